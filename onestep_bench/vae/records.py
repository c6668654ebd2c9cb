"""The latent record format (ArrayRecord), shared by writer and reader.

`python -m onestep_bench.data.prepare_latents` writes, for one split:

  DIR/<name>.json                          the sidecar (JSON, below)
  DIR/<name>-00000-of-00042.array_record   shard s holds the records of the
  ...                                      global indices [s·R, (s+1)·R),
                                           R = records_per_shard (last one
                                           shorter), in index order

where <name> is the split with every character outside [A-Za-z0-9_-]
replaced by '_' ('train[:1%]' -> 'train__1__'). Shards are written
whole (to `<file>.tmp-<pid>`, then renamed), so a shard file that exists
is complete. ArrayRecord options: `group_size:1,uncompressed` (random
access, one record per chunk).

Record i (raw bytes, little-endian, no pickle), `record_bytes` long:

  [0, 8)    label   int64
  [8, 16)   index   int64   (the example's index in the source split = i)
  [16, ..)  latent  `dtype` ('<f4' or '<f2'), C order, `shape`:
            stat='mean':    [V, h, w, c]     axes (view, h, w, c)
            stat='moments': [V, 2, h, w, c]  axes (view, stat, h, w, c),
                            stat 0 = posterior mean, 1 = posterior std
            view 0 = the image x, view 1 = hflip(x) when views = ('x',
            'hflip'). NHWC, and already in the diffusion model's space:
            mean = latent_scale · (E[z] − latent_shift), std =
            latent_scale · σ, so a posterior sample is mean + std · ε.

Sidecar keys: format ('onestep_latents/v1'), split, count, num_shards,
records_per_shard, record_bytes, header ([['label', '<i8'], ['index',
'<i8']]), dtype, shape, axes, views, stat, latent_scale, latent_shift,
vae {name, sha256, config, precision}, source {tfds, split, num_classes},
preprocess {crop: 'adm_center_crop', size, input: 'x / 127.5 - 1'},
options. The sidecar is written before the shards; a split is complete
when every shard file exists (`shard_paths` checks).

Reader API: `has_split(dir, split)`, `read_sidecar(dir, split)`,
`LatentSpec.from_sidecar(meta)`, `shard_paths(dir, split)`,
`data_source(dir, split)` (grain's
ArrayRecordDataSource over the shards: `source[i]` is record i's bytes),
`decode_record(bytes, spec)` -> (latent, label, index) and
`decode_records(list_of_bytes, spec)` -> (latents [B, *shape], labels [B],
indices [B]).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from onestep_bench.data import arrayrecord

FORMAT = 'onestep_latents/v1'
HEADER = (('label', '<i8'), ('index', '<i8'))
HEADER_BYTES = 16
DTYPES = ('float32', 'float16')
STATS = ('mean', 'moments')
VIEWS = (('x',), ('x', 'hflip'))
OPTIONS = 'group_size:1,uncompressed'


class IncompleteError(FileNotFoundError):
  """Shards are missing; the message names the command that resumes."""


@dataclasses.dataclass(frozen=True)
class LatentSpec:
  """The per-record latent: `shape` and `dtype` (see the module docstring).

  Attributes:
    latent_shape: [h, w, c] of one latent.
    dtype: 'float32' or 'float16' (stored little-endian).
    stat: 'mean' or 'moments'.
    views: ('x',) or ('x', 'hflip').
  """

  latent_shape: tuple[int, int, int]
  dtype: str = 'float32'
  stat: str = 'mean'
  views: tuple[str, ...] = ('x', 'hflip')

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f'dtype={self.dtype!r}: must be one of {DTYPES}.')
    if self.stat not in STATS:
      raise ValueError(f'stat={self.stat!r}: must be one of {STATS}.')
    if tuple(self.views) not in VIEWS:
      raise ValueError(f'views={self.views!r}: must be one of {VIEWS}.')

  @property
  def shape(self) -> tuple[int, ...]:
    """The stored array's shape: [V, (2,) h, w, c]."""
    stat = (2,) if self.stat == 'moments' else ()
    return (len(self.views), *stat, *self.latent_shape)

  @property
  def axes(self) -> tuple[str, ...]:
    """Names of `shape`'s axes."""
    stat = ('stat',) if self.stat == 'moments' else ()
    return ('view', *stat, 'h', 'w', 'c')

  @property
  def np_dtype(self) -> np.dtype:
    """The little-endian numpy dtype."""
    return np.dtype(self.dtype).newbyteorder('<')

  @property
  def record_bytes(self) -> int:
    """Bytes of one record."""
    return HEADER_BYTES + math.prod(self.shape) * self.np_dtype.itemsize

  def to_sidecar(self) -> dict[str, Any]:
    """The sidecar keys describing records."""
    return {'format': FORMAT, 'header': [list(h) for h in HEADER],
            'dtype': self.np_dtype.str, 'shape': list(self.shape),
            'axes': list(self.axes), 'views': list(self.views),
            'stat': self.stat, 'record_bytes': self.record_bytes}

  @classmethod
  def from_sidecar(cls, meta: dict[str, Any]) -> LatentSpec:
    """The spec a sidecar describes (ValueError for another format)."""
    if meta.get('format') != FORMAT:
      raise ValueError(f'sidecar format {meta.get("format")!r}, expected '
                       f'{FORMAT!r}.')
    shape = tuple(meta['shape'])
    return cls(latent_shape=tuple(shape[-3:]),
               dtype=np.dtype(meta['dtype']).name, stat=meta['stat'],
               views=tuple(meta['views']))


def encode_record(latent: np.ndarray, label: int, index: int,
                  spec: LatentSpec) -> bytes:
  """One record's bytes (header, then the latent in `spec`'s dtype)."""
  latent = np.asarray(latent)
  if latent.shape != spec.shape:
    raise ValueError(f'latent shape {latent.shape} != spec {spec.shape}.')
  header = np.asarray([label, index], '<i8').tobytes()
  return header + np.ascontiguousarray(latent, spec.np_dtype).tobytes()


def decode_record(data: bytes, spec: LatentSpec
                  ) -> tuple[np.ndarray, int, int]:
  """(latent `spec.shape`, label, index) of one record."""
  if len(data) != spec.record_bytes:
    raise ValueError(f'record of {len(data)} bytes, spec says '
                     f'{spec.record_bytes}.')
  label, index = np.frombuffer(data, '<i8', count=2)
  latent = np.frombuffer(data, spec.np_dtype, offset=HEADER_BYTES)
  return latent.reshape(spec.shape), int(label), int(index)


def decode_records(records: Sequence[bytes], spec: LatentSpec
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(latents [B, *shape], labels [B] int64, indices [B] int64)."""
  buf = np.frombuffer(b''.join(records), np.uint8).reshape(
      len(records), spec.record_bytes)
  head = buf[:, :HEADER_BYTES].copy().view('<i8')
  latents = buf[:, HEADER_BYTES:].copy().view(spec.np_dtype)
  return latents.reshape(len(records), *spec.shape), head[:, 0], head[:, 1]


# ------------------------------------------------------------------- files
def split_name(split: str) -> str:
  """A file-name-safe form of a split string."""
  return re.sub(r'[^A-Za-z0-9_-]', '_', split)


def sidecar_path(directory: str, split: str) -> str:
  """DIR/<name>.json."""
  return os.path.join(directory, f'{split_name(split)}.json')


def shard_path(directory: str, split: str, shard: int, num_shards: int
               ) -> str:
  """DIR/<name>-SSSSS-of-NNNNN.array_record."""
  return os.path.join(directory, f'{split_name(split)}-{shard:05d}-of-'
                      f'{num_shards:05d}.array_record')


def shard_bounds(count: int, records_per_shard: int
                 ) -> list[tuple[int, int]]:
  """[(start, stop)) of every shard."""
  return [(s, min(s + records_per_shard, count))
          for s in range(0, count, records_per_shard)]


def process_shards(num_shards: int, process_index: int, process_count: int
                   ) -> range:
  """The contiguous run of shards process `process_index` writes."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in '
                     f'[0, {process_count}).')
  base, extra = divmod(num_shards, process_count)
  start = process_index * base + min(process_index, extra)
  return range(start, start + base + (process_index < extra))


def write_json(path: str, obj: Any) -> None:
  """Atomic JSON write (sorted keys)."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def read_sidecar(directory: str, split: str) -> dict[str, Any]:
  """The sidecar of `split` in `directory`."""
  path = sidecar_path(directory, split)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path} not found: no latents for split {split!r} in {directory}. '
        'Make them with `python -m onestep_bench.data.prepare_latents '
        f'--split={split} --out={directory} ...`.')
  with open(path) as f:
    return json.load(f)


def shard_paths(directory: str, split: str) -> list[str]:
  """Every shard file of a split, in index order; all must exist.

  Raises:
    IncompleteError: some shards are missing (an interrupted run).
  """
  meta = read_sidecar(directory, split)
  paths = [shard_path(directory, split, s, meta['num_shards'])
           for s in range(meta['num_shards'])]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise IncompleteError(
        f'{len(missing)} of {len(paths)} shards of {split!r} missing in '
        f'{directory} (first: {os.path.basename(missing[0])}): the '
        'preparation was interrupted. Re-run the same prepare_latents '
        'command; it skips finished shards.')
  return paths


def write_shard(path: str, records: Sequence[bytes]) -> None:
  """Writes `records` to `path` as one ArrayRecord file, atomically."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  tmp = f'{path}.tmp-{os.getpid()}'
  writer = ArrayRecordWriter(tmp, OPTIONS)
  for r in records:
    writer.write(r)
  writer.close()
  os.replace(tmp, path)


def read_shard(path: str) -> list[bytes]:
  """All records of one shard file."""
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top
  reader = ArrayRecordReader(path)
  try:
    return list(reader.read_all())
  finally:
    reader.close()


def num_records(path: str) -> int:
  """Record count of one shard file (0 if unreadable)."""
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top
  try:
    reader = ArrayRecordReader(path)
  except Exception:  # pylint: disable=broad-except  # truncated / not ours
    return 0
  try:
    return int(reader.num_records())
  finally:
    reader.close()


def data_source(directory: str, split: str) -> Any:
  """An ArrayRecordDataSource (grain) over a complete split's shards."""
  import grain  # pylint: disable=g-import-not-at-top
  return grain.sources.ArrayRecordDataSource(shard_paths(directory, split))


def has_split(directory: str, split: str) -> bool:
  """Whether `directory` holds a sidecar of this format for `split`.

  Only the sidecar is checked (the shards: `shard_paths`); the harness's
  own ArrayRecord files (data/arrayrecord.py) use another format name.
  """
  return arrayrecord.sidecar_format(sidecar_path(directory, split)) == FORMAT
