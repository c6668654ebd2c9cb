"""Datasets. `build(config.data)` returns an object with the `Dataset` API.

A dataset draws training batches *inside* the jitted train step from a key
(`sample(key, n)`), so there is no iterator state to checkpoint and resume is
bitwise. Toy sets are exact samplers of known distributions.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True)
class Mixture:
  """An isotropic Gaussian mixture: centers [K, D], weights [K], one std."""

  centers: np.ndarray
  weights: np.ndarray
  std: float


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What methods and evaluators may know about the data.

  Attributes:
    name: full dataset name, e.g. 'toy2d:8gaussians'.
    shape: shape of one example, e.g. (2,) or (28, 28, 1).
    num_classes: 0 for unconditional data.
    kind: 'toy2d' or 'image'; selects the evaluator family.
    mixture: the exact mixture for Gaussian-mixture toys (mode metrics).
    mean: exact mean when known in closed form (the `gaussian` toy).
    cov: exact covariance when known in closed form.
  """

  name: str
  shape: tuple[int, ...]
  num_classes: int = 0
  kind: str = 'toy2d'
  mixture: Mixture | None = dataclasses.field(default=None, compare=False)
  mean: np.ndarray | None = dataclasses.field(default=None, compare=False)
  cov: np.ndarray | None = dataclasses.field(default=None, compare=False)


class Dataset(Protocol):
  spec: DataSpec

  def sample(self, key: jax.Array, n: int) -> dict[str, jax.Array]:
    """A batch {'x': [n, *shape]} (+ 'y' when labelled); jit-able."""

  def reference(self, key: jax.Array, n: int) -> np.ndarray:
    """`n` exact / held-out reference examples for evaluation."""


def build(config: ml_collections.ConfigDict) -> Dataset:
  """Dataset from `config.data.name` ('toy2d:<name>', ...)."""
  family, _, sub = config.name.partition(':')
  if family == 'toy2d':
    from onestep_bench.data import toy2d  # pylint: disable=g-import-not-at-top
    return toy2d.Toy2D(sub)
  raise ValueError(
      f'Unknown dataset {config.name!r}. Available: '
      + ', '.join(f'toy2d:{n}' for n in _toy_names()) + '.')


def _toy_names() -> list[str]:
  from onestep_bench.data import toy2d  # pylint: disable=g-import-not-at-top
  return sorted(toy2d.SAMPLERS)
