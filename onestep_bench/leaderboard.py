"""Results store: runs.csv (long) -> per-dataset leaderboards + LEADERBOARD.md.

`record(summary)` appends one row per (run, eval, nfe, metric) to
`results/runs.csv` under an exclusive lock (temp file, fsync, os.replace: no
lost or torn rows under concurrent sweeps), then regenerates
`results/leaderboard/<dataset>.csv` (latest row per seed, mean/std over
seeds), `results/LEADERBOARD.md` and the plots. Schema: results/README.md.

  python -m onestep_bench.leaderboard [--results_dir results]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import fcntl
import io
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

RUN_COLUMNS = [
    'timestamp', 'method', 'dataset', 'protocol', 'conditional', 'guidance',
    'seed', 'eval', 'nfe', 'n_samples', 'feature_net', 'metric', 'value',
    'steps', 'batch_size', 'examples_seen', 'params', 'train_wall_s',
    'train_step_ms', 'ms_per_sample', 'flops_per_sample', 'device', 'git_sha',
    'config_hash', 'command', 'workdir']
# One leaderboard row per distinct value of these (+ the config hash for
# protocols other than `FIXED_PROTOCOLS`: their configs differ by design).
GROUP = ('method', 'protocol', 'conditional', 'guidance', 'eval', 'nfe',
         'n_samples', 'feature_net')
FIXED_PROTOCOLS = ('bench', 'smoke')
HIGHER_IS_BETTER = frozenset({'hq_frac', 'modes_covered', 'inception_score',
                              'is', 'precision', 'recall'})
# Shown in LEADERBOARD.md after the primary metric (the CSVs have them all).
HEADLINE_METRICS = ('mmd_rbf', 'energy_distance', 'hq_frac', 'modes_covered',
                    'mode_weight_tv', 'inception_score', 'precision', 'recall')
MD_MAX_METRICS = 6
# Recorded as a metric row per (eval, nfe): sampling FLOPs / FLOPs of one
# backbone forward (runner.py). Shown beside NFE, never ranked.
EFFECTIVE_NFE = 'effective_nfe'

PROTOCOL_ORDER = ('bench', 'custom', 'ablation', 'smoke')  # Only bench ranks.
_WIDE_ID = ('dataset', 'method', 'protocol', 'conditional', 'guidance', 'eval',
            'nfe', 'n_samples', 'feature_net', 'n_seeds', 'seeds')
_PER_RUN = ('ms_per_sample', 'flops_per_sample', 'train_wall_s',
            'train_step_ms')  # Wide CSV: mean over seeds.
_WIDE_TAIL = (*_PER_RUN, 'params', 'steps', 'examples_seen', 'config_hash',
              'git_sha', 'command')
Tables = dict[str, tuple[list[dict[str, Any]], list[str]]]  # ds: rows, metrics


def slug(dataset: str) -> str:
  """File-name form of a dataset name ('toy2d:moons' -> 'toy2d__moons')."""
  return dataset.replace(':', '__')


def arrow(metric: str) -> str:
  """'↑' if higher values of `metric` are better, else '↓'."""
  up = metric in HIGHER_IS_BETTER or metric.startswith('is_')
  return '↑' if up else '↓'


def metric_name(metric: str, n_samples: int) -> str:
  """FID-type names get the sample count ('fid' -> 'fid_50k'); others kept."""
  floor = '_floor' if metric.endswith('_floor') else ''
  base = metric.removesuffix('_floor')
  if not (base == 'fid' or base.startswith('fid_')) or re.search(
      r'_\d+k?$', base):
    return metric
  n = f'{n_samples // 1000}k' if n_samples % 1000 == 0 else str(n_samples)
  return f'{base}_{n}{floor}'


def _count(metric: str) -> int:
  """Sample count encoded in a metric name ('fid_10k' -> 10000; else 0)."""
  m = re.search(r'_(\d+)(k?)$', metric)
  return int(m.group(1)) * (1000 if m.group(2) else 1) if m else 0


def primary_metric(metrics: Sequence[str]) -> str | None:
  """The ranking metric: first FID metric, else 'sliced_w2', else the first."""
  ranked = [m for m in metrics
            if not m.endswith('_floor') and m != EFFECTIVE_NFE]
  # 'fid' / 'fid_10k' (not 'fid_ci_lo_10k'); the largest sample count first.
  fids = sorted((m for m in ranked if re.fullmatch(r'fid(_\d+k?)?', m)),
                key=lambda m: -_count(m))
  prefs = fids[:1] + [m for m in ranked if m == 'sliced_w2'] + ranked
  return prefs[0] if prefs else None


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
  """Exclusive fcntl lock on `path + '.lock'` (serializes all writers)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path + '.lock', 'a', encoding='utf-8') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes `data` to `path` via a temp file in the same dir + os.replace."""
  d = os.path.dirname(path) or '.'
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix='.' + os.path.basename(path),
                             suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from others.
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def _csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str],
              header: bool = True) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, list(columns), lineterminator='\n')
  if header:
    w.writeheader()
  w.writerows(rows)  # Unknown keys raise ValueError; missing ones are ''.
  return buf.getvalue()


def read_csv(path: str) -> list[dict[str, str]]:
  """Rows of a CSV file as dicts ([] if the file does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8', newline='') as f:
    return list(csv.DictReader(f))


def atomic_append(path: str, rows: list[dict[str, Any]],
                  columns: list[str]) -> None:
  """Appends `rows` to the CSV at `path`; safe under concurrent writers.

  Raises:
    ValueError: the existing header differs from `columns`, or a row has a
      key that is not a column.
  """
  new = _csv_text(rows, columns, header=False)  # Validate before locking.
  with _locked(path):
    old = ''
    if os.path.exists(path):
      with open(path, encoding='utf-8', newline='') as f:
        old = f.read()
    if old:
      header = next(csv.reader(io.StringIO(old)))
      if header != list(columns):
        raise ValueError(
            f'{path} has columns {header}, expected {list(columns)}; refusing '
            'to mix schemas. Move the old file aside (or migrate it) first.')
      old += '' if old.endswith('\n') else '\n'
    else:
      old = _csv_text([], columns)
    atomic_write(path, old + new)


def _str(v: Any) -> str:
  return '' if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def rows_from_summary(summary: Mapping[str, Any]) -> list[dict[str, str]]:
  """summary.json -> runs.csv rows, one per (eval, nfe, numeric metric)."""
  dev = summary.get('device', '')
  if isinstance(dev, Mapping):
    dev = ':'.join(str(dev.get(k, '')) for k in ('platform', 'kind', 'count'))
  now = datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')
  base = {c: _str(summary.get(c)) for c in RUN_COLUMNS}
  base.update(timestamp=now, device=dev)
  rows = []
  for rec in summary.get('evals', []):
    n = int(rec['n_samples'])
    ev = {c: _str(rec.get(c)) for c in ('eval', 'nfe', 'feature_net',
                                        'ms_per_sample', 'flops_per_sample')}
    if rec.get('guidance') is not None:  # per-eval CFG scale wins
      ev['guidance'] = _str(rec['guidance'])
    metrics = dict(rec['metrics'])
    if rec.get('effective_nfe') is not None:  # sampling FLOPs / 1 forward
      metrics[EFFECTIVE_NFE] = rec['effective_nfe']
    for k, v in metrics.items():
      try:
        value = float(v)
      except (TypeError, ValueError):
        continue  # Non-scalar diagnostics are not leaderboard metrics.
      if k != 'n_samples':  # Already a column.
        rows.append({**base, **ev, 'n_samples': str(n), 'value': repr(value),
                     'metric': metric_name(k, n)})
  return rows


def _num(x: Any) -> float:
  return math.nan if x in ('', None) else float(x)


def _mean_std(v: Sequence[float]) -> tuple[float, float | str]:
  return (float(np.mean(v)),
          float(np.std(v, ddof=1)) if len(v) > 1 else '')


def aggregate(rows: Iterable[Mapping[str, str]]) -> Tables:
  """runs.csv rows -> {dataset: (sorted wide rows, metric names)}."""
  latest, order = {}, {}
  for r in rows:  # File order: a later row for the same seed replaces it.
    variant = '' if r['protocol'] in FIXED_PROTOCOLS else r['config_hash']
    key = (r['dataset'], variant, *(r[c] for c in GROUP), r['metric'],
           r['seed'])
    latest.pop(key, None)
    latest[key] = r  # Dict order == recency order.
    order.setdefault(r['dataset'], {})[r['metric']] = None
  groups = {}
  for key, r in latest.items():
    groups.setdefault(key[:-2], []).append(r)
  tables: Tables = {ds: ([], list(ms)) for ds, ms in order.items()}
  for rs in groups.values():
    last = rs[-1]  # The most recently recorded row of the group.
    row: dict[str, Any] = {c: last[c] for c in (*_WIDE_ID[:9], *_WIDE_TAIL)}
    seeds = sorted({r['seed'] for r in rs}, key=lambda s: (len(s), s))
    row.update(n_seeds=len(seeds), seeds=' '.join(seeds),
               config_hash=' '.join(sorted({r['config_hash'] for r in rs})))
    values = {}
    for r in rs:
      values.setdefault(r['metric'], []).append(float(r['value']))
    for m, v in values.items():
      row[f'{m}_mean'], row[f'{m}_std'] = _mean_std(v)
    for c in _PER_RUN:  # One value per seed.
      per_seed = {r['seed']: float(r[c]) for r in rs if r[c] != ''}
      row[c] = _mean_std(list(per_seed.values()))[0] if per_seed else ''
    tables[last['dataset']][0].append(row)
  for wide, metrics in tables.values():
    prim = primary_metric(metrics)
    wide.sort(key=lambda r, p=prim: _sort_key(r, p))
  return tables


def _sort_key(r: Mapping[str, Any], prim: str | None) -> tuple[Any, ...]:
  p = r['protocol']
  rank = PROTOCOL_ORDER.index(p) if p in PROTOCOL_ORDER else 99
  v = _num(r.get(f'{prim}_mean', '')) * (-1 if arrow(prim or '') == '↑' else 1)
  return (rank, p, int(r['nfe']), math.isnan(v), 0.0 if math.isnan(v) else v,
          r['method'])


def _cell(r: Mapping[str, Any], m: str) -> str:
  mean, std = r.get(f'{m}_mean', ''), r.get(f'{m}_std', '')
  if mean == '':
    return '–'
  s = f'{_num(mean):.4g}' + ('' if std == '' else f' ± {_num(std):.2g}')
  floor = r.get(f'{m}_floor_mean', '')
  return s + ('' if floor == '' else f' (floor {_num(floor):.2g})')


def _shown_metrics(metrics: Sequence[str]) -> list[str]:
  """Primary metric, then headline ones, then the rest; at most 6."""
  prim = primary_metric(metrics)
  rest = [m for m in metrics if not m.endswith('_floor')
          and m not in (prim, EFFECTIVE_NFE)]
  head = [m for m in rest if m in HEADLINE_METRICS or m.startswith(
      ('fid', 'is_'))]
  shown = [prim, *head, *(m for m in rest if m not in head)]
  return [m for m in shown if m][:MD_MAX_METRICS]


def markdown(tables: Tables) -> str:
  """LEADERBOARD.md from `aggregate`'s output."""
  out = ['# Leaderboard', '', '**Generated file, do not edit**: made from '
         '`runs.csv` by `make leaderboard` (and by every `make bench`). '
         'Schema and conventions: [README.md](README.md).', '',
         'Mean ± std over seeds (ddof=1; no ± for one seed). ↓ lower is '
         'better, ↑ higher is better. `floor`: the score of an exact sample '
         'of the same size (a perfect model scores the floor, not 0). Only '
         '`bench` rows are the headline; other protocols are listed '
         'separately and are not comparable.', '']
  if not tables:
    out.append('No runs recorded yet.')
  for ds in sorted(tables):
    wide, metrics = tables[ds]
    out += [f'## {ds}', '', 'Ranked by the first metric column within each '
            'NFE; one table per protocol and eval (different sample counts '
            'are different metrics). `eff. NFE`: sampling FLOPs / one '
            f'backbone forward. All metrics: [leaderboard/{slug(ds)}.csv]'
            f'(leaderboard/{slug(ds)}.csv).', '']
    sections = {}
    for r in wide:
      sections.setdefault((r['protocol'], r['conditional'], r['guidance'],
                           r['eval']), []).append(r)
    for (p, cond, g, ev), rs in sections.items():
      present = [m for m in metrics
                 if any(r.get(f'{m}_mean', '') != '' for r in rs)]
      shown = _shown_metrics(present)
      rs = sorted(rs, key=lambda r, m=shown[0] if shown else None:
                  _sort_key(r, m))
      title = (p if p == 'bench' else f'{p} (not comparable)') + (
          ', class-conditional' + (f', guidance {g}' if g else '')
          if cond == 'true' else '') + f', eval `{ev}`'
      out += [f'### {title}', '',
              '| method | NFE | eff. NFE | samples | seeds | ' + ' | '.join(
                  f'{m} {arrow(m)}' for m in shown) + ' | command |',
              '|---' * (len(shown) + 6) + '|']
      for r in rs:  # Non-fixed protocols: one row per config, so name it.
        mark = ' †' if ' ' in r['config_hash'] else (
            '' if p in FIXED_PROTOCOLS else f' `{r["config_hash"]}`')
        cmd = str(r['command']).replace('|', '\\|')
        eff = r.get(f'{EFFECTIVE_NFE}_mean', '')
        eff = '–' if eff == '' else f'{_num(eff):.3g}'
        out.append(f'| {r["method"]}{mark} | {r["nfe"]} | {eff} | '
                   f'{r["n_samples"]} | {r["n_seeds"]} | '
                   + ' | '.join(_cell(r, m) for m in shown) + f' | `{cmd}` |')
      out.append('')
      if any(' ' in r['config_hash'] for r in rs):
        out += ['† seeds ran with different configs (see `config_hash` in '
                'the CSV).', '']
  return '\n'.join(out).rstrip() + '\n'


def rebuild(results_dir: str = 'results',
            datasets: Sequence[str] | None = None) -> list[str]:
  """Regenerates leaderboard CSVs (for `datasets`, default all) + the .md."""
  runs = os.path.join(results_dir, 'runs.csv')
  with _locked(runs):  # No stale rebuild can overwrite a newer one.
    tables = aggregate(read_csv(runs))
    written = []
    for ds in tables if datasets is None else datasets:
      if ds in tables:
        path = os.path.join(results_dir, 'leaderboard', slug(ds) + '.csv')
        wide, metrics = tables[ds]
        cols = [f'{m}_{s}' for m in metrics for s in ('mean', 'std')]
        atomic_write(path, _csv_text(wide, [*_WIDE_ID, *cols, *_WIDE_TAIL]))
        written.append(path)
    md = os.path.join(results_dir, 'LEADERBOARD.md')
    atomic_write(md, markdown(tables))
  return [*written, md]


def record(summary: Mapping[str, Any],
           results_dir: str = 'results') -> list[dict[str, str]]:
  """Appends a run's rows to runs.csv, regenerates its dataset's outputs."""
  from onestep_bench import plots  # pylint: disable=g-import-not-at-top

  rows = rows_from_summary(summary)
  atomic_append(os.path.join(results_dir, 'runs.csv'), rows, RUN_COLUMNS)
  rebuild(results_dir, datasets=[summary['dataset']])
  plots.run_figures(summary, results_dir)
  plots.regenerate(results_dir, datasets=[summary['dataset']])
  return rows


def main(argv: Sequence[str] | None = None) -> None:
  """CLI: rebuilds every leaderboard, LEADERBOARD.md and the plots."""
  from onestep_bench import plots  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--results_dir', default='results',
                      help='Directory holding runs.csv (default: results).')
  args = parser.parse_args(argv)
  for path in [*rebuild(args.results_dir), *plots.regenerate(args.results_dir)]:
    print(path)


if __name__ == '__main__':
  main()
