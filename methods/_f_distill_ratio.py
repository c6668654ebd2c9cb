"""f-divergence weights and the density-ratio head of `methods/f_distill.py`.

Xu, Nie, Vahdat 2025, arXiv 2502.15681 §3 (spec docs/methods/f_distill.md
§3.2-3.4; FastGen `methods/distribution_matching/f_distill.py`,
`methods/common_loss.py`). Holds the table of f (`F_DIVERGENCES`,
`f_divergence`), the ratio r from the discriminator logit and its two-stage
normalisation (`density_ratio`, `normalize_ratio`, `f_weight`), the weighted
VSD step (`vsd_delta`, `vsd_loss`) and the discriminator head (`disc_init`,
`disc_apply`, `fourier_features`); `methods/f_distill.py` re-exports these
names. Private module (leading '_'): not a method plug-in.

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

Discriminator head (features: `methods/f_distill.py` docstring).
Flat data: MLP on [Fourier features (6 octaves) of (x_t, x̂0), sinusoidal(t)]
(a plain MLP on raw 2-D coordinates stays near-constant, h ≈ 1: it cannot
resolve std-0.1 toy modes in time); images: conv3x3, stride-2
conv4x4 + GroupNorm + SiLU down to ≤ 4x4, mean-pool, + time embedding, linear.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from onestep_bench.models.embeddings import sinusoidal

PyTree = Any


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
