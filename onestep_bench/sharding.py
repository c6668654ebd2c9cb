"""Device mesh and shardings (one `data` axis; batch sharded, state replicated).

Multi-host: `maybe_initialize_distributed()` calls `jax.distributed.initialize`
only when the launcher set the coordinator environment (JAX_COORDINATOR_ADDRESS
or a TPU pod / SLURM environment jax detects itself via JAX_NUM_PROCESSES).
"""

from __future__ import annotations

import os

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def maybe_initialize_distributed() -> None:
  """Initialises jax.distributed when launched as one of several processes."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS') or int(
      os.environ.get('JAX_NUM_PROCESSES', '1')) > 1:
    jax.distributed.initialize()


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """A 1-D ('data',) mesh over `config.data` devices (-1: all)."""
  n = jax.device_count() if config.data == -1 else config.data
  if n < 1 or n > jax.device_count():
    raise ValueError(f'config.mesh.data={config.data} but '
                     f'{jax.device_count()} devices are visible; use -1 or a '
                     'number <= the device count.')
  return Mesh(jax.devices()[:n], ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P('data'))


def shard_batch(tree, mesh: Mesh):
  """Constrains every leaf's leading axis to the `data` axis (inside jit)."""
  return jax.lax.with_sharding_constraint(tree, batch_sharded(mesh))
