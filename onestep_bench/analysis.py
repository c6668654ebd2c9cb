"""results/ANALYSIS.md: what the board says and what it does not, generated.

Every sentence of the file is computed from `results/runs.csv` (through
`leaderboard.aggregate`, the same tables LEADERBOARD.md shows),
`results/tuning/<family>/*.json` and the claims declared in
`experiments/claims.py`, so it cannot drift from the numbers:

- **Who wins where**: per dataset, headline protocol and NFE (eval `main`),
  the best method, the methods tied with it (Welch p >= 0.05 over seeds),
  those significantly worse, and those untested (< 2 seeds).
- **Tuning**: per method, the declared procedure's budget and winner, and
  `tuned` vs `bench` per dataset (does tuning help; does a config tuned on
  the development set transfer to the ranked sets).
- **Cost**: training FLOPs (teachers and encoders included) relative to the
  cheapest method, and effective NFE.
- **Claims**: each published claim, checked at this scale.
- **Caveats**: single-seed tables, seeds with differing configs, regressed
  runs, missing protocols.

  python -m onestep_bench.analysis [--results_dir results]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from onestep_bench import rankings
from onestep_bench.csvstore import atomic_write, read_csv
from onestep_bench.leaderboard import (
  EFFECTIVE_NFE,
  FEATURE_SPACE,
  HEADLINE_PROTOCOLS,
  Tables,
  aggregate,
  arrow,
  primary_metric,
)

Row = Mapping[str, Any]


def _f(x: Any) -> float:
  return math.nan if x in ('', None) else float(x)


def _fmt(r: Row, m: str) -> str:
  sd = r.get(f'{m}_std', '')
  return (f'{_f(r[f"{m}_mean"]):.4g}' + ('' if sd == '' else
                                          f' ± {_f(sd):.2g}')
          + f' (n={r["n_seeds"]})')


def headline(tables: Tables) -> dict[tuple[str, str], tuple[list[Row], str]]:
  """{(dataset, protocol): (eval-main rows of one feature space, metric)}.

  A dataset whose main eval has several feature spaces keeps the space with
  the most rows (the others are never ranked against it).
  """
  out = {}
  for ds, (wide, metrics) in tables.items():
    prim = primary_metric(metrics)
    for proto in HEADLINE_PROTOCOLS:
      rs = [r for r in wide if r['board'] == proto and r['eval'] == 'main'
            and r.get(f'{prim}_mean', '') != '']
      spaces: dict[tuple[str, ...], list[Row]] = {}
      for r in rs:
        spaces.setdefault(tuple(r[c] for c in (*FEATURE_SPACE, 'n_samples',
                                               'conditional', 'guidance')),
                          []).append(r)
      if prim and spaces:
        out[(ds, proto)] = (max(spaces.values(), key=len), prim)
  return out


def winners(rows: Sequence[Row], metric: str) -> list[dict[str, Any]]:
  """Per NFE: best mean, best tested (>= 2 seeds), tied, worse, untested.

  Ties and gaps are against the best row with >= 2 seeds (p >= alpha: a
  tie); single-seed rows are untested even when their mean is the best.
  """
  out = []
  for nfe in sorted({r['nfe'] for r in rows}, key=int):
    rs = [r for r in rows if r['nfe'] == nfe]
    tested = [r for r in rs if int(r['n_seeds']) >= 2]
    marks = rankings.significance(tested, metric, arrow(metric) == '↓')
    best_all = rankings.significance(rs, metric, arrow(metric) == '↓')
    out.append(dict(
        nfe=nfe, best=next(r for r in rs if best_all[id(r)] == 'best'),
        best_tested=next((r for r in tested if marks[id(r)] == 'best'),
                         None),
        tied=[r for r in tested if marks[id(r)].startswith('≈')],
        worse=[r for r in tested if marks[id(r)].startswith('worse')],
        untested=[r for r in rs if int(r['n_seeds']) < 2]))
  return out


def check_claim(rows: Sequence[Row], metric: str,
                claim: Mapping[str, Any]) -> tuple[str, str]:
  """(verdict, numbers) of one claim on one headline table."""
  def pick(method: str, nfe: int) -> Row | None:
    return next((r for r in rows if r['method'] == method
                 and int(r['nfe']) == nfe), None)
  a = pick(claim['better'], claim['better_nfe'])
  b = pick(claim['worse'], claim['worse_nfe'])
  if a is None or b is None:
    return 'untested', 'no row' if a is None and b is None else (
        f'no {claim["better"] if a is None else claim["worse"]} row')
  nums = f'{_fmt(a, metric)} vs {_fmt(b, metric)}'
  p = rankings.welch_p(a, b, metric)
  if p is None:
    return 'untested', nums + ' (< 2 seeds)'
  sign = 1.0 if arrow(metric) == '↓' else -1.0
  a_better = sign * _f(a[f'{metric}_mean']) < sign * _f(b[f'{metric}_mean'])
  if p >= rankings.ALPHA:
    return 'tie', f'{nums}, p={p:.2f}'
  return ('reproduced' if a_better else 'contradicted'), f'{nums}, p={p:.3g}'


def tuning_records(results_dir: str) -> list[dict[str, Any]]:
  """The committed winners, results/tuning/<family>/<method>.json."""
  recs = []
  for path in sorted(glob.glob(os.path.join(results_dir, 'tuning', '*',
                                            '*.json'))):
    with open(path, encoding='utf-8') as f:
      recs.append(json.load(f))
  return recs


def _who_wins(head: Mapping[tuple[str, str], tuple[list[Row], str]]
              ) -> list[str]:
  out = ['## Who wins where', '',
         'Eval `main`, per headline table and NFE. *Best tested*: the best '
         'row with ≥ 2 seeds; *tied*: not significantly different from it '
         f'(Welch t over seeds, p ≥ {rankings.ALPHA}); *single-seed*: rows '
         'that cannot be tested yet (no claim either way, even when their '
         'mean is the best).', '',
         '| dataset | protocol | metric | NFE | best mean | best tested | '
         'tied with it | significantly worse | single-seed |',
         '|---' * 9 + '|']

  def names(rs: Sequence[Row]) -> str:
    return ', '.join(r['method'] for r in rs) or '–'
  for (ds, proto), (rows, m) in sorted(head.items()):
    for w in winners(rows, m):
      bt = w['best_tested']
      out.append(f'| {ds} | {proto} | {m} | {w["nfe"]} | '
                 f'{w["best"]["method"]} {_fmt(w["best"], m)} | '
                 f'{"–" if bt is None else bt["method"] + " " + _fmt(bt, m)}'
                 f' | {names(w["tied"])} | {names(w["worse"])} | '
                 f'{names(w["untested"])} |')
  return [*out, '']


def _tuning(head: Mapping[tuple[str, str], tuple[list[Row], str]],
            recs: Sequence[Mapping[str, Any]]) -> list[str]:
  out = ['## Tuning: budget, winner, and whether it helps', '']
  if not recs:
    return [*out, 'No tuning has been committed (results/tuning/ is empty): '
            'the `tuned` protocol has no rows yet.', '']
  out += ['Every method got the same procedure (experiments/tuning.py): the '
          'same number of trials on the development set, each at the bench '
          'budget, scored on its family\'s validation measure (last '
          'column; never the ranked metric, test statistics or sets).', '',
          '| method | family | dev set | trials | tuning FLOPs | winner | '
          'val score | validation measure |', '|---' * 8 + '|']
  for r in recs:
    ov = ', '.join(f'{k}={v}' for k, v in r['overrides'].items()) or \
        'defaults (trial 0)'
    out.append(f'| {r["method"]} | {r["family"]} | {r["dev_set"]} | '
               f'{r["budget"]["trials"]} | '
               f'{_f(r["budget"]["train_flops"]):.3g} | {ov} | '
               f'{_f(r["val_score"]):.4g} | {r.get("validation", "–")} |')
  out += ['', '`tuned` vs `bench` on the ranked sets (same NFE, eval '
          '`main`): a negative Δ is an improvement for a ↓ metric.', '',
          '| dataset | method | NFE | bench | tuned | Δ | Welch p |',
          '|---' * 7 + '|']
  for (ds, proto), (rows, m) in sorted(head.items()):
    if proto != 'tuned' or (ds, 'bench') not in head:
      continue
    bench = {(r['method'], r['nfe']): r for r in head[(ds, 'bench')][0]}
    for r in sorted(rows, key=lambda r: (r['method'], int(r['nfe']))):
      b = bench.get((r['method'], r['nfe']))
      if b is None:
        continue
      p = rankings.welch_p(r, b, m)
      d = _f(r[f'{m}_mean']) - _f(b[f'{m}_mean'])
      out.append(f'| {ds} | {r["method"]} | {r["nfe"]} | {_fmt(b, m)} | '
                 f'{_fmt(r, m)} | {d:+.3g} | '
                 f'{"–" if p is None else f"{p:.2g}"} |')
  return [*out, '']


def _cost(head: Mapping[tuple[str, str], tuple[list[Row], str]]
          ) -> list[str]:
  out = ['## Training and sampling cost', '',
         'Total training FLOPs (the jitted step counted on its jaxpr × '
         'steps, plus teacher / encoder runs) relative to the cheapest method '
         'of the table, and effective NFE at NFE 1 (forwards of the shared '
         'reference backbone).', '',
         '| dataset | protocol | method | train FLOPs | × cheapest | '
         'eff. NFE at NFE 1 |', '|---' * 6 + '|']
  for (ds, proto), (rows, _) in sorted(head.items()):
    one = {r['method']: r for r in rows if int(r['nfe']) == 1}
    flops = {m: _f(r['total_train_flops']) for m, r in one.items()}
    ok = [v for v in flops.values() if not math.isnan(v)]
    low = min(ok) if ok else math.nan
    for m in sorted(one, key=lambda m: flops[m]):
      eff = _f(one[m].get(f'{EFFECTIVE_NFE}_mean'))
      out.append(f'| {ds} | {proto} | {m} | {flops[m]:.3g} | '
                 f'{flops[m] / low:.2f} | {eff:.3g} |')
  return [*out, '']


def _claims(head: Mapping[tuple[str, str], tuple[list[Row], str]],
            claims: Sequence[Mapping[str, Any]]) -> list[str]:
  out = ['## Published claims at this scale', '',
         'Each claim checked on every headline table (experiments/claims.py '
         'declares them). These are ImageNet / CIFAR-10 claims; a verdict '
         'here says what holds on toy and small-image data, not whether '
         'the paper is right at its scale.', '',
         '| claim | source | dataset | protocol | verdict | numbers |',
         '|---' * 6 + '|']
  tally: dict[str, int] = {}
  for c in claims:
    text = (f'{c["better"]} @{c["better_nfe"]} beats {c["worse"]} '
            f'@{c["worse_nfe"]}')
    for (ds, proto), (rows, m) in sorted(head.items()):
      verdict, nums = check_claim(rows, m, c)
      if verdict == 'untested' and nums.startswith('no'):
        continue
      tally[verdict] = tally.get(verdict, 0) + 1
      out.append(f'| {text} | {c["source"]} | {ds} | {proto} | '
                 f'**{verdict}** | {nums} |')
  summary = ', '.join(f'{v} {k}' for k, v in sorted(tally.items()))
  return [*out, '', f'Tally: {summary or "nothing testable yet"}.', '']


def _caveats(head: Mapping[tuple[str, str], tuple[list[Row], str]]
             ) -> list[str]:
  out = ['## What the board does not say', '']
  single = sorted({f'{ds} ({proto})' for (ds, proto), (rows, _) in
                   head.items() if any(int(r['n_seeds']) < 2 for r in rows)})
  if single:
    out.append('- **Single-seed rows** (no significance test possible) in: '
               + ', '.join(single) + '.')
  mixed = sorted({f'{r["method"]} on {ds} ({proto})'
                  for (ds, proto), (rows, _) in head.items() for r in rows
                  if ' ' in str(r['config_hash'])})
  if mixed:
    out.append('- **Seeds with different configs** (averaged anyway, '
               'marked † on the board): ' + ', '.join(mixed) + '.')
  reg = sorted({f'{r["method"]} on {ds} ({proto}, seed {r["regressed"]})'
                for (ds, proto), (rows, _) in head.items() for r in rows
                if r.get('regressed')})
  if reg:
    out.append('- **Regressed during training** (final score > 2× the best '
               'in-training score; the final number is reported): '
               + ', '.join(reg) + '.')
  out += _below_floor(head)
  datasets = sorted({ds for ds, _ in head})
  no_tuned = [ds for ds in datasets if (ds, 'tuned') not in head]
  if no_tuned:
    out.append('- **No `tuned` rows** yet for: ' + ', '.join(no_tuned)
               + ': their ranking is at paper defaults only.')
  out.append('- **Scale.** Toy 2D and small-image boards test the methods\' '
             'mechanics at small models and budgets; published ImageNet '
             'numbers are not reproduced here (see docs/reproducing.md for '
             'the paper-scale protocols).')
  return [*out, '']


def _below_floor(head: Mapping[tuple[str, str], tuple[list[Row], str]]
                 ) -> list[str]:
  """Rows whose ranked score beats its floor (a perfect sampler's score).

  The floor is the same statistic for real data at the row's sample count:
  a fresh exact sample (toy) or the held-out split against the reference
  (images, evaluators/dataset_reference.py). A held-out split smaller than
  the count is resampled with replacement (digits: 360 test images for 10k
  samples), which over-estimates the floor; a score below it says that, or
  that samples sit closer to the reference (train) split than real held-out
  data does (memorization), never that the method beats real data.
  """
  low = sorted({f'{r["method"]} on {ds} ({proto}, NFE {r["nfe"]}: '
                f'{_f(r[f"{m}_mean"]):.4g} < {_f(r[f"{m}_floor_mean"]):.4g})'
                for (ds, proto), (rows, m) in head.items() for r in rows
                if arrow(m) == '↓'  # a missing floor is nan: never below
                and _f(r[f'{m}_mean']) < _f(r.get(f'{m}_floor_mean'))})
  if not low:
    return []
  return ['- **Scores below their floor** (the metric of real data at the '
          'same sample count: a fresh exact sample on toy sets, the held-out '
          'split on images, resampled with replacement when it is smaller '
          'than the count, which over-estimates the floor; on images a score '
          'below it can also mean samples closer to the train reference than '
          'held-out data, i.e. memorization): ' + ', '.join(low) + '.']


def markdown(tables: Tables, recs: Sequence[Mapping[str, Any]],
             claims: Sequence[Mapping[str, Any]]) -> str:
  """The whole ANALYSIS.md."""
  head = headline(tables)
  n_rows = sum(len(rows) for rows, _ in head.values())
  out = ['# Analysis', '',
         '**Generated file, do not edit**: `python -m onestep_bench.analysis` '
         '(run by `make leaderboard` and every recorded run) from runs.csv, '
         'results/tuning/ and experiments/claims.py.', '',
         f'Scope: {len({ds for ds, _ in head})} datasets, '
         f'{len(head)} headline tables, {n_rows} ranked rows.', '']
  out += _who_wins(head) + _tuning(head, recs) + _cost(head)
  out += _claims(head, claims) + _caveats(head)
  return '\n'.join(out).rstrip() + '\n'


def write(results_dir: str = 'results', tables: Tables | None = None) -> str:
  """Regenerates `<results_dir>/ANALYSIS.md` (from `tables` if given)."""
  from experiments.claims import CLAIMS  # pylint: disable=g-import-not-at-top
  if tables is None:
    tables = aggregate(read_csv(os.path.join(results_dir, 'runs.csv')))
  path = os.path.join(results_dir, 'ANALYSIS.md')
  atomic_write(path, markdown(tables, tuning_records(results_dir), CLAIMS))
  return path


def main(argv: Sequence[str] | None = None) -> None:
  """CLI: rewrites ANALYSIS.md."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--results_dir', default='results')
  print(write(p.parse_args(argv).results_dir))


if __name__ == '__main__':
  main()
