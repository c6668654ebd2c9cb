"""Evaluation of a trained MAE: masked-pixel errors and a k-NN probe.

Both are sanity measures recorded in `FrozenEncoder.info` by pretrain.py;
neither feeds back into training. Labels are used here only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from onestep_bench.data.images import ImageArrays
from onestep_bench.encoders.mae import MAE, patch_mask, to_input

EVAL_BATCH = 500
PROBE_TRAIN, PROBE_TEST = 5000, 1000  # kNN sanity probe subset sizes


def batched(fn: Callable[[jax.Array, jax.Array], Any], images: np.ndarray,
            batch: int = EVAL_BATCH) -> list[np.ndarray]:
  """fn(chunk, batch_index) over fixed-size zero-padded chunks, trimmed."""
  outs = []
  for j, i in enumerate(range(0, len(images), batch)):
    chunk = images[i:i + batch]
    pad = batch - len(chunk)
    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]),
                                            chunk.dtype)])
    res = jax.device_get(fn(chunk, jnp.int32(j)))
    outs.append([np.asarray(a)[:batch - pad] for a in res])
  return [np.concatenate(parts) for parts in zip(*outs, strict=True)]


def eval_split(dataset: ImageArrays) -> str | None:
  """'test', else 'validation', else None: the split the probes score on."""
  for split in ('test', 'validation'):
    if split in dataset.splits:
      return split
  return None


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _eval_errors(mae: MAE, scale: float, zero_fill: bool, params,
                 encoder_params, chunk: jax.Array, key: jax.Array):
  x = to_input(chunk, scale)
  mask = patch_mask(key, x.shape, mae.recipe['patch'], mae.recipe['mask_prob'])
  if zero_fill:  # the baseline that predicts 0 (mid-gray) everywhere
    return (jnp.sum(jnp.square(x) * mask, (1, 2, 3)),
            jnp.sum(jnp.broadcast_to(mask, x.shape), (1, 2, 3)))
  return mae.masked_errors(params, encoder_params, x, mask)


def masked_mse(mae: MAE, params, encoder_params, images: np.ndarray, *,
               scale: float = 1.0, seed: int = 1234,
               zero_fill: bool = False) -> float:
  """Masked-pixel MSE on `images` with fixed-seed masks (recipe's p, prob).

  The masks depend only on `seed` and the image order, so numbers for
  different params (or `zero_fill`, which ignores them) are paired.
  """
  se, n = masked_errors(mae, params, encoder_params, images, scale=scale,
                        seed=seed, zero_fill=zero_fill)
  return float(se.sum() / max(n.sum(), 1.0))


def masked_errors(mae: MAE, params, encoder_params, images: np.ndarray, *,
                  scale: float = 1.0, seed: int = 1234,
                  zero_fill: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Per image (masked squared-error sum, masked pixel count), numpy."""
  key = jax.random.key(seed)
  se, n = batched(lambda c, j: _eval_errors(
      mae, scale, zero_fill, params, encoder_params, c,
      jax.random.fold_in(key, j)), images)
  return se, n


def _knn(ftr: np.ndarray, *, ytr: np.ndarray, fte: np.ndarray,
         yte: np.ndarray, num_classes: int, k: int = 10) -> float:
  """Cosine kNN accuracy after standardizing with train statistics."""
  mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
  ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
  ftr /= np.linalg.norm(ftr, axis=1, keepdims=True) + 1e-12
  fte /= np.linalg.norm(fte, axis=1, keepdims=True) + 1e-12
  nn = np.argpartition(-(fte @ ftr.T), k, axis=1)[:, :k]
  votes = np.apply_along_axis(
      lambda r: np.bincount(r, minlength=num_classes), 1, ytr[nn])
  return float(np.mean(votes.argmax(1) == yte))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _probe_features(mae: MAE, scale: float, encoder_params,
                    chunk: jax.Array) -> tuple[jax.Array, jax.Array]:
  acts = mae.encoder.apply(encoder_params, to_input(chunk, scale),
                           block_features=False)
  stages = [a for name, a in acts.items() if name.startswith('stage')]
  return (jnp.concatenate([a.mean((1, 2)) for a in stages], -1),
          stages[-1].reshape(chunk.shape[0], -1))


def knn_probe(mae: MAE, encoder_params: Sequence[dict[str, Any]],
              dataset: ImageArrays, k: int = 10
              ) -> list[dict[str, float]] | None:
  """Cosine k-NN accuracies (train subset -> eval split): a sanity measure.

  Labels are used here and nowhere in training. Two probes per entry of
  `encoder_params`: 'gap', the global means of every stage output
  concatenated; 'last', the last stage output flattened over locations.
  A final entry {'pixels': ...} is the raw-pixel baseline.
  """
  split = eval_split(dataset)
  if split is None or not dataset.label_classes:
    return None
  rng = np.random.RandomState(0)
  xtr, ytr = dataset.split_images(dataset.train_split)
  xte, yte = dataset.split_images(split)
  itr = rng.permutation(len(xtr))[:PROBE_TRAIN]
  ite = rng.permutation(len(xte))[:PROBE_TEST]
  ytr, yte = ytr[itr], yte[ite]
  knn = functools.partial(_knn, ytr=ytr, yte=yte,
                          num_classes=dataset.label_classes, k=k)

  accs = []
  for params in encoder_params:
    fn = lambda c, j, p=params: _probe_features(mae, dataset.scale, p, c)
    (gtr, ltr), (gte, lte) = batched(fn, xtr[itr]), batched(fn, xte[ite])
    accs.append({'gap': knn(gtr, fte=gte), 'last': knn(ltr, fte=lte)})
  flat = lambda a: np.asarray(a, np.float32).reshape(len(a), -1)
  accs.append({'pixels': knn(flat(xtr[itr]), fte=flat(xte[ite]))})
  return accs
