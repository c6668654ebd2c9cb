"""The Stable Diffusion VAE (`AutoencoderKL`, kl-f8) in Flax nnx.

A port of diffusers' `AutoencoderKL` (`diffusers/models/autoencoders/
autoencoder_kl.py`, `vae.py`, `unet_2d_blocks.py`, `resnet.py`) in the
configuration of `stabilityai/sd-vae-ft-ema` and `sd-vae-ft-mse`, the
autoencoder of Rombach et al. 2022 (LDM, §3 and App. G) that DiT (Peebles &
Xie 2023, §3.1), SiT, MeanFlow, TVM and Drifting use on ImageNet 256×256:
block_out_channels (128, 256, 512, 512), 2 resnets per down block (3 per up
block), 4 latent channels (f = 8: 256×256×3 -> 32×32×4), single-head
attention in both mid blocks, GroupNorm(32, eps=1e-6), SiLU, scaling factor
0.18215 (LDM §4.3.2 / App. D.1: z_scaled = 0.18215 z, unit variance).

Layout: NHWC activations, HWIO conv kernels; module attribute names are
diffusers' state_dict names (`encoder.down_blocks.0.resnets.1.conv2`,
`decoder.mid_block.attentions.0.to_q`, `quant_conv`, ...), so a param path
is the torch name with `weight` -> `kernel` (conv, linear) or `scale`
(GroupNorm). `onestep_bench/vae/convert.py` maps the published
safetensors onto these paths.

Blocks, as diffusers (torch padding 1 == SAME for the 3×3 stride-1 convs):
  ResnetBlock2D  h = conv1(silu(norm1(x))); h = conv2(silu(norm2(h)));
                 out = shortcut(x) + h  (1×1 `conv_shortcut` iff cin != cout)
  Downsample2D   zero-pad right/bottom by 1, 3×3 conv stride 2, no padding
  Upsample2D     nearest ×2, 3×3 conv
  Attention      GroupNorm -> q, k, v (Linear over channels) -> softmax(q kᵀ
                 / √C) v -> to_out.0 -> + x (one head of width C)
  posterior      moments = quant_conv(encoder(x)) = [mean, logvar] on the
                 channel axis; logvar clipped to [-30, 20]
                 (`DiagonalGaussianDistribution`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from onestep_bench.config_check import ConfigError
from onestep_bench.models import Functional

EPS = 1e-6  # every GroupNorm of the SD VAE (resnet_eps)
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp
PRECISIONS = ('highest', 'high', 'default')


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of an `AutoencoderKL` (diffusers' config.json keys).

  Attributes:
    name: label recorded in result rows and sidecars (e.g. 'sd-vae-ft-ema').
    in_channels: image channels.
    out_channels: decoded image channels.
    block_out_channels: widths per resolution level (f = 2^(levels - 1)).
    layers_per_block: resnets per encoder level (the decoder has one more).
    latent_channels: channels of z.
    norm_num_groups: GroupNorm groups; must divide every width.
    scaling_factor: z_scaled = scaling_factor * (z - shift_factor).
    shift_factor: latent shift (None for the SD VAE: 0).
    use_quant_conv: 1×1 conv on the moments (True for the SD VAE).
    use_post_quant_conv: 1×1 conv before the decoder (True for the SD VAE).
    mid_block_add_attention: attention in the mid blocks (True).
  """

  name: str = 'sd-vae-ft-ema'
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @property
  def downsample_factor(self) -> int:
    """Spatial reduction f of the encoder (8 for the SD VAE)."""
    return 2 ** (len(self.block_out_channels) - 1)

  def latent_shape(self, size: int) -> tuple[int, int, int]:
    """[h, w, c] of the latent of a size×size image (NHWC)."""
    s = size // self.downsample_factor
    return (s, s, self.latent_channels)

  def to_dict(self) -> dict[str, Any]:
    """JSON-able dict (tuples as lists)."""
    d = dataclasses.asdict(self)
    d['block_out_channels'] = list(self.block_out_channels)
    return d

  def to_json(self) -> str:
    """Canonical JSON (sorted keys): equal configs give equal strings."""
    return json.dumps(self.to_dict(), sort_keys=True)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> VAEConfig:
    """Inverse of `to_dict`; unknown keys are an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ConfigError('vae', dict(d), f'unknown keys {unknown}',
                        f'use only {sorted(fields)}')
    kw = dict(d)
    if 'block_out_channels' in kw:
      kw['block_out_channels'] = tuple(int(c) for c in
                                       kw['block_out_channels'])
    return cls(**kw).validate()

  @classmethod
  def from_diffusers(cls, d: Mapping[str, Any], name: str) -> VAEConfig:
    """From a diffusers `config.json` of an `AutoencoderKL`.

    Raises:
      ConfigError: a setting this port does not implement (other block
        types, activations, or a tuple sample size of its own).
    """
    n = len(d.get('block_out_channels', (64,)))
    checks = {'_class_name': ('AutoencoderKL',),
              'act_fn': ('silu',),
              'down_block_types': (['DownEncoderBlock2D'] * n,),
              'up_block_types': (['UpDecoderBlock2D'] * n,)}
    for key, allowed in checks.items():
      if key in d:
        v = list(d[key]) if isinstance(d[key], (list, tuple)) else d[key]
        if v not in allowed:
          raise ConfigError(f'vae.{key}', d[key], f'must be {allowed[0]!r}',
                            'only the SD-VAE AutoencoderKL is ported')
    for key in ('latents_mean', 'latents_std'):
      if d.get(key) is not None:
        raise ConfigError(f'vae.{key}', d[key], 'must be None (per-channel '
                          'latent statistics are not ported)',
                          'only the SD-VAE AutoencoderKL is ported')
    fields = {f.name for f in dataclasses.fields(cls)} - {'name'}
    return cls.from_dict({'name': name,
                          **{k: d[k] for k in fields if k in d}})

  def validate(self, prefix: str = 'vae') -> VAEConfig:
    """Returns self; ConfigError naming the key unless it can be built."""
    for key in ('in_channels', 'out_channels', 'layers_per_block',
                'latent_channels', 'norm_num_groups'):
      v = getattr(self, key)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f'{prefix}.{key}', v, 'must be an int >= 1',
                          f'e.g. {key}={getattr(VAEConfig, key)}')
    widths = self.block_out_channels
    if not widths or any(not isinstance(c, int) or c < 1 for c in widths):
      raise ConfigError(f'{prefix}.block_out_channels', widths,
                        'must be a non-empty tuple of ints >= 1',
                        'e.g. (128, 256, 512, 512)')
    bad = [c for c in widths if c % self.norm_num_groups]
    if bad:
      raise ConfigError(f'{prefix}.norm_num_groups', self.norm_num_groups,
                        f'must divide every block width {widths}',
                        'e.g. 32 for (128, 256, 512, 512), 8 for (32, 64)')
    if not self.scaling_factor > 0:
      raise ConfigError(f'{prefix}.scaling_factor', self.scaling_factor,
                        'must be > 0', 'the SD VAE uses 0.18215')
    return self


SD_VAE_FT_EMA = VAEConfig(name='sd-vae-ft-ema')
SD_VAE_FT_MSE = VAEConfig(name='sd-vae-ft-mse')
PRESETS = {c.name: c for c in (SD_VAE_FT_EMA, SD_VAE_FT_MSE)}


def tiny_config(name: str = 'tiny-vae') -> VAEConfig:
  """A two-level VAE (f = 2) for CPU tests: widths (32, 64), 8 groups."""
  return VAEConfig(name=name, block_out_channels=(32, 64),
                   layers_per_block=1, norm_num_groups=8)


# ------------------------------------------------------------------ modules
def _precision(precision: str) -> jax.lax.Precision:
  if precision not in PRECISIONS:
    raise ConfigError('vae.precision', precision, f'must be in {PRECISIONS}',
                      "'highest' (fp32 parity) or 'default' (TF32/bf16 "
                      'passes on accelerators, faster)')
  return jax.lax.Precision[precision.upper()]


class _Ctx:
  """What every layer needs: groups, precision, rngs."""

  def __init__(self, groups: int, precision: jax.lax.Precision,
               rngs: nnx.Rngs):
    self.groups, self.precision, self.rngs = groups, precision, rngs

  def conv(self, cin: int, cout: int, k: int = 3, stride: int = 1,
           padding: Any = 'SAME') -> nnx.Conv:
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding,
                    precision=self.precision, rngs=self.rngs)

  def norm(self, ch: int) -> nnx.GroupNorm:
    return nnx.GroupNorm(ch, self.groups, epsilon=EPS,
                         use_fast_variance=False, rngs=self.rngs)

  def linear(self, cin: int, cout: int) -> nnx.Linear:
    return nnx.Linear(cin, cout, precision=self.precision, rngs=self.rngs)


class ResnetBlock2D(nnx.Module):
  """diffusers' ResnetBlock2D without time embedding (pre-norm, SiLU)."""

  def __init__(self, cin: int, cout: int, ctx: _Ctx):
    self.norm1 = ctx.norm(cin)
    self.conv1 = ctx.conv(cin, cout)
    self.norm2 = ctx.norm(cout)
    self.conv2 = ctx.conv(cout, cout)
    self.conv_shortcut = ctx.conv(cin, cout, 1) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, cin] -> [B, H, W, cout]."""
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nnx.Module):
  """Single-head spatial self-attention with a residual (mid blocks)."""

  def __init__(self, ch: int, ctx: _Ctx):
    self.group_norm = ctx.norm(ch)
    self.to_q = ctx.linear(ch, ch)
    self.to_k = ctx.linear(ch, ch)
    self.to_v = ctx.linear(ch, ch)
    self.to_out = nnx.List([ctx.linear(ch, ch)])
    self.precision = ctx.precision

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, C]."""
    b, hh, ww, c = x.shape
    h = self.group_norm(x).reshape(b, hh * ww, c)
    q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
    logits = jnp.einsum('bqc,bkc->bqk', q, k, precision=self.precision)
    attn = jax.nn.softmax(logits.astype(jnp.float32) / jnp.sqrt(c), axis=-1)
    out = jnp.einsum('bqk,bkc->bqc', attn.astype(v.dtype), v,
                     precision=self.precision)
    return x + self.to_out[0](out).reshape(b, hh, ww, c)


class Downsample2D(nnx.Module):
  """Pad (0, 1) on H and W, 3×3 conv stride 2 (diffusers padding=0)."""

  def __init__(self, ch: int, ctx: _Ctx):
    self.conv = ctx.conv(ch, ch, stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H/2, W/2, C]."""
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour ×2 then a 3×3 conv."""

  def __init__(self, ch: int, ctx: _Ctx):
    self.conv = ctx.conv(ch, ch)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C]."""
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownEncoderBlock2D(nnx.Module):
  """`num_layers` resnets, then a Downsample2D unless it is the last level."""

  def __init__(self, cin: int, cout: int, num_layers: int, downsample: bool,
               ctx: _Ctx):
    self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, ctx)
                             for i in range(num_layers)])
    self.downsamplers = (nnx.List([Downsample2D(cout, ctx)]) if downsample
                         else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, cin] -> [B, H/2, W/2, cout] (H, W on the last level)."""
    for r in self.resnets:
      x = r(x)
    return x if self.downsamplers is None else self.downsamplers[0](x)


class UpDecoderBlock2D(nnx.Module):
  """`num_layers` resnets, then an Upsample2D unless it is the last level."""

  def __init__(self, cin: int, cout: int, num_layers: int, upsample: bool,
               ctx: _Ctx):
    self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, ctx)
                             for i in range(num_layers)])
    self.upsamplers = nnx.List([Upsample2D(cout, ctx)]) if upsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, cin] -> [B, 2H, 2W, cout] (H, W on the last level)."""
    for r in self.resnets:
      x = r(x)
    return x if self.upsamplers is None else self.upsamplers[0](x)


class UNetMidBlock2D(nnx.Module):
  """resnet -> [attention] -> resnet at the lowest resolution."""

  def __init__(self, ch: int, attention: bool, ctx: _Ctx):
    self.resnets = nnx.List([ResnetBlock2D(ch, ch, ctx) for _ in range(2)])
    self.attentions = nnx.List([Attention(ch, ctx)]) if attention else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, C]."""
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Encoder(nnx.Module):
  """Image [B, H, W, 3] -> moments [B, H/f, W/f, 2·latent_channels]."""

  def __init__(self, c: VAEConfig, ctx: _Ctx):
    w = c.block_out_channels
    self.conv_in = ctx.conv(c.in_channels, w[0])
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(w[max(i - 1, 0)], w[i], c.layers_per_block,
                           i < len(w) - 1, ctx) for i in range(len(w))])
    self.mid_block = UNetMidBlock2D(w[-1], c.mid_block_add_attention, ctx)
    self.conv_norm_out = ctx.norm(w[-1])
    self.conv_out = ctx.conv(w[-1], 2 * c.latent_channels)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Images [B, H, W, in_channels] in [-1, 1] -> moments (pre quant)."""
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latent [B, h, w, latent_channels] -> image [B, f·h, f·w, 3]."""

  def __init__(self, c: VAEConfig, ctx: _Ctx):
    w = tuple(reversed(c.block_out_channels))
    self.conv_in = ctx.conv(c.latent_channels, w[0])
    self.mid_block = UNetMidBlock2D(w[0], c.mid_block_add_attention, ctx)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(w[max(i - 1, 0)], w[i], c.layers_per_block + 1,
                         i < len(w) - 1, ctx) for i in range(len(w))])
    self.conv_norm_out = ctx.norm(w[-1])
    self.conv_out = ctx.conv(w[-1], c.out_channels)

  def __call__(self, z: jax.Array) -> jax.Array:
    """Post-quant latents [B, h, w, c] -> images [B, f·h, f·w, out]."""
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """Encoder, decoder and the two 1×1 quant convs of diffusers' class."""

  def __init__(self, config: VAEConfig, *, precision: str = 'highest',
               rngs: nnx.Rngs):
    config.validate()
    ctx = _Ctx(config.norm_num_groups, _precision(precision), rngs)
    lc = config.latent_channels
    self.encoder = Encoder(config, ctx)
    self.decoder = Decoder(config, ctx)
    self.quant_conv = (ctx.conv(2 * lc, 2 * lc, 1) if config.use_quant_conv
                       else None)
    self.post_quant_conv = (ctx.conv(lc, lc, 1)
                            if config.use_post_quant_conv else None)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images in [-1, 1], [B, H, W, 3] -> posterior (mean, logvar), unscaled.

    Both [B, H/f, W/f, latent_channels]; logvar clipped to [-30, 20].
    """
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latents [B, h, w, c] -> images [B, f·h, f·w, 3], ~[-1, 1]."""
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Reconstruction from the posterior mean (no sampling)."""
    return self.decode(self.encode(x)[0])


@functools.lru_cache(maxsize=16)
def build(config: VAEConfig, precision: str = 'highest') -> Functional:
  """The VAE as a `models.Functional` (`init`, `abstract`, `bind`; cached)."""
  _precision(precision)
  return Functional(lambda rngs: AutoencoderKL(config, precision=precision,
                                               rngs=rngs))
