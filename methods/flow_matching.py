"""Flow matching: the multi-step baseline and f-distill's teacher.

Lipman et al. 2023, arXiv 2210.02747; rectified flow, Liu et al. 2023.

Conventions shared by every method (docs/methods/flow_matching.md §0): t = 0 is
data, t = 1 is noise.

  z_t = (1 - t) x + t e,   e ~ N(0, I)                     (linear path)
  v(z_t, t) = E[e - x | z_t]                                (marginal velocity)
  L(θ) = E_{t, x, e} || v_θ(z_t, t) - (e - x) ||²           (Lipman eq. 23)

Sampling integrates dz/dt = v_θ(z, t) from t = 1 to t = 0 on a uniform grid
with exactly `nfe` network evaluations: Euler (any nfe ≥ 1) or Heun (EDM
Alg. 1: second-order steps, the last one Euler, so nfe = 2·steps − 1 must be
odd). The network is the shared backbone called with h = 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from onestep_bench import config_check as cc
from onestep_bench import method as base

# No image-specific options (experiments/bench.py applies IMAGE_PRESET).
IMAGE_PRESET: dict[str, object] = {}


def get_config() -> ml_collections.ConfigDict:
  """Flow-matching defaults."""
  return ml_collections.ConfigDict(dict(
      # 'uniform' (Lipman et al. 2023) or 'logit_normal' (SD3, Esser et al.
      # 2024 eq. 19, with the MeanFlow values P_mean=-0.4, P_std=1.0).
      time_dist='uniform',
      p_mean=-0.4,
      p_std=1.0,
      sampler='euler',   # 'euler' | 'heun'
  ))


def sample_time(key: jax.Array, n: int, cfg: ml_collections.ConfigDict):
  """T ~ U[0, 1] or logit-normal(p_mean, p_std); [n] float32."""
  if cfg.time_dist == 'uniform':
    return jax.random.uniform(key, (n,))
  if cfg.time_dist == 'logit_normal':
    return jax.nn.sigmoid(cfg.p_mean + cfg.p_std * jax.random.normal(key, (n,)))
  raise ValueError(f"method.time_dist={cfg.time_dist!r}: use 'uniform' or "
                   "'logit_normal'.")


def bcast(t: jax.Array, x: jax.Array) -> jax.Array:
  """[B] -> [B, 1, ..., 1] to broadcast against x."""
  return t.reshape(t.shape + (1,) * (x.ndim - 1))


class Method(base.Method):
  """Linear-path flow matching with an Euler/Heun sampler."""

  supported_nfe = base.AnyNFE()

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    """Time law, sampler (Heun needs odd NFEs) and no CFG at sampling."""
    c, p = config.method, 'method'
    cc.require_choice(c, p, 'time_dist', ('uniform', 'logit_normal'))
    cc.require_real(c, p, 'p_mean', example=-0.4)
    cc.require_real(c, p, 'p_std', 0.0, lo_open=True, example=1.0)
    cc.require_choice(c, p, 'sampler', ('euler', 'heun'))
    if c.sampler == 'heun':
      for name, ev in config.evals.items():
        even = [k for k in ev.nfe if k % 2 == 0]
        if even:
          raise cc.ConfigError(
              f'evals.{name}.nfe', tuple(ev.nfe), f'holds even {even}, but '
              'Heun sampling uses nfe = 2*steps - 1 (odd)',
              f'use odd values, e.g. --config.evals.{name}.nfe="(1, 3, 5)", '
              'or --config.method.sampler=euler')
    cc.refuse_guidance(config, 'flow_matching samples without CFG')

  def velocity(self, params, z, t, y=None):
    """v_θ(z, t): the backbone at gap h = 0."""
    return self.apply(params, z, t, 0.0, y)

  def loss(self, params, batch, key, state):
    """Velocity MSE ||v_θ(z_t, t) - (e - x)||² at t ~ p(t) (Lipman eq. 23)."""
    del state
    x = batch['x']
    kt, ke = jax.random.split(key)
    t = sample_time(kt, x.shape[0], self.mcfg)
    e = jax.random.normal(ke, x.shape)
    z = (1 - bcast(t, x)) * x + bcast(t, x) * e
    err = self.velocity(params, z, t, batch.get('y')) - (e - x)
    per_sample = jnp.mean(jnp.square(err).reshape(x.shape[0], -1), -1)
    return jnp.mean(per_sample), {}

  def sample(self, params, key, n, *, nfe, labels=None, guidance=None):
    """Euler or Heun integration from t = 1 to 0 in exactly `nfe` evals."""
    self.check_nfe(nfe)
    del guidance
    z = self.noise(key, n)
    if self.mcfg.sampler == 'euler':
      ts = jnp.linspace(1.0, 0.0, nfe + 1)

      def euler(z, i):
        return z + (ts[i + 1] - ts[i]) * self.velocity(params, z, ts[i],
                                                      labels), None
      return jax.lax.scan(euler, z, jnp.arange(nfe))[0]
    if self.mcfg.sampler == 'heun':
      if nfe % 2 == 0:
        raise base.UnsupportedNFEError(
            f'Heun sampling uses nfe = 2*steps - 1 (odd); got nfe={nfe}. Use '
            "an odd nfe or method.sampler='euler'.")
      steps = (nfe + 1) // 2
      ts = jnp.linspace(1.0, 0.0, steps + 1)

      def heun(z, i):
        dt = ts[i + 1] - ts[i]
        d = self.velocity(params, z, ts[i], labels)
        z_e = z + dt * d
        d2 = self.velocity(params, z_e, ts[i + 1], labels)
        return z + dt * 0.5 * (d + d2), None
      z = jax.lax.scan(heun, z, jnp.arange(steps - 1))[0]
      return z + (ts[-1] - ts[-2]) * self.velocity(params, z, ts[-2], labels)
    raise ValueError(f"method.sampler={self.mcfg.sampler!r}: use 'euler' or "
                     "'heun'.")
