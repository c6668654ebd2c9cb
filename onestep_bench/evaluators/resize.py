"""Image / grid resizing as separable interpolation matrices (exact, jit-able).

Every resize the feature networks need is linear and separable: along each
axis the output is `M @ input` for an [out, in] weight matrix M that depends
only on the sizes. Precomputing M on the host (numpy) and applying it with
two matmuls inside the jitted forward reproduces the reference libraries'
kernels while costing a few hundred MFLOP per batch. The matrices:

  bilinear_matrix(in, out, 'legacy_tf')    TF1 `ResizeBilinear`
      (align_corners=False, no half-pixel centres): src = dst * in / out.
  bilinear_matrix(in, out, 'pytorch_fid')  torch `F.interpolate(mode=
      'bilinear', align_corners=False)`: src = max((dst + .5) in / out - .5, 0).
  bicubic_matrix(in, out, scale_factor=)   torch `F.interpolate(mode=
      'bicubic', align_corners=False, antialias=False)` (Keys cubic, A=-0.75,
      edge taps clamped), with torch's `scale_factor` semantics when given
      (the sampling step is 1 / scale_factor, not in / out).
  bicubic_aa_matrix(in, out)               torch `F.interpolate(mode=
      'bicubic', antialias=True)`: the PIL-style filter (Keys cubic, a=-0.5,
      support 2 * max(in / out, 1), weights cut at the borders and
      renormalised), as `_upsample_bicubic2d_aa` (aten UpSampleKernel.cpp,
      `HelperInterpCubic::aa_filter`, taken from Pillow `Resample.c`).

Sample positions are rounded to float32 where the reference kernels compute
them in float32 (see `bilinear_matrix`); the weights themselves are computed
in float64 and stored as float32 (the kernels' float32 weights differ by
rounding only, ~1e-7 relative).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

BILINEAR_MODES = ('legacy_tf', 'pytorch_fid')
_HIGHEST = jax.lax.Precision.HIGHEST


def _from_taps(out_size: int, in_size: int, idx: np.ndarray,
               w: np.ndarray) -> np.ndarray:
  """[out, in] float32 matrix from per-row tap indices and weights."""
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.repeat(np.arange(out_size), idx.shape[1])
  np.add.at(m, (rows, idx.ravel()), w.ravel())
  return m.astype(np.float32)


def bilinear_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
  """[out_size, in_size] float32 bilinear interpolation weights along an axis.

  legacy_tf: src = dst * (in / out) (TF1 ResizeBilinear, align_corners=False,
  no half-pixel centres). pytorch_fid: src = max((dst + 0.5) * in / out - 0.5,
  0) (torch bilinear, align_corners=False). Then lo = floor(src), hi =
  min(lo + 1, in - 1), weights (1 - (src - lo), src - lo). Positions are
  float32 as in both libraries: TF1 rounds the product `dst * scale`; torch's
  CPU kernel rounds `scale * (dst + 0.5) - 0.5` once (an FMA), reproduced
  here by evaluating it in float64 (exact for these sizes) before rounding.
  """
  if mode not in BILINEAR_MODES:
    raise ValueError(f'Unknown bilinear resize mode {mode!r}; expected one '
                     f'of {BILINEAR_MODES}.')
  scale = np.float32(in_size / out_size)
  dst = np.arange(out_size, dtype=np.float32)
  if mode == 'legacy_tf':
    src = dst * scale
  else:  # torch's float32 fused multiply-add: one rounding of the exact value
    src = np.maximum(
        (np.float64(scale) * (dst.astype(np.float64) + 0.5) - 0.5).astype(
            np.float32), np.float32(0))
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo.astype(np.float32)).astype(np.float64)
  return _from_taps(out_size, in_size, np.stack([lo, hi], 1),
                    np.stack([1.0 - frac, frac], 1))


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel W(x) with parameter a (support 2)."""
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int,
                   scale_factor: float | None = None) -> np.ndarray:
  """[out_size, in_size] weights of torch's bicubic resize (no antialias).

  torch `upsample_bicubic2d` (align_corners=False): step = 1 / scale_factor
  when a scale factor is given (torch passes it to the kernel unless
  `recompute_scale_factor=True`), else in / out, rounded to float32;
  src = step * (dst + 0.5) - 0.5 (not clamped, rounded to float32);
  x0 = min(floor(src), in - 1), t = clip(src - x0, 0, 1); taps x0-1 .. x0+2
  clamped to [0, in - 1] with Keys' cubic weights (A = -0.75):
  W(t + 1), W(t), W(1 - t), W(2 - t).
  """
  if scale_factor is not None:
    step = np.float32(1.0 / float(scale_factor))
  else:
    step = np.float32(in_size / out_size)
  dst = np.arange(out_size, dtype=np.float64)
  src = (np.float64(step) * (dst + 0.5) - 0.5).astype(np.float32).astype(
      np.float64)
  x0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src - x0, 0.0, 1.0)
  offsets = np.arange(-1, 3)
  idx = np.clip(x0[:, None] + offsets[None, :], 0, in_size - 1)
  w = _cubic(t[:, None] - offsets[None, :], -0.75)
  return _from_taps(out_size, in_size, idx, w)


def bicubic_aa_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] weights of torch's antialiased bicubic resize.

  As aten `_compute_indices_min_size_weights_aa` with `aa_filter` (Keys
  cubic, a = -0.5, Pillow's): scale = in / out, support = 2 * max(scale, 1);
  for output i the centre is scale * (i + 0.5), the taps are
  [xmin, xmax) with xmin = max(int(centre - support + 0.5), 0) and xmax =
  min(int(centre + support + 0.5), in), the weight of tap j is
  W((j - centre + 0.5) / max(scale, 1)), normalised to sum to 1 (taps
  outside the image are dropped, not clamped). The identity for in == out.

  The kernel computes all of this in float32 (its opmath type), and the
  tap offsets j - centre lose up to half an ulp of the centre (1.5e-5 at
  centre ~170): the same float32 operations are done here, op by op
  (without FMA contraction), so the matrix matches torch's weights to
  ~1e-7 instead of ~1e-5.
  """
  f32 = np.float32
  scale = f32(f32(in_size) / f32(out_size))
  support = f32(2.0 * float(scale)) if scale >= 1.0 else f32(2.0)
  inv = f32(1.0 / float(scale)) if scale >= 1.0 else f32(1.0)
  a = f32(-0.5)
  max_taps = int(math.ceil(float(support))) * 2 + 1
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    centre = f32(float(scale) * (i + 0.5))
    lo = max(int(float(f32(centre - support)) + 0.5), 0)
    n = min(int(float(f32(centre + support)) + 0.5), in_size) - lo
    n = min(max(n, 0), max_taps)
    d = (np.arange(lo, lo + n).astype(f32) - centre).astype(f32)
    x = np.abs(((d.astype(np.float64) + 0.5) * float(inv)).astype(f32))
    near = ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)
    far = ((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a
    w = np.where(x < 1, near, np.where(x < 2, far, f32(0))).astype(f32)
    total = f32(0)
    for v in w:  # sequential float32 sum, as the kernel's loop
      total = f32(total + v)
    m[i, lo:lo + n] = (w / total).astype(f32) if total != 0 else w
  return m


def resize_nhwc(x: jax.Array, rows: np.ndarray | None,
                cols: np.ndarray | None) -> jax.Array:
  """Separable resize of x [N, H, W, C]: rows [H', H], cols [W', W].

  None skips an axis. Two matmuls at HIGHEST precision (float32 on every
  backend; TF32 would cost ~1e-3 relative on GPUs).
  """
  if rows is not None:
    x = jnp.einsum('oh,nhwc->nowc', rows, x, precision=_HIGHEST)
  if cols is not None:
    x = jnp.einsum('ow,nhwc->nhoc', cols, x, precision=_HIGHEST)
  return x


def resize_grid(grid: np.ndarray, rows: np.ndarray,
                cols: np.ndarray) -> np.ndarray:
  """Host (float64) separable resize of grid [H, W, D] -> [H', W', D]."""
  g = np.asarray(grid, np.float64)
  g = np.einsum('oh,hwd->owd', rows.astype(np.float64), g)
  return np.einsum('ow,hwd->hod', cols.astype(np.float64), g)


def check_square(n: int, what: str) -> int:
  """sqrt(n) for a perfect square n, else ValueError naming `what`."""
  r = math.isqrt(n)
  if r * r != n:
    raise ValueError(f'{what}: {n} positions is not a square grid.')
  return r
