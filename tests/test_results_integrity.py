"""Leaderboard integrity: provenance, one eff-NFE unit, train FLOPs, curves,
re-evaluation, CFG end to end, the regressed flag (issue: every number means
the same thing)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import smoke_config

from onestep_bench import curve, data, main, results, train
from onestep_bench.csvstore import read_csv
from onestep_bench.evaluate import reevaluate
from onestep_bench.evaluators import runner
from onestep_bench.method import available_methods, load_method

DS = 'toy2d:8gaussians'


def _summary(tmp_path, seed, sw2, method='m_a', weights='none', ref='r0',
             sha='abc1234', curve_pts=(), protocol='bench'):
  return {
      'method': method, 'dataset': DS, 'seed': seed, 'protocol': protocol,
      'conditional': False, 'guidance': None, 'config_hash': 'h' * 12,
      'git_sha': sha, 'steps': 100, 'batch_size': 4, 'params': 7,
      'reference_params': 7, 'train_flops': 1e9, 'total_train_flops': 1e9,
      'train_flops_exact': True, 'regressed': False,
      'command': f'cmd {method} {seed}', 'workdir': str(tmp_path / 'nowhere'),
      'evals': [{'eval': 'main', 'nfe': 1, 'n_samples': 1000,
                 'feature_net': 'raw2d', 'feature_weights': weights,
                 'ref_stats': ref, 'eval_settings': '',
                 'flops_per_sample': 100.0, 'flops_exact': True,
                 'effective_nfe': 1.0, 'metrics': {'sliced_w2': sw2}}],
      'curve': [{'eval': 'curve', 'nfe': 1, 'n_samples': 200, 'step': s,
                 'train_flops': 1e7 * s, 'total_train_flops': 1e7 * s,
                 'feature_net': 'raw2d', 'metrics': {'sliced_w2': v}}
                for s, v in curve_pts]}


def test_feature_spaces_never_ranked_together(tmp_path):
  res = str(tmp_path / 'res')
  results.record(_summary(tmp_path, 0, 1.0, 'm_a', weights='w1'), res)
  results.record(_summary(tmp_path, 1, 3.0, 'm_a', weights='w2'), res)
  results.record(_summary(tmp_path, 0, 2.0, 'm_b', ref='other'), res)
  board = read_csv(f'{res}/leaderboard/toy2d__8gaussians.csv')
  assert len(board) == 3 and all(r['n_seeds'] == '1' for r in board)
  md = open(f'{res}/LEADERBOARD.md', encoding='utf-8').read()
  assert md.count('### bench, eval `main`') == 3
  assert 'not comparable' in md and 'weights `w1`' in md


def test_uncommitted_code_never_on_the_headline(tmp_path):
  res = str(tmp_path / 'res')
  results.record(_summary(tmp_path, 0, 1.0, 'm_a'), res)
  results.record(_summary(tmp_path, 1, 0.1, 'm_a', sha='abc1234+dirty'), res)
  (clean, dirty) = read_csv(f'{res}/leaderboard/toy2d__8gaussians.csv')
  assert (clean['board'], clean['n_seeds']) == ('bench', '1')
  assert dirty['board'] == 'bench+dirty'
  md = open(f'{res}/LEADERBOARD.md', encoding='utf-8').read()
  assert '### bench+dirty (not comparable)' in md


def test_curve_points_plotted_never_ranked_and_regressed_flag(tmp_path):
  res = str(tmp_path / 'res')
  pts = [(25, 0.1), (50, 0.08), (100, 0.5)]  # collapse after step 50
  flag = curve.regressed([{'nfe': 1, 'step': s, 'metrics': {'sliced_w2': v}}
                          for s, v in pts], 2.0)
  assert flag['regressed'] and flag['detail'][0]['best_step'] == 50
  assert flag['detail'][0]['ratio'] == pytest.approx(0.5 / 0.08)
  ok = curve.regressed([{'nfe': 1, 'step': s, 'metrics': {'sliced_w2': v}}
                        for s, v in [(25, 0.1), (100, 0.15)]], 2.0)
  assert not ok['regressed']
  s = _summary(tmp_path, 0, 0.5, curve_pts=pts)
  s['regressed'] = flag['regressed']
  rows = results.record(s, res)
  assert {r['eval'] for r in rows} == {'main', 'curve'}
  assert sorted(r['step'] for r in rows if r['eval'] == 'curve'
                and r['metric'] == 'sliced_w2') == ['100', '25', '50']
  board = read_csv(f'{res}/leaderboard/toy2d__8gaussians.csv')
  assert [r['eval'] for r in board] == ['main']  # curve rows never ranked
  md = open(f'{res}/LEADERBOARD.md', encoding='utf-8').read()
  assert '⚠ regressed (seed 0)' in md
  plots = tmp_path / 'res' / 'plots'
  assert (plots / 'toy2d__8gaussians__quality_vs_train_flops.png').stat(
      ).st_size > 1000
  assert (plots / 'toy2d__8gaussians__sliced_w2_vs_sampling_flops.png'
          ).exists()


def test_eval_overrides_keep_the_protocol():
  flat = {'evals.main.nfe': (1, 4), 'evals.main.n_samples': 10}
  assert main.protocol_after_overrides('bench', flat) == 'bench'
  assert main.protocol_after_overrides(
      'bench', {'curve.fractions': (), 'mesh.fsdp': 2}) == 'bench'
  assert main.protocol_after_overrides(
      'bench', {**flat, 'train.lr': 1e-4}) == 'custom'
  # Gradient accumulation keeps the protocol (same global batch); any other
  # train key beside it does not, flat or nested.
  assert main.protocol_after_overrides(
      'paper', {'train.grad_accum': 4}) == 'paper'
  assert main.protocol_after_overrides(
      'paper', {'train': {'grad_accum': 4}}) == 'paper'
  assert main.protocol_after_overrides(
      'paper', {'train': {'grad_accum': 4, 'lr': 1e-4}}) == 'custom'


def test_grad_accum_default_keeps_the_config_hash():
  c = smoke_config('flow_matching')
  h1 = train.config_hash(c)
  with c.unlocked():
    c.train.grad_accum = 1
  assert train.config_hash(c) == h1
  c.train.grad_accum = 2
  assert train.config_hash(c) != h1


def test_eval_override_keeps_the_train_config_hash(tmp_path):
  c = smoke_config('flow_matching')
  train.check_workdir_config(str(tmp_path), c, True)
  c.evals.main.nfe = (4,)
  c.curve.fractions = (0.5,)
  c.protocol = 'custom'
  train.check_workdir_config(str(tmp_path), c, True)  # no error
  c.train.lr = 0.5
  with pytest.raises(ValueError, match='another config'):
    train.check_workdir_config(str(tmp_path), c, True)


class _MatmulMethod:
  """loss = sum((x @ W)^2) on a [B, D] batch, W [D, K]: forward 2BDK,
  backward for dW only (x is data) 2BDK: 4BDK per step by hand."""

  def __init__(self, cycle=1):
    self.step_cycle = cycle


def test_train_step_flops_match_a_hand_count():
  b, d, k = 16, 8, 5

  def one_step(root_key, arrays, phase, state, _):
    del root_key, phase
    x = arrays

    def loss(w):
      return jnp.sum((x @ w) ** 2)
    g = jax.grad(loss)(state)
    return state - 0.1 * g, {}
  w = jnp.ones((d, k))
  x = jnp.ones((b, d))
  flops, exact = train.train_step_flops(_MatmulMethod(), one_step, w,
                                        jax.random.key(0), x)
  assert exact and flops == 4 * b * d * k

  def two_phase(root_key, arrays, phase, state, _):  # phase 1: 2x the work
    s, m = one_step(root_key, arrays, None, state, None)
    if phase == 1:
      s, m = one_step(root_key, arrays, None, s, None)
    return s, m
  flops, _ = train.train_step_flops(_MatmulMethod(2), two_phase, w,
                                    jax.random.key(0), x)
  assert flops == 1.5 * 4 * b * d * k  # averaged over the cycle


def test_effective_nfe_denominator_is_shared_by_every_method():
  """The unit is the protocol's backbone, not each method's own network."""
  refs = {}
  for name in available_methods():
    c = smoke_config(name)
    ds = data.build(c.data)
    runner._REFERENCE_CACHE.clear()  # pylint: disable=protected-access
    refs[name] = runner.reference_forward(c.model, ds.spec)
    method = load_method(c, ds.spec)
    own = sum(np.prod(a.shape) for a in jax.tree.leaves(jax.eval_shape(
        lambda m=method, ds=ds: m.init(jax.random.key(0), ds.sample(
            jax.random.key(0), 2)).params)))
    assert own >= refs[name].params  # methods may add, never hide, size
  assert len({(r.flops, r.params) for r in refs.values()}) == 1, refs


def test_reference_forward_memo_is_keyed_on_the_backbone():
  c = smoke_config('flow_matching')
  ds = data.build(c.data)
  runner._REFERENCE_CACHE.clear()  # pylint: disable=protected-access
  first = runner.reference_forward(c.model, ds.spec)
  assert runner.reference_forward(c.model, ds.spec) is first  # memoised
  wider = smoke_config('flow_matching', **{'model.width': 2 * c.model.width})
  other = runner.reference_forward(wider.model, ds.spec)
  assert other.params > first.params and other.flops > first.flops


def test_run_records_train_flops_curve_and_reevaluates(tmp_path):
  c = smoke_config('flow_matching', **{'curve.fractions': (0.5, 1.0)})
  wd = str(tmp_path / 'run')
  s = train.train_and_evaluate(c, wd)
  assert s['train_flops'] == s['train_step_flops'] * s['steps'] > 0
  assert s['total_train_flops'] == s['train_flops']
  assert [p['step'] for p in s['curve']] == [4, 8]
  assert s['curve'][0]['train_flops'] == s['train_step_flops'] * 4
  rec = s['evals'][0]
  assert rec['feature_weights'] == 'none' and rec['ref_stats']
  assert rec['effective_nfe'] == pytest.approx(rec['nfe'])
  # Re-evaluation: same NFE -> same samples and score; new NFE recorded
  # under the run's protocol, no retraining.
  res = str(tmp_path / 'res')
  out = reevaluate(wd, overrides={'nfe': (1, 4)}, results_dir=res)
  again = {r['nfe']: r['metrics']['sliced_w2'] for r in out['records']}
  assert again[1] == pytest.approx(rec['metrics']['sliced_w2'], rel=1e-9)
  rows = read_csv(f'{res}/runs.csv')
  assert {r['protocol'] for r in rows} == {'smoke'}
  assert {r['nfe'] for r in rows} == {'1', '4'}
  assert "--config.evals.main.nfe=(1,4,)" in rows[0]['command']
  assert {e['nfe'] for e in out['summary']['evals']} == {1, 2, 4}


@pytest.mark.parametrize('method', [
    'drifting',
    pytest.param('tvm', marks=pytest.mark.slow),
    pytest.param('transition_matching', marks=pytest.mark.slow)])
def test_conditional_cfg_end_to_end(method, tmp_path, cheap_classifier):
  """Conditional digits smoke run -> eval at guidance 1 and > 1 -> rows."""
  del cheap_classifier
  # TM's CFG is on the head velocity: no guidance input (Method.guidance_input)
  kw = {'data.conditional': True,
        'model.guidance_embed': method != 'transition_matching',
        'train.batch_size': 80, 'evals.main.n_samples': 100,
        'evals.main.batch_size': 100, 'evals.main.nfe': (1,),
        'evals.main.guidance': 1.0}
  c = smoke_config(method, 'digits', **kw)
  del c.evals['nfe_sweep']
  wd = str(tmp_path / 'run')
  s = train.train_and_evaluate(c, wd)
  res = str(tmp_path / 'res')
  results.record(s, res)
  reevaluate(wd, overrides={'guidance': 2.0}, results_dir=res)
  rows = [r for r in read_csv(f'{res}/runs.csv') if r['metric'] == 'fid_100']
  assert {(r['conditional'], r['guidance']) for r in rows} == {
      ('true', '1.0'), ('true', '2.0')}
  assert all(r['feature_net'] == 'classifier:digits' and
             len(r['feature_weights']) == 16 for r in rows)
  vals = {r['guidance']: float(r['value']) for r in rows}
  assert vals['1.0'] != vals['2.0']  # guidance reached the sampler


def test_significance_marks_ties_and_real_gaps(tmp_path):
  from onestep_bench import rankings  # pylint: disable=g-import-not-at-top
  res = str(tmp_path / 'res')
  for seed, (a, b, c) in enumerate([(1.0, 1.05, 3.0), (1.1, 0.95, 3.1),
                                    (0.9, 1.1, 2.9)]):
    for m, v in (('m_a', a), ('m_b', b), ('m_c', c)):
      results.record(_summary(tmp_path, seed, v, m), res)
  board = read_csv(f'{res}/leaderboard/toy2d__8gaussians.csv')
  marks = {r['method']: rankings.significance(board, 'sliced_w2', True)[
      id(r)] for r in board}
  assert marks['m_a'] == 'best' or marks['m_b'] == 'best'
  tie = marks['m_b'] if marks['m_a'] == 'best' else marks['m_a']
  assert tie.startswith('≈'), marks  # 1.0 vs 1.03 over 3 seeds: noise
  assert marks['m_c'].startswith('worse'), marks
  assert all(float(r['sliced_w2_ci95']) > 0 for r in board)
  md = open(f'{res}/LEADERBOARD.md', encoding='utf-8').read()
  assert '≈ (p=' in md and 'worse (p=' in md
  assert '### bench at equal sampling cost' in md


def test_equal_training_compute_reads_the_curves():
  from onestep_bench import rankings  # pylint: disable=g-import-not-at-top
  def row(m, step, flops, v, seed='0'):
    return {'method': m, 'seed': seed, 'step': str(step), 'nfe': '1',
            'metric': 'sliced_w2', 'n_samples': '200', 'value': str(v),
            'total_train_flops': str(flops)}
  rows = [row('fast', 1, 1e9, 0.5), row('fast', 2, 2e9, 0.2),
          row('slow', 1, 3e9, 0.4), row('slow', 2, 6e9, 0.1),
          row('student', 1, 5e9, 0.05)]  # first point above F* = 2e9
  v = rankings.equal_training_compute(rows, 'sliced_w2', True)
  assert v['flops'] == 2e9
  got = {m: s for m, s, _, _ in v['rows']}
  assert got == {'fast': 0.2, 'slow': None, 'student': None}


def test_upstream_compute_counts_teacher_and_encoder(tmp_path):
  import json as _json  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top

  from conftest import method_setup  # pylint: disable=g-import-not-at-top
  _, _, drift = method_setup('drifting')
  assert drift.upstream_compute() == {}  # raw features: no encoder
  drift.encoder = types.SimpleNamespace(info={'cache_key': 'k1',
                                              'train_flops': 5e12})
  assert drift.upstream_compute() == {'encoder:k1': 5e12}
  _, _, fd = method_setup('f_distill')
  (tmp_path / 'summary.json').write_text(_json.dumps(
      {'total_train_flops': 7e12}))
  fd.mcfg.teacher_workdir = str(tmp_path)
  assert fd.upstream_compute() == {f'teacher:{tmp_path}': 7e12}
