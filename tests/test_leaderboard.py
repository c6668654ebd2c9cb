"""Results store: atomic appends, seed aggregation, LEADERBOARD.md, plots."""

import csv
import multiprocessing
import os

import numpy as np
import pytest

from onestep_bench import csvstore, results
from onestep_bench import leaderboard as lb

DS = 'toy2d:8gaussians'


def _summary(tmp_path, seed, sw2, method='method_a', n=1000, nfes=(1,),
             protocol='bench', config_hash='abc123abc123'):
  wd = tmp_path / 'runs' / f'{method}_{protocol}_{seed}'
  wd.mkdir(parents=True, exist_ok=True)
  for k in nfes:
    x = np.random.default_rng(seed).normal(size=(300, 2)).astype(np.float32)
    np.savez_compressed(wd / f'samples_nfe{k}.npz', x=x)
  return {
      'method': method, 'dataset': DS, 'seed': seed, 'protocol': protocol,
      'conditional': False, 'guidance': None, 'config_hash': config_hash,
      'git_sha': 'abc1234', 'versions': {'jax': '0'},
      'device': {'platform': 'cpu', 'kind': 'cpu', 'count': 1,
                 'processes': 1},
      'steps': 10, 'batch_size': 4, 'examples_seen': 40, 'params': 7,
      'train_wall_s': 1.5, 'train_step_ms': 0.1,
      'command': f'make bench METHOD={method} SEED={seed}',
      'workdir': str(wd),
      'evals': [{'eval': 'main', 'nfe': k, 'n_samples': n,
                 'feature_net': 'raw2d', 'ms_per_sample': 0.01,
                 'flops_per_sample': 100.0, 'effective_nfe': float(k),
                 'samples_file': f'samples_nfe{k}.npz',
                 'metrics': {'n_samples': float(n), 'sliced_w2': sw2 / k,
                             'sliced_w2_floor': 0.01, 'hq_frac': 0.5}}
                for k in nfes]}


def _board(res):
  return csvstore.read_csv(str(res / 'leaderboard' / 'toy2d__8gaussians.csv'))


def test_mean_std_over_two_seeds(tmp_path):
  res = tmp_path / 'results'
  rows = results.record(_summary(tmp_path, 0, 1.0), str(res))
  assert {r['metric'] for r in rows} == {'sliced_w2', 'sliced_w2_floor',
                                        'hq_frac', 'effective_nfe'}
  # (n_samples is a column, not a metric row)
  (one,) = _board(res)
  assert one['n_seeds'] == '1' and one['sliced_w2_std'] == ''
  results.record(_summary(tmp_path, 1, 3.0), str(res))
  (row,) = _board(res)
  assert float(row['sliced_w2_mean']) == pytest.approx(2.0)
  assert float(row['sliced_w2_std']) == pytest.approx(np.sqrt(2.0))
  assert float(row['hq_frac_std']) == pytest.approx(0.0)
  assert row['n_seeds'] == '2' and row['seeds'] == '0 1'
  assert row['command'] == 'make bench METHOD=method_a SEED=1'  # latest
  assert len(csvstore.read_csv(str(res / 'runs.csv'))) == 8


def test_rerecording_a_seed_replaces_it(tmp_path):
  res = tmp_path / 'results'
  results.record(_summary(tmp_path, 0, 1.0), str(res))
  results.record(_summary(tmp_path, 1, 3.0), str(res))
  results.record(_summary(tmp_path, 1, 5.0), str(res))  # re-run of seed 1
  (row,) = _board(res)
  assert float(row['sliced_w2_mean']) == pytest.approx(3.0)
  assert float(row['sliced_w2_std']) == pytest.approx(np.sqrt(8.0))
  assert row['n_seeds'] == '2'
  assert len(csvstore.read_csv(str(res / 'runs.csv'))) == 12  # history is kept


def test_different_sample_counts_never_aggregated(tmp_path):
  res = tmp_path / 'results'
  results.record(_summary(tmp_path, 0, 1.0, n=1000), str(res))
  results.record(_summary(tmp_path, 1, 3.0, n=5000), str(res))
  rows = _board(res)
  assert sorted(r['n_samples'] for r in rows) == ['1000', '5000']
  assert all(r['n_seeds'] == '1' for r in rows)
  assert sorted(float(r['sliced_w2_mean']) for r in rows) == [1.0, 3.0]


def test_custom_configs_not_aggregated_but_bench_seeds_are(tmp_path):
  res = tmp_path / 'results'
  for seed, h in [(0, 'aaa'), (1, 'bbb')]:
    results.record(_summary(tmp_path, seed, 1.0, protocol='custom',
                       config_hash=h), str(res))
  assert [r['n_seeds'] for r in _board(res)] == ['1', '1']


def test_rows_sorted_by_protocol_nfe_then_primary(tmp_path):
  res = tmp_path / 'results'
  results.record(_summary(tmp_path, 0, 9.0, 'method_a', nfes=(1, 2),
                     protocol='smoke'), str(res))
  results.record(_summary(tmp_path, 0, 4.0, 'method_a', nfes=(1, 2)), str(res))
  results.record(_summary(tmp_path, 0, 2.0, 'method_b', nfes=(1,)), str(res))
  got = [(r['protocol'], r['nfe'], r['method']) for r in _board(res)]
  assert got == [('bench', '1', 'method_b'), ('bench', '1', 'method_a'),
                 ('bench', '2', 'method_a'), ('smoke', '1', 'method_a'),
                 ('smoke', '2', 'method_a')]


def test_markdown(tmp_path):
  res = tmp_path / 'results'
  results.record(_summary(tmp_path, 0, 1.0, 'method_a'), str(res))
  results.record(_summary(tmp_path, 1, 3.0, 'method_a'), str(res))
  results.record(_summary(tmp_path, 0, 2.0, 'method_b', protocol='smoke'),
                 str(res))
  md = (res / 'LEADERBOARD.md').read_text(encoding='utf-8')
  assert 'do not edit' in md and '`make leaderboard`' in md
  assert '## toy2d:8gaussians' in md
  assert 'sliced_w2 ↓' in md and 'hq_frac ↑' in md
  assert '| method_a | 1 | 1 | 1000 | 2 | 2 ± 1.4 (floor 0.01) |' in md, md
  assert 'effective_nfe ↓' not in md  # a column beside NFE, never ranked
  assert '`make bench METHOD=method_a SEED=1`' in md
  bench, smoke = md.split('### smoke (not comparable)')
  assert 'method_b' in smoke and 'method_b' not in bench
  assert 'sliced_w2_floor ↓' not in md  # floors sit beside their metric


def test_header_mismatch_raises(tmp_path):
  p = str(tmp_path / 'x.csv')
  csvstore.atomic_append(p, [{'a': 1}], ['a'])
  with pytest.raises(ValueError, match='refusing to mix schemas'):
    csvstore.atomic_append(p, [{'b': 1}], ['b'])
  with pytest.raises(ValueError):
    csvstore.atomic_append(p, [{'a': 1, 'zzz': 2}], ['a'])  # unknown key
  assert open(p).read() == 'a\n1\n'


def test_added_column_migrates_old_file_and_old_writer_is_refused(tmp_path):
  p = str(tmp_path / 'x.csv')
  csvstore.atomic_append(p, [{'a': 1, 'c': 'x,y'}], ['a', 'c'])
  csvstore.atomic_append(p, [{'a': 2, 'b': 'v', 'c': 'z'}], ['a', 'b', 'c'])
  assert csvstore.read_csv(p) == [{'a': '1', 'b': '', 'c': 'x,y'},
                                  {'a': '2', 'b': 'v', 'c': 'z'}]
  with pytest.raises(ValueError, match='refusing to mix schemas'):
    csvstore.atomic_append(p, [{'a': 3, 'c': 'w'}], ['a', 'c'])  # old code
  assert len(csvstore.read_csv(p)) == 2


def test_method_variant_labels_rows_without_splitting_seeds(tmp_path):
  res = tmp_path / 'results'
  for seed in (0, 1):
    s = _summary(tmp_path, seed, 1.0 + seed)
    s['method_variant'] = 'features=pixels'
    results.record(s, str(res))
  (row,) = _board(res)
  assert row['method_variant'] == 'features=pixels' and row['n_seeds'] == '2'
  md = (res / 'LEADERBOARD.md').read_text(encoding='utf-8')
  assert '| method_a [features=pixels] | 1 |' in md


def test_runs_csv_before_method_variant_still_aggregates(tmp_path):
  res = tmp_path / 'results'
  old_cols = [c for c in lb.RUN_COLUMNS if c != 'method_variant']
  rows = lb.rows_from_summary(_summary(tmp_path, 0, 1.0))
  csvstore.atomic_append(str(res / 'runs.csv'),
                         [{c: r[c] for c in old_cols} for r in rows], old_cols)
  results.rebuild(str(res))  # reads a file that lacks the column
  assert _board(res)[0]['method_variant'] == ''
  results.record(_summary(tmp_path, 1, 3.0), str(res))  # migrates it
  (row,) = _board(res)
  assert row['n_seeds'] == '2'
  assert csvstore.read_csv(str(res / 'runs.csv'))[0]['method_variant'] == ''


_COLS = ['worker', 'i', 'pad']
_PAD = 'x' * 300 + ', "quoted", done'


def _append_worker(path, worker, barrier):
  barrier.wait()
  for i in range(5):
    csvstore.atomic_append(path, [{'worker': worker, 'i': i, 'pad': _PAD}],
                           _COLS)


# fork, not spawn (16 fresh interpreters take ~10 s on 2 cores): the children
# run only csv/fcntl/os code, never JAX, so JAX's fork warning does not apply.
@pytest.mark.filterwarnings('ignore:os.fork:RuntimeWarning')
def test_16_concurrent_processes_lose_and_tear_nothing(tmp_path):
  path = str(tmp_path / 'runs.csv')
  ctx = multiprocessing.get_context('fork')
  barrier = ctx.Barrier(16)  # All start appending at once.
  procs = [ctx.Process(target=_append_worker, args=(path, w, barrier))
           for w in range(16)]
  try:
    for p in procs:
      p.start()
    for p in procs:
      p.join(60)
  finally:
    for p in procs:
      if p.is_alive():
        p.kill()
  assert [p.exitcode for p in procs] == [0] * 16
  with open(path, newline='') as f:
    records = list(csv.reader(f))
  assert records[0] == _COLS and records.count(_COLS) == 1
  assert len(records) == 1 + 16 * 5
  assert all(len(r) == 3 and r[2] == _PAD for r in records[1:])
  assert sorted((int(r[0]), int(r[1])) for r in records[1:]) == [
      (w, i) for w in range(16) for i in range(5)]
  assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


def test_plots_written(tmp_path):
  res = tmp_path / 'results'
  results.record(_summary(tmp_path, 0, 1.0, nfes=(1, 2)), str(res))
  results.record(_summary(tmp_path, 0, 1.0, protocol='smoke'), str(res))
  d = res / 'plots' / 'toy2d__8gaussians'
  names = {'method_a_nfe1.png', 'method_a_nfe2.png', 'method_a.png',
           'method_a_smoke_nfe1.png', 'method_a_smoke.png'}
  assert names <= set(os.listdir(d))
  nfe_plot = res / 'plots' / 'toy2d__8gaussians__sliced_w2_vs_nfe.png'
  for p in [nfe_plot, *(d / n for n in names)]:
    assert p.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert p.stat().st_size < 200_000


def test_non_2d_samples_get_no_scatter(tmp_path):
  s = _summary(tmp_path, 0, 1.0)
  np.savez_compressed(os.path.join(s['workdir'], 'samples_nfe1.npz'),
                      x=np.zeros((10, 3), np.float32))
  res = tmp_path / 'results'
  results.record(s, str(res))
  assert not (res / 'plots' / 'toy2d__8gaussians').exists()


def test_cli_rebuilds_everything(tmp_path, capsys):
  res = tmp_path / 'results'
  results.record(_summary(tmp_path, 0, 1.0), str(res))
  (res / 'LEADERBOARD.md').unlink()
  (res / 'leaderboard' / 'toy2d__8gaussians.csv').unlink()
  results.main(['--results_dir', str(res)])
  assert (res / 'LEADERBOARD.md').exists() and len(_board(res)) == 1
  assert 'sliced_w2_vs_nfe.png' in capsys.readouterr().out


def test_metric_names_and_primary():
  assert lb.metric_name('fid', 50_000) == 'fid_50k'
  assert lb.metric_name('fid_floor', 10_000) == 'fid_10k_floor'
  assert lb.metric_name('fid_50k', 50_000) == 'fid_50k'
  assert lb.metric_name('sliced_w2', 10_000) == 'sliced_w2'
  assert lb.primary_metric(['mmd_rbf', 'sliced_w2']) == 'sliced_w2'
  assert lb.primary_metric(['is_50k', 'fid_50k', 'fid_10k']) == 'fid_50k'
  assert lb.arrow('fid_50k') == '↓' and lb.arrow('is_50k') == '↑'
  assert lb.arrow('modes_covered') == '↑'
