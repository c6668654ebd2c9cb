"""Backbones with one signature, `model(x, t, h, y, g)`, as pure functions.

`build(config.model, spec)` returns a `Backbone`, a `Functional`
(models/functional.py): `init(key) -> params` (a plain nested dict of
arrays) and `apply(params, x, t, h, y, g)`. Modules are flax.nnx; params are
split out once and merged back inside jit, so methods see a functional API
and the harness can checkpoint / shard plain pytrees.

Backbones (`config.model.name`; other keys are constructor options):
  'mlp'  -- models/mlp.py, any data (flattened), the toy-2D default.
  'mlp_plain' -- models/mlp_plain.py, torchcfm's / the Drifting toy demo's
            plain MLP (concatenated time, SELU or SiLU, PyTorch init), for
            like-for-like comparisons with those peers (docs/perf_peers.md).
  'unet' -- models/unet.py, ADM-style U-Net for (H, W, C) images.
  'dit'  -- models/dit.py, DiT tiny/S/B/L/XL with TVM's options.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import jax
import ml_collections
from flax import nnx

from onestep_bench.data import DataSpec
from onestep_bench.models.functional import Functional, int_keys, str_keys

__all__ = ['Backbone', 'Functional', 'build', 'int_keys', 'options',
           'str_keys']


class Backbone(Functional):
  """A shared backbone: `Functional` with the `model(x, t, h, y, g, s)` call."""

  def apply(self, params: dict[str, Any], x: jax.Array, t: jax.Array,
            h: jax.Array, y: jax.Array | None = None,
            g: jax.Array | None = None,
            s: jax.Array | None = None) -> jax.Array:
    """model(x, t, h, y, g, s); pure in `params`.

    Args:
      params: from `init`.
      x: [B, *shape] float32.
      t: [B] float32 current time.
      h: [B] float32 second time input (MeanFlow t - r, TVM gap, 0 for FM).
      y: [B] int32 labels, or None for the null label.
      g: [B] float32 guidance input; only for backbones built with
        `guidance_embed=True` (required there, a ValueError elsewhere).
      s: [B, K] int32 style indices; only for backbones built with
        `style_tokens=K` (required there, a ValueError elsewhere).

    Returns:
      [B, *shape] float32.
    """
    module = self.bind(params)
    return module(x, t, h, y, g) if s is None else module(x, t, h, y, g, s)


def _backbone_class(name: str) -> tuple[type[nnx.Module], tuple[str, ...]]:
  """Class for `name` and the constructor args that come from the spec."""
  # pylint: disable=g-import-not-at-top
  if name == 'mlp':
    from onestep_bench.models.mlp import MLP
    return MLP, ('dim', 'num_classes')
  if name == 'mlp_plain':
    from onestep_bench.models.mlp_plain import MLPPlain
    return MLPPlain, ('dim', 'num_classes')
  if name == 'unet':
    from onestep_bench.models.unet import UNet
    return UNet, ('shape', 'num_classes')
  if name == 'dit':
    from onestep_bench.models.dit import DiT
    return DiT, ('shape', 'num_classes')
  raise ValueError(f'Unknown backbone config.model.name={name!r}. '
                   f"Available: 'mlp', 'mlp_plain', 'unet', 'dit'.")


def options(name: str) -> dict[str, Any]:
  """Configurable keys of backbone `name` with their defaults."""
  cls, from_spec = _backbone_class(name)
  params = inspect.signature(cls.__init__).parameters
  return {k: p.default for k, p in params.items()
          if k not in ('self', 'rngs', *from_spec)}


def build(config: ml_collections.ConfigDict, spec: DataSpec) -> Backbone:
  """Backbone named by `config.name` with its keyword options.

  Raises:
    ValueError: unknown backbone name, or an option key the backbone does
      not take (the message lists the valid keys).
  """
  cls, _ = _backbone_class(config.name)
  kwargs = {k: v for k, v in config.items() if k != 'name'}
  valid = options(config.name)
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ValueError(
        f'Unknown option(s) for backbone {config.name!r}: '
        + ', '.join(f'config.model.{k}' for k in unknown)
        + '. Valid keys: ' + ', '.join(sorted(valid)) + '.')
  if config.name in ('mlp', 'mlp_plain'):  # flattened data
    dim = math.prod(spec.shape)
    return Backbone(lambda rngs: cls(dim, num_classes=spec.num_classes,
                                     rngs=rngs, **kwargs))
  shape = tuple(spec.shape)
  return Backbone(lambda rngs: cls(shape, num_classes=spec.num_classes,
                                   rngs=rngs, **kwargs))
