"""iMF: improved MeanFlow, the MeanFlow identity as a loss on v.

Geng, Lu, Wu, Shechtman, Kolter, He 2025, "Improved Mean Flows: On the
Challenges of Fastforward Generative Models", arXiv 2512.02012 (Sec. 4.1 the
v-loss, Sec. 4.2 guidance as conditioning; section numbers recalled, the
paper body was not readable). Spec: docs/methods/imeanflow.md,
written from the official JAX code (Lyy-iiis/imeanflow: `imf.py` class
`iMeanFlow`, `models/imfDiT.py`, `configs/default.py`), which this file
follows (the `[imf.py ...]` tags). Conventions as methods/meanflow.py: t = 0
is data, t = 1 noise, z_t = (1 - t) x + t e, sample velocity v_t = e - x.

MeanFlow identity read as an identity on the instantaneous velocity:

  v(z_t, t) = u(z_t, r, t) + (t - r) d/dt u(z_t, r, t)             (Sec. 4.1)
  V_θ(z_t) = u_θ(z_t, r, t) + (t - r) sg(JVP(u_θ; v_θ))   (compound function)
  JVP(u; v) = v ∂_z u + ∂_t u           (one jax.jvp, tangents (v, 1, 0))
  L_u = ‖V_θ - v_g‖²,  L_v = ‖v_θ - v_g‖²     (per-sample sums; aux head)
  loss = mean_B [ L_u / sg((L_u + c)^p) + L_v / sg((L_v + c)^p) ]

[imf.py forward]. What changes vs MeanFlow (whose u_tgt = v_t - (t - r)
JVP(u_θ; v_t) has the same value and gradient as ‖V - v_t‖² with tangent v_t,
`mean_flow_jvp` / `adaptive_weighted` are imported from methods/meanflow.py):
the JVP tangent is the network's own velocity v_θ(z_t, t) instead of the
sample velocity e - x, so V_θ is a function of z_t alone and the loss is a
plain regression onto e - x. v_θ comes from an auxiliary head
(`v_head='aux'`, official default; here a second copy of the shared backbone
called at h = 0, training only) or from the boundary u_θ(z, t, t)
(`v_head='boundary'`, the paper's other variant). A prefix of
`data_proportion` of the batch has r = t (then V = u_θ(z, t, t): flow
matching). Time law: t, r = sort of two logit-normal draws
[imf.py sample_tr].

Guidance (labelled data): the CFG scale ω is an input, drawn per sample from
p(ω) ∝ ω^-β on [1, ω_max] [imf.py sample_cfg_scale] and fed to the backbone
as g = 1 - 1/ω [imfDiT._build_sequence]. The guided target, whose fixed point
is the guided field ω v_c + (1 - ω) v_u:

  v_g = v_t + (1 - 1/ω) (v_θ(z_t | y, ω) - v_θ(z_t | ∅, 1))   [guidance_fn]

Label dropout (a prefix of Bin(B, p) samples) sets the null label and
v_g = v_t [cond_drop]. The official CFG-interval conditioning (t_min, t_max
tokens) is not available through the shared backbone (one guidance input):
guidance acts on all t. Sampling (eq. 12 of MeanFlow, [imf.py
sample_one_step]): z ← z - (t_i - t_{i+1}) u_θ(z, t_i, t_i - t_{i+1} | y, ω)
on t_i = 1 - i/K; `guidance` is ω.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from methods import meanflow as mf
from onestep_bench import config_check as cc
from onestep_bench import method as base

bcast = mf.bcast
UFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# The authors publish no small-image recipe (ImageNet-256 latents only), so
# image runs use the official defaults below unchanged.
IMAGE_PRESET: dict[str, object] = {}


def get_config() -> ml_collections.ConfigDict:
  """Official defaults of improved MeanFlow (Lyy-iiis/imeanflow)."""
  return ml_collections.ConfigDict(dict(
      # t, r = max / min of two draws sigmoid(N(p_mean, p_std)) (imf.py
      # `sample_tr`, `logit_normal_dist`; configs/default.py P_mean=-0.4,
      # P_std=1.0, the same law for both draws).
      p_mean=-0.4,
      p_std=1.0,
      # Batch fraction (a prefix) with r = t (configs/default.py
      # `data_proportion`=0.5; MeanFlow's official value was 0.75).
      data_proportion=0.5,
      # Source of v_θ, the JVP tangent: 'aux' (a separate velocity network
      # trained by L_v; imf.py `u_fn` "By default, we use auxiliary v-head",
      # imfDiT `v_heads`; paper B/2 objective ablation 1-NFE FID 5.68) or
      # 'boundary' (v_θ = u_θ(z, t, t); 5.97; MeanFlow baseline 6.17).
      v_head='aux',
      # Time inputs of the backbone: 't_and_h' (t and h = t - r, as
      # meanflow) or 'h_only' (official: imfDiT `__call__` "We don't
      # explicitly condition on time t, only on h = t - r", after Sun et
      # al. 2025, arXiv 2502.13129). Default 't_and_h': a 2-D point does
      # not reveal its noise level, so 'h_only' cannot represent v there.
      time_cond='t_and_h',
      # Adaptive weight L / sg((L + c)^p) on L_u and L_v separately
      # (configs/default.py norm_p=1.0, norm_eps=0.01; imf.py `adp_wt_fn`).
      norm_p=1.0,
      norm_eps=0.01,
      # CFG scale ω ~ p(ω) ∝ ω^-β on [1, cfg_omega_max] (imf.py
      # `sample_cfg_scale`: s_max=7.0, so ω ∈ [1, 8]; configs cfg_beta=1.0,
      # log-uniform ω). Labelled data only; cfg_omega_max = 1: no CFG.
      cfg_beta=1.0,
      cfg_omega_max=8.0,
      # Label dropout to the null class (configs/default.py
      # class_dropout_prob=0.1; a prefix of Bin(B, 0.1) samples).
      class_dropout=0.1,
      # ω of evals with guidance=None. Official evaluation uses ω = 8.0 on
      # the interval [0.4, 0.65] for B/2 (configs/eval_config.yml), tied to
      # the interval conditioning this plug-in lacks: 1.0 (no guidance)
      # until a scale is chosen per model (the point of flexible CFG).
      sample_omega=1.0,
  ))


def sample_tr(key: jax.Array, n: int, p_mean: float, p_std: float,
              data_proportion: float) -> tuple[jax.Array, jax.Array]:
  """(t, r), [n] each, r ≤ t; the first int(n·data_proportion) have r = t.

  [imf.py sample_tr]: two logit-normal draws, sorted.
  """
  k1, k2 = jax.random.split(key)
  draw = lambda k: jax.nn.sigmoid(p_mean + p_std * jax.random.normal(k, (n,)))
  a, b = draw(k1), draw(k2)
  t, r = jnp.maximum(a, b), jnp.minimum(a, b)
  n_fm = int(n * data_proportion + 1e-6)
  return t, jnp.where(jnp.arange(n) < n_fm, t, r)


def sample_omega(key: jax.Array, n: int, beta: float,
                 omega_max: float) -> jax.Array:
  """ω ~ p(ω) ∝ ω^-β on [1, omega_max], inverse CDF [sample_cfg_scale].

  β = 1: log-uniform, ω = omega_max^u; else ω = (1 + u (omega_max^(1-β) -
  1))^(1/(1-β)), u ~ U[0, 1].
  """
  u = jax.random.uniform(key, (n,))
  log_max = jnp.log(jnp.float32(omega_max))
  if beta == 1.0:
    return jnp.exp(u * log_max)
  inner = jnp.log1p(u * jnp.expm1((1.0 - beta) * log_max))
  return jnp.exp(inner / (1.0 - beta))


def guided_target(v_t: jax.Array, v_c: jax.Array, v_u: jax.Array,
                  omega: jax.Array) -> jax.Array:
  """v_g = v_t + (1 - 1/ω)(v_c - v_u); [imf.py guidance_fn].

  If v_c = ω v_cond + (1 - ω) v_u and E[v_t | z] = v_cond, then
  E[v_g | z] = v_c: the guided field is the fixed point.
  """
  return v_t + bcast(1.0 - 1.0 / omega, v_t) * (v_c - v_u)


def compound_velocity(u_fn: UFn, z: jax.Array, t: jax.Array, r: jax.Array,
                      v_tangent: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(u, V) with V = u + (t - r) sg(JVP(u; v_tangent)); [imf.py forward].

  The gradient flows through u only (the JVP is stop-gradiented), so
  ∇‖V - v‖² = ∇‖u - sg(v - (t - r) JVP)‖²: MeanFlow's loss when the
  tangent is v.
  """
  u, dudt = mf.mean_flow_jvp(u_fn, z, t, r, v_tangent)
  return u, u + bcast(t - r, z) * jax.lax.stop_gradient(dudt)


class Method(base.Method):
  """iMF with u_θ = the shared backbone (z, t | h = t - r, y, g = 1 - 1/ω)."""

  guidance_input = True  # see base.Method.guidance_input

  supported_nfe = base.AnyNFE()  # the jump z_r = z_t - (t - r) u on any grid

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    """Time law, v-head, weighting, ω law and the evals' guidance."""
    c, p = config.method, 'method'
    cc.require_real(c, p, 'p_mean', example=-0.4)
    cc.require_real(c, p, 'p_std', 0.0, lo_open=True, example=1.0)
    cc.require_prob(c, p, 'data_proportion')
    cc.require_choice(c, p, 'v_head', ('aux', 'boundary'))
    cc.require_choice(c, p, 'time_cond', ('t_and_h', 'h_only'))
    norm_p = cc.require_real(c, p, 'norm_p', 0.0, example=1.0)
    # (L + c)^p with c = 0 divides by zero on a sample with L = 0.
    cc.require_real(c, p, 'norm_eps', 0.0, lo_open=norm_p > 0, example=0.01)
    cc.require_real(c, p, 'cfg_beta', example=1.0)
    w_max = cc.require_real(c, p, 'cfg_omega_max', 1.0, example=8.0)
    cc.require_prob(c, p, 'class_dropout')
    cc.require_real(c, p, 'sample_omega', 1.0, w_max, example=1.0)
    embed = bool(config.model.get('guidance_embed', False))
    if not (cc.labelled(config) and w_max > 1.0):
      cc.refuse_guidance(config, 'this iMF run trains without CFG (unlabelled '
                         'data or method.cfg_omega_max=1)')
      return
    if not embed:
      raise cc.ConfigError(
          'model.guidance_embed', embed, 'must be True: iMF on labelled data '
          f'feeds the CFG scale ω ∈ [1, {w_max}] to the backbone',
          '--config.model.guidance_embed=True (or --config.method.'
          'cfg_omega_max=1.0 for no CFG)')
    for name, g in cc.guidance_evals(config):
      if not cc.is_real(g) or not 1.0 <= g <= w_max:
        raise cc.ConfigError(
            f'evals.{name}.guidance', g, f'must be a CFG scale ω in [1, '
            f'{w_max}] (the trained range, method.cfg_omega_max)',
            f'--config.evals.{name}.guidance=1.0')

  def __init__(self, config: ml_collections.ConfigDict, spec):
    super().__init__(config, spec)
    self.guidance_embed = bool(config.model.get('guidance_embed', False))
    self.cfg = bool(spec.num_classes and self.mcfg.cfg_omega_max > 1.0)
    if self.cfg and not self.guidance_embed:
      raise ValueError('iMF with CFG on labelled data feeds ω to the backbone:'
                       ' set --config.model.guidance_embed=True (or '
                       '--config.method.cfg_omega_max=1.0).')

  # ----------------------------------------------------------------- nets
  def init(self, key: jax.Array, example_batch: base.Batch) -> base.TrainState:
    """Params {'u'} (+ {'v'}: the aux velocity net), EMA = params."""
    del example_batch
    ku, kv = jax.random.split(key)
    params = {'u': self.net.init(ku)}
    if self.mcfg.v_head == 'aux':
      params['v'] = self.net.init(kv)
    return base.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state=self.tx.init(params), ema_params=params,
        extras=self.init_extras(key, params))

  def _call(self, net_params, z, t, h, y, omega):
    """Backbone call with iMF's inputs: t dropped for 'h_only', g = 1 - 1/ω."""
    if self.mcfg.time_cond == 'h_only':
      t = jnp.zeros_like(jnp.asarray(t, jnp.float32))
    g = 1.0 - 1.0 / jnp.asarray(omega, jnp.float32)
    return super().apply(net_params, z, t, h, y,
                         g if self.guidance_embed else None)

  def apply(self, params, x, t, h=None, y=None, g=None):
    """One u-net forward; `params` is the full {'u'[, 'v']} dict."""
    if self.guidance_embed and g is None:
      g = 0.0  # ω = 1
    return super().apply(params['u'], x, t, h, y, g)

  def average_velocity(self, params, z, t, r, y=None, omega=1.0):
    """u_θ(z, r, t | y, ω) = u-net(z, t, h = t - r, y, 1 - 1/ω)."""
    return self._call(params['u'], z, t, t - r, y, omega)

  def instantaneous_velocity(self, params, z, t, y=None, omega=1.0):
    """v_θ(z, t | y, ω): the aux net at h = 0, or the boundary u_θ(z, t, t)."""
    net = params['v'] if self.mcfg.v_head == 'aux' else params['u']
    return self._call(net, z, t, 0.0, y, omega)

  # ----------------------------------------------------------------- loss
  def draw(self, key: jax.Array, batch: base.Batch) -> dict[str, jax.Array]:
    """All randomness of one loss: t, r, e, ω, label-dropout mask."""
    c, x, y = self.mcfg, batch['x'], batch.get('y')
    n = x.shape[0]
    kt, ke, kw, kd = jax.random.split(key, 4)
    t, r = sample_tr(kt, n, c.p_mean, c.p_std, c.data_proportion)
    d = dict(t=t, r=r, e=jax.random.normal(ke, x.shape),
             omega=jnp.ones((n,), jnp.float32), drop=jnp.zeros((n,), bool))
    if self.spec.num_classes and y is not None:
      if self.cfg:
        d['omega'] = sample_omega(kw, n, c.cfg_beta, c.cfg_omega_max)
      n_drop = jnp.sum(jax.random.bernoulli(kd, c.class_dropout, (n,)))
      d['drop'] = jnp.arange(n) < n_drop  # official prefix [cond_drop]
    return d

  def loss_terms(self, params, x, y, d) -> dict[str, jax.Array]:
    """Per-sample L_u, L_v (sums over dims) and the pieces; [imf.py forward].

    Args:
      params: {'u'[, 'v']}.
      x: [B, ...] data.
      y: [B] labels or None.
      d: a `draw` (t, r, e, omega, drop).
    """
    t, r, e, omega = d['t'], d['r'], d['e'], d['omega']
    z = (1 - bcast(t, x)) * x + bcast(t, x) * e
    v_t = e - x
    sg = jax.lax.stop_gradient
    aux = self.mcfg.v_head == 'aux'
    labelled = self.spec.num_classes > 0 and y is not None
    y_in, v_g = y, v_t
    # Tangent v_c: v_θ at the labels before dropout [guidance_fn, forward].
    v_pred = self.instantaneous_velocity(params, z, t, y, omega)
    v_c = sg(v_pred)
    if labelled:
      null = jnp.full_like(y, self.spec.num_classes)
      if self.cfg:
        v_u = sg(self.instantaneous_velocity(params, z, t, null, 1.0))
        v_g = guided_target(v_t, v_c, v_u, omega)
      drop = d['drop']
      y_in = jnp.where(drop, null, y)
      v_g = jnp.where(bcast(drop, x), v_t, v_g)
      if aux:  # L_v sees the dropped labels, as the official head does
        v_pred = self.instantaneous_velocity(params, z, t, y_in, omega)
    v_g = sg(v_g)
    u_fn = lambda z_, t_, r_: self.average_velocity(params, z_, t_, r_, y_in,
                                                    omega)
    u, big_v = compound_velocity(u_fn, z, t, r, v_c)
    per = lambda a: jnp.sum(jnp.square(a).reshape(a.shape[0], -1), -1)
    return dict(u=u, V=big_v, v=v_pred, v_g=v_g, loss_u=per(big_v - v_g),
                loss_v=per(v_pred - v_g) if aux else jnp.zeros_like(t))

  def loss(self, params, batch, key, state):
    """The loss (Sec. 4.1): adaptive-weighted L_u (+ L_v with the aux head).

    Metrics (official names, means over batch and dims): `loss_u`
    mean (V - v_g)², `loss_v` mean (v_θ - v_g)² (the boundary head's too,
    untrained by it), `frac_r_neq_t`.
    """
    del state
    c = self.mcfg
    d = self.draw(key, batch)
    terms = self.loss_terms(params, batch['x'], batch.get('y'), d)
    dim = terms['u'][0].size
    loss = mf.adaptive_weighted(terms['loss_u'], c.norm_p, c.norm_eps)
    if c.v_head == 'aux':
      loss = loss + mf.adaptive_weighted(terms['loss_v'], c.norm_p,
                                         c.norm_eps)
    v_err = jnp.mean(jnp.square(terms['v'] - terms['v_g']))
    metrics = dict(loss_u=jnp.mean(terms['loss_u']) / dim, loss_v=v_err,
                   frac_r_neq_t=jnp.mean((d['t'] != d['r']).astype(
                       jnp.float32)))
    return jnp.mean(loss), metrics

  # ------------------------------------------------------------- sampling
  def guidance_scale(self, labels, guidance) -> float:
    """The ω a sampling call uses (static); ValueError outside training."""
    if not self.cfg:
      if guidance not in (None, 1.0):
        raise ValueError(f'guidance={guidance}: this iMF model trains without '
                         'CFG (unlabelled data or cfg_omega_max=1); sample '
                         'with guidance=None.')
      return 1.0
    w = self.mcfg.sample_omega if guidance is None else float(guidance)
    if not 1.0 <= w <= self.mcfg.cfg_omega_max:
      raise ValueError(f'guidance={w}: iMF was trained on ω ∈ [1, '
                       f'{self.mcfg.cfg_omega_max}] (method.cfg_omega_max).')
    del labels
    return w

  def sample(self, params, key, n, *, nfe, labels=None, guidance=None):
    """K = nfe jumps on t_i = 1 - i/K [imf.py sample_one_step]; ω = guidance."""
    self.check_nfe(nfe)
    omega = self.guidance_scale(labels, guidance)
    ts = jnp.linspace(1.0, 0.0, nfe + 1)

    def jump(z, i):
      t, s = ts[i], ts[i + 1]
      u = self.average_velocity(params, z, t, s, labels, omega)
      return z - (t - s) * u, None

    return jax.lax.scan(jump, self.noise(key, n), jnp.arange(nfe))[0]
