"""The one evaluation path: sample at each NFE, save the samples, score them.

For every eval in `config.evals` and every nfe in `eval.nfe ∩
method.supported_nfe`, the same code draws `n_samples` samples with
`method.sample(ema_params, key, chunk, nfe=nfe)` in jitted chunks (the last
chunk is sampled whole and sliced, never dropped), times them, reads the
sampler's FLOPs from XLA's cost analysis, saves `samples_nfe{k}.npz` in the
workdir, and scores them with the dataset family's metrics.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from onestep_bench.data import Dataset
from onestep_bench.method import Method

# Feature space used per dataset family (a column of every result row).
FEATURE_NET = {'toy2d': 'raw2d'}


def eval_nfes(method: Method, ev: ml_collections.ConfigDict,
              name: str) -> list[int]:
  """`ev.nfe ∩ method.supported_nfe`; empty intersection is an error."""
  nfes = [int(k) for k in ev.nfe if int(k) in method.supported_nfe]
  if not nfes:
    raise ValueError(
        f'config.evals.{name}.nfe={tuple(ev.nfe)} has no value supported by '
        f'{type(method).__module__} (supported: {method.supported_nfe!r}). '
        f'Set it to one of those, e.g. --config.evals.{name}.nfe="(1,)".')
  return nfes


def score(samples: np.ndarray, dataset: Dataset, seed: int) -> dict[str, float]:
  """Metrics for the dataset's family."""
  if dataset.spec.kind == 'toy2d':
    from onestep_bench.evaluators import sample_stats  # pylint: disable=g-import-not-at-top
    return sample_stats.sample_stats(samples, dataset, seed=seed)
  raise ValueError(f'No evaluator for dataset kind {dataset.spec.kind!r}.')


def draw_samples(method: Method, params: Any, key: jax.Array, n: int, nfe: int,
                 chunk: int) -> tuple[np.ndarray, dict[str, float]]:
  """n samples in jitted chunks of `chunk`; returns samples and cost info."""
  chunk = min(chunk, n)
  fn = jax.jit(lambda p, k: method.sample(p, k, chunk, nfe=nfe))
  compiled = fn.lower(params, key).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get('flops', float('nan')))
  out, t0 = [], time.perf_counter()
  for i in range(math.ceil(n / chunk)):
    out.append(compiled(params, jax.random.fold_in(key, i)))
  samples = np.concatenate(jax.device_get(out))[:n]
  dt = time.perf_counter() - t0
  return samples, {'ms_per_sample': 1e3 * dt / n,
                   'flops_per_sample': flops / chunk}


def evaluate(method: Method, params: Any, dataset: Dataset,
             evals: ml_collections.ConfigDict, workdir: str | None,
             key: jax.Array, *, seed: int) -> list[dict[str, Any]]:
  """Runs every configured eval; returns one record per (eval, nfe)."""
  records = []
  for name, ev in evals.items():
    for nfe in eval_nfes(method, ev, name):
      samples, cost = draw_samples(
          method, params, jax.random.fold_in(key, nfe), ev.n_samples, nfe,
          ev.get('batch_size', ev.n_samples))
      rec = {'eval': name, 'nfe': nfe, 'n_samples': int(ev.n_samples),
             'feature_net': FEATURE_NET.get(dataset.spec.kind, 'unknown'),
             **cost, 'samples_file': None}
      if workdir is not None and jax.process_index() == 0:
        rec['samples_file'] = f'samples_nfe{nfe}.npz'
        np.savez_compressed(os.path.join(workdir, rec['samples_file']),
                            x=samples)
      rec['metrics'] = score(samples, dataset, seed)
      logging.info('eval %s nfe=%d: %s', name, nfe, rec['metrics'])
      records.append(rec)
  return records
