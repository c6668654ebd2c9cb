"""sCM: continuous-time consistency models with TrigFlow (sCT and sCD).

Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time
Consistency Models", arXiv 2410.11081 (ICLR 2025): §3 TrigFlow, §4.1
parameterisation (identity c_noise), §4.2 objective (tangent warm-up,
JVP rearrangement, tangent normalisation, adaptive weighting), Alg. 1.
Reference code: NVlabs/FastGen `methods/consistency_model/sCM.py`,
`configs/methods/config_scm.py`. Spec: docs/methods/scm.md.

TrigFlow (paper §3), x0 data with std σ_d, z ~ N(0, σ_d² I), t ∈ [0, π/2]:
  x_t = cos(t) x0 + sin(t) z,   PF-ODE dx_t/dt = σ_d F(x_t/σ_d, c_noise(t))
  f_θ(x_t, t) = cos(t) x_t − sin(t) σ_d F_θ(x_t/σ_d, c_noise(t))   (f(x, 0) = x)
Alg. 1, per sample, θ⁻ = sg(θ), r = min(1, step/H) (tangent warm-up):
  τ ~ N(P_mean, P_std²),  t = arctan(e^τ / σ_d)   (proposal: tan t = e^τ/σ_d)
  dx_t/dt = cos(t) z − sin(t) x0                       (sCT)
          = σ_d F_teacher(x_t/σ_d, t)                  (sCD, teacher velocity)
  g = −cos²(t)(σ_d F_θ⁻ − dx_t/dt) − r cos(t) sin(t)(x_t + σ_d dF_θ⁻/dt)
    (= cos(t) df_θ⁻/dt at r = 1: the prior weighting 1/(σ_d tan t))
  g ← g / (‖g‖ + c)                                   (tangent normalisation)
  L = e^{w_φ(t)}/D ‖F_θ − F_θ⁻ − g‖² − w_φ(t)          (adaptive weighting)
cos(t) sin(t) dF_θ⁻/dt is one `jax.jvp` of F_θ⁻ in (x_t, t) with tangents
(cos t sin t dx_t/dt, cos t sin t) ("JVP rearrangement", §4.2). w_φ is a
linear layer on the sinusoidal embedding of c_noise(t) = t (FastGen
`logvar_linear`, sign flipped), trained jointly with θ; it lives in
`extras` with its own AdamW (it is not part of the generator).

The harness's flow-matching convention (t = 0 data, 1 noise; z_s = (1 − s) x
+ s e, e ~ N(0, I), velocity v = dz_s/ds) is TrigFlow up to a scale: with
  λ(t) = cos t + σ_d sin t,   s(t) = σ_d sin t / λ(t)   (s/(1−s) = σ_d tan t)
x_t = λ(t) z_{s(t)} (same x0, z = σ_d e), so the PF-ODEs are related by
  dx_t/dt = λ' x_t/λ + (σ_d/λ) v(x_t/λ, s(t)),   λ' = σ_d cos t − sin t.
The proposal is then logit-normal in FM time: s = sigmoid(τ). Two
parameterisations of F_θ (`parameterization`):
  'trigflow'  F_θ = backbone(x_t/σ_d, t, h = 0)   (paper: c_noise(t) = t)
  'flow'      F_θ = dx_t/dt(backbone(x_t/λ, s(t), h = 0)) / σ_d   (FastGen
              TrigFlowPrecond: the backbone is an FM velocity, so a
              flow_matching run's params are a valid F_θ; sCD initialises
              the student from the teacher, Alg. 1 θ ← θ_pretrain).
'auto' = 'trigflow' for sCT, 'flow' for sCD.

Sampling (multistep consistency sampler, Song et al. 2023 Alg. 1): x ←
f_θ(z, T) with T = arctan(σ_max/σ_d) (σ_max = 80: 1.56454 at σ_d = 0.5), then
for each later time t_i: x ← f_θ(cos t_i x + sin t_i z_i, t_i), one backbone
pass per step. 2 steps: t_1 = `mid_t` (1.1, paper); K ≥ 3: the uniform FM
grid s_i = 1 − i/K mapped to TrigFlow (own choice; at K = 2 it would give
arctan(1/σ_d) = 1.107 at σ_d = 0.5).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from onestep_bench import config_check as cc
from onestep_bench import method as base
from onestep_bench import runs
from onestep_bench.models.embeddings import sinusoidal

PyTree = Any
FFn = Any  # (x_t [B, ...], t [B]) -> F [B, ...]

# sCD's teacher method. Only `methods/scd.py` (the sCD bench entry) exports
# it as TEACHER_METHOD, so `make bench` / tuning train a teacher for sCD
# and never for sCT.
TEACHER = 'flow_matching'
IMAGE_PRESET: dict[str, Any] = {}
VARIANTS = ('sct', 'scd')


def get_config() -> ml_collections.ConfigDict:
  """The defaults: paper (Lu & Song 2024) / FastGen CIFAR-10 values."""
  return ml_collections.ConfigDict(dict(
      # 'sct': consistency training from scratch; 'scd': distillation of a
      # flow_matching run (method.teacher_workdir).
      variant='sct',
      # Data std σ_d: 0.5 for pixels in [-1, 1] (paper §3; FastGen
      # sigma_data). Toy 2D data is wider (8gaussians std ≈ 1.42): kept at
      # the paper value, documented in docs/methods/scm.md §5.
      sigma_data=0.5,
      # Proposal log(σ_d tan t) ~ N(P_mean, P_std²): paper CIFAR-10 and
      # ImageNet 64 (−1.0, 1.4) (FastGen train_p_mean/std; IN-512: −0.8,
      # 1.6).
      p_mean=-1.0,
      p_std=1.4,
      # Tangent normalisation g / (‖g‖ + c), c = 0.1 (Alg. 1; FastGen
      # tangent_warmup_const). 'rms' divides ‖g‖ by √D (FastGen
      # g_norm_spatial_invariance); 'none' is the paper's ablation.
      tangent_norm='l2',
      tangent_c=0.1,
      # Tangent warm-up r = min(1, step / H), H = frac · train.num_steps:
      # paper H = 10k iterations (§4.2) of FastGen's 350k-iteration CIFAR-10
      # sCT run (config_sct_cifar10) = 0.0286. A fraction, so short budgets
      # keep its share (10k steps would never reach r = 1 in 4000).
      tangent_warmup_frac=10_000 / 350_000,
      # Adaptive weighting w_φ(t) (§4.2); width of its sinusoidal time
      # features (FastGen: Linear(noise_channels = 128 on CIFAR-10, 1)).
      adaptive_weighting=True,
      weight_dim=128,
      # F_θ's backbone inputs: 'auto' | 'trigflow' | 'flow' (docstring).
      parameterization='auto',
      # Sampling: T = arctan(sigma_max / σ_d) (EDM σ_max = 80; FastGen
      # t_list [80, 0]); 2-step intermediate time t = 1.1 (paper §6).
      sigma_max=80.0,
      mid_t=1.1,
      # sCD teacher: a flow_matching run dir; '' only with
      # allow_untrained_teacher (smoke tests: a fresh backbone).
      teacher_workdir='',
      allow_untrained_teacher=False,
  ))


# ===================================================== TrigFlow maths
def bcast(t: jax.Array, x: jax.Array) -> jax.Array:
  """[B] -> [B, 1, ..., 1] to broadcast against x."""
  return t.reshape(t.shape + (1,) * (x.ndim - 1))


def proposal_time(tau: jax.Array, sigma_d: float) -> jax.Array:
  """Proposal t = arctan(e^τ / σ_d) (Alg. 1); FM time s(t) = sigmoid(τ)."""
  return jnp.arctan2(jnp.exp(tau), sigma_d)


def fm_time(t: jax.Array, sigma_d: float
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(s, λ, λ') of TrigFlow time t: x_t = λ z_s, s/(1 − s) = σ_d tan t."""
  cos, sin = jnp.cos(t), jnp.sin(t)
  lam = cos + sigma_d * sin
  return sigma_d * sin / lam, lam, sigma_d * cos - sin


def trig_time(s: jax.Array, sigma_d: float) -> jax.Array:
  """Inverse of `fm_time`: t = arctan(s / ((1 − s) σ_d))."""
  return jnp.arctan2(s, (1.0 - s) * sigma_d)


def trig_velocity(x_t: jax.Array, t: jax.Array, v: jax.Array,
                  sigma_d: float) -> jax.Array:
  """dx_t/dt from the FM velocity v at (x_t/λ, s(t)) (module docstring)."""
  _, lam, dlam = fm_time(t, sigma_d)
  return bcast(dlam / lam, x_t) * x_t + bcast(sigma_d / lam, x_t) * v


def fm_velocity(x_t: jax.Array, t: jax.Array, dxdt: jax.Array,
                sigma_d: float) -> jax.Array:
  """Inverse of `trig_velocity`: v = (λ/σ_d)(dx_t/dt − λ' x_t/λ)."""
  _, lam, dlam = fm_time(t, sigma_d)
  return bcast(lam / sigma_d, x_t) * (dxdt - bcast(dlam / lam, x_t) * x_t)


def consistency(big_f: jax.Array, x_t: jax.Array, t: jax.Array,
                sigma_d: float) -> jax.Array:
  """f(x_t, t) = cos(t) x_t − sin(t) σ_d F (paper §3)."""
  return (bcast(jnp.cos(t), x_t) * x_t
          - bcast(jnp.sin(t), x_t) * sigma_d * big_f)


def scm_tangent(f_minus: FFn, x_t: jax.Array, t: jax.Array,
                dxdt: jax.Array, r: jax.Array | float, sigma_d: float
                ) -> tuple[jax.Array, jax.Array]:
  """(F_θ⁻, g) of Alg. 1 before normalisation; g = cos t df/dt at r = 1.

  Args:
    f_minus: F_θ⁻(x_t, t) (constant parameters; x_t unscaled).
    x_t: [B, ...] TrigFlow points.
    t: [B] TrigFlow times.
    dxdt: [B, ...] dx_t/dt (sCT: cos t z − sin t x0; sCD: teacher).
    r: tangent warm-up weight in [0, 1].
    sigma_d: data std σ_d.
  """
  cs = jnp.cos(t) * jnp.sin(t)
  big_f, cs_df = jax.jvp(f_minus, (x_t, t), (bcast(cs, x_t) * dxdt, cs))
  g = (-bcast(jnp.cos(t)**2, x_t) * (sigma_d * big_f - dxdt)
       - r * (bcast(cs, x_t) * x_t + sigma_d * cs_df))
  return big_f, g


def normalize_tangent(g: jax.Array, mode: str, c: float) -> jax.Array:
  """Tangent g / (‖g‖ + c) per sample ('l2'), ‖g‖/√D ('rms'), or g."""
  if mode == 'none':
    return g
  flat = g.reshape(g.shape[0], -1)
  norm = jnp.linalg.norm(flat, axis=-1)
  if mode == 'rms':
    norm = norm / math.sqrt(flat.shape[1])
  elif mode != 'l2':
    raise ValueError(f"method.tangent_norm={mode!r}: use 'l2', 'rms' or "
                     "'none'.")
  return g / bcast(norm + c, g)


def weight_init(dim: int) -> dict[str, jax.Array]:
  """w_φ = 0 at init (own choice: the unweighted loss to start)."""
  return {'w': jnp.zeros((dim,), jnp.float32), 'b': jnp.zeros((),
                                                              jnp.float32)}


def weight_apply(phi: dict[str, jax.Array], t: jax.Array) -> jax.Array:
  """w_φ(t) = Linear(sinusoidal(c_noise(t) = t)), [B]."""
  return sinusoidal(t, phi['w'].shape[0]) @ phi['w'] + phi['b']


def adaptive_loss(sq_mean: jax.Array, w: jax.Array | None) -> jax.Array:
  """e^w · mean_dims(·²) − w per sample; plain mean_dims(·²) if w is None."""
  return sq_mean if w is None else jnp.exp(w) * sq_mean - w


def sample_times(nfe: int, t_max: float, mid_t: float,
                 sigma_d: float) -> np.ndarray:
  """TrigFlow times of the nfe-step sampler: [T, t_1, ..., t_{nfe-1}]."""
  if nfe == 2:
    return np.array([t_max, mid_t])
  s = 1.0 - np.arange(1, nfe) / nfe
  return np.concatenate([[t_max], np.arctan2(s, (1.0 - s) * sigma_d)])


# ===================================================== teacher restore
class TeacherError(ValueError):
  """The sCD teacher run cannot be used; the message names the fix."""


def _teacher_hint(config: ml_collections.ConfigDict) -> str:
  run = runs.default_workdir(TEACHER, config.data.name, config.seed)
  return (f'--config.method.teacher_workdir={run} (train it first: make '
          f'bench METHOD={TEACHER} DATASET={config.data.name} '
          f'SEED={config.seed})')


# ============================================================= method
class Method(base.Method):
  """sCT / sCD with the shared backbone as F_θ (module docstring)."""

  supported_nfe = base.AnyNFE()  # multistep consistency sampler

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    """Variant, TrigFlow / proposal / tangent keys, sampler, teacher."""
    c, p = config.method, 'method'
    variant = cc.require_choice(c, p, 'variant', VARIANTS)
    sd = cc.require_real(c, p, 'sigma_data', 0.0, lo_open=True, example=0.5)
    cc.require_real(c, p, 'p_mean', example=-1.0)
    cc.require_real(c, p, 'p_std', 0.0, lo_open=True, example=1.4)
    norm = cc.require_choice(c, p, 'tangent_norm', ('l2', 'rms', 'none'))
    cc.require_real(c, p, 'tangent_c', 0.0, lo_open=norm != 'none',
                    example=0.1)
    cc.require_real(c, p, 'tangent_warmup_frac', 0.0, 1.0, example=0.0286)
    if cc.require_bool(c, p, 'adaptive_weighting'):
      cc.require_int(c, p, 'weight_dim', 2, example=128)
      if c.weight_dim % 2:
        raise cc.ConfigError('method.weight_dim', c.weight_dim, 'must be '
                             'even (sinusoidal [cos, sin] features)',
                             '--config.method.weight_dim=128')
    param = cc.require_choice(c, p, 'parameterization',
                              ('auto', 'trigflow', 'flow'))
    if variant == 'scd' and param == 'trigflow':
      raise cc.ConfigError(
          'method.parameterization', param, "sCD initialises the student "
          "from the flow_matching teacher, which needs 'flow'",
          "--config.method.parameterization=auto (or 'flow')")
    smax = cc.require_real(c, p, 'sigma_max', 0.0, lo_open=True,
                           example=80.0)
    t_max = math.atan2(smax, sd)
    cc.require_real(c, p, 'mid_t', 0.0, t_max, lo_open=True, hi_open=True,
                    example=1.1)
    if not isinstance(c.teacher_workdir, str):
      raise cc.ConfigError('method.teacher_workdir', c.teacher_workdir,
                           'must be a run directory (a string)',
                           '--config.method.teacher_workdir=runs/...')
    untrained = cc.require_bool(c, p, 'allow_untrained_teacher')
    if variant == 'scd' and not c.teacher_workdir and not untrained:
      raise cc.ConfigError(
          'method.teacher_workdir', '', 'sCD needs a teacher (a '
          f'{TEACHER} run of this harness)', _teacher_hint(config))
    cc.refuse_guidance(config, 'scm samples without CFG')

  def __init__(self, config: ml_collections.ConfigDict, spec: Any):
    super().__init__(config, spec)
    c = self.mcfg
    if c.variant not in VARIANTS:
      raise ValueError(f'method.variant={c.variant!r}: use {VARIANTS}.')
    self.scd = c.variant == 'scd'
    self.param = c.parameterization
    if self.param == 'auto':
      self.param = 'flow' if self.scd else 'trigflow'
    if self.param not in ('trigflow', 'flow') or (
        self.scd and self.param != 'flow'):
      raise ValueError(f'method.parameterization={c.parameterization!r}: '
                       "use 'auto', 'trigflow' (sCT only) or 'flow'.")
    self.sigma_d = float(c.sigma_data)
    self.t_max = math.atan2(float(c.sigma_max), self.sigma_d)
    self.warmup = round(c.tangent_warmup_frac * config.train.num_steps)
    self.tx_weight = base.make_optimizer(config.train)
    # The teacher is read on the host before anything compiles (as
    # f_distill); `init` pulls it in through a host callback.
    self._teacher: PyTree | None = None
    if self.scd and c.teacher_workdir:
      try:
        self._teacher = runs.load_ema_params(
            c.teacher_workdir, method=TEACHER, config=config,
            spec=spec, expect=jax.eval_shape(self.net.init,
                                             jax.random.key(0)))
      except (runs.RunError, runs.RunMismatchError) as e:
        raise TeacherError(f'config.method.teacher_workdir: {e}') from e
    elif self.scd and not c.allow_untrained_teacher:
      raise TeacherError('config.method.teacher_workdir is empty: sCD needs '
                         f'a {TEACHER} run, e.g. '
                         + _teacher_hint(config))

  def upstream_compute(self) -> dict[str, float | None]:
    """sCD: the teacher run's training FLOPs; sCT: none."""
    wd = self.mcfg.teacher_workdir
    if not self.scd or not wd:
      return {}
    return {f'teacher:{wd}': runs.read_summary(wd).get('total_train_flops')}

  # ------------------------------------------------------------ state
  def init(self, key, example_batch):
    """sCT: fresh θ. sCD: θ = EMA = teacher (Alg. 1 θ ← θ_pretrain)."""
    del example_batch
    extras: dict[str, PyTree] = {}
    if self.scd:
      if self._teacher is None:  # allow_untrained_teacher (smoke tests)
        teacher = self.net.init(key)
      else:
        host = self._teacher
        teacher = jax.pure_callback(lambda: host, jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), host))
      extras['teacher'] = teacher
      params = jax.tree.map(jnp.array, teacher)
    else:
      params = self.net.init(key)
    if self.mcfg.adaptive_weighting:
      extras['weight'] = weight_init(self.mcfg.weight_dim)
      extras['weight_opt'] = self.tx_weight.init(extras['weight'])
    return base.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state=self.tx.init(params),
        ema_params=jax.tree.map(jnp.array, params), extras=extras)

  # --------------------------------------------------------- networks
  def trig_f(self, params, x_t, t, y=None):
    """F_θ(x_t, t) in TrigFlow units (x_t unscaled), [B, ...]."""
    t = jnp.broadcast_to(t, x_t.shape[:1])
    if self.param == 'trigflow':
      return self.apply(params, x_t / self.sigma_d, t, 0.0, y)
    s, lam, _ = fm_time(t, self.sigma_d)
    v = self.apply(params, x_t / bcast(lam, x_t), s, 0.0, y)
    return trig_velocity(x_t, t, v, self.sigma_d) / self.sigma_d

  def consistency_fn(self, params, x_t, t, y=None):
    """f_θ(x_t, t) = cos t x_t − sin t σ_d F_θ(x_t, t)."""
    t = jnp.broadcast_to(t, x_t.shape[:1])
    return consistency(self.trig_f(params, x_t, t, y), x_t, t, self.sigma_d)

  def teacher_velocity(self, teacher, x_t, t, y=None):
    """The sCD dx_t/dt: the FM teacher's velocity in TrigFlow units."""
    s, lam, _ = fm_time(t, self.sigma_d)
    v = self.apply(teacher, x_t / bcast(lam, x_t), s, 0.0, y)
    return trig_velocity(x_t, t, v, self.sigma_d)

  # ------------------------------------------------------------- loss
  def warmup_r(self, step: jax.Array | None) -> jax.Array:
    """Tangent warm-up r = min(1, step / H) (Alg. 1); 1 without a step."""
    if step is None or self.warmup <= 0:
      return jnp.float32(1.0)
    return jnp.minimum(1.0, step.astype(jnp.float32) / self.warmup)

  def loss_terms(self, params, phi, teacher, batch, key, step):
    """(loss, metrics) of Alg. 1 for θ = params and w_φ (phi or None)."""
    c, sd = self.mcfg, self.sigma_d
    x, y = batch['x'], batch.get('y')
    kt, kz = jax.random.split(key)
    t = proposal_time(c.p_mean + c.p_std * jax.random.normal(
        kt, (x.shape[0],)), sd)
    z = sd * jax.random.normal(kz, x.shape)
    x_t = bcast(jnp.cos(t), x) * x + bcast(jnp.sin(t), x) * z
    if self.scd:
      dxdt = jax.lax.stop_gradient(self.teacher_velocity(teacher, x_t, t, y))
    else:
      dxdt = bcast(jnp.cos(t), x) * z - bcast(jnp.sin(t), x) * x
    sg = jax.lax.stop_gradient(params)
    r = self.warmup_r(step)
    _, g = scm_tangent(lambda x_, t_: self.trig_f(sg, x_, t_, y), x_t, t,
                       dxdt, r, sd)
    g_raw = jnp.linalg.norm(g.reshape(x.shape[0], -1), axis=-1)
    g = jax.lax.stop_gradient(normalize_tangent(g, c.tangent_norm,
                                                c.tangent_c))
    big_f = self.trig_f(params, x_t, t, y)
    diff = big_f - jax.lax.stop_gradient(big_f) - g
    sq = jnp.mean(jnp.square(diff).reshape(x.shape[0], -1), -1)
    w = None if phi is None else weight_apply(phi, t)
    loss = jnp.mean(adaptive_loss(sq, w))
    metrics = dict(mse=jnp.mean(sq), tangent_norm=jnp.mean(g_raw),
                   warmup_r=r, t_mean=jnp.mean(t))
    if w is not None:
      metrics['weight_mean'] = jnp.mean(w)
    return loss, metrics

  def loss(self, params, batch, key, state):
    """Alg. 1 loss; `state=None` (tests): w_φ = 0, r = 1, fresh teacher."""
    ex = {} if state is None else state.extras
    phi = ex.get('weight')
    if phi is None and self.mcfg.adaptive_weighting:
      phi = weight_init(self.mcfg.weight_dim)
    teacher = ex.get('teacher', params) if self.scd else None
    return self.loss_terms(params, phi, teacher, batch, key,
                           None if state is None else state.step)

  def train_step(self, state, batch, key, phase=None):
    """One AdamW step of θ and (adaptive weighting) φ; EMA of θ.

    `grad_norm` is θ's; `weight_grad_norm` φ's.
    """
    del phase
    ex = state.extras
    phi = ex.get('weight')
    fn = lambda pp, b, k, s: self.loss_terms(pp[0], pp[1], ex.get('teacher'),
                                             b, k, s.step)
    (loss, metrics), (g, g_phi) = self.loss_and_grads(
        (state.params, phi), batch, key, state, fn)
    upd, opt = self.tx.update(g, state.opt_state, state.params)
    params = optax.apply_updates(state.params, upd)
    extras = dict(ex)
    if phi is not None:
      u_phi, extras['weight_opt'] = self.tx_weight.update(
          g_phi, ex['weight_opt'], phi)
      extras['weight'] = optax.apply_updates(phi, u_phi)
      metrics['weight_grad_norm'] = optax.global_norm(g_phi)
    ema = self.update_ema(state.ema_params, params, state.step)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(g),
                   param_norm=optax.global_norm(params))
    return state.replace(step=state.step + 1, params=params, opt_state=opt,
                         ema_params=ema, extras=extras), metrics

  # --------------------------------------------------------- sampling
  def sample(self, params, key, n, *, nfe, labels=None, guidance=None):
    """Multistep consistency sampling on `sample_times` (nfe passes)."""
    self.check_nfe(nfe)
    del guidance
    ts = sample_times(nfe, self.t_max, float(self.mcfg.mid_t), self.sigma_d)
    k0, kr = jax.random.split(key)
    x = self.consistency_fn(params, self.sigma_d * self.noise(k0, n),
                            float(ts[0]), labels)
    if nfe == 1:
      return x

    def step(x, i_t):
      i, t = i_t
      z = self.sigma_d * self.noise(jax.random.fold_in(kr, i), n)
      x_t = jnp.cos(t) * x + jnp.sin(t) * z
      return self.consistency_fn(params, x_t, t, labels), None
    steps = (jnp.arange(1, nfe), jnp.asarray(ts[1:], jnp.float32))
    return jax.lax.scan(step, x, steps)[0]
