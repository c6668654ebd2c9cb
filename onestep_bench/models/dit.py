"""`dit`: Diffusion Transformer (Peebles & Xie 2023), `model(x, t, h, y, g)`.

Plain DiT by default (as MeanFlow uses it, docs/methods/meanflow.md §1.2):
no-affine LayerNorm (eps 1e-6), adaLN-Zero, xavier-uniform linears and
patch embedding with zero biases, zero-init adaLN and output linears, fixed
2D sin-cos position embedding, N(0, 0.02) time/label embedders. The options
give TVM's "semi-Lipschitz" DiT (§2.5): `norm='rmsnorm'`, `qk_norm=True`,
`modulation='rms_adaln'`, `init='spectral'`, `guidance_embed=True`.

Conditioning c = t_embed(t) + h_embed(h) [+ y_embed(y)] [+ g_embed(g)], two
separate time embedders as MeanFlow/TVM. The patch embedding is a Linear on
flattened p×p×C patches (identical to DiT's stride-p Conv2d).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from onestep_bench.models import layers
from onestep_bench.models.embeddings import (
    LabelEmbed,
    StyleEmbed,
    TimeEmbed,
    embed_conditions,
)

# name -> (depth, hidden, heads), DiT Table 1 plus a tiny test size.
SIZES = {
    'tiny': (2, 64, 2),
    'S': (12, 384, 6),
    'B': (12, 768, 12),
    'L': (24, 1024, 16),
    'XL': (28, 1152, 16),
}
POS_EMBS = ('sincos', 'learned')


def sincos_2d(dim: int, gh: int, gw: int) -> np.ndarray:
  """DiT/MAE fixed 2D sin-cos position embedding, [gh·gw, dim] (row-major).

  Half the channels encode the column (w) index, half the row (h) index,
  each as [sin, cos] over dim/4 frequencies 1/10000^(k/(dim/4)).
  """
  if dim % 4:
    raise ValueError(f'sin-cos position embedding needs hidden % 4 == 0, '
                     f'got hidden={dim}.')
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

  def one_d(pos):
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  hh, ww = np.meshgrid(np.arange(gh, dtype=np.float64),
                       np.arange(gw, dtype=np.float64), indexing='ij')
  return np.concatenate([one_d(ww), one_d(hh)], axis=1).astype(np.float32)


class DiTBlock(nnx.Module):
  """adaLN-Zero block: x += gate·attn(mod(norm(x))); x += gate·mlp(...)."""

  def __init__(self, dim: int, heads: int, *, mlp_ratio: float, norm: str,
               qk_norm: bool, modulation: str, init: str, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    kinit = layers.linear_init(init)
    self.norm_kind = norm
    self.attn = layers.Attention(dim, heads, qk_norm=qk_norm,
                                 kernel_init=kinit, dtype=dtype, rngs=rngs)
    hidden = int(dim * mlp_ratio)
    self.fc1 = nnx.Linear(dim, hidden, kernel_init=kinit, dtype=dtype,
                          rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, kernel_init=kinit, dtype=dtype,
                          rngs=rngs)
    self.adaln = layers.AdaLN(dim, dim, 6,
                              rms_normalize=modulation == 'rms_adaln',
                              dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """Tokens [B, N, D] (float32 stream), conditioning [B, D]."""
    norm = layers.affine_free_norm(self.norm_kind)
    sh1, sc1, g1, sh2, sc2, g2 = self.adaln(c)
    x = x + g1[:, None] * self.attn(layers.modulate(norm(x), sh1, sc1))
    z = nnx.gelu(self.fc1(layers.modulate(norm(x), sh2, sc2)),
                 approximate=True)
    return x + g2[:, None] * self.fc2(z)


class DiT(nnx.Module):
  """DiT on NHWC images: [B, H, W, C] -> [B, H, W, C] float32.

  `features` returns the final tokens (before the final layer) as a grid.

  Args:
    shape: (H, W, C) of one image (from the data spec).
    num_classes: 0 = unconditional (no label table); else a table with a
      null row at index num_classes.
    size: 'tiny' | 'S' | 'B' | 'L' | 'XL' (depth, hidden, heads per SIZES).
    num_heads: overrides the size's head count (TVM's XL/2 uses 18).
    patch_size: p; H and W must be divisible by p.
    norm: 'layernorm' (DiT) | 'rmsnorm' (TVM), both without affine, eps 1e-6.
    qk_norm: RMSNorm with learnable scale over head_dim on q and k (TVM).
    modulation: 'adaln' (DiT) | 'rms_adaln' (TVM: RMS-normalize each chunk).
    init: 'dit' (xavier-uniform) | 'spectral' (TVM: every block linear and
      the patch embedding have spectral norm 1; `layers.spectral_init`).
    time_spectral_init: with init='spectral', also init the t/h/g embedder
      MLPs spectrally (TVM's `time_specinit`); else they stay N(0, 0.02).
    pos_emb: 'sincos' (fixed, DiT) | 'learned' (init N(0, 0.02)).
    guidance_embed: add a TimeEmbed of the guidance input g to c.
    style_tokens: K > 0 adds `StyleEmbed` (K tables of style_vocab
      entries) of the style input s [B, K] to c (Drifting App. A.2).
    style_vocab: entries per style table (official Drifting: 64).
    mlp_ratio: MLP hidden width / hidden.
    freq_dim: sinusoidal width of the time/guidance embedders (DiT: 256).
    dtype: compute dtype 'float32' | 'bfloat16'; params stay float32, norms,
      softmax, embeddings and the residual stream stay float32.
    rngs: nnx rngs.
  """

  def __init__(self, shape: tuple[int, ...], *, num_classes: int = 0,
               size: str = 'S', num_heads: int | None = None,
               patch_size: int = 2, norm: str = 'layernorm',
               qk_norm: bool = False, modulation: str = 'adaln',
               init: str = 'dit', time_spectral_init: bool = False,
               pos_emb: str = 'sincos', guidance_embed: bool = False,
               style_tokens: int = 0, style_vocab: int = 64,
               mlp_ratio: float = 4.0, freq_dim: int = 256,
               dtype: str = 'float32', rngs: nnx.Rngs):
    if len(shape) != 3:
      raise ValueError(f'dit needs image data of shape (H, W, C); got '
                       f'shape={tuple(shape)}.')
    if size not in SIZES:
      raise ValueError(f'Unknown DiT size={size!r}; valid: {tuple(SIZES)}.')
    for name, val, valid in (('norm', norm, layers.NORMS),
                             ('modulation', modulation, layers.MODULATIONS),
                             ('init', init, layers.INITS),
                             ('pos_emb', pos_emb, POS_EMBS)):
      if val not in valid:
        raise ValueError(f'Unknown DiT {name}={val!r}; valid: {valid}.')
    hh, ww, ch = shape
    p = patch_size
    if hh % p or ww % p:
      raise ValueError(
          f'Image size {hh}x{ww} is not divisible by patch_size={p}. Pick a '
          f'patch_size that divides both {hh} and {ww} '
          f'(config.model.patch_size).')
    depth, dim, heads = SIZES[size]
    heads = num_heads or heads
    cdtype = layers.compute_dtype(dtype)
    self.shape = (hh, ww, ch)
    self.p = p
    self.dim = dim
    self.pos_emb_kind = pos_emb

    kinit = layers.linear_init(init)
    tinit = kinit if (init == 'spectral' and time_spectral_init) else None
    self.patch = nnx.Linear(p * p * ch, dim, kernel_init=kinit, dtype=cdtype,
                            rngs=rngs)
    self.t_embed = TimeEmbed(dim, freq_dim, kernel_init=tinit, rngs=rngs)
    self.h_embed = TimeEmbed(dim, freq_dim, kernel_init=tinit, rngs=rngs)
    self.y_embed = (LabelEmbed(num_classes, dim, rngs=rngs)
                    if num_classes else None)
    self.blocks = nnx.List([
        DiTBlock(dim, heads, mlp_ratio=mlp_ratio, norm=norm, qk_norm=qk_norm,
                 modulation=modulation, init=init, dtype=cdtype, rngs=rngs)
        for _ in range(depth)])
    self.norm_kind = norm
    self.final_adaln = layers.AdaLN(dim, dim, 2,
                                    rms_normalize=modulation == 'rms_adaln',
                                    dtype=cdtype, rngs=rngs)
    self.out = nnx.Linear(dim, p * p * ch, kernel_init=nnx.initializers.zeros,
                          dtype=cdtype, rngs=rngs)
    n = (hh // p) * (ww // p)
    self.pos = (nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (n, dim), jnp.float32))
                if pos_emb == 'learned' else None)
    self.g_embed = (TimeEmbed(dim, freq_dim, kernel_init=tinit, rngs=rngs)
                    if guidance_embed else None)
    self.s_embed = (StyleEmbed(style_tokens, style_vocab, dim, rngs=rngs)
                    if style_tokens else None)

  def _trunk(self, x: jax.Array, t: jax.Array, h: jax.Array,
             y: jax.Array | None, g: jax.Array | None,
             s: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Patch embedding + blocks: (tokens [B, N, D], conditioning [B, D])."""
    hh, ww, ch = self.shape
    if x.shape[1:] != self.shape:
      raise ValueError(f'dit was built for images {self.shape}, got input '
                       f'{x.shape[1:]}.')
    b, p = x.shape[0], self.p
    gh, gw = hh // p, ww // p
    f32 = layers.wide(x.dtype)  # float32 (float64 for float64 inputs).
    c = embed_conditions(self, t, h, y, g, b, s).astype(f32)
    tokens = x.astype(f32).reshape(b, gh, p, gw, p, ch)
    tokens = tokens.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
    pos = (self.pos[...] if self.pos is not None
           else jnp.asarray(sincos_2d(self.dim, gh, gw)))
    z = self.patch(tokens).astype(f32) + pos[None]
    for blk in self.blocks:
      z = blk(z, c)
    return z, c

  def features(self, x: jax.Array, t: jax.Array, h: jax.Array,
               y: jax.Array | None = None,
               g: jax.Array | None = None,
               s: jax.Array | None = None) -> jax.Array:
    """The final tokens before the final layer, as their grid.

    The last block's output (the float32 residual stream, before the final
    adaLN + norm + linear) laid out [B, H/p, W/p, hidden] (token (i, j) is
    patch row i, column j). Same inputs as `__call__`.
    """
    z, _ = self._trunk(x, t, h, y, g, s)
    hh, ww, _ = self.shape
    return z.reshape(z.shape[0], hh // self.p, ww // self.p, self.dim)

  def __call__(self, x: jax.Array, t: jax.Array, h: jax.Array,
               y: jax.Array | None = None,
               g: jax.Array | None = None,
               s: jax.Array | None = None) -> jax.Array:
    """model(x, t, h, y, g, s): [B, H, W, C] -> [B, H, W, C] float32."""
    hh, ww, ch = self.shape
    b, p = x.shape[0], self.p
    gh, gw = hh // p, ww // p
    f32 = layers.wide(x.dtype)  # float32 (float64 for float64 inputs).
    z, c = self._trunk(x, t, h, y, g, s)
    shift, scale = self.final_adaln(c)
    z = layers.affine_free_norm(self.norm_kind)(z)
    z = self.out(layers.modulate(z, shift, scale))
    z = z.astype(f32).reshape(b, gh, gw, p, p, ch)
    return z.transpose(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, ch)
