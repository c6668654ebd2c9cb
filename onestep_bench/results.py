"""Recording a finished run: runs.csv rows, leaderboards, plots; and the CLI.

`record(summary)` appends the run's rows to `results/runs.csv` (locked,
atomic: csvstore.py), regenerates its dataset's leaderboard CSV and
`LEADERBOARD.md` (leaderboard.py) and `ANALYSIS.md` (analysis.py), the
run's sample figures and the dataset's plots (plots.py). Import direction:
results -> {analysis, plots, board_md} -> leaderboard -> csvstore.

  python -m onestep_bench.results [--results_dir results]   # rebuild all
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

from onestep_bench import analysis, board_md, leaderboard, plots
from onestep_bench.csvstore import (
  atomic_append,
  atomic_write,
  csv_text,
  locked,
  read_csv,
)


def rebuild(results_dir: str = 'results',
            datasets: Sequence[str] | None = None) -> list[str]:
  """Regenerates leaderboard CSVs (for `datasets`, default all) + the .md."""
  runs = os.path.join(results_dir, 'runs.csv')
  with locked(runs):  # No stale rebuild can overwrite a newer one.
    rows = read_csv(runs)
    tables = leaderboard.aggregate(rows)
    curves: dict[str, list[dict[str, str]]] = {}
    for r in rows:
      if r['eval'] == leaderboard.CURVE_EVAL:
        curves.setdefault(r['dataset'], []).append(r)
    written = []
    for ds in tables if datasets is None else datasets:
      if ds in tables:
        path = os.path.join(results_dir, 'leaderboard',
                            leaderboard.slug(ds) + '.csv')
        wide, metrics = tables[ds]
        atomic_write(path, csv_text(wide, leaderboard.wide_columns(metrics)))
        written.append(path)
    md = os.path.join(results_dir, 'LEADERBOARD.md')
    atomic_write(md, board_md.markdown(tables, curves))
    written += [md, analysis.write(results_dir, tables)]
  return written


def record(summary: Mapping[str, Any],
           results_dir: str = 'results') -> list[dict[str, str]]:
  """Appends a run's rows to runs.csv, regenerates its dataset's outputs."""
  rows = leaderboard.rows_from_summary(summary)
  atomic_append(os.path.join(results_dir, 'runs.csv'), rows,
                leaderboard.RUN_COLUMNS)
  rebuild(results_dir, datasets=[summary['dataset']])
  plots.run_figures(summary, results_dir)
  plots.regenerate(results_dir, datasets=[summary['dataset']])
  return rows


def main(argv: Sequence[str] | None = None) -> None:
  """CLI: rebuilds every leaderboard, LEADERBOARD.md and the plots."""
  parser = argparse.ArgumentParser(
      description='Rebuild leaderboards and plots from results/runs.csv.')
  parser.add_argument('--results_dir', default='results',
                      help='Directory holding runs.csv (default: results).')
  args = parser.parse_args(argv)
  for path in [*rebuild(args.results_dir),
               *plots.regenerate(args.results_dir)]:
    print(path)


if __name__ == '__main__':
  main()
