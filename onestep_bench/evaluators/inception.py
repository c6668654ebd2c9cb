"""The FID Inception network (TF graph 2015-12-05) in JAX, as pytorch-fid.

This is a port of the network that pytorch-fid (mseitzer/pytorch-fid,
`src/pytorch_fid/inception.py`) builds from the TF 2015-12-05 graph: the
torchvision `inception_v3` skeleton (1008 classes, no aux head) with the FID
blocks swapped in:

  Mixed_5b/5c/5d  FIDInceptionA(192/256/288, pool_features=32/64/64)
  Mixed_6a        InceptionB(288)
  Mixed_6b..6e    FIDInceptionC(768, c7=128/160/160/192)
  Mixed_7a        InceptionD(768)
  Mixed_7b        FIDInceptionE_1(1280)
  Mixed_7c        FIDInceptionE_2(2048)   (max-pool branch, as in TF)

The A, C and E_1 pool branches average 3x3 windows (stride 1, pad 1) over the
valid pixels only (`count_include_pad=False`, as TF). Every `BasicConv2d` is
conv (no bias) + BatchNorm(eps=1e-3, running stats) + ReLU.

Params are a flat dict keyed by the pytorch-fid state_dict names (e.g.
`Mixed_5b.branch1x1.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`,
`fc.weight`); only the layout differs from torch: conv weights are HWIO
[kh, kw, cin, cout] and `fc.weight` is [2048, 1008] (in, out). See
`param_shapes()`. `fold_batchnorm` folds every BN into its conv (adds
`<layer>.conv.bias`, drops `<layer>.bn.*`); `apply` runs either form.

Outputs: `pool3` [N, 2048] (the FID features) and `logits_unbiased`
[N, 1008] = pool3 @ fc.weight without the fc bias, the logits of the TF
graph's `softmax/logits/MatMul` used for the Inception Score (ADM,
torch-fidelity).

Preprocessing (`preprocess`, uint8 NHWC in, [N, 299, 299, 3] out in [-1, 1]):
  legacy_tf (default): uint8 as float [0, 255] -> TF1 ResizeBilinear to 299
    (align_corners=False, no half-pixel centres: src = dst * in / out,
    clamped at the last pixel) -> (x - 128) / 128. What the TF graph does
    itself (TTUR, ADM, torch-fidelity, MeanFlow/Drifting).
  pytorch_fid: x / 255 -> half-pixel bilinear resize (torch
    `F.interpolate(mode='bilinear', align_corners=False)`, no antialias) ->
    2x - 1. What pytorch-fid does.
The two give different FIDs for small images; never mix them in one table.

Weights: convert pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` with
`python -m onestep_bench.evaluators.convert_inception` (see
`resolve_weights_path`). Files are plain `.npz`, loaded without pickle.

Provenance (recorded in every result row through the feature-net name):
  source   the converter checks the full sha256 of the .pth,
           `TORCH_WEIGHTS_SHA256` = 6726825d0af5f729cebd5821db510b11
           b1cfad8faad88a03f1befd49fb9129b2 (95,628,359 bytes; the hash
           independent projects pin for that release URL; its first 8 hex
           digits are the file name's torch-hub suffix).
  output   the converted `.npz` stores `__meta__` (JSON): `verified` (the
           source matched that hash), `source_sha256`. The output is
           deterministic (keys sorted; numpy's `savez` writes fixed zip
           timestamps), so the official conversion has one sha256,
           `OFFICIAL_NPZ_SHA256`. It cannot be computed without the real
           weights (not downloadable here): it is None until recorded from
           the first official conversion (`convert_inception` prints it);
           once set, a file claiming `verified` with another hash is refused.
  label    a file converted with `--allow_unverified`, or an older file
           without `__meta__`, is labelled `inception_v3/<preprocess>/
           unverified` (`feature_net_name`), never like the official one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

# ---------------------------------------------------------------------------
# Constants.

NAME = 'inception_v3'
MODES = ('legacy_tf', 'pytorch_fid')
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3
WEIGHTS_ENV = 'ONESTEP_INCEPTION_WEIGHTS'
DEFAULT_WEIGHTS_PATH = os.path.join('~', '.cache', 'onestep_bench',
                                    'inception_v3_fid.npz')
TORCH_WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
TORCH_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/'
                     f'download/fid_weights/{TORCH_WEIGHTS_NAME}')
# torch-hub convention: the name's hash suffix is a sha256 prefix of the file.
TORCH_WEIGHTS_SHA256_PREFIX = '6726825d'
TORCH_WEIGHTS_SHA256 = ('6726825d0af5f729cebd5821db510b11'
                        'b1cfad8faad88a03f1befd49fb9129b2')
# sha256 of the official conversion's .npz: record it here from the first
# conversion of the verified source (see the module docstring).
OFFICIAL_NPZ_SHA256: str | None = None
META_KEY = '__meta__'  # JSON provenance record inside a converted .npz
UNVERIFIED = 'unverified'  # feature-net name suffix for unverified weights

_HIGHEST = jax.lax.Precision.HIGHEST
_BN_SUFFIXES = ('bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var')

Params = Mapping[str, Any]


# ---------------------------------------------------------------------------
# Architecture.


class ConvSpec(NamedTuple):
  """One BasicConv2d: conv(no bias) + BN + ReLU."""
  cin: int
  cout: int
  kernel: tuple[int, int]
  stride: int
  padding: tuple[int, int]


def _conv_specs() -> dict[str, ConvSpec]:
  """Every BasicConv2d of the FID Inception, in forward order."""
  specs: dict[str, ConvSpec] = {}

  def add(name: str, cin: int, cout: int, kernel: int | tuple[int, int],
          stride: int = 1, padding: int | tuple[int, int] = 0) -> None:
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    p = (padding, padding) if isinstance(padding, int) else padding
    specs[name] = ConvSpec(cin, cout, k, stride, p)

  add('Conv2d_1a_3x3', 3, 32, 3, stride=2)
  add('Conv2d_2a_3x3', 32, 32, 3)
  add('Conv2d_2b_3x3', 32, 64, 3, padding=1)
  add('Conv2d_3b_1x1', 64, 80, 1)
  add('Conv2d_4a_3x3', 80, 192, 3)
  for m, cin, pool_features in (('Mixed_5b', 192, 32), ('Mixed_5c', 256, 64),
                                ('Mixed_5d', 288, 64)):
    add(f'{m}.branch1x1', cin, 64, 1)
    add(f'{m}.branch5x5_1', cin, 48, 1)
    add(f'{m}.branch5x5_2', 48, 64, 5, padding=2)
    add(f'{m}.branch3x3dbl_1', cin, 64, 1)
    add(f'{m}.branch3x3dbl_2', 64, 96, 3, padding=1)
    add(f'{m}.branch3x3dbl_3', 96, 96, 3, padding=1)
    add(f'{m}.branch_pool', cin, pool_features, 1)
  add('Mixed_6a.branch3x3', 288, 384, 3, stride=2)
  add('Mixed_6a.branch3x3dbl_1', 288, 64, 1)
  add('Mixed_6a.branch3x3dbl_2', 64, 96, 3, padding=1)
  add('Mixed_6a.branch3x3dbl_3', 96, 96, 3, stride=2)
  for m, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160),
                ('Mixed_6e', 192)):
    add(f'{m}.branch1x1', 768, 192, 1)
    add(f'{m}.branch7x7_1', 768, c7, 1)
    add(f'{m}.branch7x7_2', c7, c7, (1, 7), padding=(0, 3))
    add(f'{m}.branch7x7_3', c7, 192, (7, 1), padding=(3, 0))
    add(f'{m}.branch7x7dbl_1', 768, c7, 1)
    add(f'{m}.branch7x7dbl_2', c7, c7, (7, 1), padding=(3, 0))
    add(f'{m}.branch7x7dbl_3', c7, c7, (1, 7), padding=(0, 3))
    add(f'{m}.branch7x7dbl_4', c7, c7, (7, 1), padding=(3, 0))
    add(f'{m}.branch7x7dbl_5', c7, 192, (1, 7), padding=(0, 3))
    add(f'{m}.branch_pool', 768, 192, 1)
  add('Mixed_7a.branch3x3_1', 768, 192, 1)
  add('Mixed_7a.branch3x3_2', 192, 320, 3, stride=2)
  add('Mixed_7a.branch7x7x3_1', 768, 192, 1)
  add('Mixed_7a.branch7x7x3_2', 192, 192, (1, 7), padding=(0, 3))
  add('Mixed_7a.branch7x7x3_3', 192, 192, (7, 1), padding=(3, 0))
  add('Mixed_7a.branch7x7x3_4', 192, 192, 3, stride=2)
  for m, cin in (('Mixed_7b', 1280), ('Mixed_7c', 2048)):
    add(f'{m}.branch1x1', cin, 320, 1)
    add(f'{m}.branch3x3_1', cin, 384, 1)
    add(f'{m}.branch3x3_2a', 384, 384, (1, 3), padding=(0, 1))
    add(f'{m}.branch3x3_2b', 384, 384, (3, 1), padding=(1, 0))
    add(f'{m}.branch3x3dbl_1', cin, 448, 1)
    add(f'{m}.branch3x3dbl_2', 448, 384, 3, padding=1)
    add(f'{m}.branch3x3dbl_3a', 384, 384, (1, 3), padding=(0, 1))
    add(f'{m}.branch3x3dbl_3b', 384, 384, (3, 1), padding=(1, 0))
    add(f'{m}.branch_pool', cin, 192, 1)
  return specs


CONV_SPECS: dict[str, ConvSpec] = _conv_specs()


def param_shapes() -> dict[str, tuple[int, ...]]:
  """Name -> shape of every (unfolded) param, in this module's layout.

  Conv weights are HWIO [kh, kw, cin, cout] (torch: OIHW); `fc.weight` is
  [2048, 1008] (torch: [1008, 2048]); BN vectors and `fc.bias` as in torch.
  torch's `*.num_batches_tracked` counters are not params here.
  """
  shapes: dict[str, tuple[int, ...]] = {}
  for name, s in CONV_SPECS.items():
    shapes[f'{name}.conv.weight'] = (*s.kernel, s.cin, s.cout)
    for suffix in _BN_SUFFIXES:
      shapes[f'{name}.{suffix}'] = (s.cout,)
  shapes['fc.weight'] = (FEATURE_DIM, NUM_CLASSES)
  shapes['fc.bias'] = (NUM_CLASSES,)
  return shapes


def to_jax_layout(name: str, value: np.ndarray) -> np.ndarray:
  """A torch state_dict entry in this module's layout (a transpose only)."""
  value = np.asarray(value)
  if name.endswith('.conv.weight') and value.ndim == 4:
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # OIHW -> HWIO
  if name == 'fc.weight' and value.ndim == 2:
    return np.ascontiguousarray(value.T)
  return value


def check_params(params: Params) -> None:
  """Raises ValueError unless `params` has exactly `param_shapes()`."""
  expected = param_shapes()
  missing = sorted(set(expected) - set(params))
  unexpected = sorted(set(params) - set(expected))
  wrong = [f'{k}: got {tuple(np.shape(params[k]))}, expected {expected[k]}'
           for k in expected if k in params
           and tuple(np.shape(params[k])) != expected[k]]
  if missing or unexpected or wrong:
    def head(xs: list[str]) -> str:
      return ', '.join(xs[:8]) + (f' ... (+{len(xs) - 8})' if len(xs) > 8
                                  else '')
    raise ValueError(
        'Inception params do not match the pytorch-fid FID Inception '
        f'({len(expected)} tensors expected). missing: [{head(missing)}]; '
        f'unexpected: [{head(unexpected)}]; wrong shape: [{head(wrong)}].')


def random_params(key: jax.Array | int) -> dict[str, np.ndarray]:
  """Random unfolded params with the right shapes (for tests).

  Convs are He-normal, BN gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1^2), running
  mean ~ N(0, 0.1^2), running var ~ U(0.5, 2) (positive), fc N(0, 1/2048).
  Drawn on host with numpy, seeded by the key's bits (or an int seed).
  """
  if isinstance(key, int):
    seed = [key]
  else:
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in sorted(param_shapes().items()):
    if name.endswith('conv.weight'):
      fan_in = shape[0] * shape[1] * shape[2]
      v = rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
    elif name.endswith('bn.weight'):
      v = rng.uniform(0.5, 1.5, shape)
    elif name.endswith('bn.running_var'):
      v = rng.uniform(0.5, 2.0, shape)
    elif name == 'fc.weight':
      v = rng.standard_normal(shape) / math.sqrt(FEATURE_DIM)
    else:  # bn.bias, bn.running_mean, fc.bias
      v = 0.1 * rng.standard_normal(shape)
    out[name] = v.astype(np.float32)
  return out


def fold_batchnorm(params: Params) -> dict[str, np.ndarray]:
  """Folds every inference-mode BN into its conv (float64 math, f32 out).

  w' = w * g / sqrt(var + eps) (per output channel), b' = beta - mean * g /
  sqrt(var + eps). Returns `<layer>.conv.weight` [kh, kw, cin, cout],
  `<layer>.conv.bias` [cout], `fc.weight`, `fc.bias`. Idempotent on folded
  params.
  """
  out: dict[str, np.ndarray] = {}
  for name in CONV_SPECS:
    w = np.asarray(params[f'{name}.conv.weight'], np.float64)
    if f'{name}.conv.bias' in params:
      out[f'{name}.conv.weight'] = w.astype(np.float32)
      out[f'{name}.conv.bias'] = np.asarray(params[f'{name}.conv.bias'],
                                            np.float32)
      continue
    g = np.asarray(params[f'{name}.bn.weight'], np.float64)
    beta = np.asarray(params[f'{name}.bn.bias'], np.float64)
    mean = np.asarray(params[f'{name}.bn.running_mean'], np.float64)
    var = np.asarray(params[f'{name}.bn.running_var'], np.float64)
    scale = g / np.sqrt(var + BN_EPS)
    out[f'{name}.conv.weight'] = (w * scale).astype(np.float32)
    out[f'{name}.conv.bias'] = (beta - mean * scale).astype(np.float32)
  for k in ('fc.weight', 'fc.bias'):
    out[k] = np.asarray(params[k], np.float32)
  return out


# ---------------------------------------------------------------------------
# Forward pass.


def _basic_conv(params: Params, name: str, x: jax.Array) -> jax.Array:
  """BasicConv2d on x [N, H, W, cin] -> [N, H', W', cout]."""
  s = CONV_SPECS[name]
  y = jax.lax.conv_general_dilated(
      x, params[f'{name}.conv.weight'], window_strides=(s.stride, s.stride),
      padding=((s.padding[0],) * 2, (s.padding[1],) * 2),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=_HIGHEST)
  if f'{name}.conv.bias' in params:  # folded
    y = y + params[f'{name}.conv.bias']
  else:
    scale = params[f'{name}.bn.weight'] * jax.lax.rsqrt(
        params[f'{name}.bn.running_var'] + BN_EPS)
    y = (y - params[f'{name}.bn.running_mean']) * scale + params[
        f'{name}.bn.bias']
  return jax.nn.relu(y)


def _max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
  """3x3 max pool on [N, H, W, C] (floor mode, -inf padding)."""
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
      ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def _window_counts(n: int) -> np.ndarray:
  """Valid pixels per 3-wide, pad-1 window along an axis of length n."""
  i = np.arange(n)
  return (np.minimum(i + 1, n - 1) - np.maximum(i - 1, 0) + 1).astype(
      np.float32)


def _avg_pool_same(x: jax.Array) -> jax.Array:
  """3x3/1 avg pool, pad 1, count_include_pad=False, on [N, H, W, C]."""
  summed = jax.lax.reduce_window(
      x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
      ((0, 0), (1, 1), (1, 1), (0, 0)))
  counts = np.outer(_window_counts(x.shape[1]), _window_counts(x.shape[2]))
  return summed / counts[None, :, :, None]


def _inception_a(p: Params, m: str, x: jax.Array) -> jax.Array:
  b1 = _basic_conv(p, f'{m}.branch1x1', x)
  b5 = _basic_conv(p, f'{m}.branch5x5_2', _basic_conv(p, f'{m}.branch5x5_1',
                                                      x))
  b3 = _basic_conv(p, f'{m}.branch3x3dbl_1', x)
  b3 = _basic_conv(p, f'{m}.branch3x3dbl_2', b3)
  b3 = _basic_conv(p, f'{m}.branch3x3dbl_3', b3)
  bp = _basic_conv(p, f'{m}.branch_pool', _avg_pool_same(x))
  return jnp.concatenate([b1, b5, b3, bp], axis=-1)


def _inception_b(p: Params, m: str, x: jax.Array) -> jax.Array:
  b3 = _basic_conv(p, f'{m}.branch3x3', x)
  bd = _basic_conv(p, f'{m}.branch3x3dbl_1', x)
  bd = _basic_conv(p, f'{m}.branch3x3dbl_2', bd)
  bd = _basic_conv(p, f'{m}.branch3x3dbl_3', bd)
  return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


def _inception_c(p: Params, m: str, x: jax.Array) -> jax.Array:
  b1 = _basic_conv(p, f'{m}.branch1x1', x)
  b7 = x
  for i in (1, 2, 3):
    b7 = _basic_conv(p, f'{m}.branch7x7_{i}', b7)
  bd = x
  for i in (1, 2, 3, 4, 5):
    bd = _basic_conv(p, f'{m}.branch7x7dbl_{i}', bd)
  bp = _basic_conv(p, f'{m}.branch_pool', _avg_pool_same(x))
  return jnp.concatenate([b1, b7, bd, bp], axis=-1)


def _inception_d(p: Params, m: str, x: jax.Array) -> jax.Array:
  b3 = _basic_conv(p, f'{m}.branch3x3_2', _basic_conv(p, f'{m}.branch3x3_1',
                                                      x))
  b7 = x
  for i in (1, 2, 3, 4):
    b7 = _basic_conv(p, f'{m}.branch7x7x3_{i}', b7)
  return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


def _inception_e(p: Params, m: str, x: jax.Array, max_pool: bool
                 ) -> jax.Array:
  b1 = _basic_conv(p, f'{m}.branch1x1', x)
  b3 = _basic_conv(p, f'{m}.branch3x3_1', x)
  b3 = jnp.concatenate([_basic_conv(p, f'{m}.branch3x3_2a', b3),
                        _basic_conv(p, f'{m}.branch3x3_2b', b3)], axis=-1)
  bd = _basic_conv(p, f'{m}.branch3x3dbl_1', x)
  bd = _basic_conv(p, f'{m}.branch3x3dbl_2', bd)
  bd = jnp.concatenate([_basic_conv(p, f'{m}.branch3x3dbl_3a', bd),
                        _basic_conv(p, f'{m}.branch3x3dbl_3b', bd)], axis=-1)
  # FIDInceptionE_2 (Mixed_7c) max-pools here, as the TF graph does.
  pooled = _max_pool(x, 1, pad=1) if max_pool else _avg_pool_same(x)
  bp = _basic_conv(p, f'{m}.branch_pool', pooled)
  return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def apply(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The FID Inception on preprocessed images. Pure and jit-able.

  Args:
    params: unfolded (`param_shapes()`) or `fold_batchnorm`-ed params.
    x: [N, H, W, 3] float, in [-1, 1] (see `preprocess`); H = W = 299 for
      FID (the net is fully convolutional and runs on any H, W >= 75).

  Returns:
    pool3 [N, 2048] float32 and logits_unbiased [N, 1008] float32
    (pool3 @ fc.weight, no bias).
  """
  p = params
  x = jnp.asarray(x, jnp.float32)
  x = _basic_conv(p, 'Conv2d_1a_3x3', x)
  x = _basic_conv(p, 'Conv2d_2a_3x3', x)
  x = _basic_conv(p, 'Conv2d_2b_3x3', x)
  x = _max_pool(x, 2)
  x = _basic_conv(p, 'Conv2d_3b_1x1', x)
  x = _basic_conv(p, 'Conv2d_4a_3x3', x)
  x = _max_pool(x, 2)
  for m in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d'):
    x = _inception_a(p, m, x)
  x = _inception_b(p, 'Mixed_6a', x)
  for m in ('Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e'):
    x = _inception_c(p, m, x)
  x = _inception_d(p, 'Mixed_7a', x)
  x = _inception_e(p, 'Mixed_7b', x, max_pool=False)
  x = _inception_e(p, 'Mixed_7c', x, max_pool=True)
  pool3 = jnp.mean(x, axis=(1, 2))
  logits = jnp.dot(pool3, p['fc.weight'], precision=_HIGHEST)
  return pool3, logits


# ---------------------------------------------------------------------------
# Preprocessing.


def resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
  """[out_size, in_size] float32 bilinear interpolation weights along an axis.

  legacy_tf: src = dst * (in / out) (TF1 ResizeBilinear, align_corners=False,
  no half-pixel centres). pytorch_fid: src = max((dst + 0.5) * in / out - 0.5,
  0) (torch bilinear, align_corners=False). Then lo = floor(src), hi =
  min(lo + 1, in - 1), weights (1 - (src - lo), src - lo). Positions are
  float32 as in both libraries: TF1 rounds the product `dst * scale`; torch's
  CPU kernel rounds `scale * (dst + 0.5) - 0.5` once (an FMA), reproduced
  here by evaluating it in float64 (exact for these sizes) before rounding.
  """
  _check_mode(mode)
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
  frac = (src - lo.astype(np.float32)).astype(np.float32)
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, lo), np.float32(1) - frac)
  np.add.at(m, (rows, hi), frac)
  return m


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f'Unknown Inception preprocessing mode {mode!r}; '
                     f'expected one of {MODES}.')


def _check_images(images: Any) -> None:
  """TypeError / ValueError unless images is uint8 [N, H, W, 1 or 3]."""
  dtype = getattr(images, 'dtype', None)
  if dtype is None or np.dtype(dtype) != np.uint8:
    raise TypeError(
        f'Inception inputs must be uint8 images [N, H, W, 1|3] in [0, 255], '
        f'got dtype {dtype}. Round samples to uint8 first (e.g. np.clip('
        'np.round(x), 0, 255).astype(np.uint8)), as FID on saved PNGs does.')
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'Inception inputs must be [N, H, W, 1|3] (NHWC), got '
                     f'shape {tuple(images.shape)}.')


def preprocess(images: Any, mode: str = 'legacy_tf') -> jax.Array:
  """uint8 images -> the Inception's input. Jit-able (mode is static).

  Args:
    images: [N, H, W, 3] or [N, H, W, 1] (tiled to 3) uint8, numpy or jax.
    mode: 'legacy_tf' or 'pytorch_fid' (see the module docstring).

  Returns:
    [N, 299, 299, 3] float32 in [-1, 1].
  """
  _check_mode(mode)
  _check_images(images)
  x = jnp.asarray(images).astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.tile(x, (1, 1, 1, 3))
  if mode == 'pytorch_fid':
    x = x / 255.0
  h, w = x.shape[1], x.shape[2]
  if h != INPUT_SIZE:
    x = jnp.einsum('oh,nhwc->nowc', resize_matrix(h, INPUT_SIZE, mode), x,
                   precision=_HIGHEST)
  if w != INPUT_SIZE:
    x = jnp.einsum('ow,nhwc->nhoc', resize_matrix(w, INPUT_SIZE, mode), x,
                   precision=_HIGHEST)
  if mode == 'pytorch_fid':
    return 2.0 * x - 1.0
  return (x - 128.0) / 128.0


# ---------------------------------------------------------------------------
# Weights files.


def resolve_weights_path(weights_path: str | None = None) -> str:
  """Explicit path -> $ONESTEP_INCEPTION_WEIGHTS -> the default cache path.

  Raises:
    FileNotFoundError: the resolved file does not exist; the message says how
      to make it.
  """
  source = 'weights_path'
  path = weights_path
  if not path:
    path, source = os.environ.get(WEIGHTS_ENV), f'${WEIGHTS_ENV}'
  if not path:
    path, source = DEFAULT_WEIGHTS_PATH, 'the default path'
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    default = os.path.expanduser(DEFAULT_WEIGHTS_PATH)
    raise FileNotFoundError(
        f'FID Inception weights not found at {path} (from {source}). To make '
        f'them: on a machine with internet, download {TORCH_WEIGHTS_URL} , '
        'then run `python -m onestep_bench.evaluators.convert_inception '
        f'--src {TORCH_WEIGHTS_NAME} --dst {default}` (needs `pip install '
        "-e '.[parity]'` for torch), and copy the .npz to that path or set "
        f'{WEIGHTS_ENV}=/path/to/inception_v3_fid.npz.')
  return path


def file_sha256(path: str) -> str:
  """Hex sha256 of a file."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def load_params(path: str) -> dict[str, np.ndarray]:
  """Unfolded float32 params from a converted `.npz` (never unpickles)."""
  with np.load(path, allow_pickle=False) as f:
    params = {k: np.asarray(f[k], np.float32) for k in f.files
              if k != META_KEY}
  check_params(params)
  return params


def load_meta(path: str) -> dict[str, Any]:
  """The provenance record of a converted `.npz` ({} for older files)."""
  with np.load(path, allow_pickle=False) as f:
    if META_KEY not in f.files:
      return {}
    return json.loads(f[META_KEY].tobytes().decode())


def weights_verified(path: str) -> bool:
  """Whether the file at `path` was converted from the verified source.

  False for `--allow_unverified` conversions and for files without a
  provenance record (written before it existed: re-convert them).

  Raises:
    ValueError: the file claims `verified` but its sha256 differs from
      `OFFICIAL_NPZ_SHA256` (when that is recorded).
  """
  verified = bool(load_meta(path).get('verified', False))
  if verified and OFFICIAL_NPZ_SHA256 is not None:
    sha = file_sha256(path)
    if sha != OFFICIAL_NPZ_SHA256:
      raise ValueError(
          f'{path} claims to be the verified FID Inception conversion, but '
          f'its sha256 {sha} is not the official {OFFICIAL_NPZ_SHA256}. '
          'Re-run convert_inception on the verified source.')
  return verified


def save_params(params: Params, path: str, *, verified: bool = False,
                source_sha256: str | None = None) -> None:
  """Writes unfolded params + provenance to `path` (.npz), atomically.

  Keys are written sorted, so the same params give the same bytes.

  Args:
    params: unfolded params (`param_shapes()`).
    path: output file.
    verified: the params come from the source with `TORCH_WEIGHTS_SHA256`.
    source_sha256: sha256 of the source file, recorded as given.
  """
  check_params(params)
  arrays = {k: np.asarray(params[k], np.float32) for k in sorted(params)}
  meta = {'verified': bool(verified), 'source_sha256': source_sha256}
  arrays[META_KEY] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(),
                                   np.uint8)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Extractor.


class InceptionExtractor:
  """uint8 images -> FID features and IS logits, in jitted batches.

  `extractor(images)` with images [N, H, W, 1|3] uint8 returns
  `{'features': [N, 2048] float64, 'logits': [N, 1008] float64}`. Batches
  hold `min(batch_size, N)` images; the last partial batch is zero-padded to
  a full one and the padding sliced off (no image is dropped).
  """

  def __init__(self, weights_path: str | None = None, mode: str = 'legacy_tf',
               batch_size: int = 200):
    _check_mode(mode)
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
    self._path = resolve_weights_path(weights_path)
    self._sha256 = file_sha256(self._path)
    self._verified = weights_verified(self._path)
    self._mode = mode
    self.batch_size = int(batch_size)
    self._params = jax.device_put(fold_batchnorm(load_params(self._path)))
    self._fn = jax.jit(lambda p, im: apply(p, preprocess(im, mode)))

  @property
  def name(self) -> str:
    """Feature network name (a CSV column)."""
    return NAME

  @property
  def verified(self) -> bool:
    """Whether the weights were converted from the verified source."""
    return self._verified

  @property
  def feature_net(self) -> str:
    """`inception_v3/<mode>`, plus `/unverified` for unverified weights."""
    name = f'{NAME}/{self._mode}'
    return name if self._verified else f'{name}/{UNVERIFIED}'

  @property
  def mode(self) -> str:
    """Preprocessing mode, 'legacy_tf' or 'pytorch_fid'."""
    return self._mode

  @property
  def weights_path(self) -> str:
    """Resolved path of the weights file."""
    return self._path

  @property
  def weights_sha256(self) -> str:
    """First 16 hex digits of the weights file's sha256."""
    return self._sha256[:16]

  def __call__(self, images: Any) -> dict[str, np.ndarray]:
    """Features [N, 2048] and bias-free logits [N, 1008], both float64."""
    _check_images(images)
    images = np.asarray(images)
    n = images.shape[0]
    if n == 0:
      return {'features': np.zeros((0, FEATURE_DIM)),
              'logits': np.zeros((0, NUM_CLASSES))}
    bs = min(self.batch_size, n)
    num_batches = math.ceil(n / bs)
    feats = np.empty((n, FEATURE_DIM), np.float64)
    logits = np.empty((n, NUM_CLASSES), np.float64)

    def collect(i: int, out: tuple[jax.Array, jax.Array]) -> None:
      lo, hi = i * bs, min((i + 1) * bs, n)
      f, lg = jax.device_get(out)
      feats[lo:hi] = f[:hi - lo]
      logits[lo:hi] = lg[:hi - lo]

    pending = None
    for i in tqdm(range(num_batches), desc=f'{NAME} ({self._mode})',
                  unit='batch', disable=num_batches <= 1):
      batch = images[i * bs:(i + 1) * bs]
      if batch.shape[0] < bs:
        pad = np.zeros((bs - batch.shape[0], *batch.shape[1:]), np.uint8)
        batch = np.concatenate([batch, pad])
      out = self._fn(self._params, batch)  # async dispatch
      if pending is not None:
        collect(*pending)
      pending = (i, out)
    collect(*pending)
    return {'features': feats, 'logits': logits}
