"""Which gaps are noise, and rankings at equal cost (LEADERBOARD.md views).

- `significance`: each row of a ranked table against the table's leader at
  the same NFE, by Welch's t-test on the per-seed scores (from mean, std and
  n: `scipy.stats.ttest_ind_from_stats(equal_var=False)`). p >= 0.05 is a
  tie (`≈`); a row with one seed cannot be tested (`?`).
- `equal_sampling_cost`: per effective-NFE budget B, each method's best
  score over its NFEs with effective NFE <= B (the same unit for every
  method, so TM's head and CFG's second pass count).
- `equal_training_compute`: from the in-training curve points, each method's
  score at the largest total training FLOPs F* that every method reached
  (its last curve point at or below F*; a method whose first point is
  already above F* — a distilled student paying for its teacher — has none).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from scipy import stats

ALPHA = 0.05
EFF_NFE_BUDGETS = (1.0, 2.0, 4.0, 8.0, 100.0, 1000.0)


def _f(x: Any) -> float:
  return math.nan if x in ('', None) else float(x)


def welch_p(a: Mapping[str, Any], b: Mapping[str, Any], metric: str
            ) -> float | None:
  """Two-sided Welch p-value of `metric` between two wide rows (None: n<2)."""
  na, nb = int(a['n_seeds']), int(b['n_seeds'])
  sa, sb = _f(a.get(f'{metric}_std')), _f(b.get(f'{metric}_std'))
  if na < 2 or nb < 2 or math.isnan(sa) or math.isnan(sb):
    return None
  ma, mb = _f(a[f'{metric}_mean']), _f(b[f'{metric}_mean'])
  if sa == 0 and sb == 0:
    return 1.0 if ma == mb else 0.0
  return float(stats.ttest_ind_from_stats(ma, sa, na, mb, sb, nb,
                                          equal_var=False).pvalue)


def significance(rows: Sequence[Mapping[str, Any]], metric: str,
                 lower_is_better: bool) -> dict[int, str]:
  """{id(row): mark} against the best row of the same NFE.

  Marks: 'best', '≈ (p=…)' (not significantly different: a tie), '> (p=…)'
  (significantly worse), '?' (fewer than 2 seeds on either side).
  """
  out: dict[int, str] = {}
  by_nfe: dict[str, list[Mapping[str, Any]]] = {}
  for r in rows:
    if r.get(f'{metric}_mean', '') != '':
      by_nfe.setdefault(r['nfe'], []).append(r)
  sign = 1.0 if lower_is_better else -1.0
  for rs in by_nfe.values():
    best = min(rs, key=lambda r: sign * _f(r[f'{metric}_mean']))
    for r in rs:
      if r is best:
        out[id(r)] = 'best'
        continue
      p = welch_p(r, best, metric)
      out[id(r)] = ('?' if p is None else
                    f'≈ (p={p:.2f})' if p >= ALPHA else f'worse (p={p:.3f})')
  return out


def equal_sampling_cost(rows: Sequence[Mapping[str, Any]], metric: str,
                        lower_is_better: bool, eff_key: str
                        ) -> list[tuple[float, list[tuple[str, float, str]]]]:
  """[(budget B, [(method, best score, 'NFE k'), ...] sorted best first)]."""
  sign = 1.0 if lower_is_better else -1.0
  out = []
  for b in EFF_NFE_BUDGETS:
    best: dict[str, tuple[float, str]] = {}
    for r in rows:
      eff, v = _f(r.get(f'{eff_key}_mean')), _f(r.get(f'{metric}_mean'))
      if math.isnan(eff) or math.isnan(v) or eff > b * 1.0001:
        continue
      if r['method'] not in best or sign * v < sign * best[r['method']][0]:
        best[r['method']] = (v, f'NFE {r["nfe"]}')
    if best:
      out.append((b, sorted(((m, v, k) for m, (v, k) in best.items()),
                            key=lambda t: sign * t[1])))
  return out


def equal_training_compute(curve_rows: Iterable[Mapping[str, str]],
                           metric: str, lower_is_better: bool
                           ) -> dict[str, Any] | None:
  """Scores at the largest total training FLOPs every method reached.

  `curve_rows`: runs.csv rows of one dataset, board and NFE, `eval=curve`,
  for `metric`. Returns {'flops': F*, 'nfe', 'n_samples', 'rows': [(method,
  score | None, flops of the point used, seeds)]} (best first), or None.
  """
  latest: dict[tuple[str, str, str], Mapping[str, str]] = {}
  for r in curve_rows:
    if r['metric'] == metric and r['total_train_flops'] not in ('', None):
      latest[(r['method'], r['seed'], r['step'])] = r
  if not latest:
    return None
  per: dict[str, dict[str, list[tuple[float, float]]]] = {}
  for (m, seed, _), r in latest.items():
    per.setdefault(m, {}).setdefault(seed, []).append(
        (float(r['total_train_flops']), float(r['value'])))
  reach = {m: min(max(f for f, _ in pts) for pts in seeds.values())
           for m, seeds in per.items()}
  f_star = min(reach.values())
  out = []
  for m, seeds in per.items():
    vals, used = [], []
    for pts in seeds.values():
      ok = [p for p in sorted(pts) if p[0] <= f_star * 1.0001]
      if ok:
        vals.append(ok[-1][1])
        used.append(ok[-1][0])
    score = sum(vals) / len(vals) if vals else None
    out.append((m, score, max(used) if used else None, len(vals)))
  sign = 1.0 if lower_is_better else -1.0
  out.sort(key=lambda t: (t[1] is None, sign * (t[1] or 0.0)))
  first = next(iter(latest.values()))
  return {'flops': f_star, 'nfe': first['nfe'],
          'n_samples': first['n_samples'], 'rows': out}
