"""The one evaluation path: sample at each NFE, save the samples, score them.

For every eval in `config.evals` and every nfe in `eval.nfe ∩
method.supported_nfe`, the same code draws `n_samples` samples with
`method.sample(ema_params, key, chunk, nfe=nfe)` in jitted chunks (the last
chunk is sampled whole and sliced, never dropped), times them, reads the
sampler's matmul/conv FLOPs (`flops.count_flops`, loops counted by trip
count), saves `samples_nfe{k}.npz` in the workdir, and scores them with the
dataset family's metrics.

Effective NFE = sampling FLOPs / FLOPs of one forward of the protocol's
*reference backbone*: `models.build(config.model)` on the data's shape with
the method-specific inputs switched off (no guidance embedder, no style
tokens, no method heads or widened outputs). The denominator is therefore the
same for every method of a protocol, and a method whose sampler runs a larger
network (a head, padded channels, CFG's second pass) shows it as effective
NFE > NFE. Inexact counts (a `while` loop of unknown trip count) are flagged
`flops_exact=False` in every record.

Every record also carries its provenance: the feature network and the sha256
of its weights, a digest of the reference statistics' key, and the
evaluator's settings (`eval_settings`), so rows of different feature spaces
are never ranked together (leaderboard.py). A score in a second feature
space of the same samples (FD_DINOv2, `image_eval.score_images`'
`extra_records`) becomes a second record for the same (eval, nfe), with the
same sampling cost and its own provenance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh
from tqdm import tqdm

from onestep_bench import models, sharding
from onestep_bench.data import Dataset, DataSpec
from onestep_bench.flops import count_flops
from onestep_bench.method import Method


def feature_net(dataset: Dataset, ev: ml_collections.ConfigDict) -> str:
  """The feature space of the scores (a column of every result row)."""
  if dataset.spec.kind == 'toy2d':
    return 'raw2d'
  from onestep_bench.evaluators import image_eval  # pylint: disable=g-import-not-at-top
  return image_eval.feature_net_name(dataset, ev)


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


def score(samples: np.ndarray, dataset: Dataset, seed: int,
          ev: ml_collections.ConfigDict | None = None,
          mesh: Mesh | None = None) -> dict[str, Any]:
  """Metrics for the dataset's family (image features split over `mesh`)."""
  if dataset.spec.kind == 'toy2d':
    from onestep_bench.evaluators import sample_stats  # pylint: disable=g-import-not-at-top
    return sample_stats.sample_stats(samples, dataset, seed=seed)
  from onestep_bench.evaluators import image_eval  # pylint: disable=g-import-not-at-top
  return image_eval.score_images(samples, dataset,
                                 ev or ml_collections.ConfigDict(), seed,
                                 mesh=mesh)


def sample_labels(key: jax.Array, n: int, num_classes: int) -> jax.Array:
  """Class-balanced labels for conditional sampling: [n] int32, shuffled.

  Every class appears n // C or n // C + 1 times (ADM/EDM sample classes
  uniformly; balancing removes label-sampling noise from the metrics).
  """
  return jax.random.permutation(key, jnp.arange(n, dtype=jnp.int32)
                                % num_classes)


def draw_samples(method: Method, params: Any, key: jax.Array, n: int, nfe: int,
                 chunk: int, *, num_classes: int = 0,
                 guidance: float | None = None, mesh: Mesh | None = None
                 ) -> tuple[np.ndarray, dict[str, float]]:
  """N samples in jitted chunks of `chunk`; returns samples and cost info.

  With `num_classes > 0` every chunk is sampled with class-balanced labels
  (`sample_labels`) and the CFG scale `guidance`. With a `mesh` each chunk is
  split over its devices (the batch axes, as in training); the samples are
  the same as on one device because the sampler's noise is drawn inside the
  program with partitionable threefry. Chunks not divisible by the device
  count are sampled replicated.
  """
  chunk = min(chunk, n)
  compiled, flops, exact = compile_sampler(
      method, params, key, chunk, nfe, num_classes=num_classes,
      guidance=guidance, mesh=mesh)
  out, t0 = [], time.perf_counter()
  steps = math.ceil(n / chunk)
  for i in tqdm(range(steps), desc=f'sample nfe={nfe}', leave=False,
                disable=steps < 4 or jax.process_index() != 0):
    out.append(compiled(params, jax.random.fold_in(key, i)))
  samples = np.concatenate(sharding.to_host(out))[:n]
  dt = time.perf_counter() - t0
  return samples, {'ms_per_sample': 1e3 * dt / n,
                   'flops_per_sample': flops / chunk, 'flops_exact': exact}


def compile_sampler(method: Method, params: Any, key: jax.Array, chunk: int,
                    nfe: int, *, num_classes: int = 0,
                    guidance: float | None = None, mesh: Mesh | None = None
                    ) -> tuple[Any, float, bool]:
  """(compiled `(params, key) -> chunk samples`, FLOPs per call, exact).

  Chunk i of an eval is `compiled(params, fold_in(key, i))`.
  """
  out_sharding = None
  if mesh is not None:
    out_sharding = (sharding.batch_sharded(mesh) if chunk % mesh.size == 0
                    else sharding.replicated(mesh))

  def fn(p, k):
    labels = None
    if num_classes:  # unconditional runs keep the key as is (reproducible)
      k_lab, k = jax.random.split(k)
      labels = sample_labels(k_lab, chunk, num_classes)
    return method.sample(p, k, chunk, nfe=nfe, labels=labels,
                         guidance=guidance)
  compiled = jax.jit(fn, out_shardings=out_sharding).lower(params,
                                                         key).compile()
  # jaxpr count, not compiled.cost_analysis(): XLA counts a scanned
  # sampler's loop body once, whatever the NFE.
  flops, exact = count_flops(fn, params, key)
  return compiled, flops, exact


def draw_and_score_streamed(method: Method, params: Any, dataset: Dataset,
                            ev: ml_collections.ConfigDict, name: str,
                            key: jax.Array, nfe: int, workdir: str | None, *,
                            seed: int, mesh: Mesh | None = None,
                            on_chunk: Any = None
                            ) -> tuple[dict[str, Any], dict[str, float],
                                       np.ndarray | None]:
  """Sampling + decoding + features chunk by chunk, cached (resumable).

  `ev.cache_every` chunks per cache part under `<workdir>/eval_cache/
  <eval>_nfe<k>` (`streaming.py`; process 0's workdir). Sampling and the
  feature nets are split over `mesh` (`sharded_features`). Returns
  (metrics, cost, first chunk), the same on every process.
  """
  from onestep_bench.evaluators import image_eval, streaming  # pylint: disable=g-import-not-at-top
  n = int(ev.n_samples)
  chunk = min(int(ev.get('batch_size', n)), n)
  guidance = ev.get('guidance', None)
  compiled, flops, exact = compile_sampler(
      method, params, key, chunk, nfe, num_classes=dataset.spec.num_classes,
      guidance=guidance, mesh=mesh)
  ctx = image_eval.prepare(dataset, ev, mesh)
  cache = (os.path.join(workdir, streaming.CACHE_DIR, f'{name}_nfe{nfe}')
           if workdir is not None else None)
  ckey = streaming.cache_key(params, key, n=n, nfe=nfe, chunk=chunk, ctx=ctx,
                             extra={'guidance': guidance})
  t0 = time.perf_counter()
  feats, first = streaming.stream_features(
      lambda i: compiled(params, jax.random.fold_in(key, i)), n, chunk,
      dataset, ctx, cache, ckey, cache_every=int(ev.cache_every),
      on_chunk=on_chunk, desc=f'{name} nfe={nfe}')
  dt = time.perf_counter() - t0  # sampling + decode + features (resumed:
  # this run's part only)
  metrics = image_eval.score_features(feats, dataset, ctx, seed)
  return metrics, {'ms_per_sample': 1e3 * dt / n,
                   'flops_per_sample': flops / chunk,
                   'flops_exact': exact}, first


# Backbone options that add method-specific inputs; off in the reference.
_METHOD_INPUTS = {'guidance_embed': False, 'style_tokens': 0}


@dataclasses.dataclass(frozen=True)
class ReferenceForward:
  """One forward of the protocol's reference backbone, for one sample."""

  flops: float
  params: int


# reference_forward results by (backbone config, data shape / classes):
# counting a U-Net's jaxpr takes 5-17 s on 2 CPU cores, and a run asks at
# every curve point and eval.
_REFERENCE_CACHE: dict[tuple[Any, ...], ReferenceForward] = {}


def reference_forward(model: ml_collections.ConfigDict,
                      spec: DataSpec) -> ReferenceForward:
  """FLOPs and params of `models.build(model, spec)`, method inputs off.

  Shapes only (`jax.eval_shape`): nothing is allocated. Labels are passed
  when the data has classes (the label embedding is part of every
  conditional method's forward). Memoised per process on the backbone
  config and the data's name, kind, shape and class count.
  """
  key = (model.to_json_best_effort(sort_keys=True), spec.name, spec.kind,
         tuple(spec.shape), spec.num_classes)
  if key not in _REFERENCE_CACHE:
    _REFERENCE_CACHE[key] = _reference_forward(model, spec)
  return _REFERENCE_CACHE[key]


def _reference_forward(model: ml_collections.ConfigDict,
                       spec: DataSpec) -> ReferenceForward:
  cfg = ml_collections.ConfigDict(model.to_dict())
  for k, off in _METHOD_INPUTS.items():
    if k in cfg:
      cfg[k] = off
  net = models.build(cfg, spec)
  params = jax.eval_shape(net.init, jax.random.key(0))
  x = jax.ShapeDtypeStruct((1, *spec.shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32) if spec.num_classes else None
  flops, _ = count_flops(lambda p, x, t, y: net.apply(p, x, t, t, y),
                         params, x, t, y)
  return ReferenceForward(flops=flops, params=net.num_params())


def provenance(metrics: dict[str, Any], dataset: Dataset,
               ev: ml_collections.ConfigDict,
               net: str | None = None) -> dict[str, Any]:
  """Feature space + reference statistics + evaluator settings of a score.

  Pops the evaluator's `reference` and `settings` entries from `metrics`.
  `net` overrides the eval's feature net (an extra record's own space).
  `ref_stats` is a 12-hex digest of the reference key (dataset, split, n,
  content hash, feature net, weights hash): equal digests mean the same
  statistics. An ADM reference batch names itself, '<file>@<12 hex of its
  sha256>' (`reference.ref_stats_id`). Toy 2D data is scored against a fresh
  exact sample of the law.
  """
  ref = metrics.pop('reference', None)
  settings = metrics.pop('settings', None) or {}
  if ref is None:  # toy 2D: exact samples of the law, raw coordinates
    key = {'law': dataset.spec.name, 'exact_sample': True}
    weights = 'none'
  else:
    key = {k: v for k, v in ref.items() if k != 'cache'}
    weights = str(ref.get('weights_sha256', ''))[:16]
  digest = key.pop('ref_stats', None) or hashlib.sha256(
      json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
  out = {'feature_net': net or feature_net(dataset, ev),
         'feature_weights': weights,
         'ref_stats': digest,
         'eval_settings': ';'.join(f'{k}={settings[k]}'
                                   for k in sorted(settings))}
  if ref is not None:
    out['reference'] = ref
  return out


def evaluate(method: Method, params: Any, dataset: Dataset,
             evals: ml_collections.ConfigDict, workdir: str | None,
             key: jax.Array, *, seed: int, mesh: Mesh | None = None,
             save_samples: bool = True) -> list[dict[str, Any]]:
  """Runs every configured eval; returns one record per (eval, nfe).

  Sampling and image feature extraction are sharded over `mesh` (None:
  one device; features: `sharded_features`, gathered to every process);
  the metrics run on the host of every process (cheap next to the nets),
  files on process 0 only (and only with `save_samples`: in-training
  evaluations keep none).
  """
  records = []
  if dataset.spec.kind != 'toy2d':  # bad options / missing files: no compute
    from onestep_bench.evaluators import image_eval  # pylint: disable=g-import-not-at-top
    for name, ev in evals.items():
      image_eval.eval_settings(ev, name,
                               latent=dataset.spec.kind == 'latent')
  ref = reference_forward(method.config.model, dataset.spec)
  for name, ev in evals.items():
    for nfe in eval_nfes(method, ev, name):
      guidance = ev.get('guidance', None)
      streamed = bool(ev.get('cache_every', 0)) and (
          dataset.spec.kind != 'toy2d')
      if streamed:  # FID-50K: features cached as they come, resumable
        metrics, cost, samples = draw_and_score_streamed(
            method, params, dataset, ev, name, jax.random.fold_in(key, nfe),
            nfe, workdir, seed=seed, mesh=mesh)
      else:
        samples, cost = draw_samples(
            method, params, jax.random.fold_in(key, nfe), ev.n_samples, nfe,
            ev.get('batch_size', ev.n_samples),
            num_classes=dataset.spec.num_classes, guidance=guidance,
            mesh=mesh)
      rec = {'eval': name, 'nfe': nfe, 'n_samples': int(ev.n_samples),
             'guidance': guidance, **cost,
             'reference_flops': ref.flops, 'reference_params': ref.params,
             # Sampling cost in reference-backbone forwards (heads, CFG's
             # extra passes, wider outputs included): one denominator for
             # every method of the protocol.
             'effective_nfe': (cost['flops_per_sample'] / ref.flops
                               if ref.flops else None),
             'samples_file': None}
      if save_samples and workdir is not None and jax.process_index() == 0 \
          and samples is not None:
        # streamed evals keep only their first chunk
        rec['samples_file'] = f'samples_nfe{nfe}.npz'
        np.savez_compressed(os.path.join(workdir, rec['samples_file']),
                            x=samples)
        if samples.ndim == 4:
          from onestep_bench import plots  # pylint: disable=g-import-not-at-top
          plots.image_grid(samples, os.path.join(workdir,
                                                 f'samples_nfe{nfe}.png'))
      if not streamed:
        metrics = score(samples, dataset, seed, ev, mesh)
      extra = metrics.pop('extra_records', [])
      rec['metrics'] = metrics
      rec.update(provenance(metrics, dataset, ev))
      logging.info('eval %s nfe=%d: %s', name, nfe, metrics)
      records.append(rec)
      for x in extra:  # e.g. FD_DINOv2: same samples, its own feature space
        m = {**x['metrics'], 'reference': x['reference'],
             'settings': x['settings']}
        other = {k: v for k, v in rec.items() if k not in (
            'metrics', 'reference', *provenance_keys())}
        other['metrics'] = m
        other.update(provenance(m, dataset, ev, net=x['feature_net']))
        logging.info('eval %s nfe=%d (%s): %s', name, nfe,
                     x['feature_net'], m)
        records.append(other)
  return records


def provenance_keys() -> tuple[str, ...]:
  """The record keys `provenance` sets."""
  return ('feature_net', 'feature_weights', 'ref_stats', 'eval_settings')
