"""Host-fed training batches on grain (`config.data.pipeline='grain'`).

For datasets that do not fit in device memory. The default path
(`'device'`, data/images.py) keeps the training split on every device and
draws batches inside the jitted step; this one reads them on the host:

1. Order. `grain.MapDataset.range(N).shuffle(seed).repeat()`: a global
   permutation of the N example indices per epoch (grain's index shuffle,
   seeded with `shuffle_seed(config.seed) + epoch`), epochs concatenated.
   Global position p holds example `perm_{p // N}(p mod N)`, so every
   example is seen exactly once per epoch, and a batch may straddle two
   epochs (nothing is dropped).
2. Batches. The global batch of step s is positions [s B, (s + 1) B). With
   P processes, process q loads only rows [q b, (q + 1) b) of it (b = B / P):
   `ds.batch(b)[q::P]`, grain's own per-shard slicing with
   `ShardOptions(shard_index=q, shard_count=P)`. q is the block of the batch
   that this process's devices hold in the mesh's batch sharding
   (`process_shard`), so the global batch, and the run, are the same for
   every process count. A `.map` then reads the b examples from the
   random-access source (data/sources.py, data/arrayrecord.py) in one
   `read_batch` call where the source has one.
3. Prefetch. `to_iter_dataset(ReadOptions(threads, prefetch))` reads the
   next `grain_prefetch` local batches in `grain_threads` threads while the
   step runs; the train loop also places the next chunk on the devices
   (`Feed.prepare`) before it waits for the running one.
4. Placement. `jax.make_array_from_process_local_data` assembles the local
   rows of `n` steps into a global [n, B, ...] array sharded as
   P(None, ('data', 'fsdp')) over the project's mesh (sharding.py).
5. Resume. The iterator position is the step: grain's iterator state
   `{'next_index': step}` plus the order's identity (`Feed.state`) is saved in
   every checkpoint as an orbax JSON item next to the TrainState
   (checkpoint.py); a restore checks it against the data and the step, then
   `set_state`s the iterator, so a killed run continues with exactly the
   batches an uninterrupted one sees (docs/data_pipeline.md).

Augmentation (hflip) and the uint8 -> [-1, 1] conversion stay inside the
jitted step, keyed by the step's data key (data/streamed.py).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from onestep_bench import config_check, sharding
from onestep_bench.config_check import ConfigError
from onestep_bench.data import sources

PIPELINES = ('device', 'grain')
DEFAULT_THREADS = 4
DEFAULT_PREFETCH = 4
STATE_FORMAT = 'onestep_bench.grain_feed/1'
# Keys of `Feed.state` that must match on resume (the order's identity).
_IDENTITY = ('format', 'shuffle_seed', 'global_batch', 'num_examples',
             'source')


class DataStateError(ValueError):
  """A checkpoint's data position does not fit this run's data."""


def pipeline_of(dc: ml_collections.ConfigDict) -> str:
  """`config.data.pipeline`, 'device' when unset."""
  return dc.get('pipeline') or 'device'


def check_config(config: ml_collections.ConfigDict,
                 method: Any = None) -> None:
  """Validates the pipeline keys of `config.data` (ConfigError naming fix).

  Args:
    config: the run config.
    method: the method (class or instance), for the class-grouped batch
      check; None skips it.
  """
  dc = config.data
  p = dc.get('pipeline')
  if p is not None and (not isinstance(p, str) or p not in PIPELINES):
    raise ConfigError('data.pipeline', p, f'must be one of {PIPELINES} '
                      "('device': the training split on every device, "
                      "the default; 'grain': host-fed from disk)",
                      'e.g. --config.data.pipeline=grain')
  if dc.get('grain_threads') is not None:
    config_check.require_int(dc, 'data', 'grain_threads', 0, example=4)
  if dc.get('grain_prefetch') is not None:
    config_check.require_int(dc, 'data', 'grain_prefetch', 1, example=4)
  if pipeline_of(dc) != 'grain':
    return
  if str(dc.get('name')).startswith('toy2d:'):
    raise ConfigError('data.pipeline', p, f'is for finite image / latent '
                      f'sets; {dc.name} is an exact sampler drawn inside the '
                      'step (nothing to read)',
                      'use --config.data.pipeline=device')
  groups = getattr(method, 'class_groups', 0) or 0
  if groups and config_check.labelled(config):
    raise ConfigError('data.pipeline', p, f'{getattr(method, "__module__", "")}'
                      f' trains on class-grouped batches (class_groups='
                      f'{groups}), which only the device-resident path '
                      'draws', 'use --config.data.pipeline=device, or train '
                      'unconditionally (config.data.conditional=False)')


def shuffle_seed(seed: int) -> int:
  """uint32 shuffle seed of run seed `seed` (epoch e uses it + e).

  Hashed so the epochs of seeds k and k + 1 are unrelated permutations
  (grain seeds epoch e with seed + e).
  """
  h = hashlib.sha256(f'onestep_bench/grain/{int(seed)}'.encode()).digest()
  return int.from_bytes(h[:4], 'little')


def local_batches(source: Any, *, global_batch: int, seed: int,
                  shard: grain.sharding.ShardOptions) -> grain.MapDataset:
  """MapDataset whose element s is this shard's rows of global batch s.

  Args:
    source: random-access source (index -> {'x', 'y'}).
    global_batch: B, the batch of one step over all processes.
    seed: the run seed (`shuffle_seed` derives the shuffle's).
    shard: this process's block of each batch (shard_index q of
      shard_count P; B % P == 0).

  Returns:
    An (effectively infinite) MapDataset of {'x': [B / P, ...], 'y': [B / P]}.
  """
  count = shard.shard_count
  if global_batch % count:
    raise ValueError(f'config.train.batch_size={global_batch} is not '
                     f'divisible by the {count} processes; change it.')
  order = grain.MapDataset.range(len(source)).shuffle(
      seed=shuffle_seed(seed)).repeat()
  rows = order.batch(global_batch // count, drop_remainder=True)[
      shard.shard_index::count]
  return rows.map(functools.partial(sources.read_rows, source))



def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """[n, B, ...] chunks of fed batches: B over the mesh's batch axes."""
  return NamedSharding(mesh, P(None, sharding.BATCH_AXES))


def process_shard(mesh: jax.sharding.Mesh,
                  global_batch: int) -> grain.sharding.ShardOptions:
  """The block of each global batch this process's devices hold.

  Raises:
    ValueError: the process holds no rows, or rows that are not one of
      equal contiguous blocks (a mesh this pipeline cannot feed).
  """
  index = batch_sharding(mesh).addressable_devices_indices_map(
      (1, global_batch))
  spans = sorted({(s[1].start or 0, global_batch if s[1].stop is None
                   else s[1].stop) for s in index.values()})
  lo, hi = (spans[0][0], spans[-1][1]) if spans else (0, 0)
  rows = sum(b - a for a, b in spans)
  if (not spans or rows != hi - lo or global_batch % rows or lo % rows
      or global_batch // rows != jax.process_count()):
    raise ValueError(f'This process holds rows {spans} of the batch of '
                     f'{global_batch}; the grain pipeline needs one '
                     'contiguous equal block per process. Use '
                     'config.data.pipeline=device or the default mesh.')
  return grain.sharding.ShardOptions(shard_index=lo // rows,
                                     shard_count=global_batch // rows,
                                     drop_remainder=True)


class Feed:
  """The host-fed batches of one run: grain iterator + device placement.

  Attributes:
    source: the training split's random-access source.
    global_batch: B.
    shard: this process's block (`process_shard`).
  """

  def __init__(self, source: Any, *, global_batch: int, seed: int,
               mesh: jax.sharding.Mesh, threads: int = DEFAULT_THREADS,
               prefetch: int = DEFAULT_PREFETCH,
               shard: grain.sharding.ShardOptions | None = None):
    self.source, self.global_batch, self.seed = source, global_batch, seed
    self.shard = shard or process_shard(mesh, global_batch)
    self._sharding = batch_sharding(mesh)
    self._dataset = local_batches(source, global_batch=global_batch,
                                  seed=seed, shard=self.shard)
    self._read = grain.ReadOptions(num_threads=threads,
                                   prefetch_buffer_size=prefetch)
    self._it: Iterator[Any] | None = None
    self._pending: tuple[int, int, dict[str, jax.Array]] | None = None
    self._fingerprint = fingerprint(source)
    self.step = 0

  # ----------------------------------------------------------- position
  def state(self, step: int) -> dict[str, Any]:
    """JSON state after `step` steps: grain's iterator state + identity."""
    n = len(self.source)
    seen = step * self.global_batch
    return {'format': STATE_FORMAT, 'step': int(step),
            'grain_iterator': {'next_index': int(step)},
            'examples_seen': int(seen), 'epoch': seen // n,
            'position_in_epoch': seen % n,
            'shuffle_seed': shuffle_seed(self.seed),
            'global_batch': int(self.global_batch), 'num_examples': n,
            'source': self._fingerprint}

  def check(self, saved: dict[str, Any] | None, step: int) -> None:
    """Raises DataStateError if `saved` is not this data at `step`."""
    if saved is None:
      return
    want = self.state(step)
    bad = [k for k in (*_IDENTITY, 'step', 'grain_iterator')
           if saved.get(k) != want[k]]
    if bad:
      raise DataStateError(
          'The checkpoint\'s data position does not fit this run: '
          + ', '.join(f'{k} saved {saved.get(k)!r}, now {want[k]!r}'
                      for k in bad)
          + '. Resume with the data and batch size it was trained on, or '
          'start a new --workdir.')

  def start(self, step: int, saved: dict[str, Any] | None = None) -> None:
    """(Re)positions the iterator so the next batch is that of `step`."""
    self.check(saved, step)
    self.close()
    self._it = iter(self._dataset.to_iter_dataset(self._read))
    self._it.set_state(self.state(step)['grain_iterator'])
    self.step, self._pending = int(step), None

  # ------------------------------------------------------------ batches
  def example(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of one step's fed batch, {'x': [B, ...], 'y': [B]}."""
    first = self.source[0]
    x = np.asarray(first['x'])
    return {'x': jax.ShapeDtypeStruct((self.global_batch, *x.shape), x.dtype),
            'y': jax.ShapeDtypeStruct((self.global_batch,), np.int32)}

  def _place(self, n: int) -> dict[str, jax.Array]:
    local = [next(self._it) for _ in range(n)]
    b = self.global_batch // self.shard.shard_count
    out = {}
    for k in local[0]:
      v = np.stack([np.asarray(batch[k]) for batch in local])
      if v.shape[:2] != (n, b):
        raise ValueError(f'grain yielded {k} of shape {v.shape[1:]}, '
                         f'expected a local batch of {b}.')
      out[k] = jax.make_array_from_process_local_data(
          self._sharding, v, (n, self.global_batch, *v.shape[2:]))
    return out

  def prepare(self, n: int) -> None:
    """Places the next `n` steps' batches now (overlaps a running step)."""
    if self._it is None:
      raise RuntimeError('Feed.start(step) first.')
    if n > 0 and self._pending is None:
      self._pending = (self.step, n, self._place(n))

  def take(self, n: int) -> dict[str, jax.Array]:
    """{'x': [n, B, ...], 'y': [n, B]} for steps step..step + n - 1, placed."""
    if self._it is None:
      raise RuntimeError('Feed.start(step) first.')
    if self._pending is not None and self._pending[:2] != (self.step, n):
      self.start(self.step)  # a prefetched chunk of another length: re-read
    if self._pending is None:
      self.prepare(n)
    _, _, out = self._pending
    self._pending = None
    self.step += n
    return out

  def close(self) -> None:
    """Stops the prefetch threads."""
    if self._it is not None and hasattr(self._it, 'close'):
      self._it.close()
    self._it = None


def fingerprint(source: Any) -> str:
  """The source's content identity (`fingerprint()`, else type + length)."""
  fn = getattr(source, 'fingerprint', None)
  return fn() if fn else f'{type(source).__name__}:{len(source)}'
