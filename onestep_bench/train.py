"""`train_and_evaluate(config, workdir)`: the one training + evaluation loop.

Shared by every method. Read top to bottom: setup (`build_state`, shared
with experiments/perf_common.py), state (fresh or resumed), the jitted
multi-step dispatch, the loop (logging, non-finite check, checkpoints,
preemption), evaluation, summary. Over 400 lines because that loop is one
function on purpose: one place to read what a run does, in order.

RNG: step `i` uses `fold_in(root, i)` (split into data / method keys), and
batches are drawn inside the jitted step, so a resumed run is bitwise equal
to an uninterrupted one. With `config.data.pipeline='grain'` the batches are
read on the host instead (data/pipeline.py): step `i` gets batch `i` of a
seeded per-epoch order, fed to the step as an argument; the iterator state is
saved in every checkpoint, so resume stays bitwise (docs/data_pipeline.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shlex
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from onestep_bench import (
  checkpoint,
  config_check,
  curve,
  data,
  sharding,
  writers,
)
from onestep_bench.data import pipeline
from onestep_bench.evaluators import runner
from onestep_bench.flops import count_flops
from onestep_bench.method import Method, TrainState, load_method

# Re-exported: callers read a run's provenance as train.config_hash etc.
from onestep_bench.provenance import config_hash, git_sha, versions  # noqa: F401


class NonFiniteError(FloatingPointError):
  """The loss became NaN/Inf; the last good checkpoint is kept."""


class OutOfMemoryError(MemoryError):
  """A device ran out of memory; the message names the knobs to turn."""


def oom_hint(e: Exception, config: ml_collections.ConfigDict) -> str | None:
  """One-line fix for an XLA RESOURCE_EXHAUSTED error, else None."""
  msg = str(e)
  if 'RESOURCE_EXHAUSTED' not in msg and 'Out of memory' not in msg:
    return None
  first = next((ln for ln in msg.splitlines() if ln.strip()), msg)[:200]
  return (f'Device out of memory ({first.strip()}). Lower '
          f'config.train.batch_size (now {config.train.batch_size}), shard '
          'the state with config.mesh.fsdp=<devices>, use a bf16 '
          'config.model.dtype, or lower config.evals.<name>.batch_size for '
          'sampling.')


# ============================================================== helpers
def check_workdir_config(workdir: str, config: ml_collections.ConfigDict,
                         is_main: bool) -> None:
  """Refuses to resume a workdir written by a different config or seed.

  Without this, rerunning a changed config in the same workdir would restore
  the old final checkpoint and record its scores under the new config hash.
  `evals` and `curve` may differ (re-evaluating a trained run at other NFEs
  is fine), and so may the protocol label.
  """
  path = os.path.join(workdir, 'run_config.json')
  train_only = ml_collections.ConfigDict(config.to_dict())
  for k in ('evals', 'curve', 'protocol'):  # evaluation only / a label
    if k in train_only:
      del train_only[k]
  ident = {'train_config_hash': config_hash(train_only),
           'seed': int(config.seed)}
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      stored = json.load(f)
    if stored != ident:
      raise ValueError(
          f'{workdir} holds a run of another config ({stored}); this one is '
          f'{ident}. Use a new --workdir, or delete that directory to '
          'retrain.')
  elif is_main:
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(ident, f)


def make_step_fn(method: Method, dataset: data.Dataset, mesh, batch: int):
  """one_step(root_key, arrays, phase, state, fed) -> (state, metrics).

  The batch is sampled inside the program and constrained to the batch axes,
  so each device draws only its slice (threefry is partitionable). `fed` is
  None, or the step's host-fed batch (grain pipeline), which then takes the
  place of `arrays` in `dataset.sample`.
  """
  def one_step(root_key, arrays, phase, state: TrainState, fed):
    data_key, method_key = jax.random.split(
        jax.random.fold_in(root_key, state.step))
    b = sharding.shard_batch(
        dataset.sample(data_key, batch, arrays if fed is None else fed,
                       groups=method.class_groups),
        mesh)
    if phase is None:
      return method.train_step(state, b, method_key)
    return method.train_step(state, b, method_key, phase=phase)
  return one_step


def train_step_flops(method: Method, one_step, state: TrainState,
                     root_key: jax.Array, arrays: Any,
                     fed: Any = None) -> tuple[float, bool]:
  """Matmul/conv FLOPs of one training step (global batch), and exactness.

  Counted on the jaxpr of the real step (`flops.count_flops`): forward,
  backward, JVPs, teacher / critic / fake-score passes, frozen-encoder
  features — whatever the method's `train_step` runs. A method alternating
  update types (`step_cycle` = C > 1) is counted per phase and averaged, as
  each phase runs 1/C of the steps. `fed`: one step's host-fed batch (or
  its shapes) on the grain pipeline.
  """
  phases = range(method.step_cycle) if method.step_cycle > 1 else [None]
  counts = [count_flops(lambda s, k, a, f, p=p: one_step(k, a, p, s, f),
                        state, root_key, arrays, fed) for p in phases]
  return (sum(c[0] for c in counts) / len(counts),
          all(c[1] for c in counts))


def make_train_chunk(method: Method, dataset: data.Dataset, mesh, batch: int,
                     state_sharding: Any, *, fed: bool = False,
                     every_step_metrics: bool = False):
  """jit(state, root_key, arrays, n, phase) -> (state, metrics), n steps.

  `phase` (static, only for n == 1) is `method.step_phase(step)` when the
  method alternates update types (`step_cycle` > 1), else None. The state
  keeps `state_sharding` (replicated, or FSDP-sharded) across steps.

  `arrays` (the dataset's device-resident data) is an argument rather than a
  closure so a 50 MB image set is not baked into the program as a constant.
  With `fed=True` (grain pipeline) `arrays` is instead the chunk's host-fed
  batches, {'x': [n, B, ...], 'y': [n, B]}, scanned one step at a time.

  Metrics: `loss` of every step ([n], the non-finite check), every other
  metric of the chunk's last step only ([1]; `_scan_lean`), unless
  `every_step_metrics` (then all [n]). The loop logs at chunk ends, so the
  logged norms / diagnostics are the logging step's; measured on the
  drifting peer task (experiments/perf_peers.py) the per-step diagnostics
  cost ~30 % of a step.
  """
  one_step = make_step_fn(method, dataset, mesh, batch)

  @functools.partial(jax.jit, static_argnums=(3, 4), donate_argnums=0)
  def chunk(state, root_key, arrays, n, phase=None):
    if fed:
      body = functools.partial(one_step, root_key, {},
                               phase if n == 1 else None)
      xs, first = arrays, jax.tree.map(lambda a: a[0], arrays)
    else:
      body = functools.partial(one_step, root_key, arrays,
                               phase if n == 1 else None)
      xs = first = None
    if n == 1:  # no while loop: XLA:CPU runs convs in loops ~35x slower
      state, metrics = body(state, first)
      metrics = jax.tree.map(lambda m: m[None], metrics)
    elif every_step_metrics:
      state, metrics = jax.lax.scan(body, state, xs, length=n)
    else:
      state, metrics = _scan_lean(body, state, xs, n)
    return jax.lax.with_sharding_constraint(state, state_sharding), metrics
  return chunk


def _scan_lean(body, state, xs, n: int):
  """Runs n steps: n - 1 scanned keeping only `loss`, then the last whole.

  The scanned steps' other metrics (grad / param norms, a method's
  diagnostics such as drifting's coverage) are not outputs, so XLA drops
  the compute that feeds only them; the last step reports every metric.
  Training is unchanged: every step runs the same `body`. Returns
  (state, metrics) with `loss` [n] and every other metric [1].
  """
  head = last = None
  if xs is not None:
    head = jax.tree.map(lambda a: a[:-1], xs)
    last = jax.tree.map(lambda a: a[-1], xs)

  def lean(s, x):
    s, m = body(s, x)
    return s, m['loss']
  state, losses = jax.lax.scan(lean, state, head, length=n - 1)
  state, metrics = body(state, last)
  metrics = jax.tree.map(lambda m: m[None], metrics)
  metrics['loss'] = jnp.concatenate([losses.astype(metrics['loss'].dtype),
                                     metrics['loss']])
  return state, metrics


@dataclasses.dataclass
class BuiltState:
  """What `build_state` sets up for training (or timing) a method."""

  dataset: data.Dataset
  method: Method
  mesh: jax.sharding.Mesh
  state: TrainState       # fresh, placed by `state_sharding`
  state_sharding: Any     # replicated, or FSDP-sharded (config.mesh)
  arrays: Any             # the dataset's arrays, replicated on the mesh


def build_state(config: ml_collections.ConfigDict,
                init_key: jax.Array) -> BuiltState:
  """Data, method (validated, prepared), mesh and the initial sharded state.

  The set-up shared by `train_and_evaluate` and experiments/perf_common.py.
  Shapes come first (`eval_shape`): a bad backbone config (e.g. image size vs
  patch size) fails before anything compiles; then the jitted `init` places
  the state by its shardings, and the data go to every device.
  """
  pipeline.check_config(config)  # before any data is read
  dataset = data.build(config.data)
  method = load_method(config, dataset.spec)
  config_check.validate(config, method)  # every key, before any compute
  pipeline.check_config(config, method)
  method.prepare(dataset)  # frozen encoders / teachers (host side)
  mesh = sharding.make_mesh(config.mesh)
  batch = config.train.batch_size
  if batch % mesh.size:
    raise ValueError(f'config.train.batch_size={batch} is not '
                     f'divisible by the {mesh.size} devices of the mesh '
                     f'{dict(mesh.shape)}; change the batch size or '
                     'config.mesh.')
  example = dataset.sample(jax.random.key(0), 2)
  abstract = jax.eval_shape(method.init, init_key, example)
  state_sharding = sharding.state_shardings(
      mesh, abstract, config.mesh.get('fsdp_min_size', sharding.FSDP_MIN_SIZE))
  state = jax.jit(method.init, out_shardings=state_sharding)(init_key, example)
  arrays = jax.device_put(dataset.arrays, sharding.replicated(mesh))
  return BuiltState(dataset=dataset, method=method, mesh=mesh, state=state,
                    state_sharding=state_sharding, arrays=arrays)


# ============================================================== main loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, command: str | None = None) -> dict[str, Any]:
  """Trains `config.method` on `config.data`, evaluates, writes summary.json.

  Args:
    config: a full config (see experiments/bench.py).
    workdir: run directory (checkpoints, metrics.jsonl, samples, summary).
    command: the reproducing command recorded in the summary.

  Returns:
    The summary dict (also written to `workdir/summary.json`).

  Raises:
    OutOfMemoryError: a device ran out of memory (message names the fix).
    NonFiniteError: the loss became NaN/Inf (last good checkpoint kept).
  """
  try:
    return _train_and_evaluate(config, workdir, command=command)
  except jax.errors.JaxRuntimeError as e:
    hint = oom_hint(e, config)
    if hint is None:
      raise
    raise OutOfMemoryError(hint) from e


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        *, command: str | None) -> dict[str, Any]:
  # ---------------------------------------------------------------- setup
  is_main = jax.process_index() == 0
  tc = config.train
  root = jax.random.key(config.seed)
  init_key, train_key, eval_key = jax.random.split(root, 3)
  # Everything is built and checked before the workdir or any file exists.
  built = build_state(config, init_key)
  dataset, method, mesh = built.dataset, built.method, built.mesh
  state, state_sharding, arrays = (built.state, built.state_sharding,
                                   built.arrays)
  feed = None  # host-fed batches (config.data.pipeline='grain')
  if getattr(dataset, 'host_fed', False):
    threads, prefetch = (config.data.get(k) for k in ('grain_threads',
                                                       'grain_prefetch'))
    feed = pipeline.Feed(
        dataset.train_source, global_batch=tc.batch_size, seed=config.seed,
        mesh=mesh,
        threads=pipeline.DEFAULT_THREADS if threads is None else threads,
        prefetch=prefetch or pipeline.DEFAULT_PREFETCH)
  os.makedirs(workdir, exist_ok=True)
  check_workdir_config(workdir, config, is_main)
  writer = writers.create_writer(workdir, is_main=is_main)

  # ---------------------------------------------------------------- state
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=tc.max_to_keep,
                                 data_item=feed is not None)
  restored = ckpt.restore_latest_with_data(state)
  data_state = None
  if restored is not None:
    state, data_state = restored
    logging.info('Resumed from step %d in %s', int(state.step), workdir)
  if feed is not None:  # batch `step` comes next; checked against the data
    feed.start(int(state.step), data_state)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  writer.write_hparams(config.to_dict())
  upstream = method.upstream_compute()

  # ---------------------------------------------------------------- train
  chunk_fn = make_train_chunk(method, dataset, mesh, tc.batch_size,
                              state_sharding, fed=feed is not None)
  step_flops, step_flops_exact = train_step_flops(
      method, make_step_fn(method, dataset, mesh, tc.batch_size), state,
      train_key, arrays, None if feed is None else feed.example())
  up_known = all(v is not None for v in upstream.values())
  up_total = sum(v for v in upstream.values() if v is not None)
  curve_evals = curve.eval_config(config)
  curve_at = (curve.steps(tc.num_steps, config.curve.fractions)
              if curve_evals else [])
  points = curve.load(workdir) if curve_evals else []
  done = {p['step'] for p in points}
  step = int(state.step)
  t_start, t_steady, steps_timed, first = time.perf_counter(), 0.0, 0, True
  t_curve = 0.0
  bar = tqdm(total=tc.num_steps, initial=step, desc='train', unit='step',
             disable=not is_main, dynamic_ncols=True, mininterval=1.0)
  ce = tc.checkpoint_every_steps

  def chunk_len(at: int) -> int:
    # Chunks end on checkpoint boundaries so every save sees a whole chunk.
    n = min(tc.steps_per_dispatch, tc.num_steps - at, ce - at % ce)
    nxt = next((c for c in curve_at if c > at), None)
    if nxt is not None:  # chunks also end on curve points
      n = min(n, nxt - at)
    return n

  while step < tc.num_steps:
    n = chunk_len(step)
    t0 = time.perf_counter()
    phase = (method.step_phase(step)
             if n == 1 and method.step_cycle > 1 else None)
    fed = arrays if feed is None else feed.take(n)
    state, metrics = chunk_fn(state, train_key, fed, n, phase)
    if feed is not None and step + n < tc.num_steps:
      feed.prepare(chunk_len(step + n))  # placed while this chunk runs
    metrics = jax.device_get(metrics)
    dt = time.perf_counter() - t0
    if not first:  # the first chunk includes compilation
      t_steady, steps_timed = t_steady + dt, steps_timed + n
    first = False
    losses = np.asarray(metrics['loss'])
    if not np.all(np.isfinite(losses)):
      bad = step + int(np.argmin(np.isfinite(losses))) + 1
      ckpt.wait()  # in-flight saves land before we name them
      # The loss of step k is computed from the params saved at step k - 1,
      # so checkpoints from step bad - 1 on hold params that give NaN/Inf.
      good = [s for s in ckpt.all_steps() if s <= bad - 2]
      if feed is not None:
        feed.close()
      raise NonFiniteError(
          f'Non-finite loss at step {bad} (steps {step + 1}..{step + n} were '
          f'in this dispatch). Last good checkpoint: '
          f'{good[-1] if good else None} in {ckpt.directory} (later ones '
          'hold the params that diverged; nothing was deleted). Lower '
          'config.train.lr or set config.train.grad_clip.')
    prev, step = step, step + n
    bar.update(n)
    if step // tc.log_every_steps > prev // tc.log_every_steps or (
        step == tc.num_steps):
      scalars = {k: float(np.mean(v)) for k, v in metrics.items()}
      writer.write_scalars(step, scalars)
      bar.set_postfix(loss=f'{scalars["loss"]:.4g}')
    if step in curve_at and step not in done:
      t_c = time.perf_counter()
      try:
        recs = runner.evaluate(method, state.ema_params, dataset,
                               curve_evals, None,
                               jax.random.fold_in(eval_key, step),
                               seed=config.seed, mesh=mesh,
                               save_samples=False)
      except ValueError as e:  # e.g. non-finite samples: no score, go on
        logging.warning('Curve point at step %d not scored: %s', step, e)
        recs = []
      flops_here = step_flops * step
      for rec in recs:
        rec.update(step=step, train_flops=flops_here,
                   total_train_flops=(flops_here + up_total if up_known
                                      else None))
        writer.write_scalars(step, {f'curve/nfe{rec["nfe"]}/{k}': v
                                    for k, v in rec['metrics'].items()})
      points += recs
      done.add(step)
      if is_main:
        curve.save(workdir, points)
      t_curve += time.perf_counter() - t_c
    if step % ce == 0 or step == tc.num_steps or ckpt.reached_preemption(step):
      ckpt.save(step, state, force=True,
                data=None if feed is None else feed.state(step))
      if ckpt.reached_preemption(step):
        ckpt.close()
        if feed is not None:
          feed.close()
        raise SystemExit(f'Preempted at step {step}; checkpoint saved.')
  bar.close()
  if feed is not None:
    feed.close()
  ckpt.wait()
  t_train = time.perf_counter() - t_start - t_curve
  writer.flush()

  # ---------------------------------------------------------------- eval
  results = runner.evaluate(method, state.ema_params, dataset, config.evals,
                            workdir if is_main else None, eval_key,
                            seed=config.seed, mesh=mesh)
  for rec in results:
    writer.write_scalars(step, {f'eval/{rec["eval"]}/nfe{rec["nfe"]}/{k}': v
                                for k, v in rec['metrics'].items()})

  # ---------------------------------------------------------------- summary
  train_flops = step_flops * step
  ref = runner.reference_forward(config.model, dataset.spec)
  cc = config.get('curve') or {}
  reg = curve.regressed(points, float(cc.get('regress_factor', 2.0)))
  if reg['regressed']:
    logging.warning('Run regressed (final score > %.3g x its best curve '
                    'point): %s', cc.get('regress_factor', 2.0),
                    reg['detail'])
  summary = {
      'method': config.method.name, 'dataset': config.data.name,
      'seed': int(config.seed), 'protocol': config.get('protocol', 'custom'),
      'conditional': dataset.spec.num_classes > 0, 'guidance': None,
      'method_variant': method.row_variant(),
      'config_hash': config_hash(config), 'git_sha': git_sha(),
      'versions': versions(),
      'device': {'platform': jax.devices()[0].platform,
                 'kind': jax.devices()[0].device_kind,
                 'count': jax.device_count(),
                 'processes': jax.process_count(),
                 'mesh': dict(mesh.shape)},
      'steps': step, 'batch_size': int(tc.batch_size),
      'examples_seen': step * int(tc.batch_size), 'params': int(num_params),
      'reference_params': ref.params,
      # Training compute: FLOPs of the jitted step (counted on its jaxpr) x
      # steps; total adds the runs this one depends on (teacher, encoder).
      'train_step_flops': step_flops, 'train_flops': train_flops,
      'train_flops_exact': step_flops_exact, 'upstream_flops': upstream,
      'total_train_flops': train_flops + up_total if up_known else None,
      'regressed': reg['regressed'], 'regressed_detail': reg['detail'],
      'curve': points,
      'train_wall_s': round(t_train, 3),
      'train_step_ms': (round(1e3 * t_steady / steps_timed, 4)
                        if steps_timed else None),
      'command': command or shlex.join(sys.argv),
      'workdir': workdir, 'config': json.loads(config.to_json()),
      'evals': results,
  }
  if is_main:
    tmp = os.path.join(workdir, 'summary.json.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=1, default=float)
    os.replace(tmp, os.path.join(workdir, 'summary.json'))
  writer.close()
  ckpt.close()
  return summary
