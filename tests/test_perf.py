"""`make perf` machinery on tiny sizes: rows, ratios, CSV/markdown output.

Timings here are not asserted (speed targets live in results/perf.csv, never
in unit tests); only that every figure is produced, finite and written.
"""

import csv
import math

import pytest
from absl import flags

from experiments import perf


@pytest.fixture(scope='module', autouse=True)
def _flags():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(['perf'])


def _rows(tmp_path):
  with open(tmp_path / 'perf.csv', encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  assert all(r['git_sha'] and r['device'] for r in rows)
  assert 'error' not in {r['metric'] for r in rows}
  return {(r['section'], r['method'], r['metric']): r for r in rows}


def _finite(got, keys):
  for key in keys:
    assert key in got, sorted(got)
    v = float(got[key]['value'])
    assert math.isfinite(v) and v > 0, (key, v)


def test_perf_quick_core_sections(tmp_path):
  """Overhead, step ratio, sampling and dispatch figures (the fast part)."""
  p = perf.Perf(repeats=1, quick=True)
  p.overhead('mlp')
  p.methods('mlp', ['flow_matching'], memory=False, step=True)
  p.sampling('mlp', ['flow_matching'])
  p.dispatch()
  p.write(str(tmp_path))
  got = _rows(tmp_path)
  _finite(got, [('overhead', 'flow_matching', 'harness_over_hand'),
                ('sampling', 'flow_matching', 'nfe1_over_forward_throughput'),
                ('dispatch', 'flow_matching', 'speedup_100_over_1')])
  assert got[('methods', 'flow_matching', 'step_over_flow_matching')][
      'value'] == '1.0'
  assert (tmp_path / 'perf.md').read_text(encoding='utf-8').count('\n| ') > 3


@pytest.mark.slow
def test_perf_quick_writes_every_figure(tmp_path, cheap_classifier):
  del cheap_classifier
  p = perf.Perf(repeats=1, quick=True)
  p.overhead('mlp')
  p.methods('mlp', ['flow_matching', 'f_distill'], memory=True, step=True)
  p.sampling('mlp', ['flow_matching'])
  p.dispatch()
  p.evaluator()
  p.mfu()
  p.write(str(tmp_path))
  got = _rows(tmp_path)
  _finite(got, [('overhead', 'flow_matching', 'harness_over_hand'),
                ('methods', 'f_distill', 'step_over_flow_matching'),
                ('memory', 'f_distill', 'peak_over_flow_matching'),
                ('methods', 'f_distill', 'lax_cond_over_static_phase'),
                ('sampling', 'flow_matching', 'nfe1_over_forward_throughput'),
                ('dispatch', 'flow_matching', 'speedup_100_over_1'),
                ('evaluator', '', 'flax_images_per_s'),
                ('evaluator', '', 'fid_256_end_to_end_s')])
  assert (tmp_path / 'perf.md').read_text(encoding='utf-8').count('\n| ') > 5


def test_partial_run_keeps_other_sections_and_archives_replaced(tmp_path):
  first = perf.Perf(repeats=1, quick=True)
  first.add('dispatch', 'mlp', 'flow_matching', 'a', 1.0, 'x', target=2.0,
            higher_is_better=True)
  first.add('peers', 'mlp', 'flow_matching', 'b', 1.0, 'x')
  first.write(str(tmp_path))
  again = perf.Perf(repeats=1, quick=True, sections={'peers'})
  again.add('peers', 'mlp', 'flow_matching', 'b', 3.0, 'x')
  again.write(str(tmp_path))
  again.write(str(tmp_path))  # rewritten as it goes: archived only once
  got = _rows(tmp_path)
  assert got[('dispatch', 'flow_matching', 'a')]['value'] == '1.0'
  assert got[('peers', 'flow_matching', 'b')]['value'] == '3.0'
  assert len(got) == 2
  with open(tmp_path / 'perf_history.csv', encoding='utf-8') as f:
    hist = list(csv.DictReader(f))
  assert [(r['section'], r['value']) for r in hist] == [('peers', '1.0')]
  md = (tmp_path / 'perf.md').read_text(encoding='utf-8')
  assert '2.0 ✗' in md and '| 3 |' in md
