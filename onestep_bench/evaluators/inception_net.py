"""The FID Inception network (TF graph 2015-12-05) in JAX, as pytorch-fid.

A port of the network that pytorch-fid (mseitzer/pytorch-fid,
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
`<layer>.conv.bias`, drops `<layer>.bn.*`); `prepare_params` also fuses the
1x1 convs of each block (`FUSED_1X1`); `forward` runs any of the three.

Outputs (`forward`): `pool3` [N, 2048] (the FID features), `logits`
[N, 1008] = pool3 @ fc.weight without the fc bias (the TF graph's
`softmax/logits/MatMul`, used for the Inception Score by ADM and
torch-fidelity), and `spatial` (the sFID features of ADM's evaluator,
openai/guided-diffusion `evaluations/evaluator.py`: `mixed_6/conv:0`, first
7 channels, flattened; 17 x 17 x 7 = 2023 dims at 299 px). `mixed_6/conv`
is `SPATIAL_LAYER` = Mixed_6d.branch1x1 after its ReLU: the TF graph names
its blocks mixed, mixed_1, ..., mixed_10 (= Mixed_5b, 5c, 5d, 6a, 6b, 6c,
**6d**, 6e, 7a, 7b, 7c), and inside a 17x17 block `conv` is the 1x1 branch
(`tower`, `tower_1`, `tower_2` the 7x7, double-7x7 and pool branches): the
TF-to-torch weight map of torch-fidelity's converter (toshas/torch-fidelity
`inception_features.py`, `map_tf_to_pt`: 'mixed_6/conv/conv2d_params' ->
'Mixed_6d.branch1x1.conv', 'mixed_6/conv/batchnorm' -> '...branch1x1.bn').
The op named `mixed_6/conv` itself (under which `conv2d_params`, `Conv2D`
and `batchnorm` live) is the layer's output, the ReLU that `mixed_6/join`
concatenates, i.e. the output of pytorch-fid's BasicConv2d
`Mixed_6d.branch1x1` (= channels 0..191 of Mixed_6d's output).

Preprocessing (`preprocess`, uint8 NHWC in, [N, 299, 299, 3] out in [-1, 1]):
  legacy_tf (default): uint8 as float [0, 255] -> TF1 ResizeBilinear to 299
    (align_corners=False, no half-pixel centres: src = dst * in / out,
    clamped at the last pixel) -> (x - 128) / 128. What the TF graph does
    itself (TTUR, ADM, torch-fidelity, MeanFlow/Drifting).
  pytorch_fid: x / 255 -> half-pixel bilinear resize (torch
    `F.interpolate(mode='bilinear', align_corners=False)`, no antialias) ->
    2x - 1. What pytorch-fid does.
The two give different FIDs for small images; never mix them in one table.
ADM's sFID is defined on the legacy_tf input (its graph resizes itself).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from onestep_bench.evaluators import resize

MODES = ('legacy_tf', 'pytorch_fid')
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3
# sFID (ADM): `mixed_6/conv:0`[..., :7] flattened -> 17 * 17 * 7 at 299 px.
SPATIAL_LAYER = 'Mixed_6d.branch1x1'
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023

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
#
# The forward is restructured for speed, not changed: every BasicConv2d is
# conv + bias + ReLU with its BN folded (in-graph when given unfolded
# params); the 1x1 convs that read the same block input are one matmul
# (`FUSED_1X1`); a pool branch's 1x1 conv runs *before* its 3x3 average pool
# (both are linear and the pool's weights sum to 1 at every pixel, so
# relu(W pool(x) + b) = relu(pool(W x) + b), exactly in real arithmetic, on
# 32..192 instead of 192..2048 channels); VALID stride-1 3x3 convs run as
# SAME convs cropped by one pixel (the same sums: XLA:CPU's SAME kernel is
# ~2.5x faster, measured on Conv2d_2a / Conv2d_4a, bit-identical outputs).
# Float32 rounding order differs from the plain graph by ~3e-7 relative.

# The 1x1 convs reading each block's input, in output-channel order of the
# fused matmul. A pool branch, when listed, is last (pooled after the conv).
FUSED_1X1: dict[str, tuple[str, ...]] = {
    **{m: ('branch1x1', 'branch5x5_1', 'branch3x3dbl_1', 'branch_pool')
       for m in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d')},
    **{m: ('branch1x1', 'branch7x7_1', 'branch7x7dbl_1', 'branch_pool')
       for m in ('Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e')},
    'Mixed_7a': ('branch3x3_1', 'branch7x7x3_1'),
    'Mixed_7b': ('branch1x1', 'branch3x3_1', 'branch3x3dbl_1', 'branch_pool'),
    'Mixed_7c': ('branch1x1', 'branch3x3_1', 'branch3x3dbl_1'),  # max pool
}
_FUSED = '_fused1x1'  # <block>._fused1x1.weight [cin, sum cout] / .bias


def _weight_bias(p: Params, name: str) -> tuple[jax.Array, jax.Array]:
  """HWIO weight and bias of a BasicConv2d with its BN folded in."""
  w = p[f'{name}.conv.weight']
  if f'{name}.conv.bias' in p:  # folded on the host
    return w, p[f'{name}.conv.bias']
  scale = p[f'{name}.bn.weight'] * jax.lax.rsqrt(
      p[f'{name}.bn.running_var'] + BN_EPS)
  return w * scale, p[f'{name}.bn.bias'] - p[f'{name}.bn.running_mean'] * scale


def _conv_linear(x: jax.Array, w: jax.Array, s: ConvSpec) -> jax.Array:
  """The conv of a BasicConv2d without bias / ReLU, on x [N, H, W, cin]."""
  if s.kernel == (1, 1) and s.stride == 1:
    return jnp.dot(x, w[0, 0], precision=_HIGHEST)
  pad = ((s.padding[0],) * 2, (s.padding[1],) * 2)
  crop = s.stride == 1 and s.padding == (0, 0)
  if crop:  # VALID = SAME cropped by (k - 1) / 2 (odd k): XLA:CPU fast path
    pad = ((s.kernel[0] // 2,) * 2, (s.kernel[1] // 2,) * 2)
  y = jax.lax.conv_general_dilated(
      x, w, window_strides=(s.stride, s.stride), padding=pad,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=_HIGHEST)
  if crop:
    (ph, _), (pw, _) = pad
    y = y[:, ph:y.shape[1] - ph, pw:y.shape[2] - pw]
  return y


def _basic_conv(params: Params, name: str, x: jax.Array) -> jax.Array:
  """BasicConv2d on x [N, H, W, cin] -> [N, H', W', cout]."""
  w, b = _weight_bias(params, name)
  return jax.nn.relu(_conv_linear(x, w, CONV_SPECS[name]) + b)


def _fused_1x1(p: Params, m: str, x: jax.Array) -> list[jax.Array]:
  """The `FUSED_1X1[m]` branches of block m on its input x, post-ReLU."""
  names = FUSED_1X1[m]
  if f'{m}.{_FUSED}.weight' in p:  # `prepare_params`
    w, b = p[f'{m}.{_FUSED}.weight'], p[f'{m}.{_FUSED}.bias']
  else:
    wbs = [_weight_bias(p, f'{m}.{n}') for n in names]
    w = jnp.concatenate([wi[0, 0] for wi, _ in wbs], axis=1)
    b = jnp.concatenate([bi for _, bi in wbs])
  z = jnp.dot(x, w, precision=_HIGHEST)
  outs, lo = [], 0
  for n in names:
    hi = lo + CONV_SPECS[f'{m}.{n}'].cout
    zi = z[..., lo:hi]
    if n == 'branch_pool':  # conv, then the count_include_pad=False pool
      zi = _avg_pool_same(zi)
    outs.append(jax.nn.relu(zi + b[lo:hi]))
    lo = hi
  return outs


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
  b1, b5, b3, bp = _fused_1x1(p, m, x)
  b5 = _basic_conv(p, f'{m}.branch5x5_2', b5)
  b3 = _basic_conv(p, f'{m}.branch3x3dbl_2', b3)
  b3 = _basic_conv(p, f'{m}.branch3x3dbl_3', b3)
  return jnp.concatenate([b1, b5, b3, bp], axis=-1)


def _inception_b(p: Params, m: str, x: jax.Array) -> jax.Array:
  b3 = _basic_conv(p, f'{m}.branch3x3', x)
  bd = _basic_conv(p, f'{m}.branch3x3dbl_1', x)
  bd = _basic_conv(p, f'{m}.branch3x3dbl_2', bd)
  bd = _basic_conv(p, f'{m}.branch3x3dbl_3', bd)
  return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


def _inception_c(p: Params, m: str, x: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """Block output and its branch1x1 output (Mixed_6d's: the sFID layer)."""
  b1, b7, bd, bp = _fused_1x1(p, m, x)
  for i in (2, 3):
    b7 = _basic_conv(p, f'{m}.branch7x7_{i}', b7)
  for i in (2, 3, 4, 5):
    bd = _basic_conv(p, f'{m}.branch7x7dbl_{i}', bd)
  return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


def _inception_d(p: Params, m: str, x: jax.Array) -> jax.Array:
  b3, b7 = _fused_1x1(p, m, x)
  b3 = _basic_conv(p, f'{m}.branch3x3_2', b3)
  for i in (2, 3, 4):
    b7 = _basic_conv(p, f'{m}.branch7x7x3_{i}', b7)
  return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


def _inception_e(p: Params, m: str, x: jax.Array) -> jax.Array:
  if m == 'Mixed_7c':  # FIDInceptionE_2 max-pools here, as the TF graph does
    b1, b3, bd = _fused_1x1(p, m, x)
    bp = _basic_conv(p, f'{m}.branch_pool', _max_pool(x, 1, pad=1))
  else:
    b1, b3, bd, bp = _fused_1x1(p, m, x)
  b3 = jnp.concatenate([_basic_conv(p, f'{m}.branch3x3_2a', b3),
                        _basic_conv(p, f'{m}.branch3x3_2b', b3)], axis=-1)
  bd = _basic_conv(p, f'{m}.branch3x3dbl_2', bd)
  bd = jnp.concatenate([_basic_conv(p, f'{m}.branch3x3dbl_3a', bd),
                        _basic_conv(p, f'{m}.branch3x3dbl_3b', bd)], axis=-1)
  return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def forward(params: Params, x: jax.Array) -> dict[str, jax.Array]:
  """The FID Inception on preprocessed images: every output. Jit-able.

  Args:
    params: unfolded (`param_shapes()`), `fold_batchnorm`-ed or
      `prepare_params`-ed params.
    x: [N, H, W, 3] float in [-1, 1] (see `preprocess`); H = W = 299 for
      FID (the net is fully convolutional and runs on any H, W >= 75).

  Returns:
    'pool3' [N, 2048] (FID), 'logits' [N, 1008] (pool3 @ fc.weight, no
    bias: IS), 'spatial' [N, h * w * 7] (sFID: the first 7 channels of
    `SPATIAL_LAYER`, flattened in (h, w, c) order as ADM's
    `spatial_pred.reshape([N, -1])`; h = w = 17 at 299 px, 2023 dims), all
    float32.
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
  spatial = None
  for m in ('Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e'):
    x, b1 = _inception_c(p, m, x)
    if m == SPATIAL_LAYER.split('.')[0]:
      spatial = b1[..., :SPATIAL_CHANNELS].reshape(b1.shape[0], -1)
  x = _inception_d(p, 'Mixed_7a', x)
  x = _inception_e(p, 'Mixed_7b', x)
  x = _inception_e(p, 'Mixed_7c', x)
  pool3 = jnp.mean(x, axis=(1, 2))
  logits = jnp.dot(pool3, p['fc.weight'], precision=_HIGHEST)
  return {'pool3': pool3, 'logits': logits, 'spatial': spatial}


def apply(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """pool3 [N, 2048] and logits_unbiased [N, 1008] of `forward`."""
  out = forward(params, x)
  return out['pool3'], out['logits']


def prepare_params(params: Params) -> dict[str, np.ndarray]:
  """`fold_batchnorm` plus the fused 1x1 weights of `FUSED_1X1` (host)."""
  out = fold_batchnorm(params)
  for m, names in FUSED_1X1.items():
    out[f'{m}.{_FUSED}.weight'] = np.concatenate(
        [out[f'{m}.{n}.conv.weight'][0, 0] for n in names], axis=1)
    out[f'{m}.{_FUSED}.bias'] = np.concatenate(
        [out[f'{m}.{n}.conv.bias'] for n in names])
  return out


# ---------------------------------------------------------------------------
# Preprocessing.


def resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
  """[out, in] bilinear weights of `mode` (`resize.bilinear_matrix`)."""
  _check_mode(mode)
  return resize.bilinear_matrix(in_size, out_size, mode)


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

  The resize is two matmuls with precomputed interpolation matrices
  (`resize.bilinear_matrix`), fused with the scaling into the caller's jit.

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
  x = resize.resize_nhwc(
      x, resize_matrix(h, INPUT_SIZE, mode) if h != INPUT_SIZE else None,
      resize_matrix(w, INPUT_SIZE, mode) if w != INPUT_SIZE else None)
  if mode == 'pytorch_fid':
    return 2.0 * x - 1.0
  return (x - 128.0) / 128.0
