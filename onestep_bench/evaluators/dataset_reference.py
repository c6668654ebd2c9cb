"""Reference statistics from the dataset's own split, and the FID floor.

The default reference of an image eval (`reference=''`): mu, sigma (and the
sFID mu_s, sigma_s) of `n` real images of `ref_split` through the eval's
feature net, cached under a key of (dataset, split, content hash of the
split, feature net, its weights hash, n; latent data: the VAE's
`row_fields()`), and the FID floor of held-out images against them
(docs/evaluation.md). ADM reference batches are `reference.py`.

The tuning procedure's reference (`validation_reference_stats`): the same
statistics of a development dataset's held-out split (`data.holdout`,
`images.HOLDOUT_SPLIT`), carved from train, never the test split.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
from absl import logging

from onestep_bench.data.images import ImageArrays
from onestep_bench.evaluators import decode, image_metrics
from onestep_bench.evaluators.classifier import cache_dir

MAX_REF_FEATURES = 10_000  # real features kept for P/R and KID (ADM: 10k)


def _real_images(dataset: ImageArrays, split: str, idx: Any,
                 decoder: Any) -> np.ndarray:
  """uint8 images `idx` of `split` (latents decoded by `decoder`)."""
  images = dataset.split_images(split)[0][idx]
  if dataset.spec.kind == 'latent':
    return decode.decode_stored(images, decoder)
  return images


def reference_stats(dataset: ImageArrays, extractor: Any, feature_net: str,
                    split: str, n: int | None, *,
                    decoder: Any = None) -> dict[str, Any]:
  """mu, sigma (float64) and <= 10k features of `n` images of `split`.

  With an extractor that has spatial outputs (`has_spatial`, the Inception)
  the entry also holds mu_s, sigma_s of its 'spatial' features (sFID); an
  older entry without them is recomputed. Latent data: the split's latents
  are decoded by `decoder` first, and the key holds its `row_fields()`.
  """
  spatial = bool(getattr(extractor, 'has_spatial', False))
  images, _ = dataset.split_images(split)
  n = len(images) if not n else min(int(n), len(images))
  content = hashlib.sha256(np.ascontiguousarray(images[:n]).tobytes())
  key = {'dataset': dataset.spec.name, 'split': split, 'n': n,
         'content_sha256': content.hexdigest()[:16],
         'feature_net': feature_net,
         'weights_sha256': extractor.weights_sha256}
  if dataset.spec.kind == 'latent':
    key.update(decoder.row_fields())
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
  path = os.path.join(cache_dir(), 'ref_stats', f'{digest[:24]}.npz')
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as z:
      stored = json.loads(z['key'].tobytes().decode())
      if stored != key:
        raise ValueError(f'Reference cache {path} holds {stored}, not {key}; '
                         'delete it.')
      if not spatial or 'mu_s' in z.files:
        return {**{k: z[k] for k in z.files if k != 'key'}, 'key': key,
                'path': path}
  logging.info('Computing reference statistics %s', key)
  out = extractor(_real_images(dataset, split, slice(0, n), decoder))
  feats = out['features']
  mu, sigma = image_metrics.gaussian_stats(feats)
  keep = np.random.RandomState(0).permutation(n)[:MAX_REF_FEATURES]
  arrays = {'mu': mu, 'sigma': sigma,
            'features': feats[np.sort(keep)].astype(np.float32)}
  if spatial:
    arrays['mu_s'], arrays['sigma_s'] = image_metrics.gaussian_stats(
        out['spatial'])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, **arrays,
           key=np.frombuffer(json.dumps(key, sort_keys=True).encode(),
                             np.uint8))
  os.replace(tmp, path)
  return {**arrays, 'key': key, 'path': path}


_FLOORS: dict[tuple[str, ...], float] = {}


def fid_floor(dataset: ImageArrays, extractor: Any, ref: dict[str, Any],
              n: int, seed: int, decoder: Any = None) -> float | None:
  """FID of `n` real held-out images against the reference (the floor).

  What a perfect generator would score at this sample count: `n` images of
  the held-out split, drawn with replacement when the split is smaller. The
  duplicates make it an over-estimate that grows with n / split size (digits:
  360 test images for 10k samples, so a generator can score below it; the
  analysis lists such rows). None without a held-out split
  and for an ADM reference batch (not drawn from this dataset's splits).
  """
  if 'split' not in ref['key']:
    return None
  held = [s for s in ('test', 'validation') if s in dataset.splits
          and s != ref['key']['split']]
  if not held:
    return None
  key = (json.dumps(ref['key'], sort_keys=True), held[0], str(n), str(seed))
  if key not in _FLOORS:
    size = len(dataset.split_images(held[0])[0])
    idx = np.random.RandomState(seed).choice(size, n, replace=n > size)
    mu, sigma = image_metrics.gaussian_stats(extractor(
        _real_images(dataset, held[0], idx, decoder))['features'])
    _FLOORS[key] = image_metrics.frechet_distance(mu, sigma, ref['mu'],
                                                  ref['sigma'])
  return _FLOORS[key]


def validation_reference_stats(dataset: ImageArrays, extractor: Any,
                               feature_net: str, *,
                               decoder: Any = None) -> dict[str, Any]:
  """`reference_stats` of the held-out split of a development dataset.

  The validation reference of image tuning (onestep_bench/tuning.py): all
  images of the split `data.holdout` carved from train, keyed (and cached)
  like any reference, with split 'validation' and that split's content
  hash, so it can never be mistaken for (or reuse) the board's statistics.

  Raises:
    ValueError: the dataset was built without `data.holdout` (its
      'validation' split, if any, is the source's own, not carved from
      train), or it still holds a test split.
  """
  from onestep_bench.data.images import HOLDOUT_SPLIT  # pylint: disable=g-import-not-at-top
  info = getattr(dataset, 'holdout', None)
  if not info or info.get('split') != HOLDOUT_SPLIT:
    raise ValueError(f'{dataset.spec.name}: no held-out split carved from '
                     'train; build the data with config.data.holdout > 0 '
                     '(experiments/tuning.py declares the fraction and seed).')
  if 'test' in dataset.splits:
    raise ValueError(f'{dataset.spec.name}: a development dataset must not '
                     'hold the test split (data.carve_holdout drops it).')
  return reference_stats(dataset, extractor, feature_net, HOLDOUT_SPLIT,
                         None, decoder=decoder)
