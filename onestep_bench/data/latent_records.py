"""Training reads of `prepare_latents` output (format `onestep_latents/v1`).

`python -m onestep_bench.data.prepare_latents` writes, per split, a sidecar
`DIR/<split>.json` and ArrayRecord shards (onestep_bench/vae/records.py).
`LatentRecordSource` is the random-access source the host-fed pipeline
(`config.data.pipeline='grain'`, data/streamed.py) reads them through,
for `config.data.name='latents:DIR'`.

Design:

- Views are examples. A record holds V views of one image (x, and
  hflip(x) unless prepared with --no_hflip); the source exposes V·N
  examples, example i = view i mod V of record i // V. The pipeline's
  seeded global shuffle (data/pipeline.py) then covers every view exactly
  once per epoch (an epoch is V·N examples), deterministically per
  (seed, step) and bitwise resumable, as precomputed-flip training does
  (DiT / SiT's `--hflip` feature sets: each stored view is an example).
- `stat='moments'` (posterior mean and std, for z = mean + std·ε at train
  time) is refused: training on the mean alone is not DiT's recipe, and
  the sampling is not implemented. Re-run prepare_latents with
  --stat=mean.
- Scale. The records are already in the diffusion model's space (times
  the sidecar's `latent_scale`, after `latent_shift`), so the loader does
  not multiply them again; `config.data.latent_scale` (the scale the
  model's latents are in) must equal the sidecar's value (rel 1e-6).
  `.npy` latents are stored unscaled and are multiplied, as before.
- `config.data.hflip=True` is refused: the flip is in the data (views),
  and a flipped latent is not the latent of the flipped image.
- The device path (`pipeline='device'`, the split on every device) does
  not read records (ImageNet's are 21–84 GB): it raises a ConfigError
  naming `--config.data.pipeline=grain` (`refuse_device_path`).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import ml_collections
import numpy as np

from onestep_bench.config_check import ConfigError
from onestep_bench.vae import records

SPLITS = ('train', 'test', 'validation')
SCALE_RTOL = 1e-6
FINGERPRINT_RECORDS = 4096  # records hashed into the fingerprint (a sample)


class LatentRecordsError(ValueError):
  """Records the training loader cannot use; the message names the fix."""


def has_split(directory: str | None, split: str = 'train') -> bool:
  """Whether `directory` holds split `split` written by prepare_latents."""
  return bool(directory) and records.has_split(directory, split)


def _fix(directory: str, split: str, flags: str) -> str:
  return (f'python -m onestep_bench.data.prepare_latents --split={split} '
          f'--out=NEW_DIR {flags} (with the other flags of the run that '
          f'wrote {directory})')


class LatentRecordSource:
  """One prepared split as index -> {'x': float32 [h, w, c], 'y': int32}.

  grain's `RandomAccessDataSource` protocol (`__len__`, `__getitem__`) plus
  `read_batch(indices)` (one ArrayRecord read and one decode per batch),
  `read_all()` and `fingerprint()`. Example i is view i % V of record
  i // V. Thread-safe (grain's ArrayRecordDataSource).

  Attributes:
    meta: the sidecar.
    spec: the records' `records.LatentSpec`.
    views: V.
    count: N, records in the split.
    shape: (h, w, c) of one example; dtype: float32 (what reads return).
    num_classes: the source set's class count (sidecar source.num_classes).
    latent_scale: the sidecar's scale (the records are already in it).
  """

  def __init__(self, directory: str, split: str):
    self.directory, self.split = directory, split
    self.meta = records.read_sidecar(directory, split)
    path = records.sidecar_path(directory, split)
    try:
      self.spec = records.LatentSpec.from_sidecar(self.meta)
    except (KeyError, ValueError) as e:
      raise LatentRecordsError(f'{path}: not a readable {records.FORMAT} '
                               f'sidecar ({e}).') from e
    if self.spec.stat != 'mean':
      raise LatentRecordsError(
          f'{path}: stat={self.spec.stat!r} (posterior mean and std). '
          'Training would have to sample z = mean + std * eps per step, '
          "which this loader does not do (and the mean alone is not DiT's "
          'recipe). Fix: write posterior means, '
          + _fix(directory, split, '--stat=mean') + '.')
    self.views = len(self.spec.views)
    self.count = int(self.meta['count'])
    self.shape = tuple(self.spec.latent_shape)
    self.dtype = np.dtype(np.float32)
    self.num_classes = int(self.meta.get('source', {}).get('num_classes')
                           or 0)
    self.latent_scale = float(self.meta['latent_scale'])
    self._source = records.data_source(directory, split)  # all shards exist
    if len(self._source) != self.count:
      raise LatentRecordsError(
          f'{directory}: the shards of {split!r} hold {len(self._source)} '
          f'records, {path} says {self.count}; the files do not belong '
          'together. Re-run prepare_latents into an empty --out.')
    self._fingerprint: str | None = None

  def __len__(self) -> int:
    return self.count * self.views

  def __repr__(self) -> str:
    return f'LatentRecordSource({self.directory!r}, {self.split!r})'

  def _records(self, rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(latents [k, V, h, w, c] stored dtype, labels [k]) of records `rec`."""
    raw = self._source.__getitems__([int(r) for r in rec])
    bad = [len(b) for b in raw if len(b) != self.spec.record_bytes]
    if bad:
      raise LatentRecordsError(
          f'{self!r}: a record of {bad[0]} bytes, the sidecar says '
          f'{self.spec.record_bytes}; the shards are damaged. Re-run '
          'prepare_latents into an empty --out.')
    lat, labels, index = records.decode_records(raw, self.spec)
    if not np.array_equal(index, rec):
      raise LatentRecordsError(
          f'{self!r}: record {int(rec[0])} holds index {int(index[0])}; the '
          'shards are out of order or mixed. Re-run prepare_latents into an '
          'empty --out.')
    return lat, labels

  def read_batch(self, indices: Any) -> dict[str, np.ndarray]:
    """{'x': [k, h, w, c] float32, 'y': [k] int32} of examples `indices`."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    if idx.size and not 0 <= idx.min() <= idx.max() < len(self):
      raise IndexError(f'{self!r}: indices outside [0, {len(self)}).')
    rec, view = np.divmod(idx, self.views)
    lat, labels = self._records(rec)
    x = lat[np.arange(idx.size), view]
    return {'x': x.astype(np.float32), 'y': labels.astype(np.int32)}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    b = self.read_batch([index])
    return {'x': b['x'][0], 'y': b['y'][0]}

  def read_all(self) -> tuple[np.ndarray, np.ndarray]:
    """Every example ([V·N, h, w, c] float32, [V·N] int32) in host memory."""
    parts = [self.read_batch(range(lo, min(len(self), lo + 4096)))
             for lo in range(0, len(self), 4096)]
    return (np.concatenate([p['x'] for p in parts]),
            np.concatenate([p['y'] for p in parts]))

  def fingerprint(self) -> str:
    """Content identity: the sidecar and the bytes of <= 4096 records.

    The records hashed are evenly spaced over the split (all of a small
    one), as `sources.ArraySource` samples its examples; the sidecar names
    the VAE's weights hash, the preprocessing and the layout.
    """
    if self._fingerprint is None:
      h = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode())
      take = np.unique(np.linspace(0, self.count - 1, min(
          self.count, FINGERPRINT_RECORDS)).astype(np.int64))
      for lo in range(0, take.size, 1024):
        for b in self._source.__getitems__(
            [int(r) for r in take[lo:lo + 1024]]):
          h.update(b)
      self._fingerprint = (
          f'latent_records:{self.meta.get("split", self.split)}:'
          f'{self.count}x{self.views}:{list(self.shape)}:'
          f'{self.spec.np_dtype.str}:{h.hexdigest()[:16]}')
    return self._fingerprint


def open_splits(directory: str) -> dict[str, LatentRecordSource]:
  """{split: source} for every prepared split of `directory` (train first).

  Splits must agree on the latent shape, scale, shift and VAE.
  """
  out = {s: LatentRecordSource(directory, s) for s in SPLITS
         if has_split(directory, s)}
  if 'train' not in out:
    raise LatentRecordsError(
        f'No {records.sidecar_path(directory, "train")} of format '
        f'{records.FORMAT}. Fix: ' + _fix(directory, 'train', '') + '.')
  train = out['train']

  def key(src):
    m = src.meta
    return (src.shape, m.get('latent_scale'), m.get('latent_shift'),
            m.get('vae', {}).get('sha256'))
  for s, src in out.items():
    if key(src) != key(train):
      raise LatentRecordsError(
          f'{directory}: split {s} (shape, scale, shift, VAE sha256) = '
          f'{key(src)}, train = {key(train)}; prepare both splits with the '
          'same VAE and --size.')
  return out


def loader_scale(config: ml_collections.ConfigDict,
                 train: LatentRecordSource) -> float:
  """The multiplier the loader applies to records: 1 (they are scaled).

  Raises:
    ConfigError: `data.latent_scale` is not the sidecar's `latent_scale`
      (the records would be in another scale than the model expects), or
      `data.hflip` is set.
  """
  want = config.get('latent_scale', None)
  have = train.latent_scale
  path = records.sidecar_path(train.directory, train.split)
  if want is None or not math.isclose(float(want), have, rel_tol=SCALE_RTOL,
                                      abs_tol=0.0):
    raise ConfigError(
        'data.latent_scale', want,
        f'must equal the latent_scale of the records, {have!r} ({path}): '
        'prepare_latents stores latents already multiplied by it, so the '
        'loader does not scale them again, and data.latent_scale is the '
        "scale the model's latents are in (for unscaled .npy latents the "
        'loader multiplies by it)',
        f'--config.data.latent_scale={have!r}')
  if config.get('hflip', False):
    raise ConfigError(
        'data.hflip', config.get('hflip'),
        f'is not applied to prepare_latents records (views '
        f'{list(train.spec.views)} in {path}): the flip augmentation is '
        'in the data (each view is an example), and a flipped latent is not '
        'the latent of the flipped image',
        '--config.data.hflip=False (prepare without --no_hflip for the '
        'papers\' flip augmentation)')
  return 1.0


def refuse_device_path(directory: str) -> None:
  """The device path does not read records; raises a ConfigError saying so."""
  path = records.sidecar_path(directory, 'train')
  try:
    meta = records.read_sidecar(directory, 'train')
    size = (f'{meta["count"] * meta["record_bytes"] / 1e9:.3g} GB '
            'for train; ')
  except (OSError, ValueError, KeyError, TypeError):
    size = ''
  raise ConfigError(
      'data.pipeline', 'device',
      f'{directory} holds {records.FORMAT} latent records ({path}; '
      f'{size}ImageNet-256: 21-84 GB), which only the host-fed pipeline '
      'reads (the device path would copy the whole split to every device)',
      "--config.data.pipeline=grain (or set c.data.pipeline = 'grain' in "
      'the config)')

