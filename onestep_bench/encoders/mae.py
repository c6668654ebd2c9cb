"""The masked auto-encoder of the pre-training: masks, model, loss.

MAE pre-training (docs/methods/drifting.md §1.5): p×p patches are zeroed
independently with probability 0.5; the loss is the L2 reconstruction error
on the masked pixels only. The training loop is pretrain.py; the evaluation
of a trained MAE is probe.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from onestep_bench.data.images import to_float
from onestep_bench.encoders.network import (
  decoder_fn,
  encoder_fn,
  group_rule,
  init_numpy,
)


def to_input(x: jax.Array, scale: float = 1.0) -> jax.Array:
  """uint8 pixels -> [-1, 1]; float latents -> x * scale (as ImageArrays)."""
  return to_float(x) if x.dtype == jnp.uint8 else x * scale


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
    self.decoder = decoder_fn(r, c)

  def __hash__(self) -> int:
    return hash(self._id)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, MAE) and other._id == self._id

  def init(self, seed: int) -> dict[str, Any]:
    """{'encoder': ..., 'decoder': ...} fresh parameters (numpy draws)."""
    return {'encoder': init_numpy(self.encoder, seed, 0),
            'decoder': init_numpy(self.decoder, seed, 1)}

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
