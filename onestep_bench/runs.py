"""Run directories: where runs go, and loading a finished run back.

`default_workdir` is the one run-directory convention (`main` writes there
unless told otherwise; `make bench` and distillation methods find teacher
runs there). `restore_state` is the one checkpoint reader of a run
directory; `load_run(workdir)` (config, summary, method, EMA params) serves
re-evaluation (`onestep_bench/evaluate.py`), and `load_ema_params` serves a
method that starts from another run's weights (a distillation teacher): it
checks that the run is the method, data and backbone the caller needs, and
every error names the fix. The harness never names a method; callers pass
the method they expect (e.g. a module's `TEACHER_METHOD`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from onestep_bench import checkpoint, data
from onestep_bench.method import Method, TrainState, load_method

PyTree = Any


class RunError(FileNotFoundError):
  """The directory is not a finished run of this harness."""


class RunMismatchError(ValueError):
  """A finished run that cannot serve here (other method, data, backbone)."""


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


# ------------------------------------------------------------- conventions
def default_workdir(method: str, dataset: str, seed: int,
                    protocol: str = 'bench') -> str:
  """runs/<method>/<dataset, ':' -> '_'>/<protocol>_seed<seed>.

  Where `python -m onestep_bench.main` writes without `--workdir`, so where
  `make bench METHOD=… DATASET=… SEED=…` puts a bench run.
  """
  return os.path.join('runs', method, dataset.replace(':', '_'),
                      f'{protocol}_seed{seed}')


def train_command(method: str, dataset: str, workdir: str) -> str:
  """The command that trains a bench run of `method` into `workdir`."""
  return ('python -m onestep_bench.main --config=experiments/bench.py:'
          f'method={method},dataset={dataset} --workdir={workdir}')


# ----------------------------------------------------------------- reading
def read_summary(workdir: str) -> dict[str, Any]:
  """summary.json of a finished run (RunError naming the fix otherwise)."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    raise RunError(f'{workdir} has no summary.json: it is not a finished '
                   'run (rerun its training command to finish it).')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def abstract_batch(spec: data.DataSpec, n: int = 2) -> dict[str, Any]:
  """Shapes of a training batch of `n` (`Dataset.sample`'s keys), no data."""
  batch = {'x': jax.ShapeDtypeStruct((n, *spec.shape), jnp.float32)}
  if spec.num_classes:
    batch['y'] = jax.ShapeDtypeStruct((n,), jnp.int32)
  return batch


def restore_state(workdir: str, method: Method,
                  example: Any) -> TrainState | None:
  """The newest checkpoint of `workdir` on one device, or None if none.

  The restore target is `method.init`'s output shapes for `example` (a
  batch or `abstract_batch`), traced abstractly: nothing is initialised.
  """
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
      jax.eval_shape(method.init, jax.random.key(0), example))
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    return ckpt.restore_latest(target)
  finally:
    ckpt.close()


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
  state = restore_state(workdir, method, dataset.sample(jax.random.key(0), 2))
  if state is None:
    raise RunError(f'{workdir} has no checkpoint under checkpoints/.')
  return LoadedRun(workdir=workdir, config=config, summary=summary,
                   dataset=dataset, method=method,
                   ema_params=state.ema_params, step=int(state.step))


# ------------------------------------------------- another run's weights
def _plain(d: Any) -> Any:
  return json.loads(json.dumps(d, default=str))


def check_run(workdir: str, *, method: str,
              config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The saved config of `workdir`, a finished `method` run fit for `config`.

  Fit: trained on `config.data.name` with exactly `config.model`'s backbone,
  and holding a checkpoint. Nothing is created (a missing dir stays so).

  Raises:
    RunError: no such dir, no summary.json, or no checkpoint.
    RunMismatchError: another method, dataset or backbone.
  """
  dataset = config.data.name
  how = 'train one with: ' + train_command(method, dataset, workdir)
  if not os.path.isdir(workdir):
    raise RunError(f'{workdir!r} does not exist; {how}')
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    raise RunError(f'{workdir} has no summary.json (unfinished run?); rerun '
                   f'its command to finish it, or {how}')
  with open(path, encoding='utf-8') as f:
    run_cfg = ml_collections.ConfigDict(json.load(f)['config'])
  if run_cfg.method.name != method:
    raise RunMismatchError(f'{workdir} is a {run_cfg.method.name!r} run; it '
                           f'must be {method}; {how}')
  if run_cfg.data.name != dataset:
    raise RunMismatchError(f'{workdir} was trained on {run_cfg.data.name!r}, '
                           f'this run uses {dataset!r}; {how}')
  mine, theirs = _plain(config.model.to_dict()), _plain(
      run_cfg.model.to_dict())
  if mine != theirs:
    diff = sorted(k for k in set(mine) | set(theirs)
                  if mine.get(k) != theirs.get(k))
    raise RunMismatchError(
        f'the backbone of {workdir} differs from config.model in '
        + ', '.join(f'{k} (run {theirs.get(k)!r}, here {mine.get(k)!r})'
                    for k in diff)
        + '; set --config.model.<key> to the run\'s values.')
  ckdir = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckdir) or not any(
      n.isdigit() for n in os.listdir(ckdir)):
    raise RunError(f'{workdir} has no checkpoint in {ckdir}; {how}')
  return run_cfg


def load_ema_params(workdir: str, *, method: str,
                    config: ml_collections.ConfigDict, spec: data.DataSpec,
                    expect: PyTree | None = None) -> PyTree:
  """EMA params of a finished `method` run (`check_run`), as numpy arrays.

  The run's own saved config and `spec` rebuild its method (not prepared)
  for the restore target. `expect` (a params tree or its shapes, e.g.
  `jax.eval_shape(net.init, key)`): the params must have its structure and
  shapes (RunMismatchError otherwise).

  Raises:
    RunError, RunMismatchError: see `check_run`; RunError also when no
      checkpoint could be restored.
  """
  run_cfg = check_run(workdir, method=method, config=config)
  state = restore_state(workdir, load_method(run_cfg, spec),
                        abstract_batch(spec))
  if state is None:
    raise RunError(f'{workdir} has no checkpoint in '
                   f'{os.path.join(workdir, "checkpoints")}; train one with: '
                   + train_command(method, config.data.name, workdir))
  params = jax.device_get(state.ema_params)
  if expect is not None and (
      jax.tree.structure(expect) != jax.tree.structure(params) or any(
          a.shape != b.shape for a, b in zip(jax.tree.leaves(expect),
                                             jax.tree.leaves(params),
                                             strict=True))):
    raise RunMismatchError(f'params in {workdir} do not match the shapes of '
                           "config.model; set config.model to the run's "
                           'values.')
  return params
