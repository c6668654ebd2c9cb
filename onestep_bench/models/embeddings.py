"""Time and label embeddings shared by all backbones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def sinusoidal(t: jax.Array, dim: int,
               max_period: float = 10000.0) -> jax.Array:
  """GLIDE/DiT sinusoidal embedding of raw times t in [0, 1] ([cos, sin]).

  Raw t (not t·1000), as the official MeanFlow and TVM code embed it
  (docs/methods/flow_matching.md §0): t-derivatives stay O(1), needed by
  the JVP-based targets of MeanFlow / TVM.

  Args:
    t: [B] float times.
    dim: even embedding width.
    max_period: lowest frequency's period.

  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half) / half)
  args = t[:, None].astype(jnp.promote_types(t.dtype, jnp.float32))
  args = args * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)


class TimeEmbed(nnx.Module):
  """sinusoidal(t) -> Linear -> SiLU -> Linear (DiT `TimestepEmbedder`)."""

  def __init__(self, out: int, freq_dim: int, *, rngs: nnx.Rngs,
               kernel_init: nnx.Initializer | None = None):
    self.freq_dim = freq_dim
    init = kernel_init or nnx.initializers.normal(0.02)
    self.fc1 = nnx.Linear(freq_dim, out, kernel_init=init, rngs=rngs)
    self.fc2 = nnx.Linear(out, out, kernel_init=init, rngs=rngs)

  def __call__(self, t: jax.Array) -> jax.Array:
    """Times [B] -> [B, out]."""
    return self.fc2(nnx.silu(self.fc1(sinusoidal(t, self.freq_dim))))


class LabelEmbed(nnx.Module):
  """Class table with one extra row, index `num_classes`, for the null label."""

  def __init__(self, num_classes: int, out: int, *, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.table = nnx.Embed(num_classes + 1, out,
                           embedding_init=nnx.initializers.normal(0.02),
                           rngs=rngs)

  def __call__(self, y: jax.Array | None, batch: int) -> jax.Array:
    """Labels [B] int (None -> null label) -> [B, out]."""
    if y is None:
      y = jnp.full((batch,), self.num_classes, jnp.int32)
    return self.table(y)


class StyleEmbed(nnx.Module):
  """Σ_k E_k[s_k]: K separate V-entry tables, one per style index.

  Drifting Models' "style" input (Deng et al. 2026, arXiv 2602.04770, App.
  A.2; official `models/generator.py`: 32 tables of 64 entries, each index
  drawn uniformly at sampling and training time): extra discrete noise that
  enters through the conditioning vector instead of the pixels.
  """

  def __init__(self, tokens: int, vocab: int, out: int, *, rngs: nnx.Rngs):
    self.tokens, self.vocab = tokens, vocab
    self.table = nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (tokens, vocab, out), jnp.float32))

  def __call__(self, s: jax.Array) -> jax.Array:
    """Indices [B, K] int in [0, V) -> [B, out]."""
    if s.ndim != 2 or s.shape[1] != self.tokens:
      raise ValueError(f'style input must be [B, {self.tokens}] int indices, '
                       f'got shape {s.shape}.')
    rows = self.table[...][jnp.arange(self.tokens)[None, :], s]  # [B, K, out]
    return jnp.sum(rows, axis=1)


def embed_conditions(m: nnx.Module, t: jax.Array, h: jax.Array,
                     y: jax.Array | None, g: jax.Array | None,
                     batch: int, s: jax.Array | None = None) -> jax.Array:
  """The conditioning vector c = t_embed(t) + h_embed(h) [+ y] [+ g] [+ s].

  `m` is a backbone with attributes `t_embed`, `h_embed` (`TimeEmbed`),
  `y_embed` (`LabelEmbed` or None when unconditional) and `g_embed`
  (`TimeEmbed` on the guidance input, or None without `guidance_embed`) and
  optionally `s_embed` (`StyleEmbed`, built with `style_tokens > 0`).

  Raises:
    ValueError: g given to a backbone built without a guidance embedder, or
      missing for one built with it.
  """
  c = m.t_embed(t) + m.h_embed(h)
  if m.y_embed is not None:
    c = c + m.y_embed(y, batch)
  g_embed = getattr(m, 'g_embed', None)
  if g is not None and g_embed is None:
    raise ValueError(
        f'{type(m).__name__} got a guidance input g but was built without a '
        'guidance embedder; set config.model.guidance_embed=True.')
  if g_embed is not None:
    if g is None:
      raise ValueError(
          f'{type(m).__name__} was built with guidance_embed=True and needs '
          'the guidance input g ([B] float32), e.g. a CFG scale.')
    c = c + g_embed(g)
  s_embed = getattr(m, 's_embed', None)
  if (s is None) != (s_embed is None):
    raise ValueError(
        f'{type(m).__name__}: style input s and config.model.style_tokens '
        'must come together (style_tokens > 0 builds the style tables; the '
        'method must then pass s [B, style_tokens] int indices).')
  if s_embed is not None:
    c = c + s_embed(s)
  return c
