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
             (`evaluator_section`, experiments/perf_evaluator.py).
  peers      the harness vs torchcfm / the Drifting demo / hand-written JAX
             (`peers_section`, experiments/perf_peers.py).
  mfu        GPU/TPU only: DiT training model-FLOPs utilisation.

This module holds the flags, the `Perf` row collector (a method per
section; `Perf.evaluator` calls experiments/perf_evaluator.py, `main` calls
experiments/perf_peers.py for `peers`) and `main`. Timing (`interleaved`)
and the backbone set-ups (`Setup`, `backbone_config`, `hand_written_fm`)
live in experiments/perf_common.py, which defines no flags, so the section
modules can import it.

Experiments may name methods; the harness never does.
"""

from __future__ import annotations

import csv
import datetime
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.perf_common import (
  Setup,
  _on_accelerator,
  backbone_config,
  hand_written_fm,
  interleaved,
)
from experiments.perf_evaluator import evaluator_section
from onestep_bench import train
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
    """The `evaluator` section (`perf_evaluator.evaluator_section`)."""
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
