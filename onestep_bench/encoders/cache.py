"""The encoder cache: key, path, checksummed save / load, `load_or_train`.

The harness trains the encoder once per (dataset content, recipe), on the
training split only and without labels, and caches the EMA weights under
`cache_dir()/encoders/<key>.npz` (plain arrays, no pickle) with a JSON
sidecar of metadata. A damaged file is never used and never stops a run:
it is retrained and replaced (`load_or_train`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from onestep_bench.data.images import ImageArrays
from onestep_bench.encoders.features import FrozenEncoder
from onestep_bench.encoders.network import encoder_fn, group_rule
from onestep_bench.encoders.pretrain import pretrain_flops, train
from onestep_bench.encoders.recipe import CODE_VERSION, resolve_recipe
from onestep_bench.evaluators.classifier import cache_dir


class CacheError(RuntimeError):
  """A cached encoder file is unreadable, incomplete or fails its checksum."""


def cache_key(dataset: ImageArrays, recipe: dict[str, Any]) -> str:
  """'<name>-<sha16>' of (train images, shape, dtype, recipe, CODE_VERSION)."""
  images = dataset.split_images(dataset.train_split)[0]
  digest = hashlib.sha256()
  digest.update(np.ascontiguousarray(images).tobytes())
  digest.update(json.dumps(dict(shape=list(images.shape),
                                dtype=str(images.dtype), recipe=recipe,
                                scale=dataset.scale, version=CODE_VERSION),
                           sort_keys=True).encode())
  name = re.sub(r'[^A-Za-z0-9_.-]+', '_', dataset.spec.name).strip('_')
  return f'{name}-{digest.hexdigest()[:16]}'


def encoder_path(key: str) -> str:
  """cache_dir()/encoders/<key>.npz (metadata: the .json beside it)."""
  return os.path.join(cache_dir(), 'encoders', f'{key}.npz')


def _flatten(params: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in params.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = np.asarray(v)
  return out


def _params_sha256(flat: dict[str, np.ndarray]) -> str:
  digest = hashlib.sha256()
  for name in sorted(flat):
    a = np.ascontiguousarray(flat[name])
    digest.update(f'{name}:{a.dtype}:{a.shape}'.encode())
    digest.update(a.tobytes())
  return digest.hexdigest()


def save(path: str, params: dict[str, Any], info: dict[str, Any]) -> None:
  """Writes params as named arrays + metadata (JSON in the npz and beside)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  flat = _flatten(params)
  info = dict(info, params_sha256=_params_sha256(flat))
  meta = json.dumps(info, sort_keys=True)
  tmp = f'{path}.{os.getpid()}.tmp.npz'  # one per writer process
  np.savez(tmp, __meta__=np.frombuffer(meta.encode(), np.uint8), **flat)
  os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
  side = os.path.splitext(path)[0] + '.json'
  with open(f'{side}.{os.getpid()}.tmp', 'w') as f:
    f.write(json.dumps(info, sort_keys=True, indent=1))
  os.replace(f'{side}.{os.getpid()}.tmp', side)


def load(path: str, abstract: dict[str, Any], key: str
         ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads and verifies a cached encoder.

  Raises:
    CacheError: the file is unreadable, has another cache key, lacks or
      misshapes a parameter of `abstract`, or fails its checksum.
  """
  try:
    with np.load(path, allow_pickle=False) as z:
      info = json.loads(z['__meta__'].tobytes().decode())
      flat = {k: z[k] for k in z.files if k != '__meta__'}
  except Exception as e:  # zip / npy / json errors of a damaged file
    raise CacheError(f'{path}: unreadable ({type(e).__name__}: {e})') from e
  if info.get('cache_key') != key:
    raise CacheError(f'{path}: cache_key {info.get("cache_key")!r} != {key!r}')
  want = _flatten(jax.tree.map(lambda a: np.zeros((), a.dtype), abstract))
  shapes = _flatten(jax.tree.map(lambda a: np.zeros(a.shape, np.int8),
                                 abstract))
  if set(flat) != set(want):
    raise CacheError(f'{path}: parameter names differ from the model '
                     f'(missing {sorted(set(want) - set(flat))[:3]}, extra '
                     f'{sorted(set(flat) - set(want))[:3]})')
  for name, a in flat.items():
    if a.shape != shapes[name].shape or a.dtype != want[name].dtype:
      raise CacheError(f'{path}: {name} is {a.dtype}{a.shape}, expected '
                       f'{want[name].dtype}{shapes[name].shape}')
  if _params_sha256(flat) != info.get('params_sha256'):
    raise CacheError(f'{path}: parameter checksum mismatch')
  params: dict[str, Any] = {}
  for name, a in flat.items():
    node = params
    *parents, leaf = name.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(a)
  return params, info


def load_or_train(dataset: ImageArrays, recipe: dict[str, Any] | None = None,
                  *, max_locations: int = 196, block_features: bool = True
                  ) -> FrozenEncoder:
  """The cached encoder for (dataset content, recipe), training it if absent.

  A cache file that cannot be read, lacks or misshapes a parameter, or fails
  its parameter checksum is reported (logging.warning, naming the file) and
  retrained from the same recipe (bitwise the same weights on the same
  platform and JAX version), and the new file replaces it atomically. A
  damaged file is thus never used, and never stops a run.

  Args:
    dataset: an `ImageArrays` (uint8 images or float latents).
    recipe: overrides of `RECIPE` (part of the cache key).
    max_locations: feature-dictionary bound on L per key (not hashed).
    block_features: add every 2nd inner block's maps (not hashed).
  """
  r = resolve_recipe(dataset, recipe)
  key = cache_key(dataset, r)
  path = encoder_path(key)
  shape = dataset.spec.shape
  abstract = encoder_fn(shape[-1], r['width'], r['blocks'],
                        group_rule(r)).abstract()
  params = None
  if os.path.exists(path):
    try:
      params, info = load(path, abstract, key)
    except CacheError as e:
      logging.warning('Cached encoder is damaged, retraining it: %s', e)
  if params is None:
    params, info = train(dataset, r)
    info['cache_key'] = key
    save(path, params, info)
    params, info = load(path, abstract, key)  # exactly what a hit returns
  if 'train_flops' not in info:  # caches written before FLOPs were counted
    info = {**info, 'train_flops': pretrain_flops(dataset, r)}
  return FrozenEncoder(shape, params, info, max_locations=max_locations,
                       block_features=block_features)
