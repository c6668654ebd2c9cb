"""The multi-scale feature dictionary and `FrozenEncoder`, its frozen user.

Feature dictionary (docs/methods/drifting.md §1.5, paper A.5), every value
[B, L, C_key]:
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

Official counterpart: lambertae/drifting `models/mae_model.py`
`get_activations` (same keys and values on the same maps; it also keeps
every location, the L = 1 pooled duplicates and a stage's last block:
tests/test_encoders.py re-derives it, docs/methods/drifting.md §1.5). Every
key but `norm_x` is invariant to the input's contrast x -> a·x (GroupNorm
after bias-free convs, also official), see §1.13.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from onestep_bench.encoders.network import encoder_fn, group_rule

EPS = 1e-6  # std = sqrt(var + EPS); norm_x = sqrt(mean x² + EPS) (§1.5)
POOLS = (2, 4)


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
