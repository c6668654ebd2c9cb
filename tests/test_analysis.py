"""ANALYSIS.md: winners, ties, claim verdicts and tuning deltas come from the
numbers (synthetic runs with known gaps), and the file is regenerated with
the leaderboard."""

import json

import pytest

from onestep_bench import analysis, leaderboard, results
from onestep_bench.csvstore import atomic_append, read_csv

DS = 'toy2d:8gaussians'


def _summary(method, seed, sw2, protocol='bench', nfe=1):
  return {
      'method': method, 'dataset': DS, 'seed': seed, 'protocol': protocol,
      'conditional': False, 'guidance': None, 'config_hash': 'h' * 12,
      'git_sha': 'abc1234', 'steps': 100, 'batch_size': 4, 'params': 7,
      'reference_params': 7, 'train_flops': 1e9 * (2 if method == 'b' else 1),
      'total_train_flops': 1e9 * (2 if method == 'b' else 1),
      'train_flops_exact': True, 'regressed': False,
      'command': f'cmd {method}', 'workdir': '/nowhere',
      'evals': [{'eval': 'main', 'nfe': nfe, 'n_samples': 1000,
                 'feature_net': 'raw2d', 'feature_weights': 'none',
                 'ref_stats': 'r0', 'eval_settings': '',
                 'flops_per_sample': 100.0, 'flops_exact': True,
                 'effective_nfe': float(nfe),
                 'metrics': {'sliced_w2': sw2}}]}


def _tables(runs):
  rows = [r for s in runs for r in leaderboard.rows_from_summary(s)]
  return leaderboard.aggregate(rows)


# a: clearly best; b: far worse (significant); c: within noise of a.
RUNS = ([_summary('a', s, v) for s, v in enumerate((0.10, 0.11, 0.09))]
        + [_summary('b', s, v) for s, v in enumerate((0.50, 0.52, 0.49))]
        + [_summary('c', s, v) for s, v in enumerate((0.08, 0.14, 0.10))]
        + [_summary('d', 0, 0.01)])


def test_winners_ties_worse_untested():
  head = analysis.headline(_tables(RUNS))
  (w,) = analysis.winners(*head[(DS, 'bench')])
  names = {k: {r['method'] for r in w[k]} for k in ('tied', 'worse',
                                                     'untested')}
  # d has the best mean but one seed: it cannot be tested; among the
  # multi-seed rows a is best, c is within noise, b is significantly worse.
  assert w['best']['method'] == 'd' and w['best_tested']['method'] == 'a'
  assert names == {'tied': {'c'}, 'worse': {'b'}, 'untested': {'d'}}


@pytest.mark.parametrize('claim, verdict', [
    (dict(better='a', better_nfe=1, worse='b', worse_nfe=1), 'reproduced'),
    (dict(better='b', better_nfe=1, worse='a', worse_nfe=1), 'contradicted'),
    (dict(better='c', better_nfe=1, worse='a', worse_nfe=1), 'tie'),
    (dict(better='d', better_nfe=1, worse='a', worse_nfe=1), 'untested'),
    (dict(better='a', better_nfe=4, worse='b', worse_nfe=1), 'untested'),
])
def test_claim_verdicts(claim, verdict):
  rows, metric = analysis.headline(_tables(RUNS))[(DS, 'bench')]
  assert analysis.check_claim(rows, metric, claim)[0] == verdict


def test_markdown_tuning_delta_and_caveats(tmp_path):
  tuned = [_summary('b', s, v, protocol='tuned')
           for s, v in enumerate((0.20, 0.21, 0.19))]
  recs = [{'method': 'b', 'family': 'toy2d', 'dev_set': 'toy2d:x',
           'overrides': {'train.lr': 0.003}, 'val_score': 0.1,
           'budget': {'trials': 8, 'train_flops': 8e9}}]
  md = analysis.markdown(_tables(RUNS + tuned), recs, [
      dict(better='a', better_nfe=1, worse='b', worse_nfe=1, source='S')])
  assert '| toy2d:8gaussians | b | 1 |' in md  # the tuned-vs-bench row
  delta = next(line for line in md.splitlines()
               if line.startswith('| toy2d:8gaussians | b | 1 |'))
  assert '-0.303' in delta  # 0.20 - 0.503 (means over 3 seeds)
  assert '**reproduced**' in md and 'Tally: 1 reproduced' in md
  assert 'Single-seed rows' in md and 'train.lr=0.003' in md
  # Cost table: b's train FLOPs are 2x the cheapest.
  assert '| toy2d:8gaussians | bench | b | 2e+09 | 2.00 | 1 |' in md


def test_rebuild_writes_analysis(tmp_path):
  res = tmp_path / 'res'
  rows = [r for s in RUNS for r in leaderboard.rows_from_summary(s)]
  atomic_append(str(res / 'runs.csv'), rows, leaderboard.RUN_COLUMNS)
  (res / 'tuning' / 'toy2d').mkdir(parents=True)
  (res / 'tuning' / 'toy2d' / 'a.json').write_text(json.dumps(
      {'method': 'a', 'family': 'toy2d', 'dev_set': 'toy2d:x',
       'overrides': {}, 'val_score': 0.2,
       'budget': {'trials': 8, 'train_flops': 1e10}}))
  written = results.rebuild(str(res))
  text = (res / 'ANALYSIS.md').read_text()
  assert str(res / 'ANALYSIS.md') in written
  assert 'defaults (trial 0)' in text and '## Who wins where' in text
  assert len(read_csv(str(res / 'runs.csv'))) == len(rows)


def test_caveat_lists_scores_below_their_floor():
  """A ranked score under its floor is flagged with both numbers; one above
  it is not (the floor over-estimates on resampled held-out splits)."""
  runs = [_summary('a', s, v) for s, v in enumerate((0.10, 0.11, 0.09))]
  runs += [_summary('e', s, v) for s, v in enumerate((0.03, 0.04, 0.05))]
  for r in runs:
    r['evals'][0]['metrics']['sliced_w2_floor'] = 0.06
  md = analysis.markdown(_tables(runs), [], [])
  line = next(x for x in md.splitlines() if 'Scores below their floor' in x)
  assert 'e on toy2d:8gaussians (bench, NFE 1: 0.04 < 0.06)' in line
  assert 'a on' not in line
  assert 'Scores below their floor' not in analysis.markdown(
      _tables(runs[:3]), [], [])
