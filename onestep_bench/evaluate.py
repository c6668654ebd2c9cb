"""Re-scores a finished run without retraining: `make eval WORKDIR=…`.

  python -m onestep_bench.evaluate --workdir=runs/drifting/digits/bench_seed0 \
      [--eval=main] [--nfe=1,4] [--guidance=1.5] [--n_samples=N] \
      [--results_dir=results]

Restores the run's latest EMA params (`runs.load_run`), evaluates them with
the run's own eval config (with the given overrides) through the same
`runner.evaluate` path as training, with the same evaluation key (the same
NFE gives the same samples as the original evaluation), merges the records
into the run's summary.json and records the new rows under the run's
original protocol: evaluation settings never change what was trained. The
recorded command is the training command plus the equivalent
`--config.evals.*` overrides, which reproduces the rows from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from onestep_bench import runs
from onestep_bench.evaluators import runner


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
  out: dict[str, Any] = {}
  if args.nfe:
    out['nfe'] = tuple(int(k) for k in args.nfe.split(',') if k)
  if args.guidance is not None:
    out['guidance'] = float(args.guidance)
  if args.n_samples is not None:
    out['n_samples'] = int(args.n_samples)
  return out


def _flag(name: str, key: str, v: Any) -> str:
  value = f'({",".join(map(str, v))},)' if isinstance(v, tuple) else str(v)
  return f'--config.evals.{name}.{key}={value}'


def reevaluate(workdir: str, *, eval_name: str = 'main',
               overrides: dict[str, Any] | None = None,
               results_dir: str = '') -> dict[str, Any]:
  """Evaluates a finished run again; returns {'records', 'rows', 'summary'}.

  Raises:
    runs.RunError: not a finished run.
    ValueError: unknown eval name, or an NFE the method does not support.
  """
  run = runs.load_run(workdir)
  if eval_name not in run.config.evals:
    raise ValueError(f'--eval={eval_name!r}: the run has evals '
                     f'{sorted(run.config.evals)}.')
  ev = ml_collections.ConfigDict(run.config.evals[eval_name].to_dict())
  for k, v in (overrides or {}).items():
    ev[k] = v
  evals = ml_collections.ConfigDict({eval_name: ev})
  runner.eval_nfes(run.method, ev, eval_name)  # fail before sampling
  eval_key = jax.random.split(jax.random.key(run.config.seed), 3)[2]
  records = runner.evaluate(run.method, run.ema_params, run.dataset, evals,
                            workdir, eval_key, seed=int(run.config.seed))
  summary = run.summary
  ident = lambda r: (r['eval'], r['nfe'], r.get('guidance'), r['n_samples'])
  new = {ident(r) for r in records}
  summary['evals'] = [r for r in summary['evals'] if ident(r) not in new]
  summary['evals'] += records
  tmp = os.path.join(workdir, 'summary.json.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=1, default=float)
  os.replace(tmp, os.path.join(workdir, 'summary.json'))
  command = ' '.join([summary['command'], *(
      shlex.quote(_flag(eval_name, k, v)) for k, v in
      (overrides or {}).items())])
  rows = []
  if results_dir:
    from onestep_bench import results  # pylint: disable=g-import-not-at-top
    rows = results.record({**summary, 'evals': records, 'curve': [],
                           'command': command}, results_dir)
  return {'records': records, 'rows': rows, 'summary': summary}


def main(argv: Sequence[str] | None = None) -> None:
  """CLI (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', required=True, help='A finished run directory.')
  p.add_argument('--eval', default='main', help='Which eval of the run.')
  p.add_argument('--nfe', default='', help='Comma list, e.g. 1,4.')
  p.add_argument('--guidance', type=float, default=None, help='CFG scale.')
  p.add_argument('--n_samples', type=int, default=None)
  p.add_argument('--results_dir', default='results',
                 help="Where runs.csv lives; '' to record nothing.")
  args = p.parse_args(argv)
  try:
    out = reevaluate(args.workdir, eval_name=args.eval,
                     overrides=_overrides(args),
                     results_dir=args.results_dir)
  except (runs.RunError, ValueError) as e:
    sys.exit(f'error: {" ".join(str(e).split())}')
  s = out['summary']
  for rec in out['records']:
    m = rec['metrics']
    print(f'RESULT {s["method"]} {s["dataset"]} nfe={rec["nfe"]} '
          f'guidance={rec["guidance"]} '
          + ' '.join(f'{k}={v:.4g}' for k, v in m.items()
                     if isinstance(v, float)))


if __name__ == '__main__':
  main()
