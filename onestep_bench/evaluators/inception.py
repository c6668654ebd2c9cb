"""The FID Inception: weights files, provenance and the batched extractor.

The network itself (a JAX port of pytorch-fid's FID Inception, its
preprocessing and its outputs pool3 / logits / spatial) is
`inception_net`, re-exported here: `inception.apply`, `inception.forward`,
`inception.preprocess`, `inception.param_shapes`, ... `InceptionExtractor`
runs preprocessing + network under one jit on uint8 images.

Weights: convert pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` with
`python -m onestep_bench.evaluators.convert_inception` (see
`resolve_weights_path`). Files are plain `.npz`, loaded without pickle
(`weights_io`).

Provenance (recorded in every result row through the feature-net name):
  source   the converter checks the full sha256 of the .pth,
           `TORCH_WEIGHTS_SHA256` = 6726825d0af5f729cebd5821db510b11
           b1cfad8faad88a03f1befd49fb9129b2 (95,628,359 bytes; the hash
           independent projects pin for that release URL; its first 8 hex
           digits are the file name's torch-hub suffix).
  output   the converted `.npz` stores `__meta__` (JSON): `verified` (the
           source matched that hash), `source_sha256`. The output is
           deterministic (keys sorted; numpy's `savez` writes fixed zip
           timestamps), so the official conversion has one sha256,
           `OFFICIAL_NPZ_SHA256`. It cannot be computed without the real
           weights (not downloadable here): it is None until recorded from
           the first official conversion (`convert_inception` prints it);
           once set, a file claiming `verified` with another hash is refused.
  label    a file converted with `--allow_unverified`, or an older file
           without `__meta__`, is labelled `inception_v3/<preprocess>/
           unverified` (`feature_net_name`), never like the official one.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from onestep_bench.evaluators import weights_io
from onestep_bench.evaluators.inception_net import (  # noqa: F401 (API)
  BN_EPS,
  CONV_SPECS,
  FEATURE_DIM,
  FUSED_1X1,
  INPUT_SIZE,
  MODES,
  NUM_CLASSES,
  SPATIAL_CHANNELS,
  SPATIAL_DIM,
  SPATIAL_LAYER,
  ConvSpec,
  Params,
  _check_images,
  _check_mode,
  apply,
  check_params,
  fold_batchnorm,
  forward,
  param_shapes,
  prepare_params,
  preprocess,
  random_params,
  resize_matrix,
  to_jax_layout,
)

NAME = 'inception_v3'
WEIGHTS_ENV = 'ONESTEP_INCEPTION_WEIGHTS'
DEFAULT_WEIGHTS_PATH = os.path.join('~', '.cache', 'onestep_bench',
                                    'inception_v3_fid.npz')
TORCH_WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
TORCH_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/'
                     f'download/fid_weights/{TORCH_WEIGHTS_NAME}')
# torch-hub convention: the name's hash suffix is a sha256 prefix of the file.
TORCH_WEIGHTS_SHA256_PREFIX = '6726825d'
TORCH_WEIGHTS_SHA256 = ('6726825d0af5f729cebd5821db510b11'
                        'b1cfad8faad88a03f1befd49fb9129b2')
# sha256 of the official conversion's .npz: record it here from the first
# conversion of the verified source (see the module docstring).
OFFICIAL_NPZ_SHA256: str | None = None
META_KEY = weights_io.META_KEY  # JSON provenance record inside a .npz
UNVERIFIED = 'unverified'  # feature-net name suffix for unverified weights
CPU_BATCH = 4  # images per jitted call on XLA:CPU (`default_batch_size`)


# ---------------------------------------------------------------------------
# Weights files.


def _missing_message(path: str, source: str) -> str:
  default = os.path.expanduser(DEFAULT_WEIGHTS_PATH)
  return (
      f'FID Inception weights not found at {path} (from {source}). To make '
      f'them: on a machine with internet, download {TORCH_WEIGHTS_URL} , '
      'then run `python -m onestep_bench.evaluators.convert_inception '
      f'--src {TORCH_WEIGHTS_NAME} --dst {default}` (needs `pip install '
      "-e '.[parity]'` for torch), and copy the .npz to that path or set "
      f'{WEIGHTS_ENV}=/path/to/inception_v3_fid.npz.')


def resolve_weights_path(weights_path: str | None = None) -> str:
  """Explicit path -> $ONESTEP_INCEPTION_WEIGHTS -> the default cache path.

  Raises:
    FileNotFoundError: the resolved file does not exist; the message says how
      to make it.
  """
  return weights_io.resolve(weights_path, WEIGHTS_ENV, DEFAULT_WEIGHTS_PATH,
                            _missing_message)


file_sha256 = weights_io.file_sha256
load_meta = weights_io.load_meta


def load_params(path: str) -> dict[str, np.ndarray]:
  """Unfolded float32 params from a converted `.npz` (never unpickles)."""
  params = weights_io.load_npz(path)
  check_params(params)
  return params


def weights_verified(path: str) -> bool:
  """Whether the file at `path` was converted from the verified source.

  False for `--allow_unverified` conversions and for files without a
  provenance record (written before it existed: re-convert them).

  Raises:
    ValueError: the file claims `verified` but its sha256 differs from
      `OFFICIAL_NPZ_SHA256` (when that is recorded).
  """
  verified = bool(load_meta(path).get('verified', False))
  if verified and OFFICIAL_NPZ_SHA256 is not None:
    sha = file_sha256(path)
    if sha != OFFICIAL_NPZ_SHA256:
      raise ValueError(
          f'{path} claims to be the verified FID Inception conversion, but '
          f'its sha256 {sha} is not the official {OFFICIAL_NPZ_SHA256}. '
          'Re-run convert_inception on the verified source.')
  return verified


def save_params(params: Params, path: str, *, verified: bool = False,
                source_sha256: str | None = None) -> None:
  """Writes unfolded params + provenance to `path` (.npz), atomically.

  Keys are written sorted, so the same params give the same bytes.

  Args:
    params: unfolded params (`param_shapes()`).
    path: output file.
    verified: the params come from the source with `TORCH_WEIGHTS_SHA256`.
    source_sha256: sha256 of the source file, recorded as given.
  """
  check_params(params)
  weights_io.save_npz(params, path, {'verified': bool(verified),
                                     'source_sha256': source_sha256})


# ---------------------------------------------------------------------------
# Extractor.


def default_batch_size() -> int:
  """Images per jitted call: `CPU_BATCH` on a CPU backend, else 200.

  XLA:CPU is ~25% slower per image at batch 32 than at 2-8 (the stem's
  activations, 5.5 MB per image, fall out of cache; measured, see
  docs/evaluation.md §1); accelerators want large batches.
  """
  return CPU_BATCH if jax.default_backend() == 'cpu' else 200


class InceptionExtractor:
  """uint8 images -> FID / sFID features and IS logits, in jitted batches.

  `extractor(images)` with images [N, H, W, 1|3] uint8 returns
  `{'features': [N, 2048] float64, 'logits': [N, 1008] float64,
  'spatial': [N, 2023] float32}` (spatial: `forward`'s sFID features).
  Batches hold `min(batch_size, N)` images; the last partial batch is
  zero-padded to a full one and the padding sliced off (no image is
  dropped). One jit does preprocessing and network (uint8 in).
  """

  has_spatial = True  # `image_eval` scores sFID from 'spatial'

  def __init__(self, weights_path: str | None = None, mode: str = 'legacy_tf',
               batch_size: int | None = None):
    _check_mode(mode)
    if batch_size is not None and batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
    self._path = resolve_weights_path(weights_path)
    self._sha256 = file_sha256(self._path)
    self._verified = weights_verified(self._path)
    self._mode = mode
    self.batch_size = int(batch_size or default_batch_size())
    self._params = jax.device_put(prepare_params(load_params(self._path)))

    def fn(p, im):
      out = forward(p, preprocess(im, mode))
      return out['pool3'], out['logits'], out['spatial']
    self._fn = jax.jit(fn)

  @property
  def name(self) -> str:
    """Feature network name (a CSV column)."""
    return NAME

  @property
  def verified(self) -> bool:
    """Whether the weights were converted from the verified source."""
    return self._verified

  @property
  def feature_net(self) -> str:
    """`inception_v3/<mode>`, plus `/unverified` for unverified weights."""
    name = f'{NAME}/{self._mode}'
    return name if self._verified else f'{name}/{UNVERIFIED}'

  @property
  def mode(self) -> str:
    """Preprocessing mode, 'legacy_tf' or 'pytorch_fid'."""
    return self._mode

  @property
  def weights_path(self) -> str:
    """Resolved path of the weights file."""
    return self._path

  @property
  def weights_sha256(self) -> str:
    """First 16 hex digits of the weights file's sha256."""
    return self._sha256[:16]

  def __call__(self, images: Any) -> dict[str, np.ndarray]:
    """Features [N, 2048], bias-free logits [N, 1008], spatial [N, 2023]."""
    _check_images(images)
    images = np.asarray(images)
    n = images.shape[0]
    if n == 0:
      return {'features': np.zeros((0, FEATURE_DIM)),
              'logits': np.zeros((0, NUM_CLASSES)),
              'spatial': np.zeros((0, SPATIAL_DIM), np.float32)}
    bs = min(self.batch_size, n)
    num_batches = math.ceil(n / bs)
    out: dict[str, np.ndarray] = {}

    def collect(i: int, res: tuple[jax.Array, ...]) -> None:
      lo, hi = i * bs, min((i + 1) * bs, n)
      for k, v, dt in zip(('features', 'logits', 'spatial'),
                          jax.device_get(res),
                          (np.float64, np.float64, np.float32), strict=True):
        if k not in out:
          out[k] = np.empty((n, v.shape[1]), dt)
        out[k][lo:hi] = v[:hi - lo]

    pending = None
    for i in tqdm(range(num_batches), desc=f'{NAME} ({self._mode})',
                  unit='batch', disable=num_batches <= 1):
      batch = images[i * bs:(i + 1) * bs]
      if batch.shape[0] < bs:
        pad = np.zeros((bs - batch.shape[0], *batch.shape[1:]), np.uint8)
        batch = np.concatenate([batch, pad])
      res = self._fn(self._params, batch)  # async dispatch
      if pending is not None:
        collect(*pending)
      pending = (i, res)
    collect(*pending)
    return out

