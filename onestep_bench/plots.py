"""Result figures: small PNGs under results/plots/, written atomically.

Scatters of a run's 2-D samples (`run_figures`, called by
`results.record`) and, per dataset (`regenerate`, called by `make
leaderboard` and `record`): the primary metric vs NFE, vs training FLOPs
(the in-training curve points: quality vs training compute) and vs sampling
FLOPs per sample (the Pareto view of quality vs inference cost).
"""

from __future__ import annotations

import glob
import io
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from onestep_bench import leaderboard  # noqa: E402
from onestep_bench.csvstore import atomic_write, read_csv  # noqa: E402

DPI = 80
MAX_POINTS = 5000


def _save(fig: Any, path: str) -> str:
  buf = io.BytesIO()
  fig.savefig(buf, dpi=DPI, format='png', bbox_inches='tight')
  plt.close(fig)
  atomic_write(path, buf.getvalue())
  return path


def _finite(x: np.ndarray) -> np.ndarray:
  """Finite rows of x [m, 2], at most MAX_POINTS (a fixed random subset)."""
  x = np.asarray(x, np.float32)
  x = x[np.isfinite(x).all(axis=1)]
  if len(x) > MAX_POINTS:
    x = x[np.random.default_rng(0).choice(len(x), MAX_POINTS, replace=False)]
  return x


def toy_grid(panels: Mapping[str, np.ndarray], path: str, title: str = '',
             reference: np.ndarray | None = None) -> str:
  """One scatter per {panel title: samples [n, 2]}, equal shared limits.

  The limits hold the central 99% of `reference` (default: of the samples).
  """
  x = _finite(np.concatenate([_finite(s) for s in panels.values()])
              if reference is None else reference)
  lo, hi = np.percentile(x, [0.5, 99.5], axis=0) if len(x) else (-np.ones(2),
                                                                np.ones(2))
  c, half = (lo + hi) / 2, 0.55 * float(np.max(hi - lo)) + 1e-3
  fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8),
                           squeeze=False)
  for ax, (name, s) in zip(axes[0], panels.items(), strict=True):
    ax.scatter(*_finite(s).T, s=2, alpha=0.5, linewidths=0, rasterized=True)
    ax.set(xlim=(c[0] - half, c[0] + half), ylim=(c[1] - half, c[1] + half),
           aspect='equal', xticks=[], yticks=[])
    ax.set_title(name, fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  return _save(fig, path)


def toy_scatter(samples: np.ndarray, path: str, title: str,
                reference: np.ndarray | None = None) -> str:
  """Scatter of samples [n, 2]; fixed limits from `reference` if given."""
  return toy_grid({title: samples}, path, reference=reference)


def _npz_shape(path: str) -> tuple[int, ...]:
  """Shape of 'x' in an .npz, read from its header (no array load)."""
  with zipfile.ZipFile(path) as z, z.open('x.npy') as f:
    v = np.lib.format.read_magic(f)
    return tuple((np.lib.format.read_array_header_1_0 if v == (1, 0) else
                  np.lib.format.read_array_header_2_0)(f)[0])


def run_figures(summary: Mapping[str, Any], results_dir: str) -> list[str]:
  """Scatters of a run's 2-D samples: plots/<ds>/<method>[_nfe<k>].png.

  Non-'bench' runs get `_<protocol>` after the method name, so they never
  overwrite the headline figures. Samples that are not [n, 2] are skipped.
  """
  protocol = summary.get('protocol', 'custom')
  name = summary['method'] + ('' if protocol == 'bench' else f'_{protocol}')
  d = os.path.join(results_dir, 'plots', leaderboard.slug(summary['dataset']))
  samples: dict[int, np.ndarray] = {}
  grids: list[str] = []
  for rec in summary.get('evals', []):
    nfe = int(rec['nfe'])
    f = os.path.join(summary.get('workdir') or '.',
                     rec.get('samples_file') or f'samples_nfe{nfe}.npz')
    if nfe in samples or not os.path.exists(f):
      continue
    shape = _npz_shape(f)
    if len(shape) == 4:  # images: a sample grid per NFE
      with np.load(f, allow_pickle=False) as z:
        grids.append(image_grid(z['x'][:64],
                                os.path.join(d, f'{name}_nfe{nfe}.png')))
      samples[nfe] = np.zeros((0, 2))
    elif len(shape) == 2 and shape[1] == 2:
      with np.load(f, allow_pickle=False) as z:
        samples[nfe] = z['x']
  if grids:
    return grids
  title = (f'{summary["method"]} on {summary["dataset"]} '
           f'({protocol}, seed {summary["seed"]})')
  nfes = sorted(samples)
  out = [toy_scatter(samples[k], os.path.join(d, f'{name}_nfe{k}.png'),
                     f'{title}, NFE {k}') for k in nfes]
  if out:
    out.append(toy_grid({f'NFE {k}': samples[k] for k in nfes},
                        os.path.join(d, f'{name}.png'), title))
  return out


def _errorbars(ax: Any, lines: Mapping[str, list[dict[str, str]]],
               x: Any, metric: str) -> None:
  """One mean ± std line per label of wide leaderboard rows, sorted by x."""
  for label, rs in sorted(lines.items()):
    rs.sort(key=x)
    ax.errorbar([x(r) for r in rs], [float(r[f'{metric}_mean']) for r in rs],
                yerr=[float(r[f'{metric}_std'] or 0) for r in rs], marker='o',
                ms=3, capsize=2, label=label)


def metric_vs_nfe(leaderboard_csv_path: str, metric: str, path: str,
                  protocol: str | None = None) -> str | None:
  """`metric` mean ± std vs NFE (log x), one line per method.

  Plots `protocol`'s rows; by default 'bench' if the file has any, else all
  (one line per method and per protocol, eval, n_samples, ... within it).
  Returns the path, or None when there is nothing to plot.
  """
  rows = [r for r in read_csv(leaderboard_csv_path)
          if r.get(f'{metric}_mean')]
  protocol = protocol or ('bench' if any(r['protocol'] == 'bench'
                                         for r in rows) else None)
  rows = [r for r in rows if protocol in (None, r['protocol'])]
  if not rows:
    return None
  varying = [k for k in ('protocol', 'conditional', 'guidance', 'eval',
                         'n_samples', 'feature_net', 'config_hash')
             if len({(r['method'], r[k]) for r in rows}) > len(
                 {r['method'] for r in rows})]  # Varies within a method.
  lines: dict[str, list[dict[str, str]]] = {}
  for r in rows:
    label = ' '.join([r['method'], *(f'{k}={r[k]}' for k in varying)])
    lines.setdefault(label, []).append(r)
  fig, ax = plt.subplots(figsize=(4.8, 3.4))
  _errorbars(ax, lines, lambda r: int(r['nfe']), metric)
  floors = [float(r[f'{metric}_floor_mean']) for r in rows
            if r.get(f'{metric}_floor_mean')]
  if floors and 'n_samples' not in varying:
    ax.axhline(float(np.mean(floors)), color='gray', ls=':', lw=1,
               label='exact-sample floor')
  nfes = sorted({int(r['nfe']) for r in rows})
  ax.set(xscale='log', xlabel='NFE',
         ylabel=f'{metric} {leaderboard.arrow(metric)}')
  ax.set_xticks(nfes, [str(k) for k in nfes])
  ax.minorticks_off()
  ax.set_title(os.path.basename(leaderboard_csv_path)[:-4].replace('__', ':')
               + (f' ({protocol})' if protocol else ''), fontsize=9)
  ax.legend(fontsize=7)
  return _save(fig, path)


def _bench_final(rows: list[dict[str, str]]) -> list[dict[str, str]]:
  """Wide rows of the headline: bench board, eval `main`."""
  return [r for r in rows if r.get('board', r['protocol']) == 'bench'
          and r['eval'] == 'main']


def _fmt_title(stem: str, what: str) -> str:
  return f'{stem.replace("__", ":")}: {what}'


def metric_vs_train_flops(runs: list[dict[str, str]], dataset: str,
                          path: str) -> str | None:
  """Curve points (bench board): primary metric vs total training FLOPs.

  One line per (method, NFE), mean over seeds at each step. Returns the
  path, or None without curve points.
  """
  pts = [r for r in runs if r['dataset'] == dataset
         and r['eval'] == leaderboard.CURVE_EVAL
         and leaderboard.board(r) == 'bench']
  metric = leaderboard.primary_metric(sorted({r['metric'] for r in pts}))
  pts = [r for r in pts if r['metric'] == metric and r['total_train_flops']]
  if not pts:
    return None
  latest: dict[tuple[str, ...], dict[str, str]] = {}
  for r in pts:  # a re-run seed replaces its points
    latest[(r['method'], r['nfe'], r['seed'], r['step'])] = r
  lines: dict[tuple[str, str], dict[int, list[dict[str, str]]]] = {}
  for (m, nfe, _, step), r in latest.items():
    lines.setdefault((m, nfe), {}).setdefault(int(step), []).append(r)
  fig, ax = plt.subplots(figsize=(5.2, 3.6))
  for (m, nfe), by_step in sorted(lines.items()):
    steps = sorted(by_step)
    x = [np.mean([float(r['total_train_flops']) for r in by_step[s]])
         for s in steps]
    y = [np.mean([float(r['value']) for r in by_step[s]]) for s in steps]
    ax.plot(x, y, marker='o', ms=3, ls='-' if nfe == '1' else '--',
            label=f'{m} NFE {nfe}')
  ax.set(xscale='log', yscale='log', xlabel='training FLOPs (incl. teacher / '
         'encoder runs)', ylabel=f'{metric} {leaderboard.arrow(metric)} '
         f'({pts[0]["n_samples"]} samples)')
  ax.set_title(_fmt_title(leaderboard.slug(dataset), 'quality vs training '
                          'compute (bench)'), fontsize=9)
  _log_axes_legend_outside(ax)
  return _save(fig, path)


def _log_axes_legend_outside(ax: Any) -> None:
  """No minor tick labels on log axes (they overlap); legend to the right."""
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0.0)


def metric_vs_sampling_flops(leaderboard_csv_path: str, metric: str,
                             path: str) -> str | None:
  """Pareto view: `metric` vs sampling FLOPs per sample (bench, eval main).

  One line per method through its NFEs, mean ± std over seeds.
  """
  rows = [r for r in _bench_final(read_csv(leaderboard_csv_path))
          if r.get(f'{metric}_mean') and r.get('flops_per_sample')]
  if not rows:
    return None
  by_method: dict[str, list[dict[str, str]]] = {}
  for r in rows:
    by_method.setdefault(r['method'], []).append(r)
  fig, ax = plt.subplots(figsize=(5.2, 3.6))
  _errorbars(ax, by_method, lambda r: float(r['flops_per_sample']), metric)
  for rs in by_method.values():
    for r in rs:
      ax.annotate(r['nfe'], (float(r['flops_per_sample']),
                             float(r[f'{metric}_mean'])), fontsize=6,
                  xytext=(2, 2), textcoords='offset points')
  ax.set(xscale='log', yscale='log', xlabel='sampling FLOPs per sample '
         '(labels: NFE)', ylabel=f'{metric} {leaderboard.arrow(metric)}')
  stem = os.path.basename(leaderboard_csv_path)[:-4]
  ax.set_title(_fmt_title(stem, 'quality vs sampling cost (bench)'),
               fontsize=9)
  _log_axes_legend_outside(ax)
  return _save(fig, path)


def regenerate(results_dir: str = 'results',
               datasets: Sequence[str] | None = None) -> list[str]:
  """Per leaderboard (or `datasets`): metric vs NFE / train / sample FLOPs."""
  out = []
  runs = read_csv(os.path.join(results_dir, 'runs.csv'))
  for f in sorted(glob.glob(os.path.join(results_dir, 'leaderboard', '*.csv'))):
    stem = os.path.basename(f)[:-4]
    if datasets is not None and stem not in map(leaderboard.slug, datasets):
      continue
    with open(f, encoding='utf-8') as fh:
      header = fh.readline().strip().split(',')  # Metric names have no ','.
    names = [c[:-5] for c in header if c.endswith('_mean')]
    # The primary metric, plus every other FID-<n> (e.g. the FID-2K NFE
    # sweep beside the FID-10K main eval).
    metrics = [leaderboard.primary_metric(names)] + [
        m for m in names if re.fullmatch(r'fid_\d+k?', m)]
    for metric in dict.fromkeys(m for m in metrics if m):
      p = metric_vs_nfe(f, metric, os.path.join(
          results_dir, 'plots', f'{stem}__{metric}_vs_nfe.png'))
      out += [p] if p else []
    prim = leaderboard.primary_metric(names)
    if prim:
      p = metric_vs_sampling_flops(f, prim, os.path.join(
          results_dir, 'plots', f'{stem}__{prim}_vs_sampling_flops.png'))
      out += [p] if p else []
    dataset = next((r['dataset'] for r in read_csv(f)), None)
    if dataset:
      p = metric_vs_train_flops(runs, dataset, os.path.join(
          results_dir, 'plots', f'{stem}__quality_vs_train_flops.png'))
      out += [p] if p else []
  return out


def image_grid(samples: np.ndarray, path: str, n: int = 64) -> str:
  """The first `n` images ([N, H, W, C] in [-1, 1]) tiled into one PNG."""
  from onestep_bench.data.images import to_uint8  # pylint: disable=g-import-not-at-top
  x = to_uint8(samples[:n])
  k, (h, w, c) = x.shape[0], x.shape[1:]
  cols = int(np.ceil(np.sqrt(k)))
  rows = int(np.ceil(k / cols))
  grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
  for i in range(k):
    r, q = divmod(i, cols)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h,
         1 + q * (w + 1):1 + q * (w + 1) + w] = x[i]
  scale = max(1, 256 // grid.shape[0])  # small images: enlarge for viewing
  grid = grid.repeat(scale, 0).repeat(scale, 1)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  matplotlib.image.imsave(path, grid[..., 0] if c == 1 else grid,
                          cmap='gray' if c == 1 else None, vmin=0, vmax=255)
  return path
