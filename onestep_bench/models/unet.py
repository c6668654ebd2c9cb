"""`unet`: ADM-style U-Net (Dhariwal & Nichol 2021), `model(x, t, h, y, g)`.

NHWC images of 8–64 px. Residual blocks GroupNorm -> SiLU -> conv3x3 ->
GroupNorm -> scale-shift by the embedding -> SiLU -> conv3x3 (zero-init),
self-attention blocks (zero-init projection) at the configured resolutions,
strided-conv downsampling and nearest-upsample + conv3x3, a zero-init output
conv (so the network outputs exactly 0 at init). Conditioning
c = t_embed(t) + h_embed(h) [+ y_embed(y)] [+ g_embed(g)], width 4·channels.

Odd sizes: a level only halves the resolution while H and W are both even;
otherwise its downsample (and the matching upsample) is the identity, so the
output always has the input's shape (e.g. 28 -> 14 -> 7 -> 7). No dropout
(the functional `Backbone.apply` carries no rng).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from onestep_bench.models import layers
from onestep_bench.models.embeddings import (
    LabelEmbed,
    StyleEmbed,
    TimeEmbed,
    embed_conditions,
)

_ZERO = nnx.initializers.zeros


def _groups(ch: int, max_groups: int) -> int:
  """ADM's 32 groups, capped so that each group has >= 2 channels."""
  return layers.group_count(ch, max(1, min(max_groups, ch // 2)))


class ResBlock(nnx.Module):
  """ADM residual block with scale-shift conditioning (use_scale_shift_norm)."""

  def __init__(self, cin: int, cout: int, emb_dim: int, *, max_groups: int,
               rngs: nnx.Rngs):
    self.norm1 = nnx.GroupNorm(cin, _groups(cin, max_groups), epsilon=1e-5,
                               rngs=rngs)
    self.conv1 = nnx.Conv(cin, cout, (3, 3), rngs=rngs)
    self.emb = nnx.Linear(emb_dim, 2 * cout, rngs=rngs)
    self.norm2 = nnx.GroupNorm(cout, _groups(cout, max_groups), epsilon=1e-5,
                               rngs=rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), kernel_init=_ZERO, rngs=rngs)
    self.skip = nnx.Conv(cin, cout, (1, 1), rngs=rngs) if cin != cout else None

  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    """Maps x [B, H, W, cin] and emb [B, E] to [B, H, W, cout]."""
    z = self.conv1(nnx.silu(self.norm1(x)))
    scale, shift = jnp.split(self.emb(nnx.silu(emb)), 2, axis=-1)
    z = self.norm2(z) * (1 + scale[:, None, None]) + shift[:, None, None]
    z = self.conv2(nnx.silu(z))
    return (x if self.skip is None else self.skip(x)) + z


class AttnBlock(nnx.Module):
  """GroupNorm -> multi-head self-attention over H·W -> zero-init proj."""

  def __init__(self, ch: int, heads: int, *, max_groups: int, rngs: nnx.Rngs):
    self.norm = nnx.GroupNorm(ch, _groups(ch, max_groups), epsilon=1e-5,
                              rngs=rngs)
    self.attn = layers.Attention(
        ch, heads if ch % heads == 0 else 1,
        kernel_init=nnx.initializers.lecun_normal(), proj_init=_ZERO,
        rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, C] (residual)."""
    b, hh, ww, ch = x.shape
    z = self.attn(self.norm(x).reshape(b, hh * ww, ch))
    return x + z.reshape(b, hh, ww, ch)


class ResAttn(nnx.Module):
  """A ResBlock optionally followed by an AttnBlock."""

  def __init__(self, cin: int, cout: int, emb_dim: int, attn: bool,
               heads: int, *, max_groups: int, rngs: nnx.Rngs):
    self.res = ResBlock(cin, cout, emb_dim, max_groups=max_groups, rngs=rngs)
    self.attn = (AttnBlock(cout, heads, max_groups=max_groups, rngs=rngs)
                 if attn else None)

  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    """ResBlock then (optionally) attention."""
    x = self.res(x, emb)
    return x if self.attn is None else self.attn(x)


class Resample(nnx.Module):
  """Down: conv3x3 stride 2. Up: nearest ×2 then conv3x3. Identity if off."""

  def __init__(self, ch: int, *, up: bool, active: bool, rngs: nnx.Rngs):
    self.up = up
    self.conv = (nnx.Conv(ch, ch, (3, 3), strides=1 if up else 2, rngs=rngs)
                 if active else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Halves / doubles H and W (identity when inactive)."""
    if self.conv is None:
      return x
    if self.up:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class UNet(nnx.Module):
  """ADM U-Net: [B, H, W, C] -> [B, H, W, C] float32.

  `features` returns the last decoder feature map (before the output conv).

  Args:
    shape: (H, W, C) of one image (from the data spec).
    num_classes: 0 = unconditional (no label table); else a table with a
      null row at index num_classes.
    channels: base width (ADM `model_channels`); embedding width 4·channels.
    channel_mult: width multiplier per level; one downsample between levels.
    num_res_blocks: residual blocks per level (the up path has one more).
    attn_resolutions: spatial sizes (H) at which blocks get self-attention;
      None = every level whose H <= 16 (e.g. 14 and 7 at 28 px, 16 and 8 at
      32 px). Sizes that never occur are ignored.
    num_heads: attention heads (1 where they don't divide the width).
    norm_groups: GroupNorm groups (ADM: 32), reduced to the largest divisor
      of the width with >= 2 channels per group.
    freq_dim: sinusoidal width of the time/guidance embedders.
    guidance_embed: add a TimeEmbed of the guidance input g to c.
    style_tokens: K > 0 adds `StyleEmbed` (K tables of style_vocab
      entries) of the style input s [B, K] to c (Drifting App. A.2).
    style_vocab: entries per style table (official Drifting: 64).
    rngs: nnx rngs.
  """

  def __init__(self, shape: tuple[int, ...], *, num_classes: int = 0,
               channels: int = 64, channel_mult: tuple[int, ...] = (1, 2, 2),
               num_res_blocks: int = 2,
               attn_resolutions: tuple[int, ...] | None = None,
               num_heads: int = 4, norm_groups: int = 32, freq_dim: int = 128,
               guidance_embed: bool = False,
               style_tokens: int = 0, style_vocab: int = 64, rngs: nnx.Rngs):
    if len(shape) != 3:
      raise ValueError(f'unet needs image data of shape (H, W, C); got '
                       f'shape={tuple(shape)}.')
    hh, ww, cin = shape
    self.shape = (hh, ww, cin)
    emb_dim = 4 * channels
    kw = dict(max_groups=norm_groups, rngs=rngs)

    def use_attn(res):
      if attn_resolutions is None:
        return res <= 16
      return res in tuple(attn_resolutions)

    self.inp = nnx.Conv(cin, channels, (3, 3), rngs=rngs)
    self.t_embed = TimeEmbed(emb_dim, freq_dim, rngs=rngs)
    self.h_embed = TimeEmbed(emb_dim, freq_dim, rngs=rngs)
    self.y_embed = (LabelEmbed(num_classes, emb_dim, rngs=rngs)
                    if num_classes else None)

    # Down path; `skips` records the width of every pushed activation and
    # `halved` whether each level's downsample was active.
    down, skips, halved = [], [channels], []
    ch, res_h, res_w = channels, hh, ww
    for level, mult in enumerate(channel_mult):
      for _ in range(num_res_blocks):
        down.append(ResAttn(ch, channels * mult, emb_dim, use_attn(res_h),
                            num_heads, **kw))
        ch = channels * mult
        skips.append(ch)
      if level < len(channel_mult) - 1:
        active = res_h % 2 == 0 and res_w % 2 == 0 and res_h > 1
        down.append(Resample(ch, up=False, active=active, rngs=rngs))
        halved.append(active)
        if active:
          res_h, res_w = res_h // 2, res_w // 2
        skips.append(ch)
    self.down = nnx.List(down)

    self.mid1 = ResBlock(ch, ch, emb_dim, **kw)
    self.mid_attn = AttnBlock(ch, num_heads, **kw)
    self.mid2 = ResBlock(ch, ch, emb_dim, **kw)

    up = []
    for level, mult in reversed(list(enumerate(channel_mult))):
      for i in range(num_res_blocks + 1):
        up.append(ResAttn(ch + skips.pop(), channels * mult, emb_dim,
                          use_attn(res_h), num_heads, **kw))
        ch = channels * mult
        if level and i == num_res_blocks:
          active = halved[level - 1]
          up.append(Resample(ch, up=True, active=active, rngs=rngs))
          if active:
            res_h, res_w = res_h * 2, res_w * 2
    self.up = nnx.List(up)
    assert not skips and (res_h, res_w) == (hh, ww)

    self.out_norm = nnx.GroupNorm(ch, _groups(ch, norm_groups), epsilon=1e-5,
                                  rngs=rngs)
    self.out = nnx.Conv(ch, cin, (3, 3), kernel_init=_ZERO, rngs=rngs)
    self.g_embed = (TimeEmbed(emb_dim, freq_dim, rngs=rngs)
                    if guidance_embed else None)
    self.s_embed = (StyleEmbed(style_tokens, style_vocab, emb_dim, rngs=rngs)
                    if style_tokens else None)

  def features(self, x: jax.Array, t: jax.Array, h: jax.Array,
               y: jax.Array | None = None,
               g: jax.Array | None = None,
               s: jax.Array | None = None) -> jax.Array:
    """The last decoder feature map, the input of the output conv.

    SiLU(GroupNorm(z)) of the last up-path block: [B, H, W, ch] with ch =
    channels · channel_mult[0], float32. Same inputs as `__call__`, which is
    `out(features(...))`.
    """
    if x.shape[1:] != self.shape:
      raise ValueError(f'unet was built for images {self.shape}, got input '
                       f'{x.shape[1:]}.')
    emb = embed_conditions(self, t, h, y, g, x.shape[0], s)
    f32 = layers.wide(x.dtype)  # float32 (float64 for float64 inputs).
    z = self.inp(x.astype(f32))
    skips = [z]
    for m in self.down:
      z = m(z, emb) if isinstance(m, ResAttn) else m(z)
      skips.append(z)
    z = self.mid2(self.mid_attn(self.mid1(z, emb)), emb)
    for m in self.up:
      if isinstance(m, ResAttn):
        z = m(jnp.concatenate([z, skips.pop()], axis=-1), emb)
      else:
        z = m(z)
    return nnx.silu(self.out_norm(z))

  def __call__(self, x: jax.Array, t: jax.Array, h: jax.Array,
               y: jax.Array | None = None,
               g: jax.Array | None = None,
               s: jax.Array | None = None) -> jax.Array:
    """model(x, t, h, y, g, s): [B, H, W, C] -> [B, H, W, C] float32."""
    z = self.features(x, t, h, y, g, s)
    return self.out(z).astype(layers.wide(x.dtype))
