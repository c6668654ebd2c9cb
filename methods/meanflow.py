"""MeanFlow: one-step generation by regressing the average velocity.

Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for One-step Generative
Modeling", arXiv 2505.13447 (Sec. 4). Spec: docs/methods/meanflow.md §1, written
from the official JAX code (Gsunshine/meanflow) and the official PyTorch
CIFAR-10 code (Gsunshine/py-meanflow). Conventions (spec §0): t = 0 is data,
t = 1 is noise, z_t = (1 - t) x + t e, conditional velocity v = e - x.

  u(z_t, r, t) = 1/(t - r) ∫_r^t v(z_τ, τ) dτ,   r ≤ t      (eq. 3)
  u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t)      (eq. 6, identity)
  d/dt u = v ∂_z u + ∂_t u   (dr/dt = 0)                     (eq. 8)
  L(θ) = E ‖u_θ(z_t, r, t) - sg(u_tgt)‖²,                     (eq. 9)
  u_tgt = v - (t - r)(v ∂_z u_θ + ∂_t u_θ)                   (eq. 10)
  z_r = z_t - (t - r) u(z_t, r, t)                            (eq. 12)

(Equation numbers as recalled from the paper; the spec sections are
authoritative.) The network is the shared backbone u_θ(z, t, h, y) with gap
h = t - r; d/dt u is one `jax.jvp` with tangents (v, 1, 0) on (z, t, r), so
the t-tangent flows through both the t and the h = t - r embeddings.
Adaptive loss weighting (Sec. 4.3, spec §1.3.6): with L = Σ_dims (u_θ - u_tgt)²
per sample (a sum, not a mean), the loss is L / sg((L + c)^p); p = 0 is plain
L2, and the gradient is ∇L / (L + c)^p. Samples with r = t have u_tgt = v:
plain flow matching, which the method needs to anchor the instantaneous
velocity.

CFG is folded into training (Sec. 4.2, spec §1.5), used only when the data
has labels: ṽ = ω v + κ u_θ(z, t, 0, y) + (1 - ω - κ) u_θ(z, t, 0, ∅) for t in
[t_start, t_end] (effective scale ω / (1 - κ)); ṽ replaces v in the tangent
and the target. Sampling stays one forward pass per step and ignores the
`guidance` argument. Sampling: 1-NFE x = e - u_θ(e, t=1, h=1); K-NFE on the
uniform grid t_i = 1 - i/K: z ← z - (t_i - t_{i+1}) u_θ(z, t_i, t_i - t_{i+1}).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from onestep_bench import config_check as cc
from onestep_bench import method as base

UFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


# Official recipes as `config.method` overrides (spec §1.4, §1.8). The
# defaults in `get_config` are the toy-2D choice (see its comments).
OFFICIAL_IMAGENET = dict(  # Gsunshine/meanflow configs/default.py
    time_dist='logit_normal', tr_rule='sort', p_mean_t=-0.4, p_std_t=1.0,
    p_mean_r=-0.4, p_std_r=1.0, ratio_r_neq_t=0.25, mask_rule='prefix',
    adaptive_p=1.0, adaptive_c=0.01)
PY_MEANFLOW_CIFAR10_V1 = dict(  # Gsunshine/py-meanflow scripts/cifar10_v1.sh
    time_dist='logit_normal', tr_rule='min', p_mean_t=-0.6, p_std_t=1.6,
    p_mean_r=-4.0, p_std_r=1.6, ratio_r_neq_t=0.75, mask_rule='random',
    adaptive_p=0.75, adaptive_c=1e-3)
# The image preset `experiments/bench.py` applies on every image dataset (read
# by convention, like TEACHER_METHOD): py-meanflow's CIFAR-10 recipe.
IMAGE_PRESET = PY_MEANFLOW_CIFAR10_V1


def get_config() -> ml_collections.ConfigDict:
  """MeanFlow defaults: the official values (Geng et al. 2025, official JAX).

  The bench protocol runs these paper defaults on every dataset; values
  measured on the ranked toy sets earlier (kept in the comments) are no
  longer defaults: they are candidates of the declared tuning procedure
  (experiments/tuning.py, protocol `tuned`).
  """
  return ml_collections.ConfigDict(dict(
      # (t, r) sampler (spec §1.4). Two draws a, b from time_dist:
      # 'sort': t = max(a, b), r = min(a, b) (official JAX `sample_tr`, and
      # py-meanflow v0); 'min': t = a, r = min(b, a) (py-meanflow v1).
      tr_rule='sort',
      # 'logit_normal' sigmoid(N(p_mean, p_std)) or 'uniform'. Official:
      # logit-normal (paper Tab. 1c: uniform 65.9 vs 61.1 FID). Earlier
      # toy measurement (on the ranked sets, so not a default): uniform,
      # energy distance at 1 NFE, p=0, ratio 0.75, 2 seeds: 8gaussians
      # 0.0035 vs 0.0040, checkerboard 0.0013 vs 0.0020.
      time_dist='logit_normal',
      # Logit-normal (mean, std) of the t and r draws. Official JAX ImageNet:
      # both (-0.4, 1.0). py-meanflow CIFAR v0: both (-2.0, 2.0); v1:
      # t (-0.6, 1.6), r (-4.0, 1.6) with tr_rule='min'.
      p_mean_t=-0.4,
      p_std_t=1.0,
      p_mean_r=-0.4,
      p_std_r=1.0,
      # Fraction of samples with r ≠ t (the rest have r = t: flow matching).
      # Official JAX ImageNet 0.25 (`data_proportion` 0.75 have r = t; paper
      # ablation Tab. 1a: 0 fails at 1-NFE, 0.25 best); py-meanflow CIFAR
      # 0.75. Earlier toy measurement (ranked sets, not a default): 1-NFE
      # energy distance at p=0, 8gaussians / checkerboard: 0.25 -> 0.0087 /
      # 0.0035, 0.5 -> 0.0058 / 0.0025, 0.75 -> 0.0040 / 0.0020.
      ratio_r_neq_t=0.25,
      # 'prefix': a fixed floor((1 - ratio) B) batch prefix has r = t, and
      # class dropout drops a Bin(B, p) prefix, so dropped labels get r = t
      # (official JAX). 'random': independent Bernoulli masks (py-meanflow,
      # zhuyu-cs/MeanFlow). Equal in expectation on i.i.d. batches.
      mask_rule='prefix',
      # Adaptive weight L / sg((L + c)^p). Official JAX ImageNet p=1.0,
      # c=0.01 (paper Tab. 1e: p=1 best); py-meanflow CIFAR p=0.75, c=1e-3.
      # Earlier toy measurement (ranked sets, not a default): p=0 (plain
      # L2, the unbiased conditional-mean regression); p=1 sharpened modes
      # (8gaussians mode std 0.05 vs true 0.1) and was 5x worse on
      # checkerboard (1-NFE energy distance 0.017 vs 0.0035).
      adaptive_p=1.0,
      adaptive_c=0.01,
      # CFG in training, labelled data only (spec §1.5). Official B/4
      # ablation default ω=1, κ=0.5 (ω' = 2) on t ∈ [0, 1]; L/2 uses
      # ω=0.2, κ=0.92 on [0, 0.8]. ω=1, κ=0 disables guidance.
      cfg_omega=1.0,
      cfg_kappa=0.5,
      cfg_t_start=0.0,
      cfg_t_end=1.0,
      # Label dropout to the null class (official JAX: 0.1).
      class_dropout=0.1,
      # Sampling grid t_i = 1 - i/K (community sampler; official JAX
      # default for 1/2 steps is the same [1, 0] / [1, 0.5, 0]), spec §1.6.
      time_grid='uniform',
  ))


def bcast(t: jax.Array, x: jax.Array) -> jax.Array:
  """[B] -> [B, 1, ..., 1] to broadcast against x."""
  return t.reshape(t.shape + (1,) * (x.ndim - 1))


def mean_flow_jvp(u_fn: UFn, z: jax.Array, t: jax.Array, r: jax.Array,
                  v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Average velocity u and its total time derivative du/dt (eq. 8).

  Args:
    u_fn: u(z, t, r) -> [B, ...], the average velocity over [r, t].
    z: [B, ...] points z_t.
    t: [B] start (noisier) times.
    r: [B] end times, r ≤ t.
    v: [B, ...] velocity dz/dt used as the z-tangent.

  Returns:
    (u, du/dt) = u_fn(z, t, r) and v ∂_z u + ∂_t u (r held fixed).
  """
  return jax.jvp(u_fn, (z, t, r), (v, jnp.ones_like(t), jnp.zeros_like(r)))


def mean_flow_target(u_fn: UFn, z: jax.Array, t: jax.Array, r: jax.Array,
                     v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns u and the target sg(v - clip(t - r, 0, 1) du/dt) (eq. 10)."""
  u, dudt = mean_flow_jvp(u_fn, z, t, r, v)
  gap = bcast(jnp.clip(t - r, 0.0, 1.0), z)
  return u, jax.lax.stop_gradient(v - gap * dudt)


def adaptive_weighted(sq_err: jax.Array, p: float, c: float) -> jax.Array:
  """L / sg((L + c)^p) per sample, with L the per-sample sum of sq_err."""
  per_sample = jnp.sum(sq_err.reshape(sq_err.shape[0], -1), -1)
  if p == 0:
    return per_sample
  return per_sample / jax.lax.stop_gradient((per_sample + c)**p)


class Method(base.Method):
  """MeanFlow with the shared backbone u_θ(z, t, h = t - r, y)."""

  supported_nfe = base.AnyNFE()  # eq. 12 applied on any K-step grid

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    """(t, r) sampler, adaptive weight, training CFG; no sampling CFG."""
    c, p = config.method, 'method'
    cc.require_choice(c, p, 'tr_rule', ('sort', 'min'))
    cc.require_choice(c, p, 'time_dist', ('uniform', 'logit_normal'))
    for k in ('p_mean_t', 'p_mean_r'):
      cc.require_real(c, p, k, example=-0.4)
    for k in ('p_std_t', 'p_std_r'):
      cc.require_real(c, p, k, 0.0, lo_open=True, example=1.0)
    cc.require_prob(c, p, 'ratio_r_neq_t')
    cc.require_choice(c, p, 'mask_rule', ('prefix', 'random'))
    adaptive_p = cc.require_real(c, p, 'adaptive_p', 0.0, example=1.0)
    # (L + c)^p with c = 0 divides by zero on a sample with L = 0.
    cc.require_real(c, p, 'adaptive_c', 0.0, lo_open=adaptive_p > 0,
                    example=0.01)
    cc.require_real(c, p, 'cfg_omega', 0.0, lo_open=True, example=1.0)
    cc.require_real(c, p, 'cfg_kappa', 0.0, 1.0, hi_open=True, example=0.5)
    start = cc.require_prob(c, p, 'cfg_t_start')
    cc.require_real(c, p, 'cfg_t_end', start, 1.0, example=1.0)
    cc.require_prob(c, p, 'class_dropout')
    cc.require_choice(c, p, 'time_grid', ('uniform',))
    cc.refuse_guidance(config, 'meanflow folds CFG into training '
                       '(method.cfg_omega / cfg_kappa) and samples without it')

  def average_velocity(self, params: base.PyTree, z: jax.Array, t: jax.Array,
                       r: jax.Array, y: jax.Array | None = None) -> jax.Array:
    """u_θ(z, r, t) = backbone(z, t, h = t - r, y)."""
    return self.apply(params, z, t, t - r, y)

  def _draw_time(self, key: jax.Array, n: int, mean: float,
                 std: float) -> jax.Array:
    if self.mcfg.time_dist == 'uniform':
      return jax.random.uniform(key, (n,))
    if self.mcfg.time_dist == 'logit_normal':
      return jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,)))
    raise ValueError(f'method.time_dist={self.mcfg.time_dist!r}: use '
                     "'logit_normal' or 'uniform'.")

  def _mask(self, key: jax.Array, n: int, frac: float,
            prefix_count: jax.Array | int) -> jax.Array:
    """[n] bool with rate `frac`: a batch prefix or a Bernoulli mask."""
    if self.mcfg.mask_rule == 'prefix':
      return jnp.arange(n) < prefix_count
    if self.mcfg.mask_rule == 'random':
      return jax.random.bernoulli(key, frac, (n,))
    raise ValueError(f'method.mask_rule={self.mcfg.mask_rule!r}: use '
                     "'prefix' or 'random'.")

  def sample_tr(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """(t, r), each [n] float32 with r ≤ t; spec §1.4.

    The t draw uses `key` exactly as flow_matching draws its t, so a
    logit-normal run with tr_rule='min' and ratio 0 reproduces it bit for bit.
    """
    c = self.mcfg
    a = self._draw_time(key, n, c.p_mean_t, c.p_std_t)
    b = self._draw_time(jax.random.fold_in(key, 1), n, c.p_mean_r, c.p_std_r)
    if c.tr_rule == 'sort':
      t, r = jnp.maximum(a, b), jnp.minimum(a, b)
    elif c.tr_rule == 'min':
      t, r = a, jnp.minimum(b, a)
    else:
      raise ValueError(f"method.tr_rule={c.tr_rule!r}: use 'sort' or 'min'.")
    n_eq = int(n * (1.0 - c.ratio_r_neq_t) + 1e-6)  # official: int(0.75 B)
    eq = self._mask(jax.random.fold_in(key, 2), n, 1.0 - c.ratio_r_neq_t,
                    n_eq)
    return t, jnp.where(eq, t, r)

  def guided_velocity(self, params: base.PyTree, z: jax.Array, t: jax.Array,
                      v: jax.Array, y: jax.Array, key: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """(ṽ, y_in): CFG-mixed velocity and dropped-out labels; spec §1.5."""
    c, b = self.mcfg, z.shape[0]
    null = jnp.full_like(y, self.spec.num_classes)
    n_drop = jnp.sum(jax.random.bernoulli(key, c.class_dropout, (b,)))
    drop = self._mask(jax.random.fold_in(key, 1), b, c.class_dropout, n_drop)
    v_g = v
    if c.cfg_omega != 1.0 or c.cfg_kappa != 0.0:
      on = bcast((t >= c.cfg_t_start) & (t <= c.cfg_t_end), z)
      omega = jnp.where(on, c.cfg_omega, 1.0)
      kappa = jnp.where(on, c.cfg_kappa, 0.0)
      u_null = self.apply(params, z, t, 0.0, null)
      v_g = omega * v + (1.0 - omega - kappa) * u_null
      if c.cfg_kappa != 0.0:
        v_g = v_g + kappa * self.apply(params, z, t, 0.0, y)
      v_g = jax.lax.stop_gradient(v_g)
    return jnp.where(bcast(drop, z), v, v_g), jnp.where(drop, null, y)

  def loss(self, params, batch, key, state):
    """MeanFlow loss (eqs. 9-10, adaptive weight); spec §1.3.

    Metrics: `mse` mean per-sample Σ(u - u_tgt)² (the unweighted loss);
    `v_loss` mean Σ(u - v)² over the r = t samples only (their flow-matching
    error against e - x; r ≠ t samples do not regress v); `frac_r_neq_t`.
    """
    del state
    c, x, y = self.mcfg, batch['x'], batch.get('y')
    kt, ke = jax.random.split(key)  # as flow_matching (see sample_tr)
    t, r = self.sample_tr(kt, x.shape[0])
    e = jax.random.normal(ke, x.shape)
    z = (1 - bcast(t, x)) * x + bcast(t, x) * e
    v = e - x
    v_in, y_in = v, y
    if self.spec.num_classes > 0 and y is not None:
      v_in, y_in = self.guided_velocity(params, z, t, v, y,
                                        jax.random.fold_in(key, 3))
    u_fn = lambda z_, t_, r_: self.average_velocity(params, z_, t_, r_, y_in)
    u, u_tgt = mean_flow_target(u_fn, z, t, r, v_in)
    sq = jnp.square(u - u_tgt)
    loss = jnp.mean(adaptive_weighted(sq, c.adaptive_p, c.adaptive_c))
    eq = (t == r).astype(jnp.float32)
    v_err = jnp.sum(jnp.square(u - v).reshape(x.shape[0], -1), -1)
    metrics = dict(
        mse=jnp.mean(jnp.sum(sq.reshape(x.shape[0], -1), -1)),
        v_loss=jnp.sum(eq * v_err) / jnp.maximum(jnp.sum(eq), 1.0),
        frac_r_neq_t=1.0 - jnp.mean(eq))
    return loss, metrics

  def sample(self, params, key, n, *, nfe, labels=None, guidance=None):
    """K = nfe jumps on the uniform grid 1 → 0 (eq. 12); guidance unused."""
    self.check_nfe(nfe)
    del guidance  # CFG is folded into training (spec §1.5)
    if self.mcfg.time_grid != 'uniform':
      raise ValueError(f'method.time_grid={self.mcfg.time_grid!r}: only '
                       "'uniform' is defined.")
    ts = jnp.linspace(1.0, 0.0, nfe + 1)

    def jump(z, i):
      t, s = ts[i], ts[i + 1]
      return z - (t - s) * self.average_velocity(params, z, t, s, labels), None

    return jax.lax.scan(jump, self.noise(key, n), jnp.arange(nfe))[0]
