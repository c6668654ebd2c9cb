"""In-training evaluations: quality vs training compute, and `regressed`.

A run with `config.curve.fractions` (e.g. (1/8, 1/4, 1/2, 1)) evaluates its
EMA params at those fractions of the step budget, on a small sample count
(`config.curve.n_samples`) at `config.curve.nfe`, through the same sampler and
metrics as the final evaluation (`runner.evaluate`, eval name `curve`). Each
point is stored with its `step`, `train_flops` (this run's step FLOPs × step)
and `total_train_flops` (plus the runs it depends on), so every run yields a
quality-vs-training-compute curve (plots.py).

A curve point is a different metric from the final eval (fewer samples): it is
never ranked. The last point (fraction 1) is the final params on the curve's
sample count, so `regressed` compares like with like: a run whose final
primary score is worse than `regress_factor` × its best earlier score (lower
is better) has collapsed late, and its summary and table rows say so.

Points are appended to `workdir/curve.json` as they are measured; a resumed
run keeps the points it already has (the evaluation uses its own key, so it
never changes the training state: resume stays bitwise).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections

CURVE_EVAL = 'curve'
# The quality metric a curve is judged on, per family (lower is better).
PRIMARY = ('fid', 'sliced_w2')


def steps(num_steps: int, fractions: Any) -> list[int]:
  """The training steps at which to evaluate (sorted, unique, >= 1)."""
  out = {min(num_steps, max(1, math.ceil(float(f) * num_steps)))
         for f in fractions or ()}
  return sorted(out)


def eval_config(config: ml_collections.ConfigDict
                ) -> ml_collections.ConfigDict | None:
  """`{'curve': <eval>}`: the main eval with the curve's nfe / n_samples.

  None when the config has no curve (or no fractions).
  """
  cc = config.get('curve')
  if cc is None or not cc.get('fractions') or not config.evals:
    return None
  base = config.evals.get('main') or next(iter(config.evals.values()))
  ev = ml_collections.ConfigDict(base.to_dict())
  ev.nfe = tuple(cc.nfe)
  ev.n_samples = int(cc.n_samples)
  if 'batch_size' in ev:
    ev.batch_size = min(int(ev.batch_size), ev.n_samples)
  if 'fid_bootstrap' in ev:
    ev.fid_bootstrap = 0  # a curve point needs the value, not its CI
  if 'fd_dinov2' in ev:
    ev.fd_dinov2 = 'off'  # no ViT-L pass at every curve point
  return ml_collections.ConfigDict({CURVE_EVAL: ev})


def path(workdir: str) -> str:
  """Where a run keeps its curve points."""
  return os.path.join(workdir, 'curve.json')


def load(workdir: str) -> list[dict[str, Any]]:
  """Points already measured by this run (a resumed run keeps them)."""
  p = path(workdir)
  if not os.path.exists(p):
    return []
  with open(p, encoding='utf-8') as f:
    return json.load(f)


def save(workdir: str, points: list[dict[str, Any]]) -> None:
  """Writes all points atomically (temp file + os.replace)."""
  tmp = path(workdir) + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(points, f, indent=1, default=float)
  os.replace(tmp, path(workdir))


def primary(metrics: dict[str, Any]) -> str | None:
  """The curve's quality metric among `metrics` (see PRIMARY)."""
  return next((m for m in PRIMARY if m in metrics), None)


def regressed(points: list[dict[str, Any]], factor: float
              ) -> dict[str, Any]:
  """Per NFE: final primary score vs the best earlier one.

  Returns:
    {'regressed': bool, 'detail': [{nfe, metric, best, best_step, final,
    final_step, ratio}]}; `regressed` is True when any NFE's final score is
    worse than `factor` × its best earlier score.
  """
  by_nfe: dict[int, list[dict[str, Any]]] = {}
  for p in points:
    by_nfe.setdefault(int(p['nfe']), []).append(p)
  detail, flag = [], False
  for nfe, ps in sorted(by_nfe.items()):
    ps = sorted(ps, key=lambda p: p['step'])
    m = primary(ps[-1]['metrics'])
    if m is None or len(ps) < 2:
      continue
    best = min(ps[:-1], key=lambda p: p['metrics'][m])
    b, f = float(best['metrics'][m]), float(ps[-1]['metrics'][m])
    ratio = f / b if b > 0 else math.inf
    bad = bool(f > factor * b)
    flag |= bad
    detail.append({'nfe': nfe, 'metric': m, 'best': b,
                   'best_step': best['step'], 'final': f,
                   'final_step': ps[-1]['step'], 'ratio': ratio,
                   'regressed': bad})
  return {'regressed': flag, 'detail': detail}


def validate(config: ml_collections.ConfigDict, supported: Any = None
             ) -> None:
  """Checks `config.curve` (before any compute); ConfigError if bad.

  `supported` (the method's `supported_nfe`, when known) must meet
  `curve.nfe`, so a curve point never fails in the middle of training.
  """
  from onestep_bench.config_check import ConfigError  # pylint: disable=g-import-not-at-top
  cc = config.get('curve')
  if cc is None or not cc.get('fractions'):
    return
  fr = cc.fractions
  if not isinstance(fr, (tuple, list)) or not all(
      isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1
      for f in fr):
    raise ConfigError('curve.fractions', fr, 'must be a tuple of numbers in '
                      '(0, 1]', 'e.g. --config.curve.fractions="(0.25, 1.0)"'
                      ' (or () for no in-training evaluations)')
  nfe = cc.get('nfe')
  if not isinstance(nfe, (tuple, list)) or not nfe or not all(
      isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in nfe):
    raise ConfigError('curve.nfe', nfe, 'must be a non-empty tuple of '
                      'ints >= 1', 'e.g. --config.curve.nfe="(1,)"')
  if supported is not None and not any(k in supported for k in nfe):
    raise ConfigError('curve.nfe', tuple(nfe), f'has no value the sampler '
                      f'supports ({supported!r})',
                      'e.g. --config.curve.nfe="(1,)"')
  n = cc.get('n_samples')
  if not isinstance(n, int) or isinstance(n, bool) or n < 2:
    raise ConfigError('curve.n_samples', n, 'must be an int >= 2',
                      'e.g. --config.curve.n_samples=2000')
  f = cc.get('regress_factor', 2.0)
  if not isinstance(f, (int, float)) or isinstance(f, bool) or f <= 1:
    raise ConfigError('curve.regress_factor', f, 'must be a number > 1',
                      'e.g. --config.curve.regress_factor=2.0')
