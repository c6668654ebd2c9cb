"""The encoder's networks: ResNet encoder, U-Net MAE decoder, numpy init.

Architecture (docs/methods/drifting.md §1.5, scaled down): a 3×3 stride-1
stem conv + GroupNorm + ReLU; stages of basic blocks (two 3×3 convs with
GN, ReLU; a 1×1 conv + GN shortcut when the shape changes) with widths
[C, 2C, 4C, ...], stride 2 in the first block of every stage after the
first (k // 2 px padding on every side as the official `padding=1`, so
7×7 → 4×4 and 8×8 → 4×4); GroupNorm on every stage output. GN
groups: the largest divisor of the channel count ≤ `max_groups` (32) that
leaves ≥ `min_group_channels` (8, the paper's 256 / 32) channels per group:
at our widths (16-64) plain "≤ 32" would make GN an InstanceNorm and the
stage outputs' global mean / std features constants (`num_groups`). The
pre-training decoder is a small U-Net: a bridge conv on the last stage,
then per skip (deepest first) a bilinear resize to the skip's size, concat,
GN, [3×3 conv + GN + ReLU] × `decoder_convs`, and a final 1×1 conv to the
input channels.

Both networks are `models.Functional`s; their weights are drawn in numpy by
`init_numpy` (not the nnx initializers), so cached encoders are the same on
every platform.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from onestep_bench.models import Functional


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


def group_rule(recipe: dict[str, Any]) -> GroupRule:
  """The recipe's GroupNorm rule (max_groups, min_group_channels)."""
  return GroupRule(int(recipe['max_groups']),
                   int(recipe['min_group_channels']))


# ------------------------------------------------------------------ modules
class ConvGN(nnx.Module):
  """k×k conv (no bias) followed by GroupNorm; the caller applies ReLU."""

  def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1,
               groups: GroupRule = GroupRule(), rngs: nnx.Rngs):
    # k // 2 px on every side (official mae_model.py `padding=1` for 3×3,
    # none for 1×1): a stride-2 output (i, j) is centred on input (2i, 2j),
    # where the 1×1 shortcut reads. 'SAME' pads even sizes bottom / right
    # only, which shifts the main path one pixel off the shortcut.
    self.conv = nnx.Conv(cin, cout, (kernel, kernel), strides=stride,
                         padding=kernel // 2, use_bias=False, rngs=rngs)
    self.norm = groups.norm(cout, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, cin] -> [B, ⌈H / stride⌉, ⌈W / stride⌉, cout]."""
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


# --------------------------------------------------------- functional + init
def encoder_fn(in_channels: int, width: int, blocks: Sequence[int],
               groups: GroupRule = GroupRule()) -> Functional:
  """The functional `ResNetEncoder` (draw its params with `init_numpy`)."""
  return Functional(lambda rngs: ResNetEncoder(
      in_channels, width=width, blocks=tuple(blocks), groups=groups,
      rngs=rngs))


def decoder_fn(recipe: dict[str, Any], out_channels: int) -> Functional:
  """The functional `UNetDecoder` over the recipe's encoder's skips."""
  r = recipe
  widths = [r['width']] + [r['width'] * 2**s for s in range(len(r['blocks']))]
  return Functional(lambda rngs: UNetDecoder(
      widths, out_channels, convs=r['decoder_convs'], groups=group_rule(r),
      rngs=rngs))


def init_numpy(fn: Functional, seed: int, stream: int = 0) -> dict[str, Any]:
  """Fresh parameters of `fn` (nested dict of float32 arrays, str keys).

  Kernels ~ N(0, 1 / fan_in) (LeCun normal, untruncated), biases 0,
  GroupNorm scales 1; drawn leaf by leaf in sorted-path order of
  `fn.abstract()` from numpy's PCG64 seeded with (seed, stream). numpy
  instead of the nnx initializers (`fn.init`): XLA:CPU spends seconds
  compiling threefry draws, and numpy's stream is the same on every
  platform.

  Raises:
    ValueError: a parameter that is not a kernel, bias or scale.
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

  return jax.tree_util.tree_map_with_path(draw, fn.abstract())


def num_params(params: dict[str, Any]) -> int:
  """Parameter count of a params tree."""
  return sum(math.prod(a.shape) for a in jax.tree.leaves(params))
