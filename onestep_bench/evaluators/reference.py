"""ADM reference batches as the reference of an image eval.

`config.evals.<name>.reference = 'adm:/path/VIRTUAL_imagenet256_labeled.npz'`
scores against a reference batch of the ADM evaluator (Dhariwal & Nichol
2021, App. B; openai/guided-diffusion `evaluations/evaluator.py`) instead of
statistics computed from the dataset's own split (`''` / 'dataset', the
default). The file holds

  arr_0          reference images, uint8 [N, H, W, 3] (ImageNet-256: 10k)
  mu, sigma      pool3 (2048) Gaussian of the ADM evaluator's Inception
  mu_s, sigma_s  its spatial (mixed_6/conv, 7 x 17 x 17 = 2023) Gaussian

and is read with `np.load(allow_pickle=False)`. FID uses its (mu, sigma) and
sFID its (mu_s, sigma_s) as they are (the published numbers' reference);
precision / recall and KID use this project's features of `arr_0` (ADM's
`ManifoldEstimator` also runs on the reference images' features), computed
once and cached under a key of (file sha256, feature net, weights hash).
A feature net other than the FID Inception (FD_DINOv2) gets its Gaussian
from its own features of `arr_0`.

Rows name the file: `ref_stats` = '<file name>@<first 12 hex of its
sha256>', so rows against different reference batches (or against the
dataset's own statistics, a 12-hex digest) are never ranked together.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from onestep_bench.config_check import ConfigError
from onestep_bench.evaluators import image_metrics, weights_io
from onestep_bench.evaluators.classifier import cache_dir
from onestep_bench.evaluators.dataset_reference import MAX_REF_FEATURES

ADM_PREFIX = 'adm:'
DATASET = ('', 'dataset')  # values meaning "compute from the dataset"
ADM_KEYS = ('arr_0', 'mu', 'sigma')  # required; mu_s / sigma_s optional
SPATIAL_KEYS = ('mu_s', 'sigma_s')

_SHA: dict[tuple[str, float, int], str] = {}


def adm_path(ev: ml_collections.ConfigDict, name: str = '<name>'
             ) -> str | None:
  """The ADM reference file of `ev.reference`, None for the dataset's own.

  Checks the value and the file (present, the ADM keys, uint8 NHWC RGB
  images) without reading the arrays.

  Raises:
    ConfigError: an unknown form, a missing file or a file that is not an
      ADM reference batch (names the key, the value and the fix).
  """
  value = ev.get('reference', '')
  key = f'evals.{name}.reference'
  fix = (f"--config.{key}='adm:/path/VIRTUAL_imagenet256_labeled.npz' (the "
         'ADM evaluator reference batch, openai/guided-diffusion '
         "evaluations/README.md), or '' for the dataset's own statistics")
  if value is None or value in DATASET:
    return None
  if not isinstance(value, str) or not value.startswith(ADM_PREFIX):
    raise ConfigError(key, value, "must be '' / 'dataset' or "
                      "'adm:<path to an ADM reference .npz>'", fix)
  path = os.path.abspath(os.path.expanduser(value[len(ADM_PREFIX):]))
  if not os.path.isfile(path):
    raise ConfigError(key, value, f'the file {path} does not exist',
                      'download the reference batch on a machine with '
                      'internet (e.g. https://openaipublic.blob.core.windows'
                      '.net/diffusion/jul-2021/ref_batches/imagenet/256/'
                      'VIRTUAL_imagenet256_labeled.npz) and copy it there, '
                      f'or set {fix}')
  try:
    with np.load(path, allow_pickle=False) as z:
      files = set(z.files)
  except (OSError, ValueError) as e:
    raise ConfigError(key, value, f'{path} is not a readable .npz ({e})',
                      fix) from None
  missing = [k for k in ADM_KEYS if k not in files]
  if missing:
    raise ConfigError(key, value, f'{path} lacks the keys {missing} of an '
                      f'ADM reference batch (has {sorted(files)})', fix)
  return path


def file_sha256(path: str) -> str:
  """The file's full sha256 (memoised per path, mtime and size)."""
  st = os.stat(path)
  key = (path, st.st_mtime, st.st_size)
  if key not in _SHA:
    _SHA[key] = weights_io.file_sha256(path)
  return _SHA[key]


def ref_stats_id(path: str) -> str:
  """'<file name>@<12 hex of sha256>': the row's `ref_stats`."""
  return f'{os.path.basename(path)}@{file_sha256(path)[:12]}'


def _images(z: Any, path: str) -> np.ndarray:
  images = z['arr_0']
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'{path}: arr_0 must be uint8 [N, H, W, 3] reference '
                     f'images, got {images.dtype} {images.shape}.')
  return images


def _check_dims(path: str, mu: np.ndarray, feats: np.ndarray,
                feature_net: str) -> None:
  if mu.shape != (feats.shape[1],):
    raise ValueError(
        f'{path}: its mu has shape {mu.shape} but {feature_net} gives '
        f'{feats.shape[1]} features; an ADM reference batch is for the FID '
        "Inception (feature_net='inception_v3').")


def adm_reference(path: str, extractor: Any, feature_net: str, *,
                  file_stats: bool = True) -> dict[str, Any]:
  """Reference statistics of an ADM batch, as `image_eval.reference_stats`.

  Args:
    path: the checked file (`adm_path`).
    extractor: the feature net (uint8 images -> {'features', ...}).
    feature_net: its recorded name.
    file_stats: use the file's mu / sigma (and mu_s / sigma_s with a
      spatial extractor); False (DINOv2): the Gaussian of the extractor's
      own features of all of arr_0.

  Returns:
    {'mu', 'sigma', 'features' (<= 10k, float32), ['mu_s', 'sigma_s'],
    'key', 'path' (feature cache), 'ref_stats'}.
  """
  sha = file_sha256(path)
  key = {'source': 'adm', 'file': os.path.basename(path),
         'file_sha256': sha[:16], 'feature_net': feature_net,
         'weights_sha256': extractor.weights_sha256,
         'file_stats': bool(file_stats)}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
  cache = os.path.join(cache_dir(), 'ref_stats', f'adm_{digest[:24]}.npz')
  out: dict[str, Any] = {'key': key, 'path': cache,
                         'ref_stats': ref_stats_id(path)}
  with np.load(path, allow_pickle=False) as z:
    if file_stats:
      out['mu'] = np.asarray(z['mu'], np.float64)
      out['sigma'] = np.asarray(z['sigma'], np.float64)
      if getattr(extractor, 'has_spatial', False) and all(
          k in z.files for k in SPATIAL_KEYS):
        out['mu_s'] = np.asarray(z['mu_s'], np.float64)
        out['sigma_s'] = np.asarray(z['sigma_s'], np.float64)
    if os.path.exists(cache):
      with np.load(cache, allow_pickle=False) as c:
        stored = json.loads(c['key'].tobytes().decode())
        if stored != key:
          raise ValueError(f'Reference cache {cache} holds {stored}, not '
                           f'{key}; delete it.')
        cached = {k: c[k] for k in c.files if k != 'key'}
      out.update({k: v for k, v in cached.items() if k not in out})
      key['n'] = int(cached['n'])
      return out
    images = _images(z, path)
  n = len(images)
  logging.info('Features of the ADM reference batch %s (%d images)', path, n)
  keep = np.sort(np.random.RandomState(0).permutation(n)[:MAX_REF_FEATURES])
  arrays: dict[str, np.ndarray] = {'n': np.int64(n)}
  if file_stats:
    feats = extractor(images[keep])['features']
  else:
    feats_all = extractor(images)['features']
    arrays['mu'], arrays['sigma'] = image_metrics.gaussian_stats(feats_all)
    feats = feats_all[keep]
  arrays['features'] = np.asarray(feats, np.float32)
  _check_dims(path, out.get('mu', arrays.get('mu')), arrays['features'],
              feature_net)
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  tmp = cache + '.tmp.npz'
  np.savez(tmp, **arrays, key=np.frombuffer(
      json.dumps(key, sort_keys=True).encode(), np.uint8))
  os.replace(tmp, cache)
  out.update({k: v for k, v in arrays.items() if k not in out})
  key['n'] = n
  return out


def write_adm_batch(path: str, images: np.ndarray, extractor: Any) -> None:
  """Writes an ADM-format reference batch of `images` (tests, mock runs).

  mu / sigma (and mu_s / sigma_s for a spatial extractor) are the Gaussian
  of `extractor`'s features, as ADM's evaluator computes its batches.
  """
  out = extractor(np.asarray(images, np.uint8))
  arrays = {'arr_0': np.asarray(images, np.uint8)}
  arrays['mu'], arrays['sigma'] = image_metrics.gaussian_stats(
      out['features'])
  if 'spatial' in out:
    arrays['mu_s'], arrays['sigma_s'] = image_metrics.gaussian_stats(
        out['spatial'])
  np.savez(path, **arrays)
