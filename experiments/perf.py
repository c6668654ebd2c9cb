"""`make perf`: speed and memory as ratios measured side by side in one run.

python -m experiments.perf [--sections=overhead,methods,sampling,memory,
    dispatch,evaluator,peers,mfu] [--backbones=mlp,unet,dit] [--repeats=5]
    [--quick]

Writes `results/perf.csv` (one row per figure, with device, versions and git
SHA) and `results/perf.md`. Every timing is the median over `--repeats`
rounds; inside a round the compared programs run back to back (A, B, A, B,
...), so a ratio is measured under the same machine load. Absolute ms are
reported too but only ratios are comparable across machines.

Sections (issue 10):
  overhead   harness train step / a minimal hand-written jit loop with the
             same backbone, flow-matching loss, AdamW and EMA (target <= 1.05).
  methods    train step of every method / flow matching, same backbone
             (targets: meanflow <= 1.3, tvm <= 1.5).
  sampling   1-NFE sampling throughput / raw backbone forward throughput
             (target >= 0.95); ms/sample at NFE 1, 2, 4.
  memory     compiled `memory_analysis()` of one train step per method
             (temp + arguments + outputs - aliased), and its ratio to FM.
  dispatch   toy steps/s at steps_per_dispatch 1, 10, 100.
  evaluator  Flax FID Inception vs pytorch-fid images/s: the network on the
             same batch (target >= 1.0) and uint8 32x32 -> pool3 end to end
             with each side's preprocessing and batching (target >= 1.5);
             classifier-FID end-to-end time for 10k samples
             (`evaluator_section`).
  mfu        GPU/TPU only: DiT training model-FLOPs utilisation.

Experiments may name methods; the harness never does.
"""

from __future__ import annotations

import csv
import datetime
import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags

from experiments.bench import get_config as bench_config
from onestep_bench import data, train
from onestep_bench.flops import count_flops
from onestep_bench.method import available_methods

_SECTIONS = flags.DEFINE_list(
    'sections', ['overhead', 'methods', 'sampling', 'memory', 'dispatch',
                 'evaluator', 'peers', 'mfu'], 'Which figures to measure.')
_BACKBONES = flags.DEFINE_list('backbones', ['mlp', 'unet', 'dit'],
                               'Backbones for the per-method figures.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Rounds per figure (median).')
_QUICK = flags.DEFINE_bool('quick', False, 'Tiny sizes (tests / CI).')
_OUT = flags.DEFINE_string('out_dir', 'results', 'Where perf.csv/.md go.')
_METHODS = flags.DEFINE_list('methods', [], 'Subset of methods (default all).')

FIELDS = ['timestamp', 'section', 'backbone', 'method', 'metric', 'value',
          'unit', 'target', 'meets_target', 'repeats', 'detail', 'device',
          'jax', 'flax', 'git_sha']
# Dense peak FLOP/s per chip (bf16) for the MFU figure.
PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12,
              'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5p': 459e12,
              'TPU v6 lite': 918e12}


# ================================================================ timing
def _block(x: Any) -> Any:
  return jax.block_until_ready(x)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                inner: int = 1) -> dict[str, float]:
  """Median seconds per call of each fn, rounds interleaved A, B, A, B ...

  Each fn is called twice first (compile, plus the one re-compile a jitted
  function may do when its outputs come back with committed shardings).
  """
  for f in fns.values():
    _block(f())
    _block(f())
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t0 = time.perf_counter()
      for _ in range(inner):
        out = f()
      _block(out)
      times[k].append((time.perf_counter() - t0) / inner)
  return {k: statistics.median(v) for k, v in times.items()}


# ================================================================ setups
def backbone_config(backbone: str, method: str,
                    quick: bool) -> ml_collections.ConfigDict:
  """The bench protocol config of `method` on the backbone's dataset."""
  dataset = 'toy2d:8gaussians' if backbone == 'mlp' else 'fashion_mnist'
  c = bench_config(f'method={method},dataset={dataset},smoke={quick}')
  c.mesh.data = 1
  if backbone == 'dit':  # DiT-tiny/4 on 28x28 (49 tokens): CPU-sized
    c.model = ml_collections.ConfigDict(dict(
        name='dit', size='S' if _on_accelerator() and not quick else 'tiny',
        patch_size=4 if not _on_accelerator() else 2))
  if 'allow_untrained_teacher' in c.method:  # distillation: random teacher
    c.method.allow_untrained_teacher = True
    c.method.teacher_workdir = ''
  return c


def _on_accelerator() -> bool:
  return jax.default_backend() != 'cpu'


class Setup:
  """A method + dataset + initial state + the harness's jitted train chunk."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    built = train.build_state(config, jax.random.key(0))  # as train.py does
    self.dataset, self.method, self.mesh = (built.dataset, built.method,
                                            built.mesh)
    self.state, self.state_sharding = built.state, built.state_sharding
    self.arrays = built.arrays
    self.batch = int(config.train.batch_size)
    self.chunk = train.make_train_chunk(self.method, self.dataset, self.mesh,
                                        self.batch, self.state_sharding)
    self.key = jax.random.key(1)
    self.steps = 0

  def cond_step_fn(self) -> Callable[[], Any]:
    """One cycle with phase=None: the `lax.cond` path (before the fix)."""
    def run():
      for _ in range(self.method.step_cycle):
        self.state, m = self.chunk(self.state, self.key, self.arrays, 1, None)
        self.steps += 1
      return m
    return run

  def step_fn(self, n: int = 1) -> Callable[[], Any]:
    """Runs n harness train steps (state carried), as `train.py` does.

    Methods with a `step_cycle` alternate update types; their time per step
    is the mean over whole cycles, so each call runs one full cycle.
    """
    cycle = self.method.step_cycle

    def run():
      for _ in range(cycle if n == 1 else 1):
        phase = (self.method.step_phase(self.steps)
                 if n == 1 and cycle > 1 else None)
        self.state, m = self.chunk(self.state, self.key, self.arrays, n,
                                   phase)
        self.steps += n
      return m
    return run

  def memory(self) -> dict[str, float]:
    """Compiled one-step memory (the largest phase for cycling methods)."""
    cycle = self.method.step_cycle
    best: dict[str, float] = {}
    for phase in (range(min(cycle, 2)) if cycle > 1 else [None]):
      ma = self.chunk.lower(self.state, self.key, self.arrays, 1,
                            phase).compile().memory_analysis()
      if ma is None:
        return {}
      total = (ma.temp_size_in_bytes + ma.argument_size_in_bytes
               + ma.output_size_in_bytes - ma.alias_size_in_bytes)
      if total / 2 ** 20 > best.get('peak_mib', -1):
        best = {'temp_mib': ma.temp_size_in_bytes / 2 ** 20,
                'peak_mib': total / 2 ** 20}
    return best


def hand_written_fm(setup: Setup) -> Callable[[], Any]:
  """The minimal loop: backbone + FM loss + AdamW + EMA, nothing else.

  Same backbone, data sampling, loss (Lipman et al. 2023 eq. 23, uniform t)
  and optimizer as `methods/flow_matching.py` under the harness, written as
  one jitted function with donated buffers.
  """
  net, tx, ds = setup.method.net, setup.method.tx, setup.dataset
  decay, batch = setup.config.train.ema_decay, setup.batch

  def loss_fn(params, x, key):
    kt, ke = jax.random.split(key)
    t = jax.random.uniform(kt, (x.shape[0],))
    tb = t.reshape((-1,) + (1,) * (x.ndim - 1))
    e = jax.random.normal(ke, x.shape)
    v = net.apply(params, (1 - tb) * x + tb * e, t, jnp.zeros_like(t), None)
    return jnp.mean(jnp.square(v - (e - x)))

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, opt_state, ema, i, key, arrays):
    dk, mk = jax.random.split(jax.random.fold_in(key, i))
    x = ds.sample(dk, batch, arrays)['x']
    loss, g = jax.value_and_grad(loss_fn)(params, x, mk)
    updates, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    n = i.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    ema = optax.incremental_update(params, ema, 1.0 - d)
    return params, opt_state, ema, i + 1, loss

  s = setup.state
  carry = [jax.tree.map(jnp.copy, s.params), jax.tree.map(jnp.copy,
                                                          s.opt_state),
           jax.tree.map(jnp.copy, s.ema_params), jnp.zeros((), jnp.int32)]

  def run():
    *carry[:4], loss = step(*carry, setup.key, setup.arrays)
    return loss
  return run


# ================================================================ sections
class Perf:
  """Collects rows; one instance per `make perf` invocation."""

  def __init__(self, repeats: int, quick: bool,
               sections: set[str] | None = None):
    self.repeats, self.quick = repeats, quick
    self.sections = sections  # what this run re-measures (None = all)
    self.rows: list[dict[str, Any]] = []
    self._archived, self._kept = False, []
    dev = jax.devices()[0]
    vers = train.versions()
    self.common = dict(
        timestamp=datetime.datetime.now(datetime.UTC).strftime(
            '%Y-%m-%dT%H:%M:%SZ'),
        device=f'{dev.platform}:{dev.device_kind}:{jax.device_count()}',
        jax=vers['jax'], flax=vers['flax'], git_sha=train.git_sha())

  def add(self, section, backbone, method, metric, value, unit, target=None,
          higher_is_better=False, detail=''):
    """Appends one figure's row, checks it against `target`, prints it."""
    meets = ''
    if target is not None and value is not None:
      meets = (value >= target) if higher_is_better else (value <= target)
    self.rows.append(dict(
        self.common, section=section, backbone=backbone, method=method,
        metric=metric, value=None if value is None else round(value, 6),
        unit=unit, target='' if target is None else target,
        meets_target=meets, repeats=self.repeats, detail=detail))
    print(f'{section:9s} {backbone:5s} {method:20s} {metric:28s} '
          f'{value if value is None else f"{value:.4g}"} {unit}'
          + (f' (target {target}: {"ok" if meets else "MISSED"})'
             if meets != '' else ''), flush=True)

  # ------------------------------------------------------------- overhead
  def overhead(self, backbone: str) -> None:
    """Harness flow-matching train step vs a hand-written jit loop."""
    setup = Setup(backbone_config(backbone, 'flow_matching', self.quick))
    t = interleaved({'harness': setup.step_fn(1),
                     'hand': hand_written_fm(setup)}, self.repeats,
                    inner=self._inner(backbone))
    self.add('overhead', backbone, 'flow_matching', 'harness_step_ms',
             1e3 * t['harness'], 'ms')
    self.add('overhead', backbone, 'flow_matching', 'hand_written_step_ms',
             1e3 * t['hand'], 'ms')
    self.add('overhead', backbone, 'flow_matching', 'harness_over_hand',
             t['harness'] / t['hand'], 'ratio', target=1.05)

  def _inner(self, backbone: str) -> int:
    return 20 if backbone == 'mlp' else 1

  # ------------------------------------------------------ methods + memory
  def methods(self, backbone: str, names: list[str],
              memory: bool, step: bool) -> None:
    """Per-method train-step time (`step`) and peak memory (`memory`) vs FM."""
    setups, errors = {}, {}
    for m in names:
      try:
        setups[m] = Setup(backbone_config(backbone, m, self.quick))
      except Exception as e:  # pylint: disable=broad-except
        errors[m] = f'{type(e).__name__}: {e}'[:300]
    for m, err in errors.items():
      self.add('methods', backbone, m, 'error', None, '', detail=err)
    if step and 'flow_matching' in setups:
      t = interleaved({m: s.step_fn(1) for m, s in setups.items()},
                      self.repeats, inner=self._inner(backbone))
      t = {m: sec / setups[m].method.step_cycle for m, sec in t.items()}
      targets = {'meanflow': 1.3, 'tvm': 1.5}
      for m, sec in t.items():
        self.add('methods', backbone, m, 'train_step_ms', 1e3 * sec, 'ms')
        self.add('methods', backbone, m, 'step_over_flow_matching',
                 sec / t['flow_matching'], 'ratio', target=targets.get(m))
      for m, s in setups.items():  # alternating methods: cond vs static
        if s.method.step_cycle > 1:
          tc = interleaved({'static': s.step_fn(1), 'cond': s.cond_step_fn()},
                           self.repeats)
          self.add('methods', backbone, m, 'lax_cond_over_static_phase',
                   tc['cond'] / tc['static'], 'ratio',
                   detail='train step with lax.cond over update types / '
                          'with the static phase the harness passes')
    if memory:
      mem = {m: s.memory() for m, s in setups.items()}
      base = mem.get('flow_matching', {}).get('peak_mib')
      for m, v in mem.items():
        if not v:
          continue
        self.add('memory', backbone, m, 'step_peak_mib', v['peak_mib'], 'MiB',
                 detail=f'temp {v["temp_mib"]:.1f} MiB')
        if base:
          self.add('memory', backbone, m, 'peak_over_flow_matching',
                   v['peak_mib'] / base, 'ratio')
    self._setups = setups

  # ------------------------------------------------------------- sampling
  def sampling(self, backbone: str, names: list[str]) -> None:
    """ms/sample at NFE 1/2/4 and 1-NFE vs raw forward throughput."""
    n = 64 if self.quick else (1024 if backbone == 'mlp' else 256)
    for m in names:
      try:
        setup = Setup(backbone_config(backbone, m, self.quick))
      except Exception as e:  # pylint: disable=broad-except
        self.add('sampling', backbone, m, 'error', None, '',
                 detail=f'{type(e).__name__}: {e}'[:300])
        continue
      self._sampling_one(backbone, m, setup.method, setup.state.ema_params, n)

  def _sampling_one(self, backbone, name, method, params, n) -> None:
    x = jnp.zeros((n, *method.spec.shape), jnp.float32)
    t = jnp.full((n,), 0.5)
    fwd = jax.jit(lambda p: method.apply(p, x, t, t, None))
    fns = {'forward': functools.partial(fwd, params)}
    nfes = [k for k in (1, 2, 4) if k in method.supported_nfe]
    for k in nfes:
      f = jax.jit(functools.partial(method.sample, n=n, nfe=k))
      fns[f'nfe{k}'] = functools.partial(f, params, jax.random.key(2))
    tm = interleaved(fns, self.repeats)
    for k in nfes:
      self.add('sampling', backbone, name, f'ms_per_sample_nfe{k}',
               1e3 * tm[f'nfe{k}'] / n, 'ms')
    if 1 in nfes:
      flops = count_flops(lambda p: method.sample(p, jax.random.key(0), n,
                                                  nfe=1), params)[0]
      fwd_flops = count_flops(lambda p: method.apply(p, x, t, t, None),
                              params)[0]
      self.add('sampling', backbone, name, 'nfe1_over_forward_throughput',
               tm['forward'] / tm['nfe1'], 'ratio', target=0.95,
               higher_is_better=True,
               detail=f'effective NFE {flops / fwd_flops:.2f}')

  # ------------------------------------------------------------- dispatch
  def dispatch(self) -> None:
    """Toy steps/s at steps_per_dispatch 1, 10 and 100."""
    config = backbone_config('mlp', 'flow_matching', self.quick)
    setup = Setup(config)
    steps = {k: k for k in (1, 10, 100)}
    fns = {k: setup.step_fn(k) for k in steps}
    tm = interleaved(fns, self.repeats)
    for k, sec in tm.items():
      self.add('dispatch', 'mlp', 'flow_matching',
               f'steps_per_s_dispatch{k}', k / sec, 'steps/s')
    self.add('dispatch', 'mlp', 'flow_matching', 'speedup_100_over_1',
             (100 / tm[100]) / (1 / tm[1]), 'ratio')

  # ------------------------------------------------------------ evaluator
  def evaluator(self) -> None:
    """The `evaluator` section (`evaluator_section`)."""
    evaluator_section(self)

  # ------------------------------------------------------------------ mfu
  def mfu(self) -> None:
    """DiT bf16 training model-FLOPs utilisation (GPU/TPU only)."""
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
    if not _on_accelerator() or peak is None:
      self.add('mfu', 'dit', 'flow_matching', 'mfu', None, '',
               detail=f'needs a GPU/TPU with a known peak ({kind})')
      return
    config = backbone_config('dit', 'flow_matching', self.quick)
    config.model.dtype = 'bfloat16'
    config.train.batch_size = 256
    setup = Setup(config)
    flops = count_flops(lambda s: setup.method.train_step(
        s, setup.dataset.sample(jax.random.key(0), setup.batch, setup.arrays),
        jax.random.key(0)), setup.state)[0]
    sec = interleaved({'s': setup.step_fn(10)}, self.repeats)['s'] / 10
    self.add('mfu', 'dit', 'flow_matching', 'mfu',
             flops / sec / peak / jax.device_count(), 'fraction', target=0.4,
             higher_is_better=True, detail=f'{kind}, bf16, batch 256')

  # --------------------------------------------------------------- output
  def write(self, out_dir: str) -> None:
    """Writes perf.csv / perf.md: this run's rows + other sections' rows.

    Rows of sections this run did not measure (`self.sections`; None = all)
    are kept from the existing perf.csv, so `--sections=peers` refreshes
    only the peers. Rows it replaces are appended once to
    `perf_history.csv` (the "before" of a change stays on record).
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'perf.csv')
    old = []
    if os.path.exists(path):
      with open(path, newline='', encoding='utf-8') as f:
        old = list(csv.DictReader(f))
    mine = (self.sections if self.sections is not None
            else {r['section'] for r in old})
    kept = [r for r in old if r['section'] not in mine]
    if not self._archived:
      replaced = [r for r in old if r['section'] in mine]
      hist = os.path.join(out_dir, 'perf_history.csv')
      if replaced:
        new_file = not os.path.exists(hist)
        with open(hist, 'a', newline='', encoding='utf-8') as f:
          w = csv.DictWriter(f, FIELDS, extrasaction='ignore')
          if new_file:
            w.writeheader()
          w.writerows(replaced)
      self._archived = True
      self._kept = kept
    rows = self._kept + self.rows
    with open(path + '.tmp', 'w', newline='', encoding='utf-8') as f:
      w = csv.DictWriter(f, FIELDS, extrasaction='ignore')
      w.writeheader()
      w.writerows(rows)
    os.replace(path + '.tmp', path)
    lines = ['# Performance (`make perf`)', '',
             f'{self.common["device"]}, jax {self.common["jax"]}, '
             f'git {self.common["git_sha"]}, {self.common["timestamp"]}; '
             f'median of {self.repeats} interleaved rounds (sections not '
             're-run keep their earlier rows: see the git column).', '',
             '| section | backbone | method | metric | value | unit | '
             'target | git |', '|---|---|---|---|---|---|---|---|']
    for r in rows:
      v = ('—' if r['value'] in (None, '') else f'{float(r["value"]):.4g}')
      met = r['meets_target'] in (True, 'True')
      tgt = ('' if r['target'] in ('', None) else
             f'{r["target"]} {"✓" if met else "✗"}')
      lines.append(f'| {r["section"]} | {r["backbone"]} | {r["method"]} | '
                   f'{r["metric"]} | {v} | {r["unit"]} | {tgt} | '
                   f'{r.get("git_sha", "")} |')
    with open(os.path.join(out_dir, 'perf.md'), 'w', encoding='utf-8') as f:
      f.write('\n'.join(lines) + '\n')


# ============================================================ evaluator
def _pytorch_fid_model(params: dict[str, np.ndarray] | None = None,
                       resize: bool = False):
  """pytorch-fid's FID InceptionV3 (pool3 output), or None without it.

  Random weights: torchvision's init, or `params` (the Flax port's layout,
  loaded into pytorch-fid's modules) so both networks compute the same
  function. `resize`: pytorch-fid's own resize to 299 and 2x - 1 scaling of
  [0, 1] inputs (what `pytorch_fid.fid_score` runs).
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top

    from onestep_bench.evaluators import torch_compat  # pylint: disable=g-import-not-at-top
    torch_compat.import_torchvision()
    from pytorch_fid import inception as pfi  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.manual_seed(0)
  if params is None:
    with torch_compat.random_fid_weights(pfi):
      return pfi.InceptionV3([3], resize_input=resize,  # pool3, as FID uses
                             normalize_input=resize).eval()
  sd = {k: torch.from_numpy(np.ascontiguousarray(
      v.transpose(3, 2, 0, 1) if v.ndim == 4 else
      (v.T if k == 'fc.weight' else v))) for k, v in params.items()}
  orig = pfi.load_state_dict_from_url
  pfi.load_state_dict_from_url = lambda *a, **k: sd  # its own loading code
  try:
    return pfi.InceptionV3([3], resize_input=resize,
                           normalize_input=resize).eval()
  finally:
    pfi.load_state_dict_from_url = orig


def evaluator_section(perf: Perf) -> None:
  """FID Inception speed vs pytorch-fid, then classifier FID end to end.

  Rows (section `evaluator`, interleaved rounds, median of `--repeats`):
    flax_images_per_s, pytorch_fid_images_per_s, flax_over_pytorch_fid:
      the network alone on the same preprocessed 299 px batch (target 1.0).
    e2e_flax_images_per_s, e2e_pytorch_fid_images_per_s,
    e2e_flax_over_pytorch_fid: uint8 32x32 images -> pool3, each with its
      own preprocessing and batching (ours: `InceptionExtractor`, one jit
      from uint8, `pytorch_fid` resize mode, its CPU batch; pytorch-fid:
      `F.interpolate` bilinear + 2x - 1 inside `InceptionV3`, its default
      batch of 50), the same random weights in both (target 1.5).
    fid_<n>_end_to_end_s: the bench's classifier FID + IS + P/R + KID.
  """
  _inception_network(perf)
  _inception_end_to_end(perf)
  _classifier_fid_end_to_end(perf)


def _inception_network(perf: Perf) -> None:
  from onestep_bench.evaluators import inception as inc  # pylint: disable=g-import-not-at-top
  batch, size = (2, 75) if perf.quick else (16, 299)
  x = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)
                                       ).astype(np.float32)
  params = jax.device_put(inc.prepare_params(inc.random_params(0)))
  flax_fn = jax.jit(inc.apply)
  fns = {'flax': lambda: flax_fn(params, x)}
  torch_model = _pytorch_fid_model()
  if torch_model is not None:
    import torch  # pylint: disable=g-import-not-at-top
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    def run_torch():
      with torch.no_grad():
        return torch_model(xt)[0].numpy()
    fns['pytorch_fid'] = run_torch
  tm = interleaved(fns, perf.repeats)
  perf.add('evaluator', 'inception', '', 'flax_images_per_s',
           batch / tm['flax'], 'img/s', detail=f'batch {batch}, {size}px')
  if 'pytorch_fid' in tm:
    import torch  # pylint: disable=g-import-not-at-top
    perf.add('evaluator', 'inception', '', 'pytorch_fid_images_per_s',
             batch / tm['pytorch_fid'], 'img/s',
             detail=f'torch {torch.__version__}, '
                    f'{torch.get_num_threads()} threads')
    perf.add('evaluator', 'inception', '', 'flax_over_pytorch_fid',
             tm['pytorch_fid'] / tm['flax'], 'ratio', target=1.0,
             higher_is_better=True)
  else:
    perf.add('evaluator', 'inception', '', 'flax_over_pytorch_fid', None,
             '', detail='torch/pytorch-fid not installed (make '
                        'install-parity)')


def _inception_end_to_end(perf: Perf) -> None:
  """uint8 32x32 -> pool3: the extractor vs pytorch-fid's own pipeline."""
  import tempfile  # pylint: disable=g-import-not-at-top

  from onestep_bench.evaluators import inception as inc  # pylint: disable=g-import-not-at-top
  n = 4 if perf.quick else 32
  images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3),
                                             np.uint8)
  params = inc.random_params(0)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, 'random_inception.npz')
    inc.save_params(params, path)
    ext = inc.InceptionExtractor(path, mode='pytorch_fid')
  fns = {'flax': lambda: ext(images)['features']}
  torch_model = _pytorch_fid_model(params, resize=True)
  if torch_model is not None:
    import torch  # pylint: disable=g-import-not-at-top

    def run_torch():  # pytorch-fid: ToTensor ([0, 1]), batches of 50
      out = []
      with torch.no_grad():
        for i in range(0, n, 50):
          x = torch.from_numpy(np.ascontiguousarray(
              images[i:i + 50].transpose(0, 3, 1, 2))).float() / 255.0
          out.append(torch_model(x)[0][:, :, 0, 0].numpy())
      return np.concatenate(out)
    fns['pytorch_fid'] = run_torch
  tm = interleaved(fns, perf.repeats)
  detail = f'{n} uint8 32x32 images, batch {ext.batch_size}'
  perf.add('evaluator', 'inception', '', 'e2e_flax_images_per_s',
           n / tm['flax'], 'img/s', detail=detail)
  if 'pytorch_fid' not in tm:
    perf.add('evaluator', 'inception', '', 'e2e_flax_over_pytorch_fid', None,
             '', detail='torch/pytorch-fid not installed (make '
                        'install-parity)')
    return
  ours, theirs = fns['flax'](), fns['pytorch_fid']()
  err = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
  perf.add('evaluator', 'inception', '', 'e2e_pytorch_fid_images_per_s',
           n / tm['pytorch_fid'], 'img/s', detail=f'{n} images, batch 50')
  perf.add('evaluator', 'inception', '', 'e2e_flax_over_pytorch_fid',
           tm['pytorch_fid'] / tm['flax'], 'ratio', target=1.5,
           higher_is_better=True,
           detail=f'same random weights, pool3 max rel diff {err:.1e}')


def _classifier_fid_end_to_end(perf: Perf) -> None:
  """Classifier-FID eval of 10k images (the bench's image scorer)."""
  from onestep_bench.evaluators import runner  # pylint: disable=g-import-not-at-top
  n = 256 if perf.quick else 10_000
  name = 'digits' if perf.quick else 'fashion_mnist'
  try:
    ds = data.build(ml_collections.ConfigDict(dict(
        name=name, dir='', conditional=False, hflip=False)))
  except FileNotFoundError as e:
    perf.add('evaluator', 'classifier', '', 'fid_10k_end_to_end_s', None,
             's', detail=str(e)[:200])
    return
  ev = bench_config(f'method=flow_matching,dataset={name}').evals.main
  ev.update(n_samples=n, fid_bootstrap=0)
  imgs = np.asarray(ds.arrays['x'])[:n]  # real images stand in for samples
  runner.score(imgs, ds, 0, ev)  # classifier + reference stats (cached)
  t0 = time.perf_counter()
  runner.score(imgs, ds, 0, ev)
  perf.add('evaluator', 'classifier', '', f'fid_{n}_end_to_end_s',
           time.perf_counter() - t0, 's',
           detail=f'{name}, FID+IS+PR+KID, reference cached')


def main(argv):
  """Runs the selected sections per backbone, rewriting the files as it goes."""
  del argv
  secs = set(_SECTIONS.value)
  perf = Perf(_REPEATS.value, _QUICK.value, secs)
  names = _METHODS.value or available_methods()
  if 'flow_matching' not in names:
    names = ['flow_matching', *names]
  out = _OUT.value
  # Cheap, backbone-independent figures first; the file is rewritten after
  # every part, so an interrupted run keeps what it measured.
  if 'dispatch' in secs:
    perf.dispatch()
  if 'evaluator' in secs:
    perf.evaluator()
  if 'peers' in secs:  # torchcfm / Drifting demo like for like (parity extra)
    from experiments.perf_peers import peers_section  # pylint: disable=g-import-not-at-top
    peers_section(perf)
  perf.write(out)
  for bb in _BACKBONES.value:
    if 'overhead' in secs:
      perf.overhead(bb)
    if secs & {'methods', 'memory'}:
      perf.methods(bb, names, memory='memory' in secs,
                   step='methods' in secs)
    perf.write(out)
    if 'sampling' in secs:
      perf.sampling(bb, names)
    perf.write(out)
  if 'mfu' in secs:
    perf.mfu()
  perf.write(out)
  print(f'wrote {os.path.join(_OUT.value, "perf.csv")} '
        f'({len(perf.rows)} rows)')


if __name__ == '__main__':
  app.run(main)
