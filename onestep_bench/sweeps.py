"""Ablation sweeps: `make sweep EXP=<module> SWEEP=<a>[,<b>]`.

An experiment is a module `experiments/<EXP>.py` with

  from experiments.bench import get_config   # the protocol
  BASE = 'method=…,dataset=…'          # get_config's argument string
  def sweep_<name>():                  # one generator per named sweep
    yield {'method.temperatures': (0.05, 0.2)}
    ...

Several sweeps are combined as a product. Every point trains and evaluates
one run (`runs/sweeps/<exp>/<sweeps>/<i>_seed<k>`) and the table
`results/ablations/<exp>__<sweeps>.csv` is rewritten atomically after each
point (nothing is lost if the sweep is interrupted), one row per (point,
seed, nfe) with the overrides, the metrics and the reproducing command.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import itertools
import os
import shlex
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys; an unknown key raises a KeyError naming it."""
  flat = config.to_dict()
  for key in overrides:
    node = flat
    for part in key.split('.'):
      if not isinstance(node, dict) or part not in node:
        known = sorted(node) if isinstance(node, dict) else []
        raise KeyError(f'Unknown config key {key!r} in a sweep; known keys '
                       f'at that level: {known}.')
      node = node[part]
  config.update_from_flattened_dict(dict(overrides))
  return config


def sweep_points(exp: Any, names: list[str]) -> Iterator[dict[str, Any]]:
  """Product of the named sweeps' override dicts."""
  gens = []
  for name in names:
    fn = getattr(exp, f'sweep_{name}', None)
    if fn is None:
      known = [a[6:] for a in dir(exp) if a.startswith('sweep_')]
      raise ValueError(f'{exp.__name__} has no sweep_{name}(); known: {known}')
    gens.append(list(fn()))
  for combo in itertools.product(*gens):
    point: dict[str, Any] = {}
    for part in combo:
      point.update(part)
    yield point


def command_for(exp_name: str, base: str, seed: int,
                point: Mapping[str, Any]) -> str:
  """Shell command that reruns one sweep point as a standalone training run."""
  args = ['python', '-m', 'onestep_bench.main',
          f'--config=experiments/{exp_name}.py:{base},seed={seed}']
  args += [f'--config.{k}={v!r}' if isinstance(v, tuple) else
           f'--config.{k}={v}' for k, v in point.items()]
  return shlex.join(args)


def write_table(path: str, rows: list[dict[str, Any]]) -> None:
  """Rewrites the whole CSV atomically (temp file + os.replace)."""
  columns: list[str] = []
  for r in rows:
    columns += [k for k in r if k not in columns]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, columns)
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, path)


def run(exp_name: str, sweep_names: list[str], seeds: list[int],
        results_dir: str = 'results', smoke: bool = False) -> str:
  """Runs every point x seed; returns the CSV path."""
  from onestep_bench import train  # pylint: disable=g-import-not-at-top
  exp = importlib.import_module(f'experiments.{exp_name}')
  base = exp.BASE + (',smoke=True' if smoke else '')
  tag = '+'.join(sweep_names)
  path = os.path.join(results_dir, 'ablations', f'{exp_name}__{tag}.csv')
  rows: list[dict[str, Any]] = []
  points = list(sweep_points(exp, sweep_names))
  for i, point in enumerate(points):
    for seed in seeds:
      config = apply_overrides(exp.get_config(f'{base},seed={seed}'), point)
      config.protocol = 'ablation'
      workdir = os.path.join('runs', 'sweeps', exp_name, tag,
                             f'{i}_seed{seed}')
      cmd = command_for(exp_name, base, seed, point)
      summary = train.train_and_evaluate(config, workdir, command=cmd)
      for rec in summary['evals']:
        rows.append({'point': i, **{k: str(v) for k, v in point.items()},
                     'seed': seed, 'nfe': rec['nfe'],
                     'n_samples': rec['n_samples'], **rec['metrics'],
                     'train_step_ms': summary['train_step_ms'],
                     'git_sha': summary['git_sha'], 'command': cmd})
      write_table(path, rows)
      print(f'[{i + 1}/{len(points)} seed {seed}] {point} -> {path}')
  return path


def main() -> None:
  """CLI: parses --exp/--sweep/--seeds and runs the sweep."""
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--exp', required=True, help='module in experiments/')
  p.add_argument('--sweep', required=True, help='comma list of sweep names')
  p.add_argument('--seeds', default='0', help='comma list of seeds')
  p.add_argument('--results_dir', default='results')
  p.add_argument('--smoke', action='store_true', help='tiny runs (testing)')
  a = p.parse_args()
  run(a.exp, a.sweep.split(','), [int(s) for s in a.seeds.split(',')],
      a.results_dir, a.smoke)


if __name__ == '__main__':
  main()
