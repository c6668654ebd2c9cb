"""MAE pre-training of the encoder: optimizer, train step, loop, FLOPs.

Recipe (docs/methods/drifting.md §1.5, recipe.py): AdamW (β 0.9/0.95, wd
0.01), linear warmup then constant lr; an EMA of the encoder weights is
what gets frozen. Deviations, for images of 8²-32² on two CPU cores: width
C = 16 with one block per stage and three stages; small random shifts
(+ flips when the dataset says `hflip`) instead of RandomResizedCrop(0.2-1);
800 steps at batch 64 instead of 30k at 8192; the EMA decay is warmed up as
min(ema, (1 + t) / (10 + t)) so a short run does not keep the init weights;
weights are initialized in numpy (`network.init_numpy`); GN keeps ≥ 8
channels per group (network.py).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging

from onestep_bench.data.images import ImageArrays, random_shift
from onestep_bench.encoders.mae import MAE, patch_mask, to_input
from onestep_bench.encoders.probe import (
  EVAL_BATCH,
  eval_split,
  knn_probe,
  masked_errors,
  masked_mse,
)
from onestep_bench.encoders.recipe import CODE_VERSION

BASELINE_IMAGES = 4 * EVAL_BATCH  # images for the init / zero-fill baselines


def _optimizer(r: dict[str, Any]) -> optax.GradientTransformation:
  """AdamW (β1, β2, wd from the recipe), linear warmup then constant lr."""
  warmup = max(int(r['warmup']), 1)
  sched = optax.join_schedules(
      [optax.linear_schedule(0.0, r['lr'], warmup),
       optax.constant_schedule(r['lr'])], [warmup])
  return optax.adamw(sched, b1=r['b1'], b2=r['b2'],
                     weight_decay=r['weight_decay'])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_step(mae: MAE, scale: float, params, opt, ema, i: jax.Array,
                x_tr: jax.Array, key: jax.Array):
  """One AdamW step of the masked-AE loss + the encoder EMA update."""
  r = mae.recipe
  k_idx, k_flip, k_shift, k_mask = jax.random.split(
      jax.random.fold_in(key, i), 4)
  idx = jax.random.randint(k_idx, (r['batch'],), 0, x_tr.shape[0])
  x = to_input(x_tr[idx], scale)
  if r['hflip']:
    flip = jax.random.bernoulli(k_flip, 0.5, (r['batch'], 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)
  x = random_shift(k_shift, x, r['shift'])
  mask = patch_mask(k_mask, x.shape, r['patch'], r['mask_prob'])
  loss, grads = jax.value_and_grad(mae.loss)(params, x, mask)
  updates, opt = _optimizer(r).update(grads, opt, params)
  params = optax.apply_updates(params, updates)
  t = i.astype(jnp.float32)
  d = jnp.minimum(r['ema'], (1.0 + t) / (10.0 + t))
  ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema,
                     params['encoder'])
  return params, opt, ema, loss


def pretrain_flops(dataset: ImageArrays, recipe: dict[str, Any]) -> float:
  """Matmul/conv FLOPs of the whole MAE pre-training (`train`).

  Counted on the jaxpr of one `_train_step`, × `recipe['steps']` (shapes
  only: nothing runs).
  """
  from onestep_bench.flops import count_flops  # pylint: disable=g-import-not-at-top
  r = recipe
  mae = MAE(dataset.spec.shape, r)
  params = jax.eval_shape(lambda: mae.init(r['seed']))
  opt = jax.eval_shape(_optimizer(r).init, params)
  x_tr = jax.ShapeDtypeStruct((r['batch'], *dataset.spec.shape),
                              dataset.split_images(dataset.train_split)[0]
                              .dtype)
  flops, _ = count_flops(
      lambda p, o, e, i, x, k: _train_step(mae, dataset.scale, p, o, e, i, x,
                                           k),
      params, opt, params['encoder'], jnp.int32(0), x_tr, jax.random.key(0))
  return flops * r['steps']


def train(dataset: ImageArrays, recipe: dict[str, Any]
          ) -> tuple[dict[str, Any], dict[str, Any]]:
  """MAE pre-training on the training split; returns (EMA encoder, info).

  `recipe` must be resolved (`resolve_recipe`). Deterministic: fixed seed,
  fixed steps, one jitted step per Python iteration (no lax.scan: XLA:CPU
  runs convolutions inside a while loop far slower than at top level).
  """
  r = recipe
  shape = dataset.spec.shape
  mae = MAE(shape, r)
  k_data = jax.random.key(r['seed'])
  params = mae.init(r['seed'])
  init_encoder = params['encoder']
  tx = _optimizer(r)
  x_tr = jnp.asarray(dataset.split_images(dataset.train_split)[0])

  logging.info('Training encoder (%s, %d steps; cached afterwards)',
               dataset.spec.name, r['steps'])
  t0, c0 = time.perf_counter(), time.process_time()
  opt, ema = tx.init(params), init_encoder
  losses = []
  for i in range(r['steps']):
    params, opt, ema, loss = _train_step(
        mae, dataset.scale, params, opt, ema, jnp.int32(i), x_tr, k_data)
    if (i + 1) % max(r['steps'] // 10, 1) == 0:
      losses.append(float(loss))
      logging.info('encoder step %d masked mse %.4f', i + 1, losses[-1])
  jax.block_until_ready(ema)
  info: dict[str, Any] = dict(
      dataset=dataset.spec.name, shape=list(shape), recipe=r,
      train_flops=pretrain_flops(dataset, r),
      code_version=CODE_VERSION, train_seconds=time.perf_counter() - t0,
      train_cpu_seconds=time.process_time() - c0, train_loss_curve=losses)
  t1, c1 = time.perf_counter(), time.process_time()
  split = eval_split(dataset)
  if split is not None:
    xte = dataset.split_images(split)[0]
    info['eval_split'] = split
    se, n = masked_errors(mae, params, ema, xte, scale=dataset.scale)
    info['test_masked_mse'] = float(se.sum() / n.sum())
    # Baselines on the first BASELINE_IMAGES (the same masks, a multiple of
    # EVAL_BATCH): the untrained net, and predicting 0 (mid-gray).
    k = BASELINE_IMAGES
    base = xte[:k]
    info['test_masked_mse_subset'] = float(se[:k].sum() / n[:k].sum())
    mse = functools.partial(masked_mse, mae, scale=dataset.scale)
    init = mae.init(r['seed'])
    info['test_masked_mse_init'] = mse(init, init['encoder'], base)
    info['test_masked_mse_zero_fill'] = mse(init, init['encoder'], base,
                                            zero_fill=True)
    c2 = time.process_time()
    accs = knn_probe(mae, [ema, init_encoder], dataset)
    info['knn_cpu_seconds'] = time.process_time() - c2
    if accs is not None:
      info['knn_accuracy'], info['knn_accuracy_init'] = accs[0], accs[1]
      info['knn_accuracy_pixels'] = accs[2]['pixels']
  info['eval_seconds'] = time.perf_counter() - t1
  info['eval_cpu_seconds'] = time.process_time() - c1
  logging.info('encoder %s: %s', dataset.spec.name,
               {k: v for k, v in info.items() if k != 'recipe'})
  return ema, info
