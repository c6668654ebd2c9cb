"""Loaders that turn on-disk / bundled datasets into uint8 NHWC splits.

Every loader returns `{split: (images uint8 [N, H, W, C], labels int [N])}`
plus the number of classes. Missing files raise `DatasetNotFoundError` with
one message naming the fix; nothing is ever downloaded at run time.

- `digits`: scikit-learn's bundled 8×8 digits (values 0..16 → 0..255), split
  deterministically into 1437 train / 360 test (seeded permutation).
- `fashion_mnist`: the four IDX files of the Debian package
  `dataset-fashion-mnist` (default dir /usr/share/datasets/fashion-mnist).
- `mnist`, `cifar10`, `imagenet64`: TFDS `data_source` (ArrayRecord, TF-free)
  over a prepared TFDS data dir (`download=False`).
- `latents:<dir>`: precomputed VAE latents `<dir>/{split}_latents.npy`
  [N, h, w, c] float (unscaled: times `config.data.latent_scale`) and
  `<dir>/{split}_labels.npy`. A `<dir>` of `prepare_latents` records
  (`onestep_latents/v1`, already scaled) is read by
  `data/latent_records.py`, host-fed only.

The host-fed pipeline (`config.data.pipeline='grain'`, data/pipeline.py)
reads the same data through random-access sources instead, index ->
{'x': example, 'y': int32 label}: `TfdsSource` (a `tfds.data_source`
split), `ArraySource` (arrays in memory or memory-mapped `.npy`; see
`open_latents`) and `arrayrecord.ArrayRecordSource` (the harness's own
ArrayRecord files). Each has a `fingerprint()` that resumed runs check.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from onestep_bench.data import idx

Splits = dict[str, tuple[np.ndarray, np.ndarray]]

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
# name -> (tfds builder name, num_classes)
TFDS_NAMES = {'mnist': ('mnist', 10), 'cifar10': ('cifar10', 10),
              'imagenet64': ('imagenet_resized/64x64', 1000)}


class DatasetNotFoundError(FileNotFoundError):
  """Dataset files are absent; the message says how to get them."""


def load_digits(seed: int = 0, num_test: int = 360) -> tuple[Splits, int]:
  """scikit-learn digits as uint8 [N, 8, 8, 1] (x·255/16, rounded)."""
  from sklearn.datasets import load_digits as sk_digits  # pylint: disable=g-import-not-at-top
  d = sk_digits()
  images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  perm = np.random.RandomState(seed).permutation(len(images))
  test, train = perm[:num_test], perm[num_test:]
  return {'train': (images[train], d.target[train]),
          'test': (images[test], d.target[test])}, 10


def _find(directory: str, stem: str) -> str | None:
  for name in (stem, stem + '.gz'):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


def load_fashion_mnist(directory: str | None = None) -> tuple[Splits, int]:
  """Fashion-MNIST from its IDX files as uint8 [N, 28, 28, 1]."""
  directory = (directory or os.environ.get('ONESTEP_FASHION_MNIST_DIR')
               or FASHION_MNIST_DIR)
  splits = {}
  for split, stems in FASHION_MNIST_FILES.items():
    paths = [_find(directory, s) for s in stems]
    if None in paths:
      missing = [s for s, p in zip(stems, paths, strict=True) if p is None]
      raise DatasetNotFoundError(
          f'Fashion-MNIST files {missing} (or .gz) not found in {directory}. '
          'Install them with `make data` (runs `apt-get install -y '
          'dataset-fashion-mnist`), or point config.data.dir / '
          'ONESTEP_FASHION_MNIST_DIR at a directory holding the four IDX '
          'files.')
    images, labels = (idx.read_idx(p) for p in paths)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
      raise idx.IdxError(f'{paths[0]}: expected [N, 28, 28] images matching '
                         f'{labels.shape[0]} labels, got {images.shape}.')
    splits[split] = (images[..., None].astype(np.uint8), labels)
  return splits, 10


def tfds_data_source(builder: str, split: str, data_dir: str | None,
                     fix: str) -> Any:
  """`tfds.data_source(builder)` of a prepared dataset (random access).

  Needs no TensorFlow. A dataset that is not prepared raises
  DatasetNotFoundError naming it, the tfds build command and `fix`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(builder, split=split, data_dir=data_dir,
                            download=False)
  except Exception as e:  # tfds raises several types for "not prepared"
    raise DatasetNotFoundError(
        f'TFDS dataset {builder!r} split {split!r} is not prepared in '
        f'data_dir={data_dir or "~/tensorflow_datasets"} '
        f'({type(e).__name__}: {e}). Prepare it on a machine with the '
        f'source files (`tfds build {builder} --data_dir=DIR`, ArrayRecord '
        f'format) and {fix}.') from e


def open_tfds(name: str, data_dir: str | None, split: str) -> Any:
  """`tfds.data_source` of the prepared dataset `name` (TFDS_NAMES)."""
  return tfds_data_source(TFDS_NAMES[name][0], split, data_dir,
                          'set config.data.dir=DIR')


def load_tfds(name: str, data_dir: str | None = None,
              splits: tuple[str, ...] = ('train', 'test')
              ) -> tuple[Splits, int]:
  """A prepared TFDS dataset read through `tfds.data_source` (no TF needed)."""
  num_classes = TFDS_NAMES[name][1]
  out = {}
  for split in splits:
    source = open_tfds(name, data_dir, split)
    n = len(source)
    first = source[0]
    images = np.empty((n, *np.shape(first['image'])), np.uint8)
    labels = np.empty((n,), np.int32)
    for i in range(n):  # random access; decodes one record at a time
      row = source[i]
      images[i], labels[i] = row['image'], row['label']
    out[split] = (images, labels)
  return out, num_classes


def tfds_splits(name: str) -> tuple[str, ...]:
  """The (train, held-out) splits the harness reads of a TFDS set."""
  return ('train', 'validation') if name == 'imagenet64' else ('train', 'test')


def read_rows(source: Any, indices: Any) -> dict[str, np.ndarray]:
  """{'x': [k, ...], 'y': [k] int32} of examples `indices` of a source.

  One `read_batch` call where the source has one, else one read per index.
  """
  if hasattr(source, 'read_batch'):
    return source.read_batch(indices)
  rows = [source[int(i)] for i in indices]
  return {'x': np.stack([np.asarray(r['x']) for r in rows]),
          'y': np.asarray([r['y'] for r in rows], np.int32)}


class TfdsSource:
  """A `tfds.data_source` split as index -> {'x': uint8 image, 'y': int32}.

  grain's `RandomAccessDataSource` protocol; each read decodes one record.
  """

  def __init__(self, name: str, data_dir: str | None, split: str):
    self.name, self.split = name, split
    self._source = open_tfds(name, data_dir, split)
    self.num_classes = TFDS_NAMES[name][1]

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    row = self._source[index]
    return {'x': np.asarray(row['image'], np.uint8),
            'y': np.int32(row['label'])}

  def __repr__(self) -> str:
    return f'TfdsSource({self.name!r}, {self.split!r})'

  def fingerprint(self) -> str:
    """Builder, version, split and size (TFDS versions pin the content)."""
    info = self._source.dataset_info
    return f'tfds:{info.full_name}/{self.split}:{len(self)}'


class ArraySource:
  """In-memory (or memory-mapped) arrays as a random-access source.

  Index -> {'x': examples[i], 'y': int32 label}; `examples` may be a
  memory-mapped `.npy` array (mmap_mode='r'), so a file larger than host
  memory streams from disk. Float examples are read as float32.
  """

  def __init__(self, examples: np.ndarray, labels: np.ndarray, name: str,
               split: str):
    if labels.shape != (examples.shape[0],):
      raise ValueError(f'{name}/{split}: {examples.shape[0]} examples but '
                       f'labels of shape {labels.shape}.')
    self.examples, self.labels = examples, labels.astype(np.int32)
    self.name, self.split = name, split
    self._float = examples.dtype != np.uint8

  def __len__(self) -> int:
    return int(self.examples.shape[0])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    x = self.examples[index]
    return {'x': np.asarray(x, np.float32) if self._float else x,
            'y': self.labels[index]}

  def read_batch(self, indices: Any) -> dict[str, np.ndarray]:
    """{'x': [k, ...], 'y': [k]} of `indices` (one fancy-indexed read)."""
    idx = np.asarray(indices, np.int64)
    x = self.examples[idx]
    return {'x': np.asarray(x, np.float32) if self._float else x,
            'y': self.labels[idx]}

  def __repr__(self) -> str:
    return f'ArraySource({self.name!r}, {self.split!r})'

  def fingerprint(self) -> str:
    """Shape, dtype and a hash of the labels and of <= 4096 examples."""
    n = len(self)
    take = np.linspace(0, n - 1, min(n, 4096)).astype(np.int64)
    h = hashlib.sha256(self.labels.tobytes())
    h.update(np.ascontiguousarray(self.examples[take]).tobytes())
    return (f'array:{self.name}/{self.split}:{self.examples.shape}:'
            f'{self.examples.dtype}:{h.hexdigest()[:16]}')


def _latent_files(directory: str) -> tuple[Splits, int]:
  """{split: (memory-mapped latents, int32 labels)} and the class count."""
  splits = {}
  for split in ('train', 'test', 'validation'):
    path = os.path.join(directory, f'{split}_latents.npy')
    if not os.path.exists(path):
      continue
    lat = np.load(path, allow_pickle=False, mmap_mode='r')
    lab_path = os.path.join(directory, f'{split}_labels.npy')
    labels = (np.load(lab_path, allow_pickle=False) if os.path.exists(lab_path)
              else np.zeros(lat.shape[0], np.int32))
    splits[split] = (lat, labels.astype(np.int32))
  if 'train' not in splits:
    raise DatasetNotFoundError(
        f'No {directory}/train_latents.npy. Expected precomputed VAE latents '
        '`<split>_latents.npy` [N, h, w, c] (float) and `<split>_labels.npy` '
        '[N] (int) for split in train/test/validation, or an ArrayRecord '
        'directory (`python -m onestep_bench.data.arrayrecord`).')
  num_classes = int(max(s[1].max() for s in splits.values())) + 1
  return splits, num_classes


def load_latents(directory: str) -> tuple[Splits, int]:
  """Precomputed latents `<dir>/<split>_latents.npy` (+ `_labels.npy`)."""
  splits, num_classes = _latent_files(directory)
  return {k: (np.asarray(lat, np.float32), labels)
          for k, (lat, labels) in splits.items()}, num_classes


def open_latents(directory: str) -> tuple[dict[str, ArraySource], int]:
  """The latent splits as memory-mapped `ArraySource`s (nothing is read)."""
  splits, num_classes = _latent_files(directory)
  return {k: ArraySource(lat, labels, f'latents:{directory}', k)
          for k, (lat, labels) in splits.items()}, num_classes
