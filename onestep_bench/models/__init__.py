"""Backbones with one signature, `model(x, t, h, y)`, as pure functions.

`build(config.model, spec)` returns a `Backbone`: `init(key) -> params` (a
plain nested dict of arrays) and `apply(params, x, t, h, y)`. Modules are
flax.nnx; params are split out once and merged back inside jit, so methods
see a functional API and the harness can checkpoint / shard plain pytrees.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from flax import nnx

from onestep_bench.data import DataSpec


class Backbone:
  """A functional wrapper around an nnx module constructor."""

  def __init__(self, ctor: Callable[[nnx.Rngs], nnx.Module]):
    self._ctor = ctor
    abstract = nnx.eval_shape(lambda: ctor(nnx.Rngs(0)))
    self._graphdef, self._abstract = nnx.split(abstract)

  def init(self, key: jax.Array) -> dict[str, Any]:
    """Fresh parameters as a nested dict of arrays."""
    _, state = nnx.split(self._ctor(nnx.Rngs(key)))
    return _str_keys(nnx.to_pure_dict(state))

  def apply(self, params: dict[str, Any], x: jax.Array, t: jax.Array,
            h: jax.Array, y: jax.Array | None = None) -> jax.Array:
    """model(x, t, h, y); pure in `params`."""
    state = jax.tree.map(lambda a: a, self._abstract)
    nnx.replace_by_pure_dict(state, _int_keys(params))
    return nnx.merge(self._graphdef, state)(x, t, h, y)

  def num_params(self) -> int:
    return sum(math.prod(a.shape) for a in jax.tree.leaves(self._abstract))


def _str_keys(tree: Any) -> Any:
  """Keys as strings (nnx list indices are ints; checkpoints want strings)."""
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def _int_keys(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {int(k) if k.isdigit() else k: _int_keys(v)
            for k, v in tree.items()}
  return tree


def build(config: ml_collections.ConfigDict, spec: DataSpec) -> Backbone:
  """Backbone named by `config.name` with its keyword options."""
  kwargs = {k: v for k, v in config.items() if k != 'name'}
  if config.name == 'mlp':
    from onestep_bench.models.mlp import MLP  # pylint: disable=g-import-not-at-top
    dim = math.prod(spec.shape)
    return Backbone(lambda rngs: MLP(dim, num_classes=spec.num_classes,
                                     rngs=rngs, **kwargs))
  raise ValueError(f'Unknown backbone config.model.name={config.name!r}. '
                   "Available: 'mlp'.")
