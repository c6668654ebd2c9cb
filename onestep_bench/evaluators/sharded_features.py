"""Feature extraction split over devices and processes (FID-50K on a mesh).

`shard(extractor, devices)` wraps a feature net (`InceptionExtractor`,
`DinoV2Extractor`, `ClassifierExtractor`) in a `ShardedExtractor`: the same
call (uint8 images [N, H, W, C] -> {name: [N, ...] numpy}), the same
outputs and dtypes, but each batch is one SPMD program over `devices`:

* a ('data', 'fsdp') = (len(devices), 1) mesh; the feature net's params
  replicated on every device, the batch axis split over all of them
  (`sharding.replicated` / `sharding.batch_sharded`);
* the extractor's own jitted program (preprocessing + network), so every
  image goes through the same operations as unsharded, and its features
  agree with the unsharded extractor's to float32 rounding (~1e-7
  relative: XLA may tile a convolution differently at another batch size);
* batches of `per_device_batch` images per device (default: the
  extractor's own `batch_size`, fewer when N is small), the last one padded
  with zeros to a multiple of the device count and the padding dropped;
* with devices of several processes, each process builds only its own
  devices' shards of a batch (`jax.make_array_from_callback`: every process
  holds the same images, but reads only its rows) and the features are
  gathered to every process (`sharding.to_host`), so all processes return
  identical arrays. Every process must then make the same calls, in the
  same order (they do: every process runs the same evaluation).

Which devices (`eval_devices`, `local_devices`): the generated samples'
features use all devices of the eval's mesh, across processes; reference
statistics and the FID floor (real images, whose cache may exist on one
host and not another) use this process's devices of that mesh only, with
no cross-process collective, so a host whose cache is warm cannot leave the
others waiting.

Extractors without a known program (test stand-ins, other callables) are
returned unchanged by `shard` and run as they are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from onestep_bench import sharding

IN_FLIGHT = 2  # batches dispatched ahead of the one the host waits for


@dataclasses.dataclass(frozen=True)
class Program:
  """A feature net as a pure program: what `ShardedExtractor` splits.

  Attributes:
    fn: (params, uint8 images [B, H, W, C]) -> a tuple of [B, ...] arrays,
      jit-able (the extractor's own jitted function).
    params: its params (any pytree; copied to the host once, replicated).
    outputs: (name, numpy dtype) of each element of `fn`'s tuple, as the
      extractor returns them.
    check: raises on bad inputs exactly as the extractor does.
    batch_size: the extractor's images per call (the default per device).
  """

  fn: Callable[[Any, jax.Array], tuple[jax.Array, ...]]
  params: Any
  outputs: tuple[tuple[str, type], ...]
  check: Callable[[np.ndarray], None]
  batch_size: int


def _check_uint8(images: np.ndarray) -> None:
  if images.dtype != np.uint8:
    raise TypeError(f'feature nets expect uint8 images, got {images.dtype}.')


# pylint: disable=protected-access
def program(extractor: Any) -> Program | None:
  """The extractor's jitted program and params, None for unknown nets."""
  name = type(extractor).__name__
  if name == 'InceptionExtractor':
    from onestep_bench.evaluators import inception  # pylint: disable=g-import-not-at-top
    if isinstance(extractor, inception.InceptionExtractor):
      return Program(extractor._fn, extractor._params,
                     (('features', np.float64), ('logits', np.float64),
                      ('spatial', np.float32)),
                     inception._check_images, extractor.batch_size)
  if name == 'DinoV2Extractor':
    from onestep_bench.evaluators import dinov2  # pylint: disable=g-import-not-at-top
    if isinstance(extractor, dinov2.DinoV2Extractor):
      fn = extractor._fn
      return Program(lambda p, im: (fn(p, im),), extractor._params,
                     (('features', np.float64),), dinov2.check_images,
                     extractor.batch_size)
  if name == 'ClassifierExtractor':
    from onestep_bench.evaluators import classifier  # pylint: disable=g-import-not-at-top
    if isinstance(extractor, classifier.ClassifierExtractor):
      return Program(extractor._fwd, extractor.params,
                     (('features', np.float64), ('probs', np.float64)),
                     _check_uint8, extractor.batch_size)
  return None
# pylint: enable=protected-access


def eval_devices(mesh: Mesh) -> list[jax.Device]:
  """Every device of the eval's mesh (all processes), in mesh order."""
  return list(mesh.devices.flat)


def local_devices(mesh: Mesh) -> list[jax.Device]:
  """This process's devices of the eval's mesh, in mesh order."""
  me = jax.process_index()
  return [d for d in mesh.devices.flat if d.process_index == me]


def _replicate(tree: Any, target: jax.sharding.Sharding) -> Any:
  """Host copy of `tree`, then one full copy per device of `target`."""
  def put(leaf: Any) -> jax.Array:
    a = np.asarray(leaf)
    return jax.make_array_from_callback(a.shape, target, lambda idx: a[idx])
  return jax.tree.map(put, jax.device_get(tree))


class ShardedExtractor:
  """An extractor whose batches are split over `devices` (module doc).

  Attributes other than `__call__`, `mesh`, `base` and `per_device_batch`
  (`weights_sha256`, `feature_net`, `has_spatial`, ...) are the wrapped
  extractor's.
  """

  def __init__(self, base: Any, prog: Program, devices: Sequence[jax.Device],
               per_device_batch: int | None = None):
    if not devices:
      raise ValueError('ShardedExtractor needs at least one device.')
    per = int(per_device_batch or prog.batch_size)
    if per < 1:
      raise ValueError(f'per_device_batch must be >= 1, got {per}.')
    self.base, self.per_device_batch, self._prog = base, per, prog
    self.mesh = Mesh(np.asarray(devices, dtype=object).reshape(-1, 1),
                     sharding.BATCH_AXES)
    me = jax.process_index()
    self._local = all(d.process_index == me for d in devices)
    rep = sharding.replicated(self.mesh)
    self._data = sharding.batch_sharded(self.mesh)
    self._params = _replicate(prog.params, rep)
    self._fn = jax.jit(prog.fn, in_shardings=(rep, self._data),
                       out_shardings=self._data)

  def __getattr__(self, name: str) -> Any:
    if name.startswith('__') or name in ('base', '_prog'):
      raise AttributeError(name)  # not set yet (copy / unpickle)
    return getattr(self.base, name)

  def batch_shape(self, n: int) -> int:
    """Images per SPMD call for n images: a multiple of the device count."""
    d = self.mesh.size
    return min(self.per_device_batch, max(1, math.ceil(n / d))) * d

  def _put(self, batch: np.ndarray) -> jax.Array:
    """A batch-sharded global array; only this process's rows are read."""
    return jax.make_array_from_callback(batch.shape, self._data,
                                        lambda idx: batch[idx])

  def __call__(self, images: Any) -> dict[str, np.ndarray]:
    """The wrapped extractor's outputs for `images`, computed on the mesh."""
    images = np.asarray(images)
    self._prog.check(images)
    n = len(images)
    if n == 0:
      return self.base(images)
    bs = self.batch_shape(n)
    outs = []
    for lo in range(0, n, bs):  # dispatched asynchronously, gathered once
      batch = images[lo:lo + bs]
      if len(batch) < bs:
        pad = np.zeros((bs - len(batch), *batch.shape[1:]), batch.dtype)
        batch = np.concatenate([batch, pad])
      outs.append(self._fn(self._params, self._put(batch)))
      if len(outs) > IN_FLIGHT:  # bound the input batches held on device
        jax.block_until_ready(outs[-1 - IN_FLIGHT])
    host = jax.device_get(outs) if self._local else sharding.to_host(outs)
    return {name: np.concatenate([np.asarray(o[j]) for o in host])[:n]
            .astype(dtype, copy=False)
            for j, (name, dtype) in enumerate(self._prog.outputs)}


_SHARDED: dict[tuple[int, tuple[int, ...], int | None], ShardedExtractor] = {}


def shard(extractor: Any, devices: Sequence[jax.Device], *,
          per_device_batch: int | None = None) -> Any:
  """`extractor` split over `devices` (memoised), or itself if unknown.

  One device of this process (the default one), or none: the extractor
  itself (nothing to split).
  """
  if extractor is None or isinstance(extractor, ShardedExtractor) or (
      not devices):
    return extractor
  prog = program(extractor)
  if prog is None or (len(devices) == 1 and per_device_batch is None
                      and devices[0] == jax.local_devices()[0]):
    return extractor
  key = (id(extractor), tuple(d.id for d in devices), per_device_batch)
  hit = _SHARDED.get(key)
  if hit is None or hit.base is not extractor:  # id reused: stale entry
    hit = _SHARDED[key] = ShardedExtractor(extractor, prog, devices,
                                           per_device_batch)
  return hit
