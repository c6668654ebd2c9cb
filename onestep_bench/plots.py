"""Result plots: toy scatter per method x NFE, and metric vs NFE.

Written by `leaderboard.record` / `rebuild` under `results/plots/`.
"""

from __future__ import annotations

import csv
import os
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402

MAX_POINTS = 5000
DPI = 80


def _save(fig, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path + '.tmp.png', dpi=DPI, bbox_inches='tight')
  os.replace(path + '.tmp.png', path)
  plt.close(fig)


def run_scatter(summary: dict[str, Any], results_dir: str) -> str | None:
  """One panel per evaluated NFE of a 2-D run: results/plots/<ds>/<method>.png."""
  panels = []
  for rec in summary['evals']:
    f = rec.get('samples_file')
    path = os.path.join(summary['workdir'], f) if f else None
    if path and os.path.exists(path):
      x = np.load(path)['x']
      if x.ndim == 2 and x.shape[1] == 2:
        panels.append((rec, x[:MAX_POINTS]))
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3),
                           squeeze=False)
  lim = np.quantile(np.abs(np.concatenate([p[1] for p in panels])), 0.995)
  lim = float(min(max(lim, 1.0), 10.0)) * 1.1
  for ax, (rec, x) in zip(axes[0], panels):
    ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.5, rasterized=True)
    m = rec['metrics']
    ax.set_title(f'NFE {rec["nfe"]}  SW2 {m.get("sliced_w2", float("nan")):.3f}',
                 fontsize=9)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect('equal')
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f'{summary["method"]} on {summary["dataset"]} '
               f'({summary["protocol"]}, seed {summary["seed"]})', fontsize=10)
  out = os.path.join(results_dir, 'plots', summary['dataset'].replace(
      ':', '__'), f'{summary["method"]}.png')
  _save(fig, out)
  return out


def metric_vs_nfe(leaderboard_csv: str, results_dir: str,
                  metric: str | None = None) -> str | None:
  """Primary metric vs NFE per method (protocol 'bench'), log-x."""
  with open(leaderboard_csv, encoding='utf-8') as f:
    rows = [r for r in csv.DictReader(f) if r['protocol'] == 'bench']
  if not rows:
    return None
  if metric is None:
    metric = 'sliced_w2' if 'sliced_w2_mean' in rows[0] else next(
        k[:-5] for k in rows[0] if k.endswith('_mean'))
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  for method in sorted({r['method'] for r in rows}):
    rs = sorted((r for r in rows if r['method'] == method and
                 r.get(f'{metric}_mean')), key=lambda r: int(r['nfe']))
    if not rs:
      continue
    nfe = [int(r['nfe']) for r in rs]
    mean = [float(r[f'{metric}_mean']) for r in rs]
    std = [float(r[f'{metric}_std'] or 0) for r in rs]
    ax.errorbar(nfe, mean, yerr=std, marker='o', ms=4, capsize=2,
                label=method)
  floors = [float(r[f'{metric}_floor_mean']) for r in rows
            if r.get(f'{metric}_floor_mean')]
  if floors:
    ax.axhline(float(np.mean(floors)), color='gray', ls='--', lw=1,
               label='exact-sample floor')
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('NFE')
  ax.set_ylabel(metric)
  ds = os.path.basename(leaderboard_csv)[:-4]
  ax.set_title(ds.replace('__', ':'), fontsize=10)
  ax.legend(fontsize=7)
  out = os.path.join(results_dir, 'plots', f'{ds}__{metric}_vs_nfe.png')
  _save(fig, out)
  return out
