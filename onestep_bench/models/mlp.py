"""`mlp`: the toy-2D backbone, `model(x, t, h, y)`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from onestep_bench.models.embeddings import LabelEmbed, TimeEmbed


class MLP(nnx.Module):
  """Residual SiLU MLP conditioned on (t, h, y) by adding embeddings.

  x: [B, D] -> [B, D]. The conditioning vector c = e_t(t) + e_h(h) (+ e_y(y))
  is added to the hidden state before every block (two separate time
  embedders, as MeanFlow/TVM use for t and the gap h).
  """

  def __init__(self, dim: int, *, width: int = 256, depth: int = 3,
               num_classes: int = 0, freq_dim: int = 64, rngs: nnx.Rngs):
    self.inp = nnx.Linear(dim, width, rngs=rngs)
    self.t_embed = TimeEmbed(width, freq_dim, rngs=rngs)
    self.h_embed = TimeEmbed(width, freq_dim, rngs=rngs)
    self.y_embed = (LabelEmbed(num_classes, width, rngs=rngs)
                    if num_classes else None)
    self.blocks = nnx.List([nnx.Linear(width, width, rngs=rngs)
                            for _ in range(depth)])
    self.out = nnx.Linear(width, dim, kernel_init=nnx.initializers.zeros,
                          rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, h: jax.Array,
               y: jax.Array | None = None) -> jax.Array:
    c = self.t_embed(t) + self.h_embed(h)
    if self.y_embed is not None:
      c = c + self.y_embed(y, x.shape[0])
    z = self.inp(x.reshape(x.shape[0], -1))
    for blk in self.blocks:
      z = z + blk(nnx.silu(z + c))
    return self.out(nnx.silu(z)).reshape(x.shape).astype(jnp.float32)
