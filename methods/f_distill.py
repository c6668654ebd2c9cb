"""f-distill: one-step distillation by f-divergence distribution matching.

Xu, Nie, Vahdat 2025, "One-step Diffusion Models with f-Divergence
Distribution Matching", arXiv 2502.15681. Spec: docs/methods/f_distill.md
§3; reference code NVlabs/FastGen `methods/distribution_matching/
{f_distill,dmd2}.py`, `methods/common_loss.py`. Conventions (flow_matching):
t = 0 data, t = 1 noise, x_t = (1 - t) x + t e, so α_t = 1 - t, σ_t = t; a
velocity v = e - x gives x̂0 = x_t - t v (spec §3.9).

Networks (all the harness backbone, all initialised from the teacher P, a
flow_matching run restored from `method.teacher_workdir`): the student G
(TrainState.params), a fake score F (trained on student samples), and a small
discriminator head D. The student is the teacher's x̂0 map at t = 1:
x = G(z) = z - v_θ(z, 1), z ~ N(0, I) (1 NFE).

Objective ∫ w(t) D_f(p_t ‖ q_t) dt with r = p_t / q_t. Its gradient (paper §3,
spec §3.2) is the DMD score difference weighted per sample by h(r):
  ∇_θ D_f = E[ h(r(x_t)) (∇log q_t - ∇log p_t)(x_t) α_t ∂G/∂θ ],
  h(r) = f''(r) r²,   ∇log q_t - ∇log p_t = α_t (x̂0_F - x̂0_P) / σ_t².
f choices (`f_div`; h is f''(r) r² exactly, constants cancel in stage 2):
  rkl  -log r                      h = 1      (= DMD / DMD2)
  sf   (r+1) log((r+1)/(2r))       h = 1/(1+r)  (softened RKL)
  js   r log r - (r+1) log((r+1)/2) h = r/(1+r)
  sh   (√r - 1)²                   h = √r / 2  (squared Hellinger)
  kl   r log r                     h = r      (forward KL)
  jf   (r - 1) log r               h = 1 + r  (Jeffreys)
  neyman (1 - r)² / r              h = 2/r    (Neyman χ², FastGen key)
  alpha (r^α - α r - 1 + α)/(α(α-1)) h = r^α (Amari α, 0 < α < 1
        interpolates RKL (α→0) and FKL (α→1); α = 1/2 is 4x sq. Hellinger)
r comes from D, trained by logistic loss real-vs-student at noise level t:
its logit → log p_t/q_t (data over student). Two-stage normalisation
(FastGen `_get_f_div_weighting_h`, spec §3.4): r = clip(exp(clip(logit,
±10)), 0.1, 20); stage 1 divides r by a per-time-bin mean (10 equal bins of
t ∈ [0, 1], EMA `ratio_ema` of the batch mean, folded in before dividing;
E_q[r] = 1 per t); stage 2 h ← h / (mean_batch h + 1e-6).

Student loss (student step, every `student_update_freq`-th iteration):
  Δ = h · (x̂0_F - x̂0_P) / (mean_dims |x - x̂0_P| + 1e-6)    (no grad; the
      denominator is DMD's time-dependent weight w(t), spec §3.2)
  L_G = ½ mean((x - sg(x - Δ))²) + λ_GAN mean softplus(-D(x_t))
Fake-score + discriminator step (all other iterations), x = sg(G(z)):
  L_F = mean ‖v_F(x_t, t) - (e - x)‖²          (FM, the teacher's own loss)
  L_D = mean softplus(D(x_t)) + mean softplus(-D(x'_t')), x' ~ data, with an
        independent t', e' (FastGen gan_use_same_t_noise=False).
Each net has its own optax optimizer (AdamW from config.train; per-net lr
overrides); the student's EMA is updated every iteration (FastGen callback).

Discriminator features (`disc_features`). The shared backbones return only
x-shaped outputs, so D is a small head on (x_t, x̂0_N(x_t, t), t) where N is
the fake score (default; DMD2 §4.3 puts D on the fake score), the teacher
(FastGen), or nothing ('raw': D sees (x_t, t) only, spec §3.9 toy). x̂0_F - x̂0_P
is exactly the score difference ∝ ∇ log r, so these are informative features.
The D loss does not train F (a stop-gradient): F's *output* is the score the
VSD term uses, so unlike DMD2's shared encoder it must not be bent by D.
Flat data: MLP on [Fourier features (6 octaves) of (x_t, x̂0), sinusoidal(t)]
(a plain MLP on raw 2-D coordinates stays near-constant, h ≈ 1: it cannot
resolve std-0.1 toy modes in time); images: conv3x3, stride-2
conv4x4 + GroupNorm + SiLU down to ≤ 4x4, mean-pool, + time embedding, linear.

Multi-step students (FastGen `student_sample_steps`, spec §3.7):
`student_steps = K` trains G on the grid t_k = 1 - k/K with DMD2-style
backward simulation (the input at t_k is the student's own no-grad rollout,
re-noised: x_{t_{k+1}} = (1 - t_{k+1}) x̂0 + t_{k+1} e), not FastGen's noised
real data. It samples with any nfe dividing K on the sub-grid. K = 1 (paper).

Length (over 400 lines, on purpose): one file per method (methods/README.md),
and this method is three networks (student, fake score, discriminator head),
a family of f-divergence weights with two-stage ratio normalisation, and a
two-time-scale train step. File I/O is the harness's: the teacher run is
found, checked and restored by onestep_bench/runs.py (`load_ema_params`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from onestep_bench import config_check as cc
from onestep_bench import method as base
from onestep_bench import runs
from onestep_bench.models.embeddings import sinusoidal

PyTree = Any

# The teacher's method; experiments/bench.py and the Makefile read it to
# train the teacher first and find its run (`runs.default_workdir`) without
# naming methods.
TEACHER_METHOD = 'flow_matching'
# No image-specific options (experiments/bench.py applies IMAGE_PRESET).
IMAGE_PRESET: dict[str, Any] = {}

# Official recipes (NVlabs/FastGen) as `config.method` overrides; apply with
# `config.method.update(...)`. Sources by key (fastgen/configs/...; lines
# and the train-level values -- lr, batch, EMA, grad clip, the EDM time law
# and discriminator, which have no method key here -- in
# docs/methods/f_distill.md §3.12).
FASTGEN_CIFAR10 = dict(  # experiments/EDM/config_f_distill_cifar10.py
    f_div='kl',                  # ...cifar10.py:14
    gan_weight=1e-3,             # methods/config_dmd2.py:40
    student_update_freq=5,       # methods/config_dmd2.py:37
    ratio_lower=0.1,             # methods/config_f_distill.py:28
    ratio_upper=20.0,            # methods/config_f_distill.py:29
    logit_clip=10.0,             # fastgen/methods/.../f_distill.py:67
    ratio_normalization=True,    # methods/config_f_distill.py:32
    ratio_bins=10,               # methods/config_f_distill.py:33
    ratio_ema=0.0,               # methods/config_f_distill.py:34
    gan_same_t_noise=False,      # methods/config_dmd2.py:43
    disc_features='teacher',     # .../f_distill.py:146-153 (teacher feats)
    teacher_guidance=None,       # config.py:105 (guidance_scale unset)
    student_steps=1,             # config.py:141 (student_sample_steps)
)
FASTGEN_IMAGENET64 = dict(  # experiments/EDM/config_f_distill_in64.py
    FASTGEN_CIFAR10,
    f_div='js',                  # methods/config_f_distill.py:25 (default)
    gan_weight=3e-3,             # ...in64.py:23
    ratio_ema=0.5,               # ...in64.py:24
)
PRESETS = dict(cifar10=FASTGEN_CIFAR10, imagenet64=FASTGEN_IMAGENET64)


def get_config() -> ml_collections.ConfigDict:
  """f-distill defaults: FastGen values where they exist, toy-2D safe."""
  return ml_collections.ConfigDict(dict(
      # A flow_matching run dir of this harness (checkpoints/ + summary.json).
      # '' only with allow_untrained_teacher=True (smoke / contract tests:
      # the teacher is then a freshly initialised backbone).
      teacher_workdir='',
      allow_untrained_teacher=False,
      # FastGen FdistillConfig.f_div default 'js' (paper: JS best on IN-64 /
      # T2I; FastGen CIFAR-10 config uses 'kl'). Keys: module docstring.
      f_div='js',
      alpha=0.5,            # only for f_div='alpha' (own addition)
      # FastGen DMD2 ModelConfig: gan_loss_weight_gen 1e-3 (CIFAR-10; IN-64
      # 3e-3, SDXL 5e-3). f-distill needs it > 0 (r comes from D).
      gan_weight=1e-3,
      # FastGen student_update_freq 5 (EDM; SD1.5 10): one student step
      # per 5 iterations, the other 4 update F and D (two-time-scale rule).
      student_update_freq=5,
      # Ratio clipping and normalisation: FastGen FdistillConfig
      # (ratio_lower 0.1, ratio_upper 20, bin_num 10, ratio_ema_rate 0.0 on
      # CIFAR-10, 0.5 on IN-64); logits clamped to ±10 before exp (code).
      ratio_lower=0.1,
      ratio_upper=20.0,
      logit_clip=10.0,
      ratio_normalization=True,
      ratio_bins=10,
      ratio_ema=0.0,
      # t ~ U[t_min, t_max] for the VSD / GAN / fake-score noise: FastGen's
      # flow-teacher configs (SD1.5: uniform, min_t 0.001, max_t 0.999).
      t_min=0.001,
      t_max=0.999,
      # FastGen gan_use_same_t_noise=False: real data gets its own t and e.
      gan_same_t_noise=False,
      # Discriminator head: 'fake_score' (DMD2), 'teacher' (FastGen), 'raw'.
      # Width/depth: own toy choice (FastGen's EDM heads are conv stacks on
      # UNet features, not applicable to the shared backbones).
      disc_features='fake_score',
      disc_width=128,
      disc_depth=2,
      # Fourier octaves of D's flat inputs (own toy choice; 0 = raw
      # coordinates; images use a conv head and ignore it).
      disc_fourier=6,
      # Teacher CFG scale on x̂0 (FastGen guidance_scale; None = off; SD1.5
      # 1.75). Only used with labelled data.
      teacher_guidance=ml_collections.config_dict.placeholder(float),
      # Student steps K (FastGen student_sample_steps; paper: 1).
      student_steps=1,
      # Learning rates of G / F / D; 0 = config.train.lr. FastGen uses one
      # lr for all three (1e-4 CIFAR-10, 2e-6 IN-64, 1e-5 SD1.5) with AdamW
      # wd 0.01, no warm-up; the bench protocol's optimizer is kept here.
      lr_student=0.0,
      lr_fake=0.0,
      lr_disc=0.0,
  ))


# ====================================================== f-divergences
def _xlogx(r):
  return r * jnp.log(r)


F_DIVERGENCES: dict[str, tuple[Callable, Callable]] = {
    # name: (f(r), h(r) = f''(r) r²)
    'rkl': (lambda r: -jnp.log(r), jnp.ones_like),
    'sf': (lambda r: (r + 1) * jnp.log((r + 1) / (2 * r)),
           lambda r: 1 / (1 + r)),
    'js': (lambda r: _xlogx(r) - (r + 1) * jnp.log((r + 1) / 2),
           lambda r: r / (1 + r)),
    'sh': (lambda r: (jnp.sqrt(r) - 1)**2, lambda r: 0.5 * jnp.sqrt(r)),
    'kl': (_xlogx, lambda r: r),
    'jf': (lambda r: (r - 1) * jnp.log(r), lambda r: 1 + r),
    'neyman': (lambda r: (1 - r)**2 / r, lambda r: 2 / r),
}


def f_divergence(name: str, alpha: float = 0.5) -> tuple[Callable, Callable]:
  """(f, h) for `name` (module docstring); 'alpha' uses `alpha`."""
  if name == 'alpha':
    a = float(alpha)
    if a in (0.0, 1.0):
      raise ValueError("method.alpha must not be 0 or 1 (those limits are "
                       "f_div='rkl' and 'kl').")
    return (lambda r: (r**a - a * r - (1 - a)) / (a * (a - 1)),
            lambda r: r**a)
  if name not in F_DIVERGENCES:
    raise ValueError(f'method.f_div={name!r}: use one of '
                     f'{sorted(F_DIVERGENCES) + ["alpha"]}.')
  return F_DIVERGENCES[name]


def density_ratio(logit: jax.Array, lower: float, upper: float,
                  logit_clip: float = 10.0) -> jax.Array:
  """Ratio r = clip(exp(clip(logit, ±logit_clip)), lower, upper), fp32."""
  logit = jnp.clip(logit.astype(jnp.float32), -logit_clip, logit_clip)
  return jnp.clip(jnp.exp(logit), lower, upper)


def normalize_ratio(r: jax.Array, t: jax.Array, bins: jax.Array,
                    ema: float) -> tuple[jax.Array, jax.Array]:
  """Stage 1: r / (EMA per-t-bin mean of r + 1e-6); returns (r, new bins).

  Bins split t ∈ [0, 1] (the network's t range) into len(bins) equal
  intervals; only non-empty bins are updated, with the batch mean folded in
  before dividing (FastGen). Batch means are global under jit sharding.
  """
  n = bins.shape[0]
  idx = jnp.clip(jnp.floor(t * n).astype(jnp.int32), 0, n - 1)
  onehot = jax.nn.one_hot(idx, n, dtype=jnp.float32)
  cnt = onehot.sum(0)
  mean = (onehot * r[:, None]).sum(0) / (cnt + 1e-6)
  new = jnp.where(cnt > 0, ema * bins + (1 - ema) * mean, bins)
  return r / (new[idx] + 1e-6), new


def f_weight(r: jax.Array, h_fn: Callable) -> jax.Array:
  """Stage 2: h(r) / (mean_batch h(r) + 1e-6), [B] fp32."""
  h = h_fn(r.astype(jnp.float32))
  h = jnp.broadcast_to(h, r.shape)
  return h / (jnp.mean(h) + 1e-6)


def vsd_delta(x: jax.Array, x0_fake: jax.Array, x0_teacher: jax.Array,
              h: jax.Array) -> jax.Array:
  """Δ = h (x̂0_F - x̂0_P) / (mean_dims |x - x̂0_P| + 1e-6), no grad."""
  axes = tuple(range(1, x.ndim))
  w = 1.0 / (jnp.mean(jnp.abs(x - x0_teacher), axes, keepdims=True) + 1e-6)
  w = w * h.reshape(h.shape + (1,) * (x.ndim - 1))
  return jax.lax.stop_gradient((x0_fake - x0_teacher) * w)


def vsd_loss(x: jax.Array, delta: jax.Array) -> jax.Array:
  """½ mean((x - sg(x - Δ))²): d/dx = Δ / x.size (FastGen common_loss)."""
  return 0.5 * jnp.mean(jnp.square(x - jax.lax.stop_gradient(x - delta)))


# ================================================ discriminator head
def _dense(key, n_in, n_out):
  return {'w': jax.random.normal(key, (n_in, n_out)) / math.sqrt(n_in),
          'b': jnp.zeros((n_out,))}


def _conv(key, k, c_in, c_out):
  return {'w': jax.random.normal(key, (k, k, c_in, c_out))
               / math.sqrt(k * k * c_in), 'b': jnp.zeros((c_out,))}


def _conv_apply(p, x, stride):
  y = jax.lax.conv_general_dilated(
      x, p['w'], (stride, stride), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y + p['b']


def _group_norm(x, groups):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mu = g.mean((1, 2, 4), keepdims=True)
  var = g.var((1, 2, 4), keepdims=True)
  return ((g - mu) / jnp.sqrt(var + 1e-5)).reshape(x.shape)


_T_FREQ = 32


def fourier_features(z: jax.Array, octaves: int) -> jax.Array:
  """[B, D] -> [B, D (1 + 2 octaves)]: z, sin(2^k z), cos(2^k z), k < n."""
  if not octaves:
    return z
  a = z[..., None] * (2.0 ** jnp.arange(octaves))
  return jnp.concatenate([z, jnp.sin(a).reshape(z.shape[0], -1),
                          jnp.cos(a).reshape(z.shape[0], -1)], -1)


def disc_init(key: jax.Array, shape: tuple[int, ...], n_feat: int,
              width: int, depth: int, octaves: int = 0) -> PyTree:
  """Head params; inputs x_t and `n_feat` x-shaped feature maps (0 or 1).

  Flat data: `octaves` Fourier octaves of the inputs (MLPs are slow to learn
  high-frequency ratios; toy modes have std 0.1 on a radius-2 ring).
  """
  keys = iter(jax.random.split(key, 64))
  if len(shape) == 3:  # images [H, W, C]: conv stack to <= 4x4
    h, c = shape[0], shape[-1] * (1 + n_feat)
    p = {'stem': _conv(next(keys), 3, c, width), 'down': []}
    while h > 4:
      p['down'].append(_conv(next(keys), 4, width, width))
      h = math.ceil(h / 2)
    p['temb'] = _dense(next(keys), _T_FREQ, width)
    p['out'] = _dense(next(keys), width, 1)
    return p
  d_in = math.prod(shape) * (1 + n_feat) * (1 + 2 * octaves) + _T_FREQ
  layers = [_dense(next(keys), d_in if i == 0 else width, width)
            for i in range(depth)]
  return {'layers': layers, 'out': _dense(next(keys), width, 1)}


def disc_apply(p: PyTree, x_t: jax.Array, feat: jax.Array | None,
               t: jax.Array, octaves: int = 0) -> jax.Array:
  """Logit ≈ log p_t(x_t)/q_t(x_t): x_t, feat [B, *shape], t [B] -> [B]."""
  ins = [x_t] if feat is None else [x_t, feat]
  temb = sinusoidal(t, _T_FREQ)
  if 'stem' in p:
    z = jax.nn.silu(_conv_apply(p['stem'], jnp.concatenate(ins, -1), 1))
    for q in p['down']:
      z = _conv_apply(q, z, 2)
      z = jax.nn.silu(_group_norm(z, math.gcd(z.shape[-1], 32)))
    z = jax.nn.silu(z.mean((1, 2)) + temb @ p['temb']['w'] + p['temb']['b'])
  else:
    z = jnp.concatenate([a.reshape(a.shape[0], -1) for a in ins], -1)
    z = jnp.concatenate([fourier_features(z, octaves), temb], -1)
    for q in p['layers']:
      z = jax.nn.silu(z @ q['w'] + q['b'])
  return z @ p['out']['w'][:, 0] + p['out']['b'][0]


# ===================================================== teacher restore
class TeacherError(ValueError):
  """The teacher run cannot be used; the message names the fix."""


def load_teacher(workdir: str, config: ml_collections.ConfigDict,
                 spec: Any, expect: PyTree | None = None) -> PyTree:
  """EMA params (numpy) of a `TEACHER_METHOD` run: `runs.load_ema_params`.

  Raises:
    TeacherError: missing dir / summary / checkpoint, wrong method, other
      dataset, or a backbone that differs from `config.model` (or from the
      shapes `expect`).
  """
  try:
    return runs.load_ema_params(workdir, method=TEACHER_METHOD,
                                config=config, spec=spec, expect=expect)
  except (runs.RunError, runs.RunMismatchError) as e:
    raise TeacherError(f'config.method.teacher_workdir: {e}') from e


def _teacher_hint(config: ml_collections.ConfigDict) -> str:
  """Where the bench teacher run is and how to train it."""
  run = runs.default_workdir(TEACHER_METHOD, config.data.name, config.seed)
  return (f'--config.method.teacher_workdir={run} (train it first: make '
          f'bench METHOD={TEACHER_METHOD} DATASET={config.data.name} '
          f'SEED={config.seed})')


# ============================================================= method
def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
  return t.reshape(t.shape + (1,) * (x.ndim - 1))


class Method(base.Method):
  """f-distill with a teacher-initialised student, fake score and D head."""

  # The student step normalises its weights by batch means: h(r) / mean_batch
  # h(r) (`f_weight`) and the per-t-bin EMA of r (`normalize_ratio`, a state
  # update per step), so micro-batch gradients would not average to it.
  grad_accum_refused = ('its student loss normalises the f-weights by their '
                        'batch mean (h(r) / mean h(r)) and folds batch means '
                        'into the ratio bins, so micro-batch gradients do not '
                        'average to the global-batch gradient')

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    """f, ratio / time / D settings, student steps and the teacher source.

    The teacher run itself (existence, method, data, backbone) is checked by
    `load_teacher` in `__init__` (TeacherError), before anything compiles.
    """
    c, p = config.method, 'method'
    if not isinstance(c.teacher_workdir, str):
      raise cc.ConfigError('method.teacher_workdir', c.teacher_workdir,
                           'must be a run directory (a string)',
                           '--config.method.teacher_workdir=runs/...')
    if not cc.require_bool(c, p, 'allow_untrained_teacher') and (
        not c.teacher_workdir):
      raise cc.ConfigError(
          'method.teacher_workdir', '', 'f-distill needs a teacher (a '
          f'{TEACHER_METHOD} run of this harness)', _teacher_hint(config)
          + ', or set method.allow_untrained_teacher=True for smoke tests')
    f_div = cc.require_choice(c, p, 'f_div', [*F_DIVERGENCES, 'alpha'])
    alpha = cc.require_real(c, p, 'alpha', example=0.5)
    if f_div == 'alpha' and alpha in (0.0, 1.0):
      raise cc.ConfigError('method.alpha', alpha, "must not be 0 or 1 (those "
                           "limits are f_div='rkl' and 'kl')",
                           '--config.method.alpha=0.5')
    gan = cc.require_real(c, p, 'gan_weight', 0.0, example=1e-3)
    if gan == 0 and f_div != 'rkl':
      raise cc.ConfigError('method.gan_weight', gan, 'must be > 0: r comes '
                           'from the discriminator', "--config.method."
                           "gan_weight=1e-3, or f_div='rkl' for pure DMD")
    cc.require_int(c, p, 'student_update_freq', 2, example=5)
    lower = cc.require_real(c, p, 'ratio_lower', 0.0, lo_open=True,
                            example=0.1)
    cc.require_real(c, p, 'ratio_upper', lower, lo_open=True, example=20.0)
    cc.require_real(c, p, 'logit_clip', 0.0, lo_open=True, example=10.0)
    cc.require_bool(c, p, 'ratio_normalization')
    cc.require_int(c, p, 'ratio_bins', example=10)
    cc.require_real(c, p, 'ratio_ema', 0.0, 1.0, hi_open=True, example=0.0)
    t_min = cc.require_real(c, p, 't_min', 0.0, 1.0, hi_open=True,
                            example=0.001)
    cc.require_real(c, p, 't_max', t_min, 1.0, lo_open=True, example=0.999)
    cc.require_bool(c, p, 'gan_same_t_noise')
    cc.require_choice(c, p, 'disc_features', ('fake_score', 'teacher', 'raw'))
    cc.require_int(c, p, 'disc_width', example=128)
    cc.require_int(c, p, 'disc_depth', 0, example=2)
    cc.require_int(c, p, 'disc_fourier', 0, example=6)
    if c.teacher_guidance is not None:
      cc.require_real(c, p, 'teacher_guidance', 0.0, example=1.75)
      if not cc.labelled(config):
        raise cc.ConfigError('method.teacher_guidance', c.teacher_guidance,
                             'needs class labels, but the data is '
                             'unconditional', 'leave it unset (None)')
    k = cc.require_int(c, p, 'student_steps')
    for name in ('lr_student', 'lr_fake', 'lr_disc'):
      cc.require_real(c, p, name, 0.0, example=0.0)  # 0 = config.train.lr
    cc.check_supported_nfe(
        config, tuple(n for n in range(1, k + 1) if k % n == 0),
        f'f_distill with method.student_steps={k} (its divisors)')
    cc.refuse_guidance(config, "f_distill distils the teacher's CFG "
                       '(method.teacher_guidance) and samples without it')

  def __init__(self, config: ml_collections.ConfigDict, spec: Any):
    super().__init__(config, spec)
    c = self.mcfg
    self.h_fn = f_divergence(c.f_div, c.alpha)[1]
    if c.student_update_freq < 2:
      raise ValueError('method.student_update_freq must be >= 2 (the other '
                       'iterations train the fake score and D).')
    if c.disc_features not in ('fake_score', 'teacher', 'raw'):
      raise ValueError(f'method.disc_features={c.disc_features!r}: use '
                       "'fake_score', 'teacher' or 'raw'.")
    if c.gan_weight <= 0 and c.f_div != 'rkl':
      raise ValueError('method.gan_weight must be > 0: r comes from the '
                       "discriminator (FastGen asserts this too); use "
                       "f_div='rkl' for pure DMD.")
    k = int(c.student_steps)
    if k < 1:
      raise ValueError(f'method.student_steps={k} must be >= 1.')
    self.supported_nfe = tuple(n for n in range(1, k + 1) if k % n == 0)
    # Each net's optimizer counts its own updates (one student step per K
    # iterations, the critics the other K - 1; `base.make_optimizer`).
    kk, tc = c.student_update_freq, config.train
    self.tx = base.make_optimizer(tc, lr=c.lr_student, share=1 / kk,
                                  offset=1)
    self.tx_fake = base.make_optimizer(tc, lr=c.lr_fake, share=1 - 1 / kk,
                                       offset=1)
    self.tx_disc = base.make_optimizer(tc, lr=c.lr_disc, share=1 - 1 / kk,
                                       offset=1)
    # The teacher is read here, on the host, before anything compiles (the
    # harness jits `init`); `init` pulls it in through a host callback so
    # it is not baked into the program as a constant.
    self._teacher: PyTree | None = None
    if c.teacher_workdir:
      self._teacher = load_teacher(
          c.teacher_workdir, config, spec,
          expect=jax.eval_shape(self.net.init, jax.random.key(0)))
    elif not c.allow_untrained_teacher:
      raise TeacherError(
          'config.method.teacher_workdir is empty: f-distill needs a '
          f'{TEACHER_METHOD} run of this harness, e.g. '
          + _teacher_hint(config)
          + ', or set method.allow_untrained_teacher=True for smoke tests.')

  # ------------------------------------------------------------- state
  def upstream_compute(self) -> dict[str, float | None]:
    """The teacher run's total training FLOPs (its summary.json)."""
    wd = self.mcfg.teacher_workdir
    if not wd:
      return {}
    s = runs.read_summary(wd)
    return {f'teacher:{wd}': s.get('total_train_flops')}

  def init(self, key, example_batch):
    """Student, EMA, fake score = teacher; fresh D; ratio bins = 1."""
    del example_batch
    kt, kd = jax.random.split(key)
    if self._teacher is None:  # allow_untrained_teacher (smoke tests)
      teacher = self.net.init(kt)
    else:
      host = self._teacher
      teacher = jax.pure_callback(
          lambda: host, jax.tree.map(
              lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), host))
    copy = lambda p: jax.tree.map(jnp.array, p)
    n_feat = 0 if self.mcfg.disc_features == 'raw' else 1
    disc = disc_init(kd, tuple(self.spec.shape), n_feat, self.mcfg.disc_width,
                     self.mcfg.disc_depth, self.mcfg.disc_fourier)
    fake = copy(teacher)
    params = copy(teacher)
    return base.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state=self.tx.init(params), ema_params=copy(teacher),
        extras=dict(teacher=teacher, fake=fake,
                    fake_opt=self.tx_fake.init(fake), disc=disc,
                    disc_opt=self.tx_disc.init(disc),
                    ratio_bins=jnp.ones((self.mcfg.ratio_bins,), jnp.float32)))

  # ---------------------------------------------------------- networks
  def x0(self, params, x_t, t, y=None):
    """x̂0 = x_t - t v(x_t, t): the denoiser of any of G, F, P."""
    return x_t - _bcast(jnp.broadcast_to(t, x_t.shape[:1]), x_t) * self.apply(
        params, x_t, t, 0.0, y)

  def teacher_x0(self, teacher, x_t, t, y=None):
    """Teacher x̂0, with CFG on x̂0 when `teacher_guidance` is set."""
    out = self.x0(teacher, x_t, t, y)
    g = self.mcfg.teacher_guidance
    if g is not None and y is not None and self.spec.num_classes:
      null = jnp.full_like(y, self.spec.num_classes)
      out = out + (g - 1.0) * (out - self.x0(teacher, x_t, t, null))
    return out

  def generate(self, params, key, n, y=None):
    """Training samples of G: [n, *shape] (backward simulation if K > 1)."""
    k_steps = int(self.mcfg.student_steps)
    kz, ki, ks = jax.random.split(key, 3)
    z = self.noise(kz, n)
    if k_steps == 1:
      return self.x0(params, z, 1.0, y)
    ts = jnp.linspace(1.0, 0.0, k_steps + 1)
    idx = jax.random.randint(ki, (n,), 0, k_steps)
    sg = jax.lax.stop_gradient(params)

    def body(j, x):
      x0 = self.x0(sg, x, ts[j], y)
      e = self.noise(jax.random.fold_in(ks, j), n)
      nxt = (1 - ts[j + 1]) * x0 + ts[j + 1] * e
      return jnp.where(_bcast(j < idx, x), nxt, x)
    x_in = jax.lax.stop_gradient(jax.lax.fori_loop(0, k_steps - 1, body, z))
    return self.x0(params, x_in, ts[idx], y)

  def _time(self, key, n):
    c = self.mcfg
    return c.t_min + (c.t_max - c.t_min) * jax.random.uniform(key, (n,))

  def _noised(self, x, key):
    kt, ke = jax.random.split(key)
    t = self._time(kt, x.shape[0])
    e = jax.random.normal(ke, x.shape)
    return (1 - _bcast(t, x)) * x + _bcast(t, x) * e, t, e

  def disc(self, p, x_t, feat, t):
    """D's logit ≈ log p_t/q_t (data over student) at x_t; [B]."""
    return disc_apply(p, x_t, feat, t, self.mcfg.disc_fourier)

  def _disc_feat(self, extras, x_t, t, y, x0_fake=None):
    """D's feature map at x_t: x̂0 of F or P, or None ('raw')."""
    mode = self.mcfg.disc_features
    if mode == 'raw':
      return None
    if mode == 'fake_score':
      return self.x0(extras['fake'], x_t, t, y) if x0_fake is None else x0_fake
    return self.x0(extras['teacher'], x_t, t, y)

  # ------------------------------------------------------------ losses
  def student_loss(self, params, extras, batch, key):
    """(L_G, (metrics, new ratio bins)) of the student step."""
    c, y = self.mcfg, batch.get('y')
    n = batch['x'].shape[0]
    kg, kn = jax.random.split(key)
    x = self.generate(params, kg, n, y)
    x_t, t, _ = self._noised(x, kn)
    x0_f = self.x0(extras['fake'], x_t, t, y)
    x0_p = jax.lax.stop_gradient(self.teacher_x0(extras['teacher'], x_t, t, y))
    feat = self._disc_feat(extras, x_t, t, y, x0_f)  # grads reach x via x_t
    x0_f = jax.lax.stop_gradient(x0_f)
    logit = self.disc(extras['disc'], x_t, feat, t)
    r = density_ratio(jax.lax.stop_gradient(logit), c.ratio_lower,
                      c.ratio_upper, c.logit_clip)
    bins = extras['ratio_bins']
    r_n = r
    if c.ratio_normalization:
      r_n, bins = normalize_ratio(r, t, bins, c.ratio_ema)
    h = f_weight(r_n, self.h_fn)
    l_vsd = vsd_loss(x, vsd_delta(x, x0_f, x0_p, h))
    l_gan = jnp.mean(jax.nn.softplus(-logit))
    metrics = dict(vsd_loss=l_vsd, gan_gen=l_gan, r_mean=jnp.mean(r),
                   h_min=jnp.min(h), h_max=jnp.max(h))
    return l_vsd + c.gan_weight * l_gan, (metrics, bins)

  def critic_loss(self, nets, params, extras, batch, key):
    """(L_F + L_D, metrics): fake score (FM) and discriminator losses."""
    fake, disc = nets
    c, y, real = self.mcfg, batch.get('y'), batch['x']
    kg, kn, kr = jax.random.split(key, 3)
    x = jax.lax.stop_gradient(self.generate(params, kg, real.shape[0], y))
    x_t, t, e = self._noised(x, kn)
    v = self.apply(fake, x_t, t, 0.0, y)
    l_fm = jnp.mean(jnp.square(v - (e - x)))
    if c.gan_same_t_noise:
      t_r, xr_t = t, (1 - _bcast(t, real)) * real + _bcast(t, real) * e
    else:
      xr_t, t_r, _ = self._noised(real, kr)
    ex = dict(extras, fake=jax.lax.stop_gradient(fake))
    x0_f = x_t - _bcast(t, x_t) * jax.lax.stop_gradient(v)
    f_fake = self._disc_feat(ex, x_t, t, y, x0_f)
    f_real = self._disc_feat(ex, xr_t, t_r, y)
    lg_f = self.disc(disc, x_t, f_fake, t)
    lg_r = self.disc(disc, xr_t, f_real, t_r)
    l_d = jnp.mean(jax.nn.softplus(lg_f)) + jnp.mean(jax.nn.softplus(-lg_r))
    metrics = dict(fake_loss=l_fm, disc_loss=l_d,
                   d_acc=0.5 * (jnp.mean(lg_r > 0) + jnp.mean(lg_f < 0)))
    return l_fm + l_d, metrics

  def loss(self, params, batch, key, state):
    """The student loss L_G (the contract's `loss`; train_step is custom)."""
    loss, (metrics, _) = self.student_loss(params, state.extras, batch, key)
    return loss, metrics

  # -------------------------------------------------------- train step
  @property
  def step_cycle(self) -> int:
    """K = `student_update_freq`: one student step per K train steps."""
    return int(self.mcfg.student_update_freq)

  def step_phase(self, step: int) -> int:
    """0: student update (step % K == 0); 1: fake score + D update."""
    return 0 if step % self.step_cycle == 0 else 1

  def train_step(self, state, batch, key, phase=None):
    """Student step if step % K == 0, else fake-score + D step; EMA always.

    `phase` = `step_phase(step)` when the harness knows it statically (one
    step per dispatch): then only that branch is traced, no `lax.cond`
    (XLA:CPU ran this step ~10x slower with the cond on Fashion-MNIST).
    Same result either way (tested).

    Metrics: `loss` / `grad_norm` of the update that ran; the student-only
    metrics are reported x K on student steps (0 otherwise) and the critic
    ones x K/(K-1) on the other steps, so their mean over whole K-cycles
    (the harness logs means over 100-step windows) is the per-update mean.
    """
    kk = self.mcfg.student_update_freq
    ex = state.extras
    zero_s = {k: jnp.float32(0) for k in ('vsd_loss', 'gan_gen', 'r_mean',
                                           'h_min', 'h_max')}
    zero_c = {k: jnp.float32(0) for k in ('fake_loss', 'disc_loss', 'd_acc')}

    def student(_):
      grad_fn = jax.value_and_grad(self.student_loss, has_aux=True)
      (loss, (m, bins)), g = grad_fn(state.params, ex, batch, key)
      upd, opt = self.tx.update(g, state.opt_state, state.params)
      params = optax.apply_updates(state.params, upd)
      m = {k: v * kk for k, v in m.items()}
      out = (params, opt, ex['fake'], ex['fake_opt'], ex['disc'],
             ex['disc_opt'], bins)
      return out, dict(zero_c, **m, loss=loss, grad_norm=optax.global_norm(g))

    def critic(_):
      grad_fn = jax.value_and_grad(self.critic_loss, has_aux=True)
      (loss, m), (gf, gd) = grad_fn((ex['fake'], ex['disc']), state.params,
                                    ex, batch, key)
      uf, fopt = self.tx_fake.update(gf, ex['fake_opt'], ex['fake'])
      ud, dopt = self.tx_disc.update(gd, ex['disc_opt'], ex['disc'])
      m = {k: v * kk / (kk - 1) for k, v in m.items()}
      out = (state.params, state.opt_state, optax.apply_updates(ex['fake'], uf),
             fopt, optax.apply_updates(ex['disc'], ud), dopt, ex['ratio_bins'])
      return out, dict(zero_s, **m, loss=loss,
                       grad_norm=optax.global_norm((gf, gd)))

    if phase is None:
      out, metrics = jax.lax.cond(state.step % kk == 0, student, critic, None)
    else:
      out, metrics = (student if phase == 0 else critic)(None)
    params, opt, fake, fopt, disc, dopt, bins = out
    ema = self.update_ema(state.ema_params, params, state.step)
    metrics['param_norm'] = optax.global_norm(params)
    extras = dict(ex, fake=fake, fake_opt=fopt, disc=disc, disc_opt=dopt,
                  ratio_bins=bins)
    return state.replace(step=state.step + 1, params=params, opt_state=opt,
                         ema_params=ema, extras=extras), metrics

  # ---------------------------------------------------------- sampling
  def sample(self, params, key, n, *, nfe, labels=None, guidance=None):
    """Student steps on t_i = 1 - i/nfe, re-noising x̂0 in between."""
    self.check_nfe(nfe)
    del guidance  # teacher CFG is distilled in (teacher_guidance)
    kz, ke = jax.random.split(key)
    ts = jnp.linspace(1.0, 0.0, nfe + 1)
    x0 = self.x0(params, self.noise(kz, n), 1.0, labels)
    if nfe == 1:
      return x0

    def step(x0, i):
      e = self.noise(jax.random.fold_in(ke, i), n)
      x = (1 - ts[i]) * x0 + ts[i] * e
      return self.x0(params, x, ts[i], labels), None
    return jax.lax.scan(step, x0, jnp.arange(1, nfe))[0]
