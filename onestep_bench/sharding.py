"""Device mesh and shardings: a ('data', 'fsdp') mesh, batch over both axes.

* `data` axis: plain data parallelism (state replicated along it).
* `fsdp` axis (`config.mesh.fsdp`, default 1): ZeRO-3 / FSDP-style sharding
  of the whole TrainState (params, optimizer state, EMA, method extras). Each
  large leaf is split along its largest axis divisible by the fsdp size; XLA
  inserts the all-gathers / reduce-scatters (GSPMD, as in big_vision's and
  MaxText's `fsdp` axis). The batch is split over both axes, so the global
  batch must be divisible by data * fsdp.

Multi-host: `maybe_initialize_distributed()` calls `jax.distributed.initialize`
only when the launcher set the environment: JAX_COORDINATOR_ADDRESS (host:port
of process 0) with JAX_NUM_PROCESSES and JAX_PROCESS_ID, or just
JAX_NUM_PROCESSES > 1 on clusters jax detects itself (Cloud TPU pod slices,
SLURM, Open MPI). The mesh then spans every process's devices
(`jax.devices()` is the global list); every process runs the same program and
only process 0 writes files.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')
# Leaves smaller than this stay replicated under FSDP (biases, norms, scalars:
# gathering them costs more latency than their memory is worth).
FSDP_MIN_SIZE = 2 ** 12


def maybe_initialize_distributed() -> None:
  """Initialises jax.distributed when launched as one of several processes."""
  env = os.environ
  if not env.get('JAX_COORDINATOR_ADDRESS') and int(
      env.get('JAX_NUM_PROCESSES', '1')) <= 1:
    return
  kwargs = {}
  if env.get('JAX_NUM_PROCESSES') and env.get('JAX_PROCESS_ID'):
    kwargs = dict(num_processes=int(env['JAX_NUM_PROCESSES']),
                  process_id=int(env['JAX_PROCESS_ID']))
  jax.distributed.initialize(**kwargs)  # address: JAX_COORDINATOR_ADDRESS


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """A ('data', 'fsdp') mesh; `config.data` = -1 takes all remaining devices.

  Raises:
    ValueError: the requested mesh does not fit the visible devices.
  """
  fsdp = int(config.get('fsdp', 1))
  total = jax.device_count()
  if fsdp < 1 or total % fsdp:
    raise ValueError(f'config.mesh.fsdp={fsdp} must be >= 1 and divide the '
                     f'{total} visible devices.')
  data = total // fsdp if config.data == -1 else int(config.data)
  if data < 1 or data * fsdp > total:
    raise ValueError(f'config.mesh.data={config.data} x config.mesh.fsdp='
                     f'{fsdp} needs more than the {total} visible devices; '
                     'use data=-1 or smaller numbers.')
  devices = jax.devices()[:data * fsdp]
  try:  # topology-aware order on TPU/GPU; plain order elsewhere
    grid = mesh_utils.create_device_mesh((data, fsdp), devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(data, fsdp)
  return Mesh(grid, BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  """Full copy of the array on every device of `mesh`."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(tree, mesh: Mesh):
  """Constrains every leaf's leading axis to the batch axes (inside jit)."""
  return jax.lax.with_sharding_constraint(tree, batch_sharded(mesh))


def leaf_sharding(mesh: Mesh, shape: tuple[int, ...],
                  min_size: int = FSDP_MIN_SIZE) -> NamedSharding:
  """FSDP placement of one array: its largest fsdp-divisible axis is split.

  Replicated when the fsdp axis has size 1, the leaf is smaller than
  `min_size` elements, or no axis divides evenly.
  """
  n = mesh.shape['fsdp']
  if n == 1 or math.prod(shape) < min_size:
    return replicated(mesh)
  for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[axis] % n == 0:
      spec = [None] * len(shape)
      spec[axis] = 'fsdp'
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def state_shardings(mesh: Mesh, abstract_state: Any,
                    min_size: int = FSDP_MIN_SIZE) -> Any:
  """Per-leaf shardings for a pytree of arrays / ShapeDtypeStructs."""
  return jax.tree.map(lambda s: leaf_sharding(mesh, tuple(s.shape), min_size),
                      abstract_state)


def to_host(x: Any) -> Any:
  """Numpy copy of a (possibly multi-process, sharded) array pytree."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(x, tiled=True)
  return jax.device_get(x)
