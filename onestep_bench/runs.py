"""Loading a finished run back: its config, summary, method and EMA params.

`load_run(workdir)` is the one reader of a run directory (summary.json +
orbax checkpoints) for everything that re-uses a trained run: re-evaluation
(`onestep_bench/evaluate.py`), distillation teachers, perf and tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from onestep_bench import checkpoint, data
from onestep_bench.method import Method, load_method


class RunError(FileNotFoundError):
  """The directory is not a finished run of this harness."""


@dataclasses.dataclass
class LoadedRun:
  """A finished run: what trained it, what it scored, its EMA params."""

  workdir: str
  config: ml_collections.ConfigDict
  summary: dict[str, Any]
  dataset: Any
  method: Method
  ema_params: Any
  step: int


def read_summary(workdir: str) -> dict[str, Any]:
  """summary.json of a finished run (RunError naming the fix otherwise)."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    raise RunError(f'{workdir} has no summary.json: it is not a finished '
                   'run (rerun its training command to finish it).')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def load_run(workdir: str, *, prepare: bool = True) -> LoadedRun:
  """Config, summary, method and latest-checkpoint EMA params of a run.

  The run's own saved config rebuilds the data, the method and the restore
  target (shapes only), so nothing about the run has to be re-specified.
  `prepare=False` skips `method.prepare` (frozen encoders / teachers) when
  the caller only samples.
  """
  summary = read_summary(workdir)
  config = ml_collections.ConfigDict(summary['config'])
  dataset = data.build(config.data)
  method = load_method(config, dataset.spec)
  if prepare:
    method.prepare(dataset)
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  example = dataset.sample(jax.random.key(0), 2)
  target = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
      jax.eval_shape(method.init, jax.random.key(0), example))
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    state = ckpt.restore_latest(target)
  finally:
    ckpt.close()
  if state is None:
    raise RunError(f'{workdir} has no checkpoint under checkpoints/.')
  return LoadedRun(workdir=workdir, config=config, summary=summary,
                   dataset=dataset, method=method,
                   ema_params=state.ema_params, step=int(state.step))
