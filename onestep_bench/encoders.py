"""Frozen self-supervised feature encoders: a ResNet trained as a masked AE.

Deng, Li, Li, Du, He 2026, "Generative Modeling via Drifting", arXiv
2602.04770, App. A.3 (ResNet-MAE encoder and its pre-training) and A.5 (the
multi-scale feature dictionary). Spec: docs/methods/drifting.md §1.5,
§1.11 ("a ResNet-MAE trained by the harness on the same training set").

The harness trains the encoder once per (dataset content, recipe), on the
training split only and without labels, and caches the EMA weights under
`cache_dir()/encoders/<key>.npz` (plain arrays, no pickle) with a JSON
sidecar of metadata. `load_or_train(dataset) -> FrozenEncoder`; a method
stores `encoder.params` in its state and calls the pure function
`encoder.features(params, x)` inside its jitted step. The encoder is a
network of its own: it shares nothing with the evaluator's feature network
(`evaluators/classifier.py`), which is trained on labels.

Architecture (§1.5, scaled down): a 3×3 stride-1 stem conv + GroupNorm +
ReLU; stages of basic blocks (two 3×3 convs with GN, ReLU; a 1×1 conv + GN
shortcut when the shape changes) with widths [C, 2C, 4C, ...], stride 2 in
the first block of every stage after the first (SAME padding, so 7×7 → 4×4);
GroupNorm on every stage output. GN groups: the largest divisor of the
channel count ≤ `max_groups` (32) that leaves ≥ `min_group_channels` (8,
the paper's 256 / 32) channels per group: at our widths (16-64) plain
"≤ 32" would make GN an InstanceNorm and the stage outputs' global mean /
std features constants (`num_groups`). The pre-training decoder is a small
U-Net: a bridge conv on the last stage, then per skip (deepest first) a
bilinear resize to the skip's size, concat, GN, [3×3 conv + GN + ReLU] ×
`decoder_convs`, and a final 1×1 conv to the input channels.

MAE pre-training (§1.5): p×p patches are zeroed independently with
probability 0.5; the loss is the L2 reconstruction error on the masked
pixels only; AdamW (β 0.9/0.95, wd 0.01), linear warmup then constant lr;
an EMA of the encoder weights is what gets frozen. Deviations, for images of
8²-32² on two CPU cores: width C = 16 with one block per stage and three
stages; small random shifts (+ flips when the dataset says `hflip`) instead
of RandomResizedCrop(0.2-1); 800 steps at batch 64 instead of 30k at 8192;
the EMA decay is warmed up as min(ema, (1 + t) / (10 + t)) so a short run
does not keep the init weights; weights are initialized in numpy
(`_Functional.init`); GN keeps ≥ 8 channels per group (above).
Cost of `RECIPE` at 600 steps (2 shared CPU cores, CPU time incl. compile and
evaluation): digits ≈ 38 CPU-s (training 32), Fashion-MNIST ≈ 240 CPU-s
(training 208, evaluation 32); a cache hit takes < 0.5 s. The masked-pixel
test MSE and k-NN sanity accuracies are in `FrozenEncoder.info`.

Feature dictionary (§1.5, paper A.5), every value [B, L, C_key]:
  `norm_x`            per-channel RMS of the input, sqrt(mean x² + 1e-6), L=1.
  For every map `a` in (stem, each stage output after its GN, and with
  `block_features` every 2nd block output inside a stage that is not the
  stage's last block), keys `<map>/<stat>`:
  `loc`               per-location vectors (L = H·W);
  `mean`, `std`       global mean and std over locations (L = 1),
                      std = sqrt(var + 1e-6);
  `mean_2x2`, `std_2x2`, `mean_4x4`, `std_4x4`
                      mean / std over non-overlapping p×p windows
                      (L = H·W / p²), only when p divides H and W.
Bounded cost: a map key is produced only when its L ≤ `max_locations`
(default 196 = 14²); a p×p map over a p×p feature map (L = 1) is skipped
because it equals the global mean / std. The raw-pixel `global` term of A.5
is the caller's (raw input), not the encoder's.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from onestep_bench.data.images import ImageArrays, random_shift, to_float
from onestep_bench.evaluators.classifier import cache_dir
from onestep_bench.models import int_keys, str_keys

# Bump when a change to this file changes what a recipe trains or what the
# cached arrays mean: the cache key includes it, so old files are not reused.
CODE_VERSION = 1

# Deterministic pre-training recipe, sized for 2 CPU cores (module docstring
# and tests/test_encoders.py say what it costs). 'auto' entries are resolved
# per dataset by `resolve_recipe` (patch: 1 for images ≤ 8 px, else 2;
# shift: 1 px for images ≤ 8 px, else 2) and the resolved values are hashed.
RECIPE: dict[str, Any] = dict(
    width=16,             # C: stage widths [C, 2C, 4C, ...]
    blocks=(1, 1, 1),     # basic blocks per stage
    max_groups=32,        # GroupNorm groups: largest divisor ≤ this ...
    min_group_channels=8,  # ... leaving ≥ 8 channels per group (paper's
                           # 256 / 32); 1 would make GN InstanceNorm at C ≤ 32
    decoder_convs=1,      # 3×3 conv + GN + ReLU per decoder up-block
    patch='auto',         # masked patch size p
    mask_prob=0.5,        # each p×p patch is zeroed with this probability
    steps=800,
    batch=64,
    lr=2e-3,
    warmup=50,           # linear warmup steps, then constant lr
    b1=0.9,
    b2=0.95,
    weight_decay=0.01,
    ema=0.999,            # EMA decay of the encoder weights (what is frozen)
    shift='auto',         # random translation, pixels (edge padding)
    seed=0,
)

EPS = 1e-6  # std = sqrt(var + EPS); norm_x = sqrt(mean x² + EPS) (§1.5)
POOLS = (2, 4)
EVAL_BATCH = 500
PROBE_TRAIN, PROBE_TEST = 5000, 1000  # kNN sanity probe subset sizes
BASELINE_IMAGES = 4 * EVAL_BATCH  # images for the init / zero-fill baselines


class CacheError(RuntimeError):
  """A cached encoder file is unreadable, incomplete or fails its checksum."""


def num_groups(channels: int, max_groups: int = 32,
               min_channels: int = 1) -> int:
  """Largest divisor of C = `channels` ≤ `max_groups` and ≤ C / min_channels.

  §1.5: the largest divisor ≤ 32 (`min_channels` = 1).

  `min_channels` keeps at least that many channels per group (at least one
  group). With one channel per group GroupNorm is InstanceNorm: every
  channel's spatial mean and std after it are its bias and scale, so the
  global `mean` / `std` features of a stage output would be constants. The
  paper's C = 256 with 32 groups has 8 channels per group.
  """
  limit = max(1, min(channels, max_groups, channels // max(min_channels, 1)))
  return max(g for g in range(1, limit + 1) if channels % g == 0)


@dataclasses.dataclass(frozen=True)
class GroupRule:
  """GroupNorm group count for a channel count (see `num_groups`)."""

  max_groups: int = 32
  min_channels: int = 1

  def norm(self, channels: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """A GroupNorm over `channels` with this rule's group count."""
    return nnx.GroupNorm(channels, num_groups(channels, self.max_groups,
                                              self.min_channels), rngs=rngs)


# ------------------------------------------------------------------ modules
class ConvGN(nnx.Module):
  """k×k conv (no bias) followed by GroupNorm; the caller applies ReLU."""

  def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1,
               groups: GroupRule = GroupRule(), rngs: nnx.Rngs):
    self.conv = nnx.Conv(cin, cout, (kernel, kernel), strides=stride,
                         padding='SAME', use_bias=False, rngs=rngs)
    self.norm = groups.norm(cout, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, cin] -> [B, H / stride, W / stride, cout] (SAME)."""
    return self.norm(self.conv(x))


class BasicBlock(nnx.Module):
  """ReLU(GN(conv(ReLU(GN(conv(x))))) + shortcut(x)); 1×1+GN on a change."""

  def __init__(self, cin: int, cout: int, *, stride: int, groups: GroupRule,
               rngs: nnx.Rngs):
    self.conv1 = ConvGN(cin, cout, 3, stride=stride, groups=groups,
                        rngs=rngs)
    self.conv2 = ConvGN(cout, cout, 3, groups=groups, rngs=rngs)
    self.proj = (ConvGN(cin, cout, 1, stride=stride, groups=groups,
                        rngs=rngs) if stride != 1 or cin != cout else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, cin] -> [B, H / stride, W / stride, cout]."""
    h = self.conv2(nnx.relu(self.conv1(x)))
    return nnx.relu(h + (x if self.proj is None else self.proj(x)))


class ResNetEncoder(nnx.Module):
  """The §1.5 ResNet encoder for small images (any H×W×C).

  Calling it returns the named activation maps in forward order: 'stem',
  then per stage s (1-based) optionally 'stage<s>.block<b>' (every 2nd block
  that is not the stage's last) and 'stage<s>' (the stage output after GN).
  """

  def __init__(self, in_channels: int, *, width: int = 16,
               blocks: Sequence[int] = (1, 1, 1),
               groups: GroupRule = GroupRule(), rngs: nnx.Rngs):
    self.blocks = tuple(int(b) for b in blocks)
    self.widths = tuple(width * 2**s for s in range(len(self.blocks)))
    self.stem = ConvGN(in_channels, width, 3, groups=groups,
                       rngs=rngs)
    stages, norms = [], []
    cin = width
    for s, (n, cout) in enumerate(zip(self.blocks, self.widths, strict=True)):
      stage = []
      for b in range(n):
        stride = 2 if s > 0 and b == 0 else 1
        stage.append(BasicBlock(cin, cout, stride=stride,
                                groups=groups, rngs=rngs))
        cin = cout
      stages.append(nnx.List(stage))
      norms.append(groups.norm(cout, rngs))
    self.stages = nnx.List(stages)
    self.stage_norms = nnx.List(norms)

  def __call__(self, x: jax.Array, *, block_features: bool = True
               ) -> dict[str, jax.Array]:
    """x: [B, H, W, C] -> {name: [B, h, w, c]} in forward order."""
    h = nnx.relu(self.stem(x))
    acts = {'stem': h}
    for s, (stage, norm) in enumerate(zip(self.stages, self.stage_norms,
                                          strict=True)):
      for b, block in enumerate(stage):
        h = block(h)
        if block_features and b % 2 == 1 and b < len(stage) - 1:
          acts[f'stage{s + 1}.block{b + 1}'] = h
      h = norm(h)
      acts[f'stage{s + 1}'] = h
    return acts


class UNetDecoder(nnx.Module):
  """MAE pre-training decoder (§1.5): bridge, up-blocks with skips, 1×1 out.

  Skips are the stem and stage outputs, shallowest first; each up-block
  resizes (bilinear) to the next shallower skip, concatenates it, applies
  GN and `convs` × [3×3 conv + GN + ReLU] down to the skip's width.
  """

  def __init__(self, skip_channels: Sequence[int], out_channels: int, *,
               convs: int = 1, groups: GroupRule = GroupRule(),
               rngs: nnx.Rngs):
    deep = skip_channels[-1]
    self.bridge = ConvGN(deep, deep, 3, groups=groups, rngs=rngs)
    ups, cin = [], deep
    for c in reversed(skip_channels[:-1]):
      cat = cin + c
      layers = [groups.norm(cat, rngs)]
      layers += [ConvGN(cat if i == 0 else c, c, 3, groups=groups,
                        rngs=rngs) for i in range(convs)]
      ups.append(nnx.List(layers))
      cin = c
    self.ups = nnx.List(ups)
    self.out = nnx.Conv(cin, out_channels, (1, 1), rngs=rngs)

  def __call__(self, skips: Sequence[jax.Array]) -> jax.Array:
    """skips: shallowest first -> [B, H, W, out_channels] at skips[0] size."""
    h = nnx.relu(self.bridge(skips[-1]))
    for layers, skip in zip(self.ups, reversed(skips[:-1]), strict=True):
      b, hh, ww, _ = skip.shape
      h = jax.image.resize(h, (b, hh, ww, h.shape[-1]), 'bilinear')
      h = layers[0](jnp.concatenate([h, skip], -1))
      for conv in layers[1:]:
        h = nnx.relu(conv(h))
    return self.out(h)


class _Functional:
  """An nnx module constructor as init(key) -> pure dict, apply(p, ...)."""

  def __init__(self, ctor: Callable[[nnx.Rngs], nnx.Module]):
    self._ctor = ctor
    self._graphdef, self._abstract = nnx.split(
        nnx.eval_shape(lambda: ctor(nnx.Rngs(0))))

  def init(self, seed: int, stream: int = 0) -> dict[str, Any]:
    """Fresh parameters (nested dict of float32 arrays, str keys), in numpy.

    Kernels ~ N(0, 1 / fan_in) (LeCun normal, untruncated), biases 0,
    GroupNorm scales 1; drawn leaf by leaf in sorted-path order from
    numpy's PCG64 seeded with (seed, stream). numpy instead of the nnx
    initializers: XLA:CPU spends seconds compiling threefry draws, and
    numpy's stream is the same on every platform.
    """
    rng = np.random.default_rng([int(seed), int(stream)])

    def draw(path, a):
      name = str(getattr(path[-1], 'key', path[-1]))
      if name == 'kernel':
        fan_in = math.prod(a.shape[:-1])
        return jnp.asarray(rng.standard_normal(a.shape, np.float32)
                           / np.float32(math.sqrt(fan_in)))
      if name == 'scale':
        return jnp.ones(a.shape, a.dtype)
      if name == 'bias':
        return jnp.zeros(a.shape, a.dtype)
      raise ValueError(f'No initializer for parameter {name!r}.')

    return jax.tree_util.tree_map_with_path(draw, self.abstract())

  def abstract(self) -> dict[str, Any]:
    """The params tree of ShapeDtypeStructs (str keys)."""
    return str_keys(nnx.to_pure_dict(self._abstract))

  def apply(self, params: dict[str, Any], *args, **kwargs):
    state = jax.tree.map(lambda a: a, self._abstract)
    nnx.replace_by_pure_dict(state, int_keys(params))
    return nnx.merge(self._graphdef, state)(*args, **kwargs)


def group_rule(recipe: dict[str, Any]) -> GroupRule:
  """The recipe's GroupNorm rule (max_groups, min_group_channels)."""
  return GroupRule(int(recipe['max_groups']),
                   int(recipe['min_group_channels']))


def encoder_fn(in_channels: int, width: int, blocks: Sequence[int],
               groups: GroupRule = GroupRule()) -> _Functional:
  """The functional `ResNetEncoder`."""
  return _Functional(lambda rngs: ResNetEncoder(
      in_channels, width=width, blocks=tuple(blocks), groups=groups,
      rngs=rngs))


# --------------------------------------------------------------- features
def _mean_std(a: jax.Array, axes: tuple[int, ...]
              ) -> tuple[jax.Array, jax.Array]:
  mean = jnp.mean(a, axes)
  var = jnp.mean(jnp.square(a - jnp.expand_dims(mean, axes)), axes)
  return mean, jnp.sqrt(var + EPS)


def feature_dict(x: jax.Array, acts: dict[str, jax.Array], *,
                 max_locations: int = 196,
                 pools: Sequence[int] = POOLS) -> dict[str, jax.Array]:
  """The §1.5 / paper A.5 dictionary from the input and named maps.

  Args:
    x: the encoder input [B, H, W, C].
    acts: {name: [B, h, w, c]} activation maps.
    max_locations: map keys (per-location, pooled) with more than this many
      locations L are left out.
    pools: window sizes of the pooled mean / std maps.

  Returns:
    {key: [B, L, C_key]}, see the module docstring.
  """
  x32 = x.astype(jnp.float32)
  out = {'norm_x': jnp.sqrt(jnp.mean(jnp.square(x32), (1, 2)) + EPS)[:, None]}
  for name, a in acts.items():
    b, h, w, c = a.shape
    if h * w <= max_locations:
      out[f'{name}/loc'] = a.reshape(b, h * w, c)
    mean, std = _mean_std(a, (1, 2))
    out[f'{name}/mean'], out[f'{name}/std'] = mean[:, None], std[:, None]
    for p in pools:
      n = (h // p) * (w // p)
      if h % p or w % p or n == 1 or n > max_locations:
        continue
      mean, std = _mean_std(a.reshape(b, h // p, p, w // p, p, c), (2, 4))
      out[f'{name}/mean_{p}x{p}'] = mean.reshape(b, n, c)
      out[f'{name}/std_{p}x{p}'] = std.reshape(b, n, c)
  return out


class FrozenEncoder:
  """A trained, frozen ResNet-MAE encoder and its feature dictionary.

  Attributes:
    params: the frozen EMA encoder weights, a plain nested dict of arrays.
    info: metadata (recipe, cache key, test masked-MSE, kNN accuracy, ...).
    shape: the (H, W, C) it was trained on.
    max_locations, block_features: feature-dictionary options.
  """

  def __init__(self, shape: Sequence[int], params: dict[str, Any],
               info: dict[str, Any], *, max_locations: int = 196,
               block_features: bool = True):
    r = info['recipe']
    self.shape = tuple(int(s) for s in shape)
    self.params = params
    self.info = info
    self.max_locations = int(max_locations)
    self.block_features = bool(block_features)
    self._net = encoder_fn(self.shape[-1], r['width'], r['blocks'],
                           group_rule(r))

  def activations(self, params: dict[str, Any], x: jax.Array
                  ) -> dict[str, jax.Array]:
    """x: float [B, H, W, C] in [-1, 1] -> named maps (no masking)."""
    return self._net.apply(params, x, block_features=self.block_features)

  def features(self, params: dict[str, Any], x: jax.Array
               ) -> dict[str, jax.Array]:
    """The multi-scale feature dictionary {key: [B, L, C_key]}; pure, jit-able.

    `params` are wrapped in stop_gradient (the encoder stays frozen even if
    a caller differentiates w.r.t. them); gradients flow to `x`.
    """
    params = jax.lax.stop_gradient(params)
    return feature_dict(x, self.activations(params, x),
                        max_locations=self.max_locations)

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    """`features` with the frozen `params`."""
    return self.features(self.params, x)

  def feature_shapes(self, shape: Sequence[int] | None = None
                     ) -> dict[str, tuple[int, int]]:
    """{key: (L, C_key)} for inputs of `shape` (H, W, C); default: own."""
    shape = tuple(shape or self.shape)
    out = jax.eval_shape(self.features, self.params,
                         jax.ShapeDtypeStruct((1, *shape), jnp.float32))
    return {k: tuple(v.shape[1:]) for k, v in out.items()}


# ------------------------------------------------------------ pre-training
def resolve_recipe(dataset: ImageArrays, recipe: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
  """RECIPE ∪ overrides, 'auto' resolved for the data, + dataset hflip."""
  r = dict(RECIPE, **(recipe or {}))
  unknown = sorted(set(r) - set(RECIPE))
  if unknown:
    raise ValueError(f'Unknown encoder recipe key(s) {unknown}; valid: '
                     f'{sorted(RECIPE)}.')
  small = min(dataset.spec.shape[:2]) <= 8
  if r['patch'] == 'auto':
    r['patch'] = 1 if small else 2
  if r['shift'] == 'auto':
    r['shift'] = 1 if small else 2
  r['blocks'] = [int(b) for b in r['blocks']]
  r['hflip'] = bool(dataset.hflip)
  return r


def cache_key(dataset: ImageArrays, recipe: dict[str, Any]) -> str:
  """'<name>-<sha16>' of (train images, shape, dtype, recipe, CODE_VERSION)."""
  images = dataset.split_images(dataset.train_split)[0]
  digest = hashlib.sha256()
  digest.update(np.ascontiguousarray(images).tobytes())
  digest.update(json.dumps(dict(shape=list(images.shape),
                                dtype=str(images.dtype), recipe=recipe,
                                scale=dataset.scale, version=CODE_VERSION),
                           sort_keys=True).encode())
  name = re.sub(r'[^A-Za-z0-9_.-]+', '_', dataset.spec.name).strip('_')
  return f'{name}-{digest.hexdigest()[:16]}'


def patch_mask(key: jax.Array, shape: Sequence[int], patch: int,
               prob: float) -> jax.Array:
  """[B, H, W, 1] float, 1 = masked: p×p patches dropped i.i.d. w.p. `prob`.

  The patch grid is anchored at the top-left; edge patches of an H or W not
  divisible by p are cropped.
  """
  b, h, w = shape[:3]
  gh, gw = -(-h // patch), -(-w // patch)
  m = jax.random.bernoulli(key, prob, (b, gh, 1, gw, 1, 1))
  m = jnp.broadcast_to(m, (b, gh, patch, gw, patch, 1))
  return m.reshape(b, gh * patch, gw * patch, 1)[:, :h, :w].astype(
      jnp.float32)


class MAE:
  """Encoder + decoder of the masked-AE pre-training, as pure functions.

  Hashable by (shape, recipe), so the module-level jitted train / eval
  steps, which take it as a static argument, compile once per recipe (a
  retrain of a damaged cache file reuses the compiled step).
  """

  def __init__(self, shape: Sequence[int], recipe: dict[str, Any]):
    r = recipe
    self.recipe = r
    self._id = (tuple(shape), json.dumps(r, sort_keys=True))
    c = shape[-1]
    self.encoder = encoder_fn(c, r['width'], r['blocks'], group_rule(r))
    widths = [r['width']] + [r['width'] * 2**s for s in range(len(r['blocks']))]
    self.decoder = _Functional(lambda rngs: UNetDecoder(
        widths, c, convs=r['decoder_convs'], groups=group_rule(r),
        rngs=rngs))

  def __hash__(self) -> int:
    return hash(self._id)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, MAE) and other._id == self._id

  def init(self, seed: int) -> dict[str, Any]:
    """{'encoder': ..., 'decoder': ...} fresh parameters (numpy draws)."""
    return {'encoder': self.encoder.init(seed, 0),
            'decoder': self.decoder.init(seed, 1)}

  def reconstruct(self, params: dict[str, Any], encoder_params: dict[str, Any],
                  x: jax.Array, mask: jax.Array) -> jax.Array:
    """Decoder(encoder(x with masked pixels zeroed))."""
    acts = self.encoder.apply(encoder_params, x * (1.0 - mask),
                              block_features=False)
    skips = [a for k, a in acts.items() if '.' not in k]
    return self.decoder.apply(params['decoder'], skips)

  def masked_errors(self, params, encoder_params, x, mask
                    ) -> tuple[jax.Array, jax.Array]:
    """Per image: (sum of squared error over masked pixels, masked count)."""
    err = jnp.square(self.reconstruct(params, encoder_params, x, mask) - x)
    return (jnp.sum(err * mask, (1, 2, 3)),
            jnp.sum(jnp.broadcast_to(mask, x.shape), (1, 2, 3)))

  def loss(self, params, x, mask) -> jax.Array:
    """Mean squared error over the masked pixels of the batch."""
    se, n = self.masked_errors(params, params['encoder'], x, mask)
    return jnp.sum(se) / jnp.maximum(jnp.sum(n), 1.0)


def _optimizer(r: dict[str, Any]) -> optax.GradientTransformation:
  """AdamW (β1, β2, wd from the recipe), linear warmup then constant lr."""
  warmup = max(int(r['warmup']), 1)
  sched = optax.join_schedules(
      [optax.linear_schedule(0.0, r['lr'], warmup),
       optax.constant_schedule(r['lr'])], [warmup])
  return optax.adamw(sched, b1=r['b1'], b2=r['b2'],
                     weight_decay=r['weight_decay'])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_step(mae: MAE, scale: float, params, opt, ema, i: jax.Array,
                x_tr: jax.Array, key: jax.Array):
  """One AdamW step of the masked-AE loss + the encoder EMA update."""
  r = mae.recipe
  k_idx, k_flip, k_shift, k_mask = jax.random.split(
      jax.random.fold_in(key, i), 4)
  idx = jax.random.randint(k_idx, (r['batch'],), 0, x_tr.shape[0])
  x = _to_input(x_tr[idx], scale)
  if r['hflip']:
    flip = jax.random.bernoulli(k_flip, 0.5, (r['batch'], 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)
  x = random_shift(k_shift, x, r['shift'])
  mask = patch_mask(k_mask, x.shape, r['patch'], r['mask_prob'])
  loss, grads = jax.value_and_grad(mae.loss)(params, x, mask)
  updates, opt = _optimizer(r).update(grads, opt, params)
  params = optax.apply_updates(params, updates)
  t = i.astype(jnp.float32)
  d = jnp.minimum(r['ema'], (1.0 + t) / (10.0 + t))
  ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema,
                     params['encoder'])
  return params, opt, ema, loss


def pretrain_flops(dataset: ImageArrays, recipe: dict[str, Any]) -> float:
  """Matmul/conv FLOPs of the whole MAE pre-training (`train`).

  Counted on the jaxpr of one `_train_step`, × `recipe['steps']` (shapes
  only: nothing runs).
  """
  from onestep_bench.flops import count_flops  # pylint: disable=g-import-not-at-top
  r = recipe
  mae = MAE(dataset.spec.shape, r)
  params = jax.eval_shape(lambda: mae.init(r['seed']))
  opt = jax.eval_shape(_optimizer(r).init, params)
  x_tr = jax.ShapeDtypeStruct((r['batch'], *dataset.spec.shape),
                              dataset.split_images(dataset.train_split)[0]
                              .dtype)
  flops, _ = count_flops(
      lambda p, o, e, i, x, k: _train_step(mae, dataset.scale, p, o, e, i, x,
                                           k),
      params, opt, params['encoder'], jnp.int32(0), x_tr, jax.random.key(0))
  return flops * r['steps']


def _to_input(x: jax.Array, scale: float = 1.0) -> jax.Array:
  """uint8 pixels -> [-1, 1]; float latents -> x * scale (as ImageArrays)."""
  return to_float(x) if x.dtype == jnp.uint8 else x * scale


def _batched(fn: Callable[[jax.Array, jax.Array], Any], images: np.ndarray,
             batch: int = EVAL_BATCH) -> list[np.ndarray]:
  """fn(chunk, batch_index) over fixed-size zero-padded chunks, trimmed."""
  outs = []
  for j, i in enumerate(range(0, len(images), batch)):
    chunk = images[i:i + batch]
    pad = batch - len(chunk)
    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]),
                                            chunk.dtype)])
    res = jax.device_get(fn(chunk, jnp.int32(j)))
    outs.append([np.asarray(a)[:batch - pad] for a in res])
  return [np.concatenate(parts) for parts in zip(*outs, strict=True)]


def _eval_split(dataset: ImageArrays) -> str | None:
  for split in ('test', 'validation'):
    if split in dataset.splits:
      return split
  return None


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _eval_errors(mae: MAE, scale: float, zero_fill: bool, params,
                 encoder_params, chunk: jax.Array, key: jax.Array):
  x = _to_input(chunk, scale)
  mask = patch_mask(key, x.shape, mae.recipe['patch'], mae.recipe['mask_prob'])
  if zero_fill:  # the baseline that predicts 0 (mid-gray) everywhere
    return (jnp.sum(jnp.square(x) * mask, (1, 2, 3)),
            jnp.sum(jnp.broadcast_to(mask, x.shape), (1, 2, 3)))
  return mae.masked_errors(params, encoder_params, x, mask)


def masked_mse(mae: MAE, params, encoder_params, images: np.ndarray, *,
               scale: float = 1.0, seed: int = 1234,
               zero_fill: bool = False) -> float:
  """Masked-pixel MSE on `images` with fixed-seed masks (recipe's p, prob).

  The masks depend only on `seed` and the image order, so numbers for
  different params (or `zero_fill`, which ignores them) are paired.
  """
  se, n = masked_errors(mae, params, encoder_params, images, scale=scale,
                        seed=seed, zero_fill=zero_fill)
  return float(se.sum() / max(n.sum(), 1.0))


def masked_errors(mae: MAE, params, encoder_params, images: np.ndarray, *,
                  scale: float = 1.0, seed: int = 1234,
                  zero_fill: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Per image (masked squared-error sum, masked pixel count), numpy."""
  key = jax.random.key(seed)
  se, n = _batched(lambda c, j: _eval_errors(
      mae, scale, zero_fill, params, encoder_params, c,
      jax.random.fold_in(key, j)), images)
  return se, n


def _knn(ftr: np.ndarray, *, ytr: np.ndarray, fte: np.ndarray,
         yte: np.ndarray, num_classes: int, k: int = 10) -> float:
  """Cosine kNN accuracy after standardizing with train statistics."""
  mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
  ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
  ftr /= np.linalg.norm(ftr, axis=1, keepdims=True) + 1e-12
  fte /= np.linalg.norm(fte, axis=1, keepdims=True) + 1e-12
  nn = np.argpartition(-(fte @ ftr.T), k, axis=1)[:, :k]
  votes = np.apply_along_axis(
      lambda r: np.bincount(r, minlength=num_classes), 1, ytr[nn])
  return float(np.mean(votes.argmax(1) == yte))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _probe_features(mae: MAE, scale: float, encoder_params,
                    chunk: jax.Array) -> tuple[jax.Array, jax.Array]:
  acts = mae.encoder.apply(encoder_params, _to_input(chunk, scale),
                           block_features=False)
  stages = [a for name, a in acts.items() if name.startswith('stage')]
  return (jnp.concatenate([a.mean((1, 2)) for a in stages], -1),
          stages[-1].reshape(chunk.shape[0], -1))


def knn_probe(mae: MAE, encoder_params: Sequence[dict[str, Any]],
              dataset: ImageArrays, k: int = 10
              ) -> list[dict[str, float]] | None:
  """Cosine k-NN accuracies (train subset -> eval split): a sanity measure.

  Labels are used here and nowhere in training. Two probes per entry of
  `encoder_params`: 'gap', the global means of every stage output
  concatenated; 'last', the last stage output flattened over locations.
  A final entry {'pixels': ...} is the raw-pixel baseline.
  """
  split = _eval_split(dataset)
  if split is None or not dataset.label_classes:
    return None
  rng = np.random.RandomState(0)
  xtr, ytr = dataset.split_images(dataset.train_split)
  xte, yte = dataset.split_images(split)
  itr = rng.permutation(len(xtr))[:PROBE_TRAIN]
  ite = rng.permutation(len(xte))[:PROBE_TEST]
  ytr, yte = ytr[itr], yte[ite]
  knn = functools.partial(_knn, ytr=ytr, yte=yte,
                          num_classes=dataset.label_classes, k=k)

  accs = []
  for params in encoder_params:
    fn = lambda c, j, p=params: _probe_features(mae, dataset.scale, p, c)
    (gtr, ltr), (gte, lte) = _batched(fn, xtr[itr]), _batched(fn, xte[ite])
    accs.append({'gap': knn(gtr, fte=gte), 'last': knn(ltr, fte=lte)})
  flat = lambda a: np.asarray(a, np.float32).reshape(len(a), -1)
  accs.append({'pixels': knn(flat(xtr[itr]), fte=flat(xte[ite]))})
  return accs


def train(dataset: ImageArrays, recipe: dict[str, Any]
          ) -> tuple[dict[str, Any], dict[str, Any]]:
  """MAE pre-training on the training split; returns (EMA encoder, info).

  `recipe` must be resolved (`resolve_recipe`). Deterministic: fixed seed,
  fixed steps, one jitted step per Python iteration (no lax.scan: XLA:CPU
  runs convolutions inside a while loop far slower than at top level).
  """
  r = recipe
  shape = dataset.spec.shape
  mae = MAE(shape, r)
  k_data = jax.random.key(r['seed'])
  params = mae.init(r['seed'])
  init_encoder = params['encoder']
  tx = _optimizer(r)
  x_tr = jnp.asarray(dataset.split_images(dataset.train_split)[0])

  logging.info('Training encoder (%s, %d steps; cached afterwards)',
               dataset.spec.name, r['steps'])
  t0, c0 = time.perf_counter(), time.process_time()
  opt, ema = tx.init(params), init_encoder
  losses = []
  for i in range(r['steps']):
    params, opt, ema, loss = _train_step(
        mae, dataset.scale, params, opt, ema, jnp.int32(i), x_tr, k_data)
    if (i + 1) % max(r['steps'] // 10, 1) == 0:
      losses.append(float(loss))
      logging.info('encoder step %d masked mse %.4f', i + 1, losses[-1])
  jax.block_until_ready(ema)
  info: dict[str, Any] = dict(
      dataset=dataset.spec.name, shape=list(shape), recipe=r,
      train_flops=pretrain_flops(dataset, r),
      code_version=CODE_VERSION, train_seconds=time.perf_counter() - t0,
      train_cpu_seconds=time.process_time() - c0, train_loss_curve=losses)
  t1, c1 = time.perf_counter(), time.process_time()
  split = _eval_split(dataset)
  if split is not None:
    xte = dataset.split_images(split)[0]
    info['eval_split'] = split
    se, n = masked_errors(mae, params, ema, xte, scale=dataset.scale)
    info['test_masked_mse'] = float(se.sum() / n.sum())
    # Baselines on the first BASELINE_IMAGES (the same masks, a multiple of
    # EVAL_BATCH): the untrained net, and predicting 0 (mid-gray).
    k = BASELINE_IMAGES
    base = xte[:k]
    info['test_masked_mse_subset'] = float(se[:k].sum() / n[:k].sum())
    mse = functools.partial(masked_mse, mae, scale=dataset.scale)
    init = mae.init(r['seed'])
    info['test_masked_mse_init'] = mse(init, init['encoder'], base)
    info['test_masked_mse_zero_fill'] = mse(init, init['encoder'], base,
                                            zero_fill=True)
    c2 = time.process_time()
    accs = knn_probe(mae, [ema, init_encoder], dataset)
    info['knn_cpu_seconds'] = time.process_time() - c2
    if accs is not None:
      info['knn_accuracy'], info['knn_accuracy_init'] = accs[0], accs[1]
      info['knn_accuracy_pixels'] = accs[2]['pixels']
  info['eval_seconds'] = time.perf_counter() - t1
  info['eval_cpu_seconds'] = time.process_time() - c1
  logging.info('encoder %s: %s', dataset.spec.name,
               {k: v for k, v in info.items() if k != 'recipe'})
  return ema, info


# ------------------------------------------------------------------ cache
def _flatten(params: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in params.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = np.asarray(v)
  return out


def _params_sha256(flat: dict[str, np.ndarray]) -> str:
  digest = hashlib.sha256()
  for name in sorted(flat):
    a = np.ascontiguousarray(flat[name])
    digest.update(f'{name}:{a.dtype}:{a.shape}'.encode())
    digest.update(a.tobytes())
  return digest.hexdigest()


def save(path: str, params: dict[str, Any], info: dict[str, Any]) -> None:
  """Writes params as named arrays + metadata (JSON in the npz and beside)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  flat = _flatten(params)
  info = dict(info, params_sha256=_params_sha256(flat))
  meta = json.dumps(info, sort_keys=True)
  tmp = f'{path}.{os.getpid()}.tmp.npz'  # one per writer process
  np.savez(tmp, __meta__=np.frombuffer(meta.encode(), np.uint8), **flat)
  os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
  side = os.path.splitext(path)[0] + '.json'
  with open(f'{side}.{os.getpid()}.tmp', 'w') as f:
    f.write(json.dumps(info, sort_keys=True, indent=1))
  os.replace(f'{side}.{os.getpid()}.tmp', side)


def load(path: str, abstract: dict[str, Any], key: str
         ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads and verifies a cached encoder; CacheError on any defect."""
  try:
    with np.load(path, allow_pickle=False) as z:
      info = json.loads(z['__meta__'].tobytes().decode())
      flat = {k: z[k] for k in z.files if k != '__meta__'}
  except Exception as e:  # zip / npy / json errors of a damaged file
    raise CacheError(f'{path}: unreadable ({type(e).__name__}: {e})') from e
  if info.get('cache_key') != key:
    raise CacheError(f'{path}: cache_key {info.get("cache_key")!r} != {key!r}')
  want = _flatten(jax.tree.map(lambda a: np.zeros((), a.dtype), abstract))
  shapes = _flatten(jax.tree.map(lambda a: np.zeros(a.shape, np.int8),
                                 abstract))
  if set(flat) != set(want):
    raise CacheError(f'{path}: parameter names differ from the model '
                     f'(missing {sorted(set(want) - set(flat))[:3]}, extra '
                     f'{sorted(set(flat) - set(want))[:3]})')
  for name, a in flat.items():
    if a.shape != shapes[name].shape or a.dtype != want[name].dtype:
      raise CacheError(f'{path}: {name} is {a.dtype}{a.shape}, expected '
                       f'{want[name].dtype}{shapes[name].shape}')
  if _params_sha256(flat) != info.get('params_sha256'):
    raise CacheError(f'{path}: parameter checksum mismatch')
  params: dict[str, Any] = {}
  for name, a in flat.items():
    node = params
    *parents, leaf = name.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(a)
  return params, info


def encoder_path(key: str) -> str:
  """cache_dir()/encoders/<key>.npz (metadata: the .json beside it)."""
  return os.path.join(cache_dir(), 'encoders', f'{key}.npz')


def load_or_train(dataset: ImageArrays, recipe: dict[str, Any] | None = None,
                  *, max_locations: int = 196, block_features: bool = True
                  ) -> FrozenEncoder:
  """The cached encoder for (dataset content, recipe), training it if absent.

  A cache file that cannot be read, lacks or misshapes a parameter, or fails
  its parameter checksum is reported (logging.warning, naming the file) and
  retrained from the same recipe (bitwise the same weights on the same
  platform and JAX version), and the new file replaces it atomically. A
  damaged file is thus never used, and never stops a run.

  Args:
    dataset: an `ImageArrays` (uint8 images or float latents).
    recipe: overrides of `RECIPE` (part of the cache key).
    max_locations: feature-dictionary bound on L per key (not hashed).
    block_features: add every 2nd inner block's maps (not hashed).
  """
  r = resolve_recipe(dataset, recipe)
  key = cache_key(dataset, r)
  path = encoder_path(key)
  shape = dataset.spec.shape
  abstract = encoder_fn(shape[-1], r['width'], r['blocks'],
                        group_rule(r)).abstract()
  params = None
  if os.path.exists(path):
    try:
      params, info = load(path, abstract, key)
    except CacheError as e:
      logging.warning('Cached encoder is damaged, retraining it: %s', e)
  if params is None:
    params, info = train(dataset, r)
    info['cache_key'] = key
    save(path, params, info)
    params, info = load(path, abstract, key)  # exactly what a hit returns
  if 'train_flops' not in info:  # caches written before FLOPs were counted
    info = {**info, 'train_flops': pretrain_flops(dataset, r)}
  return FrozenEncoder(shape, params, info, max_locations=max_locations,
                       block_features=block_features)


def num_params(params: dict[str, Any]) -> int:
  """Parameter count of a params tree."""
  return sum(math.prod(a.shape) for a in jax.tree.leaves(params))
