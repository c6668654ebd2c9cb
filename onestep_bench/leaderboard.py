"""Results store: runs.csv (long) -> per-dataset leaderboards + LEADERBOARD.md.

`rows_from_summary(summary)` turns a run's summary.json into runs.csv rows:
one per (eval, nfe, metric) of the final evaluation, plus one per in-training
curve point (`eval=curve`, with its `step` and FLOPs). `aggregate` makes the
wide per-dataset tables of `results/leaderboard/<dataset>.csv` (latest row
per seed, mean / std / 95% CI over seeds). LEADERBOARD.md is rendered by
`board_md.py`; recording, rebuilding and the CLI live in `results.py`; CSV
locking in `csvstore.py`. Schema: results/README.md.

What is never ranked together: rows of different feature spaces (feature
net, its weights hash, reference statistics, evaluator settings), sample
counts, protocols, conditioning or guidance; rows from uncommitted code
(`git_sha` ending in `+dirty`) sit on their own `<protocol>+dirty` board.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

RUN_COLUMNS = [
    'timestamp', 'method', 'method_variant', 'dataset', 'protocol',
    'conditional', 'guidance', 'seed', 'eval', 'nfe', 'n_samples',
    'feature_net', 'feature_weights',
    'ref_stats', 'eval_settings', 'metric', 'value', 'step', 'steps',
    'batch_size', 'examples_seen', 'params', 'reference_params',
    'train_wall_s', 'train_step_ms', 'train_step_flops', 'train_flops',
    'total_train_flops', 'train_flops_exact', 'ms_per_sample',
    'flops_per_sample', 'flops_exact', 'reference_flops', 'regressed',
    'device', 'git_sha', 'config_hash', 'command', 'workdir']
# The feature space of a score: rows differing in any of these are never
# aggregated or ranked together.
FEATURE_SPACE = ('feature_net', 'feature_weights', 'ref_stats',
                 'eval_settings')
# One leaderboard row per distinct value of these (+ the config hash for
# protocols other than `FIXED_PROTOCOLS`: their configs differ by design).
GROUP = ('method', 'board', 'conditional', 'guidance', 'eval', 'nfe',
         'n_samples', *FEATURE_SPACE)
FIXED_PROTOCOLS = ('bench', 'tuned', 'equal_budget', 'paper', 'smoke')
# The ranked tables: `bench` (paper defaults) and `tuned` (the declared
# tuning procedure's winner per method, experiments/tuning.py), side by
# side; at paper scale `equal_budget` (experiments/paper.py: one backbone,
# batch and budget for every method). `paper` rows (each method at its own
# published setting) are listed but not comparable: budgets differ.
HEADLINE_PROTOCOLS = ('bench', 'tuned', 'equal_budget')
CURVE_EVAL = 'curve'  # in-training points: plotted (plots.py), never ranked
DIRTY = '+dirty'
HIGHER_IS_BETTER = frozenset({'hq_frac', 'modes_covered', 'inception_score',
                              'is', 'precision', 'recall'})
# Shown in LEADERBOARD.md after the primary metric (the CSVs have them all).
HEADLINE_METRICS = ('mmd_rbf', 'energy_distance', 'hq_frac', 'modes_covered',
                    'mode_weight_tv', 'inception_score', 'precision', 'recall')
MD_MAX_METRICS = 5
# Recorded as a metric row per (eval, nfe): sampling FLOPs / FLOPs of one
# forward of the protocol's reference backbone (runner.py). Never ranked.
EFFECTIVE_NFE = 'effective_nfe'

# Only `bench` and `tuned` rank; `+dirty` (uncommitted code) is listed apart.
PROTOCOL_ORDER = ('bench', 'tuned', 'equal_budget', 'paper', 'bench+dirty',
                  'tuned+dirty', 'custom', 'ablation', 'smoke')
# `method_variant` (Method.row_variant, e.g. drifting's feature set) is
# shown, not grouped on: a fixed protocol's rows share one config, and the
# others are keyed by config hash.
_WIDE_ID = ('dataset', 'method', 'method_variant', 'board', 'protocol',
            'conditional', 'guidance', 'eval', 'nfe', 'n_samples',
            *FEATURE_SPACE, 'n_seeds', 'seeds')
_PER_RUN = ('ms_per_sample', 'flops_per_sample', 'train_wall_s',
            'train_step_ms', 'train_flops',
            'total_train_flops')  # Wide CSV: mean over seeds.
_WIDE_TAIL = (*_PER_RUN, 'params', 'reference_params', 'flops_exact',
              'train_flops_exact', 'regressed', 'steps', 'examples_seen',
              'config_hash', 'git_sha', 'command')
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
  fid_like = base in ('fid', 'sfid', 'fd_dinov2') or base.startswith('fid_')
  if not fid_like or re.search(
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


def _str(v: Any) -> str:
  return '' if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _eval_rows(base: Mapping[str, str], rec: Mapping[str, Any],
               extra: Mapping[str, Any]) -> list[dict[str, str]]:
  """One row per numeric metric of an eval record."""
  n = int(rec['n_samples'])
  ev = {c: _str(rec.get(c)) for c in (
      'eval', 'nfe', *FEATURE_SPACE, 'ms_per_sample', 'flops_per_sample',
      'flops_exact', 'reference_flops')}
  ev.update({k: _str(v) for k, v in extra.items()})
  if rec.get('guidance') is not None:  # per-eval CFG scale wins
    ev['guidance'] = _str(rec['guidance'])
  metrics = dict(rec['metrics'])
  if rec.get('effective_nfe') is not None:
    metrics[EFFECTIVE_NFE] = rec['effective_nfe']
  rows = []
  for k, v in metrics.items():
    try:
      value = float(v)
    except (TypeError, ValueError):
      continue  # Non-scalar diagnostics are not leaderboard metrics.
    if k != 'n_samples':  # Already a column.
      rows.append({**base, **ev, 'n_samples': str(n), 'value': repr(value),
                   'metric': metric_name(k, n)})
  return rows


def rows_from_summary(summary: Mapping[str, Any]) -> list[dict[str, str]]:
  """summary.json -> runs.csv rows: final evals, then curve points."""
  dev = summary.get('device', '')
  if isinstance(dev, Mapping):
    dev = ':'.join(str(dev.get(k, '')) for k in ('platform', 'kind', 'count'))
  now = datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')
  base = {c: _str(summary.get(c)) for c in RUN_COLUMNS}
  base.update(timestamp=now, device=dev)
  rows = []
  for rec in summary.get('evals', []):
    rows += _eval_rows(base, rec, {'step': summary.get('steps')})
  for rec in summary.get('curve', []):
    rows += _eval_rows(base, rec, {
        'eval': CURVE_EVAL, 'step': rec['step'],
        'train_flops': rec.get('train_flops'),
        'total_train_flops': rec.get('total_train_flops'),
        'regressed': ''})
  return rows


def board(r: Mapping[str, str]) -> str:
  """The table a row belongs to: its protocol (+dirty: uncommitted code)."""
  return r['protocol'] + (DIRTY if r.get('git_sha', '').endswith(DIRTY)
                          else '')


def _num(x: Any) -> float:
  return math.nan if x in ('', None) else float(x)


def _mean_std_ci(v: Sequence[float]) -> tuple[float, Any, Any]:
  """Mean, sample std (ddof 1) and 95% t-interval half-width ('' for n=1)."""
  if len(v) < 2:
    return float(np.mean(v)), '', ''
  sd = float(np.std(v, ddof=1))
  return (float(np.mean(v)), sd,
          float(stats.t.ppf(0.975, len(v) - 1) * sd / math.sqrt(len(v))))


def aggregate(rows: Iterable[Mapping[str, str]]) -> Tables:
  """runs.csv rows -> {dataset: (sorted wide rows, metric names)}.

  Curve rows (`eval=curve`) are skipped: they are plotted, never ranked.
  """
  latest, order = {}, {}
  for r in rows:  # File order: a later row for the same seed replaces it.
    if r['eval'] == CURVE_EVAL:
      continue
    r = {**r, 'board': board(r)}
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
    row: dict[str, Any] = {c: last.get(c, '')  # '': file before a column
                            for c in (*_WIDE_ID[:-2], *_WIDE_TAIL)}
    seeds = sorted({r['seed'] for r in rs}, key=lambda s: (len(s), s))
    row.update(n_seeds=len(seeds), seeds=' '.join(seeds),
               config_hash=' '.join(sorted({r['config_hash'] for r in rs})),
               flops_exact=_all_true(rs, 'flops_exact'),
               train_flops_exact=_all_true(rs, 'train_flops_exact'),
               regressed=' '.join(sorted({r['seed'] for r in rs
                                          if r['regressed'] == 'true'})))
    values = {}
    for r in rs:
      values.setdefault(r['metric'], []).append(float(r['value']))
    for m, v in values.items():
      row[f'{m}_mean'], row[f'{m}_std'], row[f'{m}_ci95'] = _mean_std_ci(v)
    for c in _PER_RUN:  # One value per seed.
      per_seed = {r['seed']: float(r[c]) for r in rs if r[c] != ''}
      row[c] = (_mean_std_ci(list(per_seed.values()))[0] if per_seed
                else '')
    tables[last['dataset']][0].append(row)
  for wide, metrics in tables.values():
    prim = primary_metric(metrics)
    wide.sort(key=lambda r, p=prim: _sort_key(r, p))
  return tables


def _all_true(rs: Sequence[Mapping[str, str]], col: str) -> str:
  """'false' if any seed says false, '' if none recorded, else 'true'."""
  vals = {r[col] for r in rs} - {''}
  return '' if not vals else 'false' if 'false' in vals else 'true'


def _sort_key(r: Mapping[str, Any], prim: str | None) -> tuple[Any, ...]:
  p = r['board']
  rank = PROTOCOL_ORDER.index(p) if p in PROTOCOL_ORDER else 99
  v = _num(r.get(f'{prim}_mean', '')) * (-1 if arrow(prim or '') == '↑' else 1)
  return (rank, p, int(r['nfe']), math.isnan(v), 0.0 if math.isnan(v) else v,
          r['method'])


def wide_columns(metrics: Sequence[str]) -> list[str]:
  """Columns of `leaderboard/<dataset>.csv` for a dataset's metrics."""
  cols = [f'{m}_{s}' for m in metrics for s in ('mean', 'std', 'ci95')]
  return [*_WIDE_ID, *cols, *_WIDE_TAIL]
