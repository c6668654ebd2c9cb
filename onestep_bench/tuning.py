"""Runs the declared tuning procedure (experiments/tuning.py) for a method.

  python -m onestep_bench.tuning --method=meanflow --family=toy2d [--k=8]
  python -m onestep_bench.tuning --method=meanflow --family=images

Trials run through the normal harness (`train.train_and_evaluate`) at the
family's bench budget on the development set, with protocol `tuning` and no
result rows (they are never on a board). Each is scored on the validation
measure, averaged over the declared NFEs the method supports:

  toy2d   sliced W2 of the trial's samples against an exact reference of
          `VAL_REF_N` points drawn with `VAL_SEED` (a seed no run or
          evaluation uses).
  images  FID of the trial's saved samples against the statistics of a
          validation split carved from the dev set's train split
          (`data.holdout`, `data.holdout_seed` from experiments/tuning.py;
          `ImageValidation`). Every trial (and a distillation teacher)
          trains on train minus those images, and the dev dataset holds no
          test split, so neither training nor scoring can read the test
          statistics. Features: the eval's feature net as the board
          resolves it (`auto`: classifier:<dataset> for 1-channel sets,
          trained on the dev train split, so the held-out images are unseen
          by every network; its accuracy on them must reach the
          classifier's floor).

Writes `results/tuning/<family>/<method>.csv` (one row per trial: overrides,
seed, validation scores, training FLOPs) and `<method>.json` (the winning
overrides, the budget in trials and FLOPs), which `protocol=tuned` applies
on every dataset of the family (experiments/tuning.py FAMILY_DATASETS).
Distillation methods (`TEACHER_METHOD`) get one teacher: the teacher
method's bench run on the development set at the first trial seed. A trial
whose training diverges (non-finite loss) or whose samples are not finite
scores +inf (it loses); the procedure goes on.

Trials are durable one by one: after each, the rows so far go to
`<method>.partial.csv` (atomic), and a later call reuses every recorded row
whose trial index, seed, overrides and config hash match the plan, so a
procedure interrupted by the loss of its machine (run dirs, checkpoints and
all) loses at most the trial in progress once the partial table is kept
(committed). A lost teacher run dir is retrained (deterministic) before
the first trial is planned, even when every trial is recorded: the
student's config validation loads its teacher. The complete table
replaces the partial one when the last trial is scored.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from onestep_bench.data.images import HOLDOUT_SPLIT

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


class ImageValidation:
  """The image validation measure: FID against the held-out split.

  Built once per tuning run on the development dataset (`data.holdout`):
  the eval's feature net (for `classifier:<data>`, a classifier trained
  here on the dataset's own train split, i.e. without the held-out images;
  it is built directly, not through the evaluator's per-process memo,
  which is keyed by the net's name only), its accuracy on the held-out
  images checked against `classifier.MIN_ACCURACY`, and the held-out
  statistics (`dataset_reference.validation_reference_stats`).

  Attributes:
    feature_net: the resolved feature-net name (as in board rows).
    ref: the reference entry (mu, sigma, 'key' with split 'validation').
    accuracy: the classifier's accuracy on the held-out images (None for
      other feature nets).
  """

  def __init__(self, dataset: Any, ev: Any):
    from onestep_bench.evaluators import (  # pylint: disable=g-import-not-at-top
      classifier,
      dataset_reference,
      decode,
      image_eval,
    )
    self.dataset, self.ev = dataset, ev
    latent = dataset.spec.kind == 'latent'
    self.settings = image_eval.eval_settings(ev, 'main', latent=latent)
    self.feature_net = image_eval.feature_net_name(dataset, ev)
    self.accuracy = None
    if self.feature_net.startswith('classifier:'):
      self.extractor = classifier.ClassifierExtractor(dataset)
      x, y = dataset.split_images(HOLDOUT_SPLIT)
      self.accuracy = float(np.mean(
          self.extractor(x)['probs'].argmax(-1) == y))
      floor = classifier.MIN_ACCURACY.get(dataset.spec.name)
      if floor is not None and self.accuracy < floor:
        raise RuntimeError(
            f'{self.feature_net} (trained on the dev train split) has '
            f'accuracy {self.accuracy:.4f} on the held-out images, below '
            f'its {floor} floor: its FID would be meaningless. Check the '
            'classifier recipe or the holdout (experiments/tuning.py).')
    else:
      self.extractor = image_eval.get_extractor(dataset, ev)
    self.decoder = decode.get_decoder(ev) if latent else None
    self.ref = dataset_reference.validation_reference_stats(
        dataset, self.extractor, self.feature_net, decoder=self.decoder)

  def __call__(self, samples: np.ndarray) -> float:
    """FID of `samples` ([N, H, W, C] in [-1, 1]) vs the held-out split."""
    from onestep_bench.evaluators import image_eval, image_metrics  # pylint: disable=g-import-not-at-top
    if not np.all(np.isfinite(samples)):
      return float('inf')
    images = image_eval.decode_to_images(samples, self.dataset, self.ev,
                                         self.settings['quantize'])
    return image_metrics.fid_from_features(
        self.extractor(images)['features'], self.ref['mu'], self.ref['sigma'])

  def describe(self) -> dict[str, Any]:
    """What the winner's json records of the measure."""
    key = self.ref['key']
    return {'feature_net': self.feature_net,
            'feature_weights': str(key['weights_sha256'])[:16],
            'reference': dict(key),
            'classifier_holdout_accuracy': self.accuracy,
            'holdout': self.dataset.holdout}


def _holdout(spec: Any, family: str) -> tuple[Any, int] | None:
  """(data.holdout, data.holdout_seed) of `family`, None for toy families."""
  h = spec.HOLDOUT.get(family)
  return None if not h else (h, spec.HOLDOUT_SEED)


def _config(method: str, dataset: str, seed: int,
            overrides: dict[str, Any], val_nfe: Sequence[int],
            smoke: bool = False, holdout: tuple[Any, int] | None = None):
  from experiments.bench import get_config  # pylint: disable=g-import-not-at-top
  c = get_config(f'method={method},dataset={dataset},seed={seed},'
                 f'smoke={smoke}')
  c.protocol = 'tuning'
  c.curve.fractions = ()
  if holdout:  # image dev set: train minus the held-out validation split
    c.data.holdout, c.data.holdout_seed = holdout
    # The harness's own scores of a trial are not the measure (tuning
    # rescoring its saved samples is); point them at the held-out split
    # too, and skip what only costs time (FD_DINOv2, bootstrap).
    c.evals.main.update(ref_split=HOLDOUT_SPLIT, fd_dinov2='off',
                        fid_bootstrap=0)
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
    hint = ''
    try:
      hint = f" ({family} is a dataset of family '{spec.family_of(family)}')"
    except ValueError:
      pass
    raise ValueError(f'family={family!r}: the tuning procedure is declared '
                     f'for {sorted(spec.DEV_SETS)}{hint}; use '
                     '--family=<one of those>.')
  dev = spec.DEV_SETS[family]
  holdout = _holdout(spec, family)
  k = k or spec.K_TRIALS
  space = spec.space(method, family)
  base = _config(method, dev, 0, {}, spec.VAL_NFE, smoke, holdout)
  defaults = {key: base[key.split('.', 1)[0]][key.split('.', 1)[1]]
              for key in space}
  trials = trial_overrides(space, k, defaults=defaults)
  dev_dir = dev.replace(':', '_') + ('_holdout' if holdout else '')
  # Data (and the image measure: feature net, held-out statistics) first:
  # a bad holdout or classifier fails before any trial trains.
  dataset = data.build(base.data)
  image = dataset.spec.kind != 'toy2d'
  scorer = ImageValidation(dataset, base.evals.main) if image else (
      lambda x: validation_score(x, dataset))
  teacher = getattr(method_module(method), 'TEACHER_METHOD', None)
  extra: dict[str, Any] = {}
  if teacher:
    twd = os.path.join(runs_dir, teacher, dev_dir, 'teacher')
    extra['method.teacher_workdir'] = twd
    if not os.path.exists(os.path.join(twd, 'summary.json')):
      # Before any trial is planned: the student's config validation loads it.
      train.train_and_evaluate(_config(teacher, dev, spec.TRIAL_SEED, {},
                                       spec.VAL_NFE, smoke, holdout), twd)
  metric = 'fid' if image else 'sliced_w2'
  out_dir = os.path.join(results_dir, 'tuning', family)
  partial = os.path.join(out_dir, f'{method}.partial.csv')
  first = ['trial', 'seed', 'overrides', 'val_score']
  recorded = _recorded_trials(partial)
  rows: list[dict[str, Any]] = []

  def save(path: str) -> None:
    cols = first + sorted({c for r in rows for c in r} - set(first))
    atomic_write(path, csv_text(rows, cols))

  for i, ov in enumerate(trials):
    seed = spec.TRIAL_SEED + i
    c = _config(method, dev, seed, {**extra, **ov}, spec.VAL_NFE, smoke,
                holdout)
    supported = method_module(method).Method(c, dataset.spec).supported_nfe
    c.evals.main.nfe = tuple(n for n in spec.VAL_NFE if n in supported)
    row = {'trial': i, 'seed': seed, 'overrides': json.dumps(ov),
           'config_hash': train.config_hash(c)}
    old = recorded.get(i)
    if old is not None and all(str(old.get(k)) == str(v)
                               for k, v in row.items()):
      rows.append(old)  # scored in an earlier call: same plan, same config
      continue
    wd = os.path.join(runs_dir, method, dev_dir, f'trial{i}')
    try:
      s = train.train_and_evaluate(c, wd)
    except train.NonFiniteError as e:  # diverged: loses, the others go on
      rows.append({**row, 'val_score': float('inf'), 'train_flops': None,
                   'git_sha': train.git_sha(), 'failed': str(e)[:200]})
      save(partial)
      continue
    scores = {}
    for rec in s['evals']:
      path = os.path.join(wd, rec['samples_file'])
      with np.load(path, allow_pickle=False) as z:
        v = float(scorer(z['x']))
      scores[rec['nfe']] = v if np.isfinite(v) else float('inf')
    rows.append({**row, 'val_score': float(np.mean(list(scores.values()))),
                 **{f'val_{metric}_nfe{n}': v for n, v in scores.items()},
                 'train_flops': s['total_train_flops'],
                 'git_sha': s['git_sha']})
    save(partial)
  best = min(rows, key=lambda r: (r['val_score'], r['trial']))
  save(os.path.join(out_dir, f'{method}.csv'))
  if os.path.exists(partial):
    os.remove(partial)
  nfes = list(spec.VAL_NFE)
  if image:
    h = dataset.holdout
    validation = (f'FID ({scorer.feature_net}) vs the {h["n_holdout"]} '
                  f'images held out of the {dev} train split '
                  f'(data.holdout={h["holdout"]}, holdout_seed='
                  f'{h["holdout_seed"]}; trials train on the other '
                  f'{h["n_train"]}), mean over NFE {nfes} supported')
  else:
    validation = (f'sliced W2 vs an exact {VAL_REF_N}-point reference '
                  f'(seed {VAL_SEED}), mean over NFE {nfes} supported')
  winner = {'method': method, 'family': family, 'dev_set': dev,
            'overrides': json.loads(best['overrides']),
            'trial': best['trial'], 'val_score': best['val_score'],
            'budget': {'trials': len(rows), 'train_flops': sum(
                r.get('train_flops') or 0.0 for r in rows)},
            'validation': validation,
            **({'validation_measure': scorer.describe()} if image else {})}
  atomic_write(winner_path(method, family, results_dir),
               json.dumps(winner, indent=1, default=str) + '\n')
  return winner


def _recorded_trials(path: str) -> dict[int, dict[str, Any]]:
  """Rows of a partial trial table by trial index, scores as floats."""
  from onestep_bench.csvstore import read_csv  # pylint: disable=g-import-not-at-top
  out: dict[int, dict[str, Any]] = {}
  for r in read_csv(path):
    row: dict[str, Any] = {k: v for k, v in r.items() if v != ''}
    for k in row:
      if k == 'train_flops' or k.startswith('val_'):
        row[k] = float(row[k])
    row['trial'], row['seed'] = int(row['trial']), int(row['seed'])
    out[row['trial']] = row
  return out


def winner_path(method: str, family: str,
                results_dir: str = 'results') -> str:
  """Where `tune` writes, and runs read, `method`'s winner on `family`."""
  return os.path.join(results_dir, 'tuning', family, f'{method}.json')


def tuned_overrides(method: str, family: str,
                    results_dir: str = 'results') -> dict[str, Any]:
  """The committed winner of `method` on `family` (ValueError if none)."""
  path = winner_path(method, family, results_dir)
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
  p.add_argument('--family', default='toy2d',
                 help='toy2d | images (experiments/tuning.py DEV_SETS)')
  p.add_argument('--k', type=int, default=None)
  p.add_argument('--results_dir', default='results')
  args = p.parse_args(argv)
  print(json.dumps(tune(args.method, args.family, k=args.k,
                        results_dir=args.results_dir), indent=1))


if __name__ == '__main__':
  main()
