"""Runs the declared tuning procedure (experiments/tuning.py) for a method.

  python -m onestep_bench.tuning --method=meanflow --family=toy2d [--k=8]

Trials run through the normal harness (`train.train_and_evaluate`) at the
family's bench budget on the development set, with protocol `tuning` and no
result rows (they are never on a board). Each is scored on the validation
measure: for toy 2D, sliced W2 of the trial's samples against an exact
reference of `VAL_REF_N` points drawn with `VAL_SEED` (a seed no run or
evaluation uses), averaged over the declared NFEs the method supports.
Writes `results/tuning/<family>/<method>.csv` (one row per trial: overrides,
seed, validation scores, training FLOPs) and `<method>.json` (the winning
overrides, the budget in trials and FLOPs), which `protocol=tuned` applies.
Distillation methods (`TEACHER_METHOD`) get one teacher: the teacher
method's bench run on the development set at the first trial seed.

Image families need a validation split carved from train and are not
supported yet (refused with a clear error, never silently scored on test).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

VAL_SEED = 2**31 - 7
VAL_REF_N = 100_000
VAL_PROJ = 256


def trial_overrides(space: dict[str, Sequence[Any]], k: int,
                    seed: int = 0, defaults: dict[str, Any] | None = None
                    ) -> list[dict[str, Any]]:
  """Trial 0 = {} (the defaults), then k - 1 distinct grid points.

  Grid points equal to `defaults` on every key (trial 0 again) are skipped.
  """
  keys = sorted(space)
  grid = [[]]
  for key in keys:
    grid = [g + [v] for g in grid for v in space[key]]
  if defaults:
    grid = [g for g in grid
            if any(defaults.get(k) != v for k, v in zip(keys, g, strict=True))]
  rng = random.Random(seed)
  picks = rng.sample(grid, min(k - 1, len(grid)))
  return [{}] + [dict(zip(keys, p, strict=True)) for p in picks]


def validation_score(samples: np.ndarray, dataset: Any) -> float:
  """Sliced W2 against the independent validation reference (toy 2D)."""
  import jax  # pylint: disable=g-import-not-at-top

  from onestep_bench.evaluators import sample_stats  # pylint: disable=g-import-not-at-top
  ref = np.asarray(dataset.reference(jax.random.key(VAL_SEED), VAL_REF_N),
                   np.float64)
  dirs = sample_stats.directions(VAL_PROJ, VAL_SEED, ref.shape[1])
  return float(sample_stats.sliced_w2(np.asarray(samples, np.float64), ref,
                                      dirs))


def _config(method: str, dataset: str, seed: int,
            overrides: dict[str, Any], val_nfe: Sequence[int],
            smoke: bool = False):
  from experiments.bench import get_config  # pylint: disable=g-import-not-at-top
  c = get_config(f'method={method},dataset={dataset},seed={seed},'
                 f'smoke={smoke}')
  c.protocol = 'tuning'
  c.curve.fractions = ()
  for key, v in overrides.items():
    sect, name = key.split('.', 1)
    c[sect][name] = v
  for ev in list(c.evals):
    if ev != 'main':
      del c.evals[ev]
  c.evals.main.nfe = tuple(val_nfe)
  return c


def tune(method: str, family: str, *, k: int | None = None,
         results_dir: str = 'results', runs_dir: str = 'runs/tuning',
         smoke: bool = False) -> dict[str, Any]:
  """Runs the K trials of `method` on `family`'s dev set; writes the table.

  `smoke=True` (tests) runs every trial at the smoke budget.
  """
  from experiments import tuning as spec  # pylint: disable=g-import-not-at-top
  from onestep_bench import data, train  # pylint: disable=g-import-not-at-top
  from onestep_bench.csvstore import atomic_write, csv_text  # pylint: disable=g-import-not-at-top
  from onestep_bench.method import method_module  # pylint: disable=g-import-not-at-top
  if family not in spec.DEV_SETS:
    raise ValueError(f'family={family!r}: the tuning procedure is declared '
                     f'for {sorted(spec.DEV_SETS)} (images need a validation '
                     'split carved from train, not implemented yet).')
  dev = spec.DEV_SETS[family]
  k = k or spec.K_TRIALS
  base = _config(method, dev, 0, {}, spec.VAL_NFE, smoke)
  defaults = {key: base[key.split('.', 1)[0]][key.split('.', 1)[1]]
              for key in spec.SPACES[method]}
  trials = trial_overrides(spec.SPACES[method], k, defaults=defaults)
  teacher = getattr(method_module(method), 'TEACHER_METHOD', None)
  extra: dict[str, Any] = {}
  if teacher:
    twd = os.path.join(runs_dir, teacher, dev.replace(':', '_'), 'teacher')
    if not os.path.exists(os.path.join(twd, 'summary.json')):
      train.train_and_evaluate(_config(teacher, dev, spec.TRIAL_SEED, {},
                                       spec.VAL_NFE, smoke), twd)
    extra['method.teacher_workdir'] = twd
  dataset = data.build(base.data)
  rows = []
  for i, ov in enumerate(trials):
    seed = spec.TRIAL_SEED + i
    c = _config(method, dev, seed, {**extra, **ov}, spec.VAL_NFE, smoke)
    supported = method_module(method).Method(c, dataset.spec).supported_nfe
    c.evals.main.nfe = tuple(n for n in spec.VAL_NFE if n in supported)
    wd = os.path.join(runs_dir, method, dev.replace(':', '_'), f'trial{i}')
    s = train.train_and_evaluate(c, wd)
    scores = {}
    for rec in s['evals']:
      path = os.path.join(wd, rec['samples_file'])
      with np.load(path, allow_pickle=False) as z:
        scores[rec['nfe']] = validation_score(z['x'], dataset)
    rows.append({'trial': i, 'seed': seed, 'overrides': json.dumps(ov),
                 'val_score': float(np.mean(list(scores.values()))),
                 **{f'val_sliced_w2_nfe{n}': v for n, v in scores.items()},
                 'train_flops': s['total_train_flops'],
                 'git_sha': s['git_sha']})
  best = min(rows, key=lambda r: r['val_score'])
  out_dir = os.path.join(results_dir, 'tuning', family)
  first = ['trial', 'seed', 'overrides', 'val_score']
  cols = first + sorted({c for r in rows for c in r} - set(first))
  atomic_write(os.path.join(out_dir, f'{method}.csv'), csv_text(rows, cols))
  winner = {'method': method, 'family': family, 'dev_set': dev,
            'overrides': json.loads(best['overrides']),
            'trial': best['trial'], 'val_score': best['val_score'],
            'budget': {'trials': len(rows), 'train_flops': sum(
                r['train_flops'] or 0.0 for r in rows)},
            'validation': f'sliced W2 vs an exact {VAL_REF_N}-point '
                          f'reference (seed {VAL_SEED}), mean over NFE '
                          f'{list(spec.VAL_NFE)} supported'}
  atomic_write(os.path.join(out_dir, f'{method}.json'),
               json.dumps(winner, indent=1, default=str) + '\n')
  return winner


def tuned_overrides(method: str, family: str,
                    results_dir: str = 'results') -> dict[str, Any]:
  """The committed winner of `method` on `family` (ValueError if none)."""
  path = os.path.join(results_dir, 'tuning', family, f'{method}.json')
  if not os.path.exists(path):
    raise ValueError(f'No tuned config for {method} on {family} ({path}); '
                     f'run: python -m onestep_bench.tuning --method={method} '
                     f'--family={family}')
  with open(path, encoding='utf-8') as f:
    return json.load(f)['overrides']


def main(argv: Sequence[str] | None = None) -> None:
  """CLI (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--method', required=True)
  p.add_argument('--family', default='toy2d')
  p.add_argument('--k', type=int, default=None)
  p.add_argument('--results_dir', default='results')
  args = p.parse_args(argv)
  print(json.dumps(tune(args.method, args.family, k=args.k,
                        results_dir=args.results_dir), indent=1))


if __name__ == '__main__':
  main()
