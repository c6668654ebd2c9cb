"""FID-50K as a stream: sample, decode, extract chunk by chunk; resumable.

`stream_features` draws the eval's samples in the same jitted chunks as
`runner.draw_samples` (chunk i from `fold_in(key, i)`, split over the mesh),
turns each chunk into uint8 images (`image_eval.decode_to_images`: the VAE
for latent data), runs the feature nets on it (`image_eval.features`) and
keeps only the features. Every `cache_every` chunks the new features are
written to `<workdir>/eval_cache/<tag>/part_<first>_<last>.npz` (plain
arrays, written to a temporary name and renamed, no pickle); a rerun with
the same key (the params' digest, sampler and eval settings, feature nets
and their weights, VAE) loads the parts and continues after the last
complete one, so a preempted FID-50K resumes instead of restarting. The
features of a resumed run equal an uninterrupted run's bit for bit (same
chunks, same keys, same programs).

Devices: each chunk is sampled over the eval's mesh (`runner.
compile_sampler`, batch split over every device) and gathered to every
process (`sharding.to_host`); latents are decoded over the process's local
devices (`vae.LatentDecoder`; every process decodes the whole chunk); the
feature nets of a `prepare(dataset, ev, mesh)` context are split over every
device of the mesh, each process extracting only its devices' rows, and the
features gathered to every process (`sharded_features`), so all processes
hold the same features and score the same metrics.

Processes: only process 0 reads and writes the cache (others may have no
workdir: `train.py` passes them None). It decides where to resume and
broadcasts that, with the cached features, to the others
(`multihost_utils.broadcast_one_to_all`, as raw bytes so float64 survives),
so every process skips the same chunks and the collective sampling and
extraction programs stay in step. Only process 0 shows the progress bar.

Samples are not kept (50k ImageNet-256 images are 9.8 GB); the first chunk
is returned for the sample grid.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from onestep_bench import sharding
from onestep_bench.evaluators import image_eval

CACHE_DIR = 'eval_cache'
_PIECE = 1 << 28  # bytes per broadcast of resumed features (256 MiB)
_PART = re.compile(r'part_(\d+)_(\d+)\.npz$')


def params_digest(params: Any) -> str:
  """16 hex of the sha256 of every leaf's bytes (tree order)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return h.hexdigest()[:16]


def cache_key(params: Any, key: jax.Array, *, n: int, nfe: int, chunk: int,
              ctx: image_eval.Context, extra: dict[str, Any] | None = None
              ) -> dict[str, Any]:
  """What the cached features depend on (compared on resume)."""
  return {'params': params_digest(params),
          'key': np.asarray(jax.random.key_data(key)).tolist(),
          'n': int(n), 'nfe': int(nfe), 'chunk': int(chunk),
          'feature_net': ctx.feature_net,
          'weights_sha256': ctx.extractor.weights_sha256,
          'dinov2': getattr(ctx.dinov2, 'weights_sha256', None),
          'settings': {k: v for k, v in ctx.settings.items()},
          **(extra or {})}


def _load_parts(directory: str, key: dict[str, Any]
                ) -> tuple[int, list[dict[str, np.ndarray]]]:
  """(chunks done, their feature dicts in order) of a matching cache."""
  meta = os.path.join(directory, 'key.json')
  if not os.path.exists(meta):
    return 0, []
  with open(meta) as f:
    stored = json.load(f)
  if stored != json.loads(json.dumps(key)):
    raise ValueError(f'{directory} holds features of another evaluation '
                     f'({stored}); delete it or use another workdir.')
  parts, done = [], 0
  for path in sorted(glob.glob(os.path.join(directory, 'part_*.npz'))):
    lo, hi = map(int, _PART.search(path).groups())
    if lo != done:
      break  # a gap: recompute from here
    with np.load(path, allow_pickle=False) as z:
      parts.append({k: z[k] for k in z.files})
    done = hi + 1
  return done, parts


def _save_part(directory: str, lo: int, hi: int,
               arrays: dict[str, np.ndarray]) -> None:
  path = os.path.join(directory, f'part_{lo:06d}_{hi:06d}.npz')
  tmp = path + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _save_key(directory: str, key: dict[str, Any]) -> None:
  path = os.path.join(directory, 'key.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(key, f, sort_keys=True)
  os.replace(path + '.tmp', path)


def _broadcast_bytes(data: bytes | None) -> bytes:
  """Process 0's `data` on every process (others pass None).

  In pieces of at most `_PIECE` bytes (int32 sizes, bounded device memory).
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  n = 0 if data is None else len(data)
  hi, lo = multihost_utils.broadcast_one_to_all(
      np.asarray([n // _PIECE, n % _PIECE], np.int32))
  size = int(hi) * _PIECE + int(lo)
  out = []
  for start in range(0, size, _PIECE):
    m = min(_PIECE, size - start)
    buf = (np.frombuffer(data, np.uint8, m, start) if data is not None
           else np.zeros(m, np.uint8))
    out.append(multihost_utils.broadcast_one_to_all(buf).tobytes())
  return b''.join(out)


def _broadcast_resume(cache: str | None, key: dict[str, Any]
                      ) -> tuple[int, list[dict[str, np.ndarray]]]:
  """`_load_parts` of process 0's cache, on every process.

  One small broadcast (chunks done, or process 0's error, and the parts'
  array names / dtypes / shapes), then each cached array as bytes.

  Raises:
    ValueError: process 0's cache holds another evaluation (on every
      process).
  """
  main = jax.process_index() == 0
  done, parts, header = 0, [], None
  if main:
    try:
      done, parts = _load_parts(cache, key) if cache is not None else (0, [])
      header = {'done': done, 'parts': [
          [[k, v.dtype.str, list(v.shape)] for k, v in p.items()]
          for p in parts]}
    except ValueError as e:
      header = {'error': str(e)}
  header = json.loads(_broadcast_bytes(
      json.dumps(header).encode() if main else None))
  if 'error' in header:
    raise ValueError(f'process 0: {header["error"]}')
  out = []
  for i, spec in enumerate(header['parts']):
    part = {}
    for name, dtype, shape in spec:
      raw = _broadcast_bytes(np.ascontiguousarray(parts[i][name]).tobytes()
                             if main else None)
      part[name] = np.frombuffer(raw, np.dtype(dtype)).reshape(shape).copy()
    out.append(part)
  return int(header['done']), out


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def stream_features(sample_chunk: Callable[[int], Any], n: int, chunk: int,
                    dataset: Any, ctx: image_eval.Context,
                    cache: str | None, key: dict[str, Any], *,
                    cache_every: int = 10,
                    on_chunk: Callable[[int], None] | None = None,
                    desc: str = 'eval') -> tuple[dict[str, np.ndarray],
                                                 np.ndarray | None]:
  """Features of n samples drawn as `sample_chunk(i)`, i < ceil(n / chunk).

  Args:
    sample_chunk: i -> chunk i of samples ([chunk, ...], numpy or jax).
    n: samples in all (the last chunk is sliced, never dropped).
    chunk: samples per chunk.
    dataset: the dataset (decode of latents).
    ctx: `image_eval.prepare(dataset, ev)`.
    cache: the cache directory (None: no cache, nothing resumes); used on
      process 0 only (the others get its cached features by broadcast).
    key: `cache_key(...)`, stored and compared on resume.
    cache_every: chunks per part file.
    on_chunk: called with i after chunk i is extracted (tests interrupt
      here).
    desc: the progress bar's label.

  Returns:
    ({'features', 'spatial', 'logits' | 'probs', ['dinov2']: [n, ...]},
    the first chunk's samples or None when it was read from the cache).
  """
  steps = math.ceil(n / chunk)
  main = jax.process_index() == 0
  cache = cache if main else None  # process 0 reads and writes it
  if cache is not None:
    os.makedirs(cache, exist_ok=True)
  if jax.process_count() > 1:
    done, parts = _broadcast_resume(cache, key)
  else:
    done, parts = _load_parts(cache, key) if cache is not None else (0, [])
  if cache is not None and not done:
    _save_key(cache, key)
  first, pending, lo = None, [], done
  for i in tqdm(range(done, steps), desc=desc, initial=done, total=steps,
                unit='chunk', disable=steps - done < 2 or not main):
    x = np.asarray(sharding.to_host(sample_chunk(i)))[:n - i * chunk]
    if i == 0:
      first = x
    images = image_eval.decode_to_images(x, dataset, ctx.ev,
                                         ctx.settings['quantize'])
    pending.append(image_eval.features(images, ctx))
    if on_chunk is not None:
      on_chunk(i)
    if cache is not None and (len(pending) == cache_every or i == steps - 1):
      part = _concat(pending)
      _save_part(cache, lo, i, part)
      parts.append(part)
      pending, lo = [], i + 1
  if pending:
    parts.append(_concat(pending))
  return _concat(parts), first
