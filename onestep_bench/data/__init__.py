"""Datasets. `build(config.data)` returns an object with the `Dataset` API.

By default (`config.data.pipeline='device'`) a dataset draws training
batches *inside* the jitted train step from a key (`sample(key, n)`), so
there is no iterator state to checkpoint and resume is bitwise. Toy sets are
exact samplers of known distributions. Image / latent sets larger than device
memory use `pipeline='grain'` (data/pipeline.py, data/streamed.py): batches
are read on the host in a seeded per-epoch order and fed to the step; the
iterator position is checkpointed with the state, so resume stays bitwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

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
    kind: 'toy2d', 'image' or 'latent'; selects the evaluator family.
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
  """What the harness needs of a dataset (toy2d.Toy2D, images.ImageArrays)."""

  spec: DataSpec

  @property
  def arrays(self) -> dict[str, jax.Array]:
    """Device-resident data passed to `sample` inside jit ({} for toys)."""

  def sample(self, key: jax.Array, n: int,
             arrays: dict[str, jax.Array] | None = None, *,
             groups: int = 0) -> dict[str, jax.Array]:
    """A batch {'x': [n, *shape]} (+ 'y' when labelled); jit-able.

    `groups=G` asks labelled data for G contiguous one-class blocks.
    """

  def reference(self, key: jax.Array, n: int) -> np.ndarray:
    """`n` exact / held-out reference examples for evaluation."""


IMAGE_SETS = ('digits', 'fashion_mnist', 'mnist', 'cifar10', 'imagenet64')


def build(config: ml_collections.ConfigDict) -> Dataset:
  """Dataset from `config.name` ('toy2d:<name>', 'digits', 'latents:<dir>'…).

  Optional keys: `dir` (data directory: IDX dir, TFDS data_dir, or a
  directory of the harness's ArrayRecord files, data/arrayrecord.py),
  `conditional` (feed class labels; default False), `hflip` (random
  horizontal flips), `latent_scale` (the scale the model's latents are
  in: `.npy` latents are multiplied by it; `prepare_latents` records,
  already scaled, must match their sidecar's and are read only by
  `pipeline='grain'`, data/latent_records.py),
  `pipeline` ('device' default | 'grain': a host-fed `StreamedImages`),
  `holdout` / `holdout_seed` (in-memory image / latent data: a validation
  split carved from train, `check_holdout`).
  """
  family, _, sub = config.name.partition(':')
  holdout, holdout_seed = check_holdout(config)  # before anything is read
  if family == 'toy2d':
    from onestep_bench.data import toy2d  # pylint: disable=g-import-not-at-top
    return toy2d.Toy2D(sub)
  if (config.get('pipeline') or 'device') == 'grain':
    from onestep_bench.data import streamed  # pylint: disable=g-import-not-at-top
    return streamed.build(config)
  from onestep_bench.data import arrayrecord, images, sources  # pylint: disable=g-import-not-at-top
  directory = config.get('dir') or None
  kwargs = dict(conditional=bool(config.get('conditional', False)),
                hflip=bool(config.get('hflip', False)))

  def arrays(splits, k, kind='image', **kw):
    info = None
    if holdout:  # a development view: train minus the validation split
      splits, info = images.carve_holdout(splits, holdout, holdout_seed,
                                          config.name)
    return images.ImageArrays(config.name, splits, k, kind=kind,
                              holdout=info, **kwargs, **kw)
  stored = sub if family == 'latents' else directory
  if arrayrecord.has_split(stored):  # our ArrayRecord files, into memory
    splits, k, kind = arrayrecord.load_splits(
        stored, None if family == 'latents' else family)
    return arrays(splits, k, kind,
                  scale=float(config.get('latent_scale', 1.0)))
  if family == 'latents':
    if not sub:
      raise ValueError("Use config.data.name='latents:<directory>'.")
    from onestep_bench.data import latent_records  # pylint: disable=g-import-not-at-top
    if latent_records.has_split(sub):  # prepare_latents' records: too big
      latent_records.refuse_device_path(sub)
    splits, k = sources.load_latents(sub)
    return arrays(splits, k, 'latent',
                  scale=float(config.get('latent_scale', 1.0)))
  if family == 'digits':
    splits, k = sources.load_digits()
  elif family == 'fashion_mnist':
    splits, k = sources.load_fashion_mnist(directory)
  elif family in sources.TFDS_NAMES:
    splits, k = sources.load_tfds(family, directory,
                                  splits=sources.tfds_splits(family))
  else:
    raise ValueError(
        f'Unknown dataset {config.name!r}. Available: '
        + ', '.join([f'toy2d:{n}' for n in _toy_names()] + list(IMAGE_SETS)
                    + ['latents:<dir>']) + '.')
  return arrays(splits, k)


def check_holdout(config: ml_collections.ConfigDict) -> tuple[Any, int]:
  """(`holdout`, `holdout_seed`) of `config.data`, checked before loading.

  `holdout` (default 0 = none): a fraction in (0, 1) or an int count of the
  train split, removed from it and kept as the split `images.HOLDOUT_SPLIT`
  ('validation'); the source's other splits (test) are dropped
  (`images.carve_holdout`). Training never sees the held-out images, and a
  dataset built with a holdout has no test split. `holdout_seed` (default
  0; the tuning procedure declares its own, experiments/tuning.py) fixes
  which images. Only in-memory image / latent data (pipeline 'device').

  Raises:
    ConfigError: a bad value, toy data, or the host-fed pipeline (the
      message names the key, the value and the fix).
  """
  from onestep_bench.config_check import ConfigError, is_int  # pylint: disable=g-import-not-at-top
  from onestep_bench.data import images  # pylint: disable=g-import-not-at-top
  holdout = config.get('holdout', 0)
  images.holdout_count(holdout, 0)  # type / range; the size check on load
  seed = config.get('holdout_seed', 0)
  if seed is None:
    seed = 0
  if not is_int(seed) or not 0 <= seed < 2**32:
    raise ConfigError('data.holdout_seed', seed, 'must be an int in [0, '
                      '2**32 - 1]', 'e.g. --config.data.holdout_seed=0')
  if not holdout:
    return 0, int(seed)
  family = str(config.get('name')).partition(':')[0]
  if family == 'toy2d':
    raise ConfigError('data.holdout', holdout, 'applies to image / latent '
                      'data only (toy sets are exact samplers with no train '
                      'split)', 'leave config.data.holdout at 0 for toy2d:'
                      '<name>; validation there uses fresh exact samples')
  if (config.get('pipeline') or 'device') == 'grain':
    raise ConfigError('data.holdout', holdout, "is not implemented for the "
                      "host-fed pipeline (config.data.pipeline='grain')",
                      "use config.data.pipeline='device' (in-memory data), "
                      'or set config.data.holdout=0')
  return holdout, int(seed)


def _toy_names() -> list[str]:
  from onestep_bench.data import toy2d  # pylint: disable=g-import-not-at-top
  return sorted(toy2d.SAMPLERS)
