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
  [N, h, w, c] float and `<dir>/{split}_labels.npy`.
"""

from __future__ import annotations

import os

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


def load_tfds(name: str, data_dir: str | None = None,
              splits: tuple[str, ...] = ('train', 'test')
              ) -> tuple[Splits, int]:
  """A prepared TFDS dataset read through `tfds.data_source` (no TF needed)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder_name, num_classes = TFDS_NAMES[name]
  out = {}
  for split in splits:
    try:
      source = tfds.data_source(builder_name, split=split, data_dir=data_dir,
                                download=False)
    except Exception as e:  # tfds raises several types for "not prepared"
      raise DatasetNotFoundError(
          f'TFDS dataset {builder_name!r} split {split!r} is not prepared in '
          f'data_dir={data_dir or "~/tensorflow_datasets"} ({type(e).__name__}'
          f'). Prepare it on a machine with the source files (`tfds build '
          f'{builder_name} --data_dir=DIR`, ArrayRecord format) and set '
          'config.data.dir=DIR.') from e
    n = len(source)
    first = source[0]
    images = np.empty((n, *np.shape(first['image'])), np.uint8)
    labels = np.empty((n,), np.int32)
    for i in range(n):  # random access; decodes one record at a time
      row = source[i]
      images[i], labels[i] = row['image'], row['label']
    out[split] = (images, labels)
  return out, num_classes


def load_latents(directory: str) -> tuple[Splits, int]:
  """Precomputed latents `<dir>/<split>_latents.npy` (+ `_labels.npy`)."""
  splits = {}
  for split in ('train', 'test', 'validation'):
    path = os.path.join(directory, f'{split}_latents.npy')
    if not os.path.exists(path):
      continue
    lat = np.load(path, allow_pickle=False, mmap_mode='r')
    lab_path = os.path.join(directory, f'{split}_labels.npy')
    labels = (np.load(lab_path, allow_pickle=False) if os.path.exists(lab_path)
              else np.zeros(lat.shape[0], np.int32))
    splits[split] = (np.asarray(lat, np.float32), labels.astype(np.int32))
  if 'train' not in splits:
    raise DatasetNotFoundError(
        f'No {directory}/train_latents.npy. Expected precomputed VAE latents '
        '`<split>_latents.npy` [N, h, w, c] (float) and `<split>_labels.npy` '
        '[N] (int) for split in train/test/validation.')
  num_classes = int(max(s[1].max() for s in splits.values())) + 1
  return splits, num_classes
