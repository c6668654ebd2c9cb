"""Results CSVs: aggregation over seeds, latest-wins, atomic appends."""

import csv
import multiprocessing
import os

import numpy as np
import pytest

from onestep_bench import leaderboard as lb


def _summary(tmp_path, seed, value, method='m1', n=1000, nfe=1):
  wd = tmp_path / f'run_{method}_{seed}'
  wd.mkdir(exist_ok=True)
  np.savez(wd / f'samples_nfe{nfe}.npz', x=np.random.default_rng(seed).normal(
      size=(50, 2)).astype(np.float32))
  return {
      'method': method, 'dataset': 'toy2d:8gaussians', 'seed': seed,
      'protocol': 'bench', 'conditional': False, 'guidance': None,
      'config_hash': 'abc', 'git_sha': 'deadbee', 'steps': 10,
      'batch_size': 4, 'examples_seen': 40, 'params': 7, 'train_wall_s': 1.0,
      'train_step_ms': 0.1, 'device': {'kind': 'cpu', 'count': 1},
      'command': f'make bench SEED={seed}', 'workdir': str(wd),
      'evals': [{'eval': 'main', 'nfe': nfe, 'n_samples': n,
                 'feature_net': 'raw2d', 'ms_per_sample': 0.01,
                 'samples_file': f'samples_nfe{nfe}.npz',
                 'metrics': {'sliced_w2': value, 'sliced_w2_floor': 0.01,
                             'hq_frac': 0.5}}]}


def _board(res):
  with open(res / 'leaderboard' / 'toy2d__8gaussians.csv') as f:
    return list(csv.DictReader(f))


def test_mean_std_over_seeds_and_latest_wins(tmp_path):
  res = tmp_path / 'results'
  lb.record(_summary(tmp_path, 0, 1.0), str(res))
  lb.record(_summary(tmp_path, 1, 3.0), str(res))
  (row,) = _board(res)
  assert float(row['sliced_w2_mean']) == pytest.approx(2.0)
  assert float(row['sliced_w2_std']) == pytest.approx(np.sqrt(2.0))
  assert row['n_seeds'] == '2'
  lb.record(_summary(tmp_path, 1, 5.0), str(res))  # re-run seed 1
  (row,) = _board(res)
  assert float(row['sliced_w2_mean']) == pytest.approx(3.0)
  assert row['n_seeds'] == '2'
  md = (res / 'LEADERBOARD.md').read_text()
  assert 'm1' in md and 'sliced_w2 ↓' in md and 'hq_frac ↑' in md
  assert (res / 'plots' / 'toy2d__8gaussians' / 'm1.png').exists()
  assert (res / 'plots' / 'toy2d__8gaussians__sliced_w2_vs_nfe.png').exists()


def test_sample_counts_never_mixed(tmp_path):
  res = tmp_path / 'results'
  lb.record(_summary(tmp_path, 0, 1.0, n=1000), str(res))
  lb.record(_summary(tmp_path, 1, 3.0, n=5000), str(res))
  rows = _board(res)
  assert sorted(r['n_samples'] for r in rows) == ['1000', '5000']
  assert all(r['n_seeds'] == '1' for r in rows)


def test_header_mismatch_raises(tmp_path):
  p = str(tmp_path / 'x.csv')
  lb.atomic_append(p, [{'a': 1}], ['a'])
  with pytest.raises(ValueError, match='schemas are never mixed'):
    lb.atomic_append(p, [{'b': 1}], ['b'])


def _append_many(args):
  path, worker = args
  for i in range(5):
    lb.atomic_append(path, [{'worker': worker, 'i': i, 'pad': 'x' * 200}],
                     ['worker', 'i', 'pad'])


def test_concurrent_appends_lose_nothing(tmp_path):
  path = str(tmp_path / 'runs.csv')
  with multiprocessing.get_context('fork').Pool(16) as pool:
    pool.map(_append_many, [(path, w) for w in range(16)])
  with open(path) as f:
    lines = f.read().splitlines()
  assert lines[0] == 'worker,i,pad' and lines.count('worker,i,pad') == 1
  rows = lb.read_csv(path)
  assert len(rows) == 80
  assert {(r['worker'], r['i']) for r in rows} == {
      (str(w), str(i)) for w in range(16) for i in range(5)}
  assert all(r['pad'] == 'x' * 200 for r in rows)
  assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]
