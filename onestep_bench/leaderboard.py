"""Results CSVs: append runs, aggregate seeds, render LEADERBOARD.md.

`results/runs.csv` is long format, one row per (run, eval, nfe, metric);
appends are atomic (file lock + temp file + os.replace), so concurrent runs
never lose or tear rows. `results/leaderboard/<dataset>.csv` and
`results/LEADERBOARD.md` are regenerated from it: the latest row per seed
wins, then mean / std / n_seeds over seeds. Rows that differ in protocol,
conditioning, guidance, eval, NFE or sample count are never aggregated
together. Schema: results/README.md.

  python -m onestep_bench.leaderboard [--results_dir results]
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime
import fcntl
import glob
import os
import statistics
from collections.abc import Iterable
from typing import Any

RUN_COLUMNS = [
    'timestamp', 'method', 'dataset', 'protocol', 'conditional', 'guidance',
    'seed', 'eval', 'nfe', 'n_samples', 'feature_net', 'metric', 'value',
    'steps', 'batch_size', 'examples_seen', 'params', 'train_wall_s',
    'train_step_ms', 'ms_per_sample', 'flops_per_sample', 'device',
    'git_sha', 'config_hash', 'command', 'workdir']
GROUP = ('method', 'protocol', 'conditional', 'guidance', 'eval', 'nfe',
         'n_samples', 'feature_net')
HIGHER_IS_BETTER = frozenset({'hq_frac', 'modes_covered', 'inception_score',
                              'precision', 'recall'})
# Columns of LEADERBOARD.md per dataset kind, primary (ranking) metric first.
SHOWN = {'toy2d': ('sliced_w2', 'mmd_rbf', 'energy_distance', 'hq_frac',
                   'modes_covered', 'mode_weight_tv', 'mean_err', 'cov_err')}


def _write_atomic(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w', encoding='utf-8', newline='') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _csv_text(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
  import io  # pylint: disable=g-import-not-at-top
  buf = io.StringIO()
  w = csv.DictWriter(buf, columns, lineterminator='\n')
  w.writeheader()
  w.writerows(rows)
  return buf.getvalue()


def read_csv(path: str) -> list[dict[str, str]]:
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8', newline='') as f:
    return list(csv.DictReader(f))


def atomic_append(path: str, rows: list[dict[str, Any]],
                  columns: list[str]) -> None:
  """Appends rows under an exclusive lock via temp file + os.replace.

  Raises:
    ValueError: the existing file has a different header.
  """
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path + '.lock', 'w', encoding='utf-8') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    old: list[dict[str, str]] = []
    if os.path.exists(path):
      with open(path, encoding='utf-8', newline='') as f:
        reader = csv.DictReader(f)
        if reader.fieldnames and list(reader.fieldnames) != columns:
          raise ValueError(
              f'{path} has columns {reader.fieldnames}, expected {columns}. '
              'Move the old file away; schemas are never mixed.')
        old = list(reader)
    _write_atomic(path, _csv_text([*old, *rows], columns))


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
  """Long-format rows of one run summary."""
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds')
  dev = summary['device']
  base = {k: summary.get(k) for k in RUN_COLUMNS if k in summary}
  base.update(timestamp=now, device=f'{dev["kind"]} x{dev["count"]}')
  rows = []
  for rec in summary['evals']:
    for metric, value in rec['metrics'].items():
      rows.append({**base, 'eval': rec['eval'], 'nfe': rec['nfe'],
                   'n_samples': rec['n_samples'],
                   'feature_net': rec['feature_net'],
                   'ms_per_sample': rec.get('ms_per_sample'),
                   'flops_per_sample': rec.get('flops_per_sample'),
                   'metric': metric, 'value': value})
  return rows


def _fmt(mean: float, std: float | None) -> str:
  s = f'{mean:.4g}'
  return s if std is None else f'{s} ± {std:.2g}'


def aggregate(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
  """Latest row per (group, metric, seed); mean/std/n over seeds, wide."""
  latest: dict[tuple, dict[str, str]] = {}
  for r in rows:  # file order == time order: later rows replace earlier
    latest[tuple(r[k] for k in GROUP) + (r['metric'], r['seed'])] = r
  by_group: dict[tuple, dict[str, Any]] = collections.defaultdict(dict)
  values: dict[tuple, list[float]] = collections.defaultdict(list)
  for key, r in latest.items():
    g = key[:len(GROUP)]
    values[g + (r['metric'],)].append(float(r['value']))
    entry = by_group[g]
    entry.update({k: r[k] for k in GROUP}, command=r['command'])
    entry.setdefault('_seeds', set()).add(r['seed'])
  out = []
  for g, entry in by_group.items():
    row = {k: v for k, v in entry.items() if k != '_seeds'}
    row['n_seeds'] = len(entry['_seeds'])
    for (*gk, metric), vals in values.items():
      if tuple(gk) == g:
        row[f'{metric}_mean'] = statistics.fmean(vals)
        row[f'{metric}_std'] = statistics.stdev(vals) if len(vals) > 1 else ''
    out.append(row)
  return out


def _kind(dataset: str) -> str:
  return dataset.partition(':')[0]


def _sort_key(row: dict[str, Any], primary: str) -> tuple:
  return (row['protocol'], int(row['nfe']),
          float(row.get(f'{primary}_mean', float('inf')) or float('inf')))


def _markdown(dataset: str, rows: list[dict[str, Any]]) -> list[str]:
  shown = [m for m in SHOWN.get(_kind(dataset), ())
           if any(f'{m}_mean' in r for r in rows)]
  arrow = {m: '↑' if m in HIGHER_IS_BETTER else '↓' for m in shown}
  lines = [f'## {dataset}', '']
  for proto in sorted({r['protocol'] for r in rows},
                      key=lambda p: (p != 'bench', p)):
    sub = [r for r in rows if r['protocol'] == proto]
    title = ('protocol `bench` (headline)' if proto == 'bench' else
             f'protocol `{proto}` (not comparable with `bench`)')
    lines += [f'### {title}', '',
              '| method | NFE | seeds | n | ' + ' | '.join(
                  f'{m} {arrow[m]}' for m in shown) + ' | reproduce |',
              '|' + '---|' * (len(shown) + 5)]
    for r in sub:
      cells = []
      for m in shown:
        if f'{m}_mean' not in r:
          cells.append('')
          continue
        std = r.get(f'{m}_std')
        cell = _fmt(float(r[f'{m}_mean']), float(std) if std else None)
        floor = r.get(f'{m}_floor_mean')
        cells.append(cell + (f' (floor {float(floor):.3g})' if floor else ''))
      lines.append(f'| {r["method"]} | {r["nfe"]} | {r["n_seeds"]} | '
                   f'{r["n_samples"]} | ' + ' | '.join(cells) +
                   f' | `{r["command"]}` |')
    lines.append('')
  return lines


def rebuild(results_dir: str = 'results') -> None:
  """Regenerates leaderboard/*.csv, LEADERBOARD.md and plots from runs.csv."""
  runs = read_csv(os.path.join(results_dir, 'runs.csv'))
  by_ds: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
  for r in runs:
    by_ds[r['dataset']].append(r)
  md = ['# Leaderboard', '',
        'Generated by `make leaderboard` from `results/runs.csv`; do not '
        'edit. Mean ± std over seeds (latest run per seed); ↓ lower is '
        'better, ↑ higher is better. Toy metrics are computed on raw 2-D '
        'coordinates against exact samples; `floor` is the score of an '
        'exact sample of the same size. Schema: results/README.md.', '']
  for ds in sorted(by_ds):
    rows = aggregate(by_ds[ds])
    primary = SHOWN.get(_kind(ds), ('sliced_w2',))[0]
    rows.sort(key=lambda r, p=primary: _sort_key(r, p))
    columns = list(GROUP) + ['n_seeds'] + sorted(
        {k for r in rows for k in r if k.endswith(('_mean', '_std'))}) + [
            'command']
    _write_atomic(os.path.join(results_dir, 'leaderboard',
                               ds.replace(':', '__') + '.csv'),
                  _csv_text(rows, columns))
    md += _markdown(ds, rows)
  _write_atomic(os.path.join(results_dir, 'LEADERBOARD.md'), '\n'.join(md))
  from onestep_bench import plots  # pylint: disable=g-import-not-at-top
  for path in glob.glob(os.path.join(results_dir, 'leaderboard', '*.csv')):
    plots.metric_vs_nfe(path, results_dir)


def record(summary: dict[str, Any], results_dir: str = 'results'
           ) -> list[dict[str, Any]]:
  """Appends a run to runs.csv, writes its plots, rebuilds the leaderboard."""
  rows = summary_rows(summary)
  atomic_append(os.path.join(results_dir, 'runs.csv'), rows, RUN_COLUMNS)
  from onestep_bench import plots  # pylint: disable=g-import-not-at-top
  plots.run_scatter(summary, results_dir)
  rebuild(results_dir)
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description='Regenerate leaderboards + plots.')
  p.add_argument('--results_dir', default='results')
  rebuild(p.parse_args().results_dir)


if __name__ == '__main__':
  main()
