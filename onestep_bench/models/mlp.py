"""`mlp`: the toy-2D backbone, `model(x, t, h, y, g)`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from onestep_bench.models.embeddings import (
    LabelEmbed,
    StyleEmbed,
    TimeEmbed,
    embed_conditions,
)


class MLP(nnx.Module):
  """Residual SiLU MLP conditioned on (t, h, y) by adding embeddings.

  x: [B, D] -> [B, D]. The conditioning vector c = e_t(t) + e_h(h) (+ e_y(y))
  is added to the hidden state before every block (two separate time
  embedders, as MeanFlow/TVM use for t and the gap h). With
  `guidance_embed=True` a third `TimeEmbed` of the guidance input g is added
  to c (built last, so the other parameters are unchanged by the option);
  `style_tokens=K` adds a `StyleEmbed` of the style input s [B, K] likewise.
  `features` returns the last hidden activation (before `out`) instead.
  """

  def __init__(self, dim: int, *, width: int = 256, depth: int = 3,
               num_classes: int = 0, freq_dim: int = 64,
               guidance_embed: bool = False,
               style_tokens: int = 0, style_vocab: int = 64, rngs: nnx.Rngs):
    self.inp = nnx.Linear(dim, width, rngs=rngs)
    self.t_embed = TimeEmbed(width, freq_dim, rngs=rngs)
    self.h_embed = TimeEmbed(width, freq_dim, rngs=rngs)
    self.y_embed = (LabelEmbed(num_classes, width, rngs=rngs)
                    if num_classes else None)
    self.blocks = nnx.List([nnx.Linear(width, width, rngs=rngs)
                            for _ in range(depth)])
    self.out = nnx.Linear(width, dim, kernel_init=nnx.initializers.zeros,
                          rngs=rngs)
    self.g_embed = (TimeEmbed(width, freq_dim, rngs=rngs)
                    if guidance_embed else None)
    self.s_embed = (StyleEmbed(style_tokens, style_vocab, width, rngs=rngs)
                    if style_tokens else None)

  def features(self, x: jax.Array, t: jax.Array, h: jax.Array,
               y: jax.Array | None = None,
               g: jax.Array | None = None,
               s: jax.Array | None = None) -> jax.Array:
    """The last hidden activation, the input of `out`: [B, width].

    Same inputs as `__call__`, which is `out(features(...))` reshaped.
    """
    c = embed_conditions(self, t, h, y, g, x.shape[0], s)
    z = self.inp(x.reshape(x.shape[0], -1))
    for blk in self.blocks:
      z = z + blk(nnx.silu(z + c))
    return nnx.silu(z)

  def __call__(self, x: jax.Array, t: jax.Array, h: jax.Array,
               y: jax.Array | None = None,
               g: jax.Array | None = None,
               s: jax.Array | None = None) -> jax.Array:
    """model(x, t, h, y, g, s): x [B, ...] -> x's shape, float32."""
    z = self.features(x, t, h, y, g, s)
    return self.out(z).reshape(x.shape).astype(jnp.float32)
