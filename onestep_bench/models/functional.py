"""`Functional`: an nnx module constructor as pure functions of a params dict.

The one wrapper between flax.nnx modules and the harness's plain pytrees:
`init(key)` draws params (a nested dict of arrays with str keys, what
checkpoints and shardings want), `apply(params, *args)` / `bind(params)`
merge them back into the module inside jit, so callers see a functional
API. `models.Backbone` (the shared `model(x, t, h, y, g)` networks), method
heads and the frozen feature encoders all use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx


class Functional:
  """An nnx module constructor as `init(key)`, `apply(params, ...)`, `bind`.

  The module is built once abstractly (`nnx.eval_shape`, nothing allocated)
  for its graph definition and parameter shapes. A subclass may draw params
  its own way (e.g. in numpy) from `abstract()` and still use `apply` /
  `bind`.
  """

  def __init__(self, ctor: Callable[[nnx.Rngs], nnx.Module]):
    """Args: ctor: `rngs -> module`, called with `nnx.Rngs(key)` by `init`."""
    self._ctor = ctor
    self._graphdef, self._abstract = nnx.split(
        nnx.eval_shape(lambda: ctor(nnx.Rngs(0))))

  def init(self, key: jax.Array) -> dict[str, Any]:
    """Fresh parameters (the module's own initializers) as a str-keyed dict."""
    _, state = nnx.split(self._ctor(nnx.Rngs(key)))
    return str_keys(nnx.to_pure_dict(state))

  def abstract(self) -> dict[str, Any]:
    """The params tree of `jax.ShapeDtypeStruct`s (str keys), no arrays."""
    return str_keys(nnx.to_pure_dict(self._abstract))

  def bind(self, params: dict[str, Any]) -> nnx.Module:
    """The module with `params` merged in; call any of its methods on it.

    Pure in `params` when used inside a traced function: the module is
    rebuilt from the abstract state each call, never mutated.
    """
    state = jax.tree.map(lambda a: a, self._abstract)
    nnx.replace_by_pure_dict(state, int_keys(params))
    return nnx.merge(self._graphdef, state)

  def apply(self, params: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    """`module(*args, **kwargs)` with `params`: `bind(params)(...)`."""
    return self.bind(params)(*args, **kwargs)

  def num_params(self) -> int:
    """Parameter count, from abstract shapes (nothing is allocated)."""
    return sum(math.prod(a.shape) for a in jax.tree.leaves(self._abstract))


def str_keys(tree: Any) -> Any:
  """Keys as strings (nnx list indices are ints; checkpoints want strings)."""
  if isinstance(tree, dict):
    return {str(k): str_keys(v) for k, v in tree.items()}
  return tree


def int_keys(tree: Any) -> Any:
  """Inverse of `str_keys`: digit keys back to ints (nnx list indices)."""
  if isinstance(tree, dict):
    return {int(k) if k.isdigit() else k: int_keys(v)
            for k, v in tree.items()}
  return tree
