"""LEADERBOARD.md: one table per feature space, significance, equal-cost views.

Rendered from `leaderboard.aggregate`'s tables (and the raw curve rows for
the equal-training-compute view, `rankings.py`). Conventions are in the
file's own introduction and in results/README.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from onestep_bench import rankings
from onestep_bench.leaderboard import (
  DIRTY,
  EFFECTIVE_NFE,
  FEATURE_SPACE,
  FIXED_PROTOCOLS,
  HEADLINE_METRICS,
  HEADLINE_PROTOCOLS,
  MD_MAX_METRICS,
  Tables,
  _num,
  _sort_key,
  arrow,
  board,
  primary_metric,
  slug,
)


def _cell(r: Mapping[str, Any], m: str) -> str:
  mean, std = r.get(f'{m}_mean', ''), r.get(f'{m}_std', '')
  if mean == '':
    return '–'
  s = f'{_num(mean):.4g}' + ('' if std == '' else f' ± {_num(std):.2g}')
  floor = r.get(f'{m}_floor_mean', '')
  return s + ('' if floor == '' else f' (floor {_num(floor):.2g})')


def _shown_metrics(metrics: Sequence[str]) -> list[str]:
  """Primary metric, then headline ones, then the rest; at most 5."""
  prim = primary_metric(metrics)
  rest = [m for m in metrics if not m.endswith('_floor')
          and m not in (prim, EFFECTIVE_NFE)]
  head = [m for m in rest if m in HEADLINE_METRICS or m.startswith(
      ('fid', 'is_'))]
  shown = [prim, *head, *(m for m in rest if m not in head)]
  return [m for m in shown if m][:MD_MAX_METRICS]


def _flops(x: Any) -> str:
  return '–' if x in ('', None) else f'{_num(x):.2e}'


def _cost_cells(r: Mapping[str, Any]) -> list[str]:
  """Effective NFE (*: inexact), total train FLOPs, params (‡: > ref)."""
  eff = r.get(f'{EFFECTIVE_NFE}_mean', '')
  eff = '–' if eff == '' else f'{_num(eff):.3g}' + (
      '*' if r.get('flops_exact') == 'false' else '')
  own, total = r.get('train_flops', ''), r.get('total_train_flops', '')
  train = _flops(total if total != '' else own) + (
      f' (own {_flops(own)})' if total not in ('', own) and own != ''
      and _num(total) > 1.001 * _num(own) else '')
  if r.get('train_flops_exact') == 'false':
    train += '*'
  p, ref = _num(r.get('params', '')), _num(r.get('reference_params', ''))
  params = '–' if math.isnan(p) else f'{p / 1e3:.4g}k'
  if not math.isnan(ref) and p > 1.001 * ref:
    params += f' ‡{p / ref:.2f}×'
  return [eff, train, params]


_MD_INTRO = [
    '# Leaderboard', '', '**Generated file, do not edit**: made from '
    '`runs.csv` by `make leaderboard` (and by every `make bench`). '
    'Schema and conventions: [README.md](README.md).', '',
    'Mean ± std over seeds (ddof=1; no ± for one seed; 95% CIs in the CSVs). '
    '↓ lower is better, ↑ higher is better. `floor`: the score of an exact '
    'sample of the same size (a perfect model scores the floor, not 0). '
    '`eff. NFE`: sampling FLOPs / one forward of the protocol\'s reference '
    'backbone (the same unit for every method; `*` = inexact count). '
    '`train FLOPs`: the jitted train step counted on its jaxpr × steps, plus '
    'the runs the method depends on (teacher, encoder pre-training; `own` = '
    'this run alone). `‡k×`: the model has k× the reference backbone\'s '
    'parameters. ⚠ `regressed`: the final score is worse than 2× the '
    'run\'s best in-training score. `vs best`: Welch t-test over seeds '
    'against the best row of the same NFE (`≈`: p ≥ 0.05, a tie; `?`: fewer '
    'than 2 seeds, untested). Each table is one feature space '
    '(feature net + weights hash + reference statistics + evaluator '
    'settings). Headline tables: `bench` (every method at its paper '
    'defaults) and `tuned` (every method after the same declared tuning '
    'procedure: K trials on a development set, scored on a validation '
    'measure, results/tuning/); rows from uncommitted code (`+dirty`) and '
    'other protocols are listed apart and are not comparable.', '']


def _section_title(key: tuple[str, ...]) -> str:
  b, cond, g, ev, n, fnet, fw, ref, _ = key
  title = b if b in HEADLINE_PROTOCOLS else f'{b} (not comparable)'
  if cond == 'true':
    title += ', class-conditional' + (f', guidance {g}' if g else '')
  return (f'{title}, eval `{ev}` ({n} samples), features `{fnet}` '
          f'(weights `{fw[:8]}`, ref `{ref[:8]}`)')


def markdown(tables: Tables,
             curves: Mapping[str, Sequence[Mapping[str, str]]] | None = None
             ) -> str:
  """LEADERBOARD.md from `aggregate`'s output (+ runs.csv curve rows)."""
  curves = curves or {}
  out = list(_MD_INTRO)
  if not tables:
    out.append('No runs recorded yet.')
  for ds in sorted(tables):
    wide, metrics = tables[ds]
    out += [f'## {ds}', '', 'Ranked by the first metric column within each '
            'NFE. All metrics: '
            f'[leaderboard/{slug(ds)}.csv](leaderboard/{slug(ds)}.csv).', '']
    sections: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in wide:
      sections.setdefault((r['board'], r['conditional'], r['guidance'],
                           r['eval'], r['n_samples'],
                           *(r[c] for c in FEATURE_SPACE)), []).append(r)
    spaces: dict[tuple[str, ...], int] = {}
    for key in sections:
      spaces[key[:4]] = spaces.get(key[:4], 0) + 1
    for key, rs in sections.items():
      present = [m for m in metrics
                 if any(r.get(f'{m}_mean', '') != '' for r in rs)]
      shown = _shown_metrics(present)
      rs = sorted(rs, key=lambda r, m=shown[0] if shown else None:
                  _sort_key(r, m))
      out += [f'### {_section_title(key)}', '']
      if spaces[key[:4]] > 1:
        out += ['Another table of this eval uses a different feature space '
                'or sample count (weights, reference statistics or '
                'evaluator settings): the tables are not comparable.', '']
      marks = (rankings.significance(rs, shown[0], arrow(shown[0]) == '↓')
               if shown else {})
      out += ['| method | NFE | eff. NFE | samples | seeds | ' + ' | '.join(
          f'{m} {arrow(m)}' for m in shown)
              + ' | vs best | train FLOPs | params | command |',
              '|---' * (len(shown) + 9) + '|']
      fixed = key[0].removesuffix(DIRTY) in FIXED_PROTOCOLS
      for r in rs:  # Non-fixed protocols: one row per config, so name it.
        mark = ' †' if ' ' in r['config_hash'] else (
            '' if fixed else f' `{r["config_hash"]}`')
        if r.get('regressed'):
          mark += f' ⚠ regressed (seed {r["regressed"]})'
        cmd = str(r['command']).replace('|', '\\|')
        eff, train, params = _cost_cells(r)
        name = r['method'] + (f' [{r["method_variant"]}]'
                              if r.get('method_variant') else '')
        out.append(f'| {name}{mark} | {r["nfe"]} | {eff} | '
                   f'{r["n_samples"]} | {r["n_seeds"]} | '
                   + ' | '.join(_cell(r, m) for m in shown)
                   + f' | {marks.get(id(r), "")} | {train} | {params} | '
                   f'`{cmd}` |')
      out.append('')
      if any(' ' in r['config_hash'] for r in rs):
        out += ['† seeds ran with different configs (see `config_hash` in '
                'the CSV).', '']
    out += _equal_cost_views(wide, metrics, curves.get(ds, ()))
  return '\n'.join(out).rstrip() + '\n'


def _equal_cost_views(wide: Sequence[Mapping[str, Any]],
                      metrics: Sequence[str],
                      curve_rows: Sequence[Mapping[str, str]]) -> list[str]:
  """Headline rankings at equal sampling cost and at equal training compute."""
  out: list[str] = []
  for proto in HEADLINE_PROTOCOLS:
    out += _equal_cost_view(proto, wide, metrics, curve_rows)
  return out


def _equal_cost_view(proto: str, wide: Sequence[Mapping[str, Any]],
                     metrics: Sequence[str],
                     curve_rows: Sequence[Mapping[str, str]]) -> list[str]:
  """`proto`'s rankings at equal sampling cost and equal training compute."""
  head = [r for r in wide if r['board'] == proto and r['eval'] == 'main']
  spaces = {tuple(r[c] for c in (*FEATURE_SPACE, 'n_samples')) for r in head}
  prim = primary_metric(metrics)
  out: list[str] = []
  if prim and len(spaces) == 1 and head:
    low = arrow(prim) == '↓'
    views = rankings.equal_sampling_cost(head, prim, low, EFFECTIVE_NFE)
    out += [f'### {proto} at equal sampling cost', '',
            f'Best `{prim}` of each method over its NFEs whose effective NFE '
            '(reference-backbone forwards) is within the budget.', '',
            '| eff. NFE ≤ | ranking |', '|---|---|']
    for b, ranked in views:
      out.append(f'| {b:g} | ' + ', '.join(
          f'{m} {v:.4g} ({k})' for m, v, k in ranked) + ' |')
    out.append('')
  proto_curve = [r for r in curve_rows if board(r) == proto]
  for nfe in sorted({r['nfe'] for r in proto_curve}, key=int):
    rs = [r for r in proto_curve if r['nfe'] == nfe]
    cprim = primary_metric(sorted({r['metric'] for r in rs}))
    view = rankings.equal_training_compute(rs, cprim, arrow(cprim) == '↓')
    if view is None:
      continue
    out += [f'### {proto} at equal training compute, NFE {nfe}', '',
            f'`{cprim}` on {view["n_samples"]} samples (in-training curve '
            f'points) at ≤ {view["flops"]:.3g} total training FLOPs, the '
            'most every method reached (teacher / encoder runs included); '
            '`–`: the method\'s first point already costs more.', '',
            '| method | score | at FLOPs | seeds |', '|---|---|---|---|']
    for m, v, f, n in view['rows']:
      out.append(f'| {m} | {"–" if v is None else f"{v:.4g}"} | '
                 f'{"–" if f is None else f"{f:.3g}"} | {n} |')
    out.append('')
  return out
