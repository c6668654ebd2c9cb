"""DINOv2 ViT-L/14 in JAX: the feature network of FD_DINOv2.

FD_DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation
metrics", dgm-eval; Karras et al. 2024, EDM2 §5) is the Frechet distance
(eq. 1 of Heusel et al. 2017) between Gaussians fitted to DINOv2 features.
The protocol here is EDM2's `calculate_metrics.py` `DINOv2Detector` (modeled
after layer6ai-labs/dgm-eval), resize_mode 'torch':

  uint8 [N, H, W, 3] -> float [0, 255] -> `F.interpolate(size=(224, 224),
  mode='bicubic', antialias=True)` -> / 255 -> (x - mean) / std with the
  ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) ->
  facebookresearch/dinov2 hub `dinov2_vitl14` -> the class token after the
  final LayerNorm (`x_norm_clstoken`; the hub head is Identity) -> 1024-d.

(EDM2's 'pil' mode resizes with PIL in uint8 instead, dgm-eval's original
path; EDM2 calls the torch mode "almost the same results". Only the torch
mode is implemented; the resize is `resize.bicubic_aa_matrix`.)

Architecture (Oquab et al. 2023, DINOv2, §4; `DinoVisionTransformer`): a
pre-norm ViT (Dosovitskiy et al. 2021, eqs. 1-4) with LayerScale (Touvron et
al. 2021, CaiT, §3.1, eq. 4):

  z0 = [cls; patches(x) W_e + b_e] + E_pos
  z' = z + ls1 * MSA(LN1(z));   z_next = z' + ls2 * MLP(LN2(z'))
  out = LN(z_L)[:, 0]

MSA: `num_heads` heads of width 64, one qkv projection with bias,
softmax(q k^T / sqrt(64)) v, output projection; MLP: D -> 4D, exact (erf)
GELU, -> D; every LayerNorm has eps 1e-6. ViT-L/14: D = 1024, 24 blocks,
16 heads, patch 14, pretrained at 518 px (a 37 x 37 grid of learned
position embeddings).

Position embeddings at 224 px (16 x 16 patches) are the 37 x 37 grid
resized bicubically (`POS_INTERP`, in the feature-net name):
  'hub' (default; what torch.hub's `dinov2_vitl14`, hence EDM2 / dgm-eval,
    computes): `F.interpolate(grid, scale_factor=(16.1 / 37,) * 2,
    mode='bicubic', antialias=False)` -- the "+0.1" offset of
    `interpolate_pos_encoding` (`interpolate_offset=0.1`); torch then samples
    with step 1 / scale_factor = 37 / 16.1.
  'transformers': transformers' `Dinov2Embeddings.interpolate_pos_encoding`
    (5.x): `size=(16, 16)`, bicubic, align_corners=False (step 37 / 16).
The two put the samples up to 0.22 grid cells apart: different
feature spaces. Both are `resize.bicubic_matrix` applied once on the host.

Params: a flat dict (`param_shapes`), Linear kernels [in, out]; the patch
embedding is a [14 * 14 * 3, D] matrix over (row, col, channel) of a patch.
Converted from the official checkpoint by `convert_dinov2` (safetensors, no
pickle), stored as a pickle-free `.npz` with the architecture in its meta.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from onestep_bench.evaluators import resize, weights_io

INPUT_SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LN_EPS = 1e-6
HEAD_DIM = 64  # every released DINOv2 (S/B/L/g) uses 64-wide heads
POS_INTERP = ('hub', 'transformers')
POS_OFFSET = 0.1  # the hub's `interpolate_offset`
WEIGHTS_ENV = 'ONESTEP_DINOV2_WEIGHTS'
DEFAULT_WEIGHTS_PATH = os.path.join('~', '.cache', 'onestep_bench',
                                    'dinov2_vitl14.npz')
HF_REPO = 'facebook/dinov2-large'
HF_URL = f'https://huggingface.co/{HF_REPO}/resolve/main/model.safetensors'
# sha256 of the official conversion's .npz (from HF_URL): not computable
# here (no download); until recorded, every file is labelled '/unverified'.
OFFICIAL_NPZ_SHA256: str | None = None
UNVERIFIED = 'unverified'
CPU_BATCH = 4
_HIGHEST = jax.lax.Precision.HIGHEST

Params = Mapping[str, Any]


class Arch(NamedTuple):
  """A DINOv2 ViT: width, blocks, heads, MLP width, patch, pretrained grid."""
  width: int
  depth: int
  num_heads: int
  mlp: int
  patch: int
  grid: int


VITL14 = Arch(width=1024, depth=24, num_heads=16, mlp=4096, patch=14, grid=37)


def arch_name(arch: Arch) -> str:
  """'dinov2_vitl14' for ViT-L/14, else a name spelling the sizes."""
  if arch == VITL14:
    return 'dinov2_vitl14'
  return (f'dinov2_w{arch.width}_d{arch.depth}_h{arch.num_heads}'
          f'_p{arch.patch}_g{arch.grid}')


# ---------------------------------------------------------------------------
# Params.


def param_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
  """Name -> shape of every param (pos_embed at the pretrained grid)."""
  d, p = arch.width, arch.patch
  shapes = {'patch_embed.kernel': (p * p * 3, d), 'patch_embed.bias': (d,),
            'cls_token': (d,), 'pos_embed': (1 + arch.grid ** 2, d),
            'norm.scale': (d,), 'norm.bias': (d,)}
  for i in range(arch.depth):
    b = f'blocks.{i}'
    shapes.update({
        f'{b}.norm1.scale': (d,), f'{b}.norm1.bias': (d,),
        f'{b}.attn.qkv.kernel': (d, 3 * d), f'{b}.attn.qkv.bias': (3 * d,),
        f'{b}.attn.proj.kernel': (d, d), f'{b}.attn.proj.bias': (d,),
        f'{b}.ls1': (d,), f'{b}.norm2.scale': (d,), f'{b}.norm2.bias': (d,),
        f'{b}.mlp.fc1.kernel': (d, arch.mlp), f'{b}.mlp.fc1.bias': (arch.mlp,),
        f'{b}.mlp.fc2.kernel': (arch.mlp, d), f'{b}.mlp.fc2.bias': (d,),
        f'{b}.ls2': (d,)})
  return shapes


def check_params(params: Params, arch: Arch) -> None:
  """ValueError unless `params` has exactly `param_shapes(arch)`."""
  if arch.width % arch.num_heads:
    raise ValueError(f'width {arch.width} is not a multiple of num_heads '
                     f'{arch.num_heads}.')
  weights_io.check_shapes(params, param_shapes(arch), arch_name(arch))


def random_params(arch: Arch, seed: int = 0) -> dict[str, np.ndarray]:
  """Random params with the right shapes and non-trivial scales (tests).

  Linear kernels N(0, 1 / fan_in), biases N(0, 0.1^2), LayerNorm scales
  U(0.5, 1.5), LayerScales U(0.2, 1), cls / pos embeddings N(0, 0.5^2).
  """
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in sorted(param_shapes(arch).items()):
    if name.endswith('kernel'):
      v = rng.standard_normal(shape) / math.sqrt(shape[0])
    elif name.endswith('scale'):
      v = rng.uniform(0.5, 1.5, shape)
    elif name.endswith(('ls1', 'ls2')):
      v = rng.uniform(0.2, 1.0, shape)
    elif name in ('cls_token', 'pos_embed'):
      v = 0.5 * rng.standard_normal(shape)
    else:
      v = 0.1 * rng.standard_normal(shape)
    out[name] = v.astype(np.float32)
  return out


def pos_matrix(grid: int, new_grid: int, mode: str) -> np.ndarray:
  """[new_grid, grid] bicubic weights of the position-embedding resize."""
  if mode not in POS_INTERP:
    raise ValueError(f'Unknown position-embedding interpolation {mode!r}; '
                     f'expected one of {POS_INTERP}.')
  if mode == 'hub':  # F.interpolate(scale_factor=(new + 0.1) / grid)
    return resize.bicubic_matrix(grid, new_grid,
                                 scale_factor=(new_grid + POS_OFFSET) / grid)
  return resize.bicubic_matrix(grid, new_grid)


def interpolate_pos_embed(pos_embed: np.ndarray, new_grid: int,
                          mode: str = 'hub') -> np.ndarray:
  """pos_embed [1 + g^2, D] -> [1 + new_grid^2, D] (the cls row kept).

  The identity when new_grid == g (both references skip the resize then).
  """
  g = resize.check_square(pos_embed.shape[0] - 1, 'pos_embed')
  if new_grid == g:
    return np.asarray(pos_embed, np.float32)
  m = pos_matrix(g, new_grid, mode)
  grid = pos_embed[1:].reshape(g, g, -1)
  out = resize.resize_grid(grid, m, m).reshape(new_grid ** 2, -1)
  return np.concatenate([pos_embed[:1], out]).astype(np.float32)


def prepare_params(params: Params, arch: Arch, input_size: int = INPUT_SIZE,
                   pos_interp: str = 'hub') -> dict[str, np.ndarray]:
  """Params with pos_embed resized to the input's patch grid (host)."""
  if input_size % arch.patch:
    raise ValueError(f'input_size {input_size} is not a multiple of the '
                     f'patch size {arch.patch}.')
  out = {k: np.asarray(v, np.float32) for k, v in params.items()}
  out['pos_embed'] = interpolate_pos_embed(out['pos_embed'],
                                           input_size // arch.patch,
                                           pos_interp)
  return out


# ---------------------------------------------------------------------------
# Preprocessing and forward pass.


def check_images(images: Any) -> None:
  """TypeError unless images is uint8 [N, H, W, 1|3]."""
  dtype = getattr(images, 'dtype', None)
  if dtype is None or np.dtype(dtype) != np.uint8 or images.ndim != 4 or (
      images.shape[-1] not in (1, 3)):
    raise TypeError('DINOv2 inputs must be uint8 images [N, H, W, 1|3], got '
                    f'{dtype} {tuple(getattr(images, "shape", ()))}. Round '
                    'samples to uint8 first, as for FID.')


def preprocess(images: Any, size: int = INPUT_SIZE) -> jax.Array:
  """uint8 [N, H, W, 1|3] -> [N, size, size, 3] normalised float32. Jit-able.

  torch's antialiased bicubic resize of the [0, 255] floats (no clipping),
  then / 255 and the ImageNet mean / std (EDM2 `DINOv2Detector`).
  """
  check_images(images)
  x = jnp.asarray(images).astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.tile(x, (1, 1, 1, 3))
  h, w = x.shape[1], x.shape[2]
  x = resize.resize_nhwc(
      x, resize.bicubic_aa_matrix(h, size) if h != size else None,
      resize.bicubic_aa_matrix(w, size) if w != size else None)
  mean = np.asarray(MEAN, np.float32) * 255.0
  inv_std = 1.0 / (np.asarray(STD, np.float32) * 255.0)
  return (x - mean) * inv_std


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + LN_EPS) * scale + bias


def _dense(x: jax.Array, p: Params, name: str) -> jax.Array:
  return jnp.dot(x, p[f'{name}.kernel'], precision=_HIGHEST) + p[
      f'{name}.bias']


def _block(p: Params, b: str, x: jax.Array, num_heads: int) -> jax.Array:
  """One pre-norm transformer block with LayerScale, x [N, T, D]."""
  n, t, d = x.shape
  h = _layer_norm(x, p[f'{b}.norm1.scale'], p[f'{b}.norm1.bias'])
  qkv = _dense(h, p, f'{b}.attn.qkv').reshape(n, t, 3, num_heads,
                                              d // num_heads)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, T, H, hd]
  logits = jnp.einsum('nqhc,nkhc->nhqk', q, k, precision=_HIGHEST)
  attn = jax.nn.softmax(logits * (d // num_heads) ** -0.5, axis=-1)
  o = jnp.einsum('nhqk,nkhc->nqhc', attn, v, precision=_HIGHEST)
  x = x + p[f'{b}.ls1'] * _dense(o.reshape(n, t, d), p, f'{b}.attn.proj')
  h = _layer_norm(x, p[f'{b}.norm2.scale'], p[f'{b}.norm2.bias'])
  h = jax.nn.gelu(_dense(h, p, f'{b}.mlp.fc1'), approximate=False)
  return x + p[f'{b}.ls2'] * _dense(h, p, f'{b}.mlp.fc2')


def forward(params: Params, x: jax.Array, arch: Arch) -> jax.Array:
  """DINOv2 on preprocessed x [N, S, S, 3] -> CLS after the final LN [N, D].

  `params['pos_embed']` must already hold 1 + (S / patch)^2 rows
  (`prepare_params`). Pure and jit-able (arch is static).
  """
  n, s, _, c = x.shape
  g, pt = s // arch.patch, arch.patch
  tokens = x.reshape(n, g, pt, g, pt, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      n, g * g, pt * pt * c)
  z = _dense(tokens, params, 'patch_embed')
  cls = jnp.broadcast_to(params['cls_token'], (n, 1, arch.width))
  z = jnp.concatenate([cls, z], axis=1) + params['pos_embed']
  for i in range(arch.depth):
    z = _block(params, f'blocks.{i}', z, arch.num_heads)
  return _layer_norm(z[:, 0], params['norm.scale'], params['norm.bias'])


# ---------------------------------------------------------------------------
# Weights files.


def _missing_message(path: str, source: str) -> str:
  default = os.path.expanduser(DEFAULT_WEIGHTS_PATH)
  return (
      f'DINOv2 ViT-L/14 weights not found at {path} (from {source}). To make '
      f'them: on a machine with internet, download {HF_URL} (the '
      f'{HF_REPO} checkpoint, 1.2 GB; e.g. `huggingface-cli download '
      f'{HF_REPO} model.safetensors config.json --local-dir dinov2-large`), '
      'then run `python -m onestep_bench.evaluators.convert_dinov2 --src '
      f'dinov2-large/model.safetensors --dst {default}` and copy the .npz '
      f'to that path or set {WEIGHTS_ENV}=/path/to/dinov2_vitl14.npz.')


def resolve_weights_path(weights_path: str | None = None) -> str:
  """Explicit path -> $ONESTEP_DINOV2_WEIGHTS -> the default cache path.

  Raises:
    FileNotFoundError: no file there; the message names the converter.
  """
  return weights_io.resolve(weights_path, WEIGHTS_ENV, DEFAULT_WEIGHTS_PATH,
                            _missing_message)


def weights_available(weights_path: str | None = None) -> bool:
  """Whether `resolve_weights_path(weights_path)` finds a file."""
  try:
    resolve_weights_path(weights_path)
  except FileNotFoundError:
    return False
  return True


def save_params(params: Params, path: str, arch: Arch,
                meta: Mapping[str, Any] | None = None) -> None:
  """Writes params + {'arch': arch, **meta} to `path` (.npz), atomically."""
  check_params(params, arch)
  weights_io.save_npz(params, path, {**(meta or {}),
                                     'arch': arch._asdict()})


def load_params(path: str) -> tuple[dict[str, np.ndarray], Arch]:
  """(params, arch) of a converted `.npz` (never unpickles)."""
  meta = weights_io.load_meta(path)
  if 'arch' not in meta:
    raise ValueError(f'{path} has no DINOv2 architecture record; re-convert '
                     'it with onestep_bench.evaluators.convert_dinov2.')
  arch = Arch(**meta['arch'])
  params = weights_io.load_npz(path)
  check_params(params, arch)
  return params, arch


class DinoV2Extractor:
  """uint8 images -> DINOv2 CLS features [N, D] float64, in jitted batches.

  Preprocessing and network run under one jit; the last partial batch is
  zero-padded and sliced (no image dropped). `feature_net` is
  '<arch>/<pos_interp>' plus '/unverified' unless the file's sha256 is
  `OFFICIAL_NPZ_SHA256`.
  """

  has_spatial = False

  def __init__(self, weights_path: str | None = None,
               pos_interp: str = 'hub', batch_size: int | None = None):
    if pos_interp not in POS_INTERP:
      raise ValueError(f'pos_interp must be one of {POS_INTERP}, got '
                       f'{pos_interp!r}.')
    self._path = resolve_weights_path(weights_path)
    self._sha256 = weights_io.file_sha256(self._path)
    params, self.arch = load_params(self._path)
    self._pos_interp = pos_interp
    self.batch_size = int(batch_size or (
        CPU_BATCH if jax.default_backend() == 'cpu' else 256))
    self._params = jax.device_put(prepare_params(params, self.arch,
                                                 pos_interp=pos_interp))
    arch = self.arch
    self._fn = jax.jit(lambda p, im: forward(p, preprocess(im), arch))

  @property
  def verified(self) -> bool:
    """Whether the file is the recorded official conversion."""
    return OFFICIAL_NPZ_SHA256 is not None and (
        self._sha256 == OFFICIAL_NPZ_SHA256)

  @property
  def feature_net(self) -> str:
    """The feature-space name recorded in result rows."""
    name = f'{arch_name(self.arch)}/{self._pos_interp}'
    return name if self.verified else f'{name}/{UNVERIFIED}'

  @property
  def weights_sha256(self) -> str:
    """First 16 hex digits of the weights file's sha256."""
    return self._sha256[:16]

  def __call__(self, images: Any) -> dict[str, np.ndarray]:
    """{'features': [N, D] float64} of uint8 images [N, H, W, 1|3]."""
    images = np.asarray(images)
    check_images(images)
    n = len(images)
    feats = np.empty((n, self.arch.width), np.float64)
    bs = max(1, min(self.batch_size, n))
    steps = math.ceil(n / bs)
    pending = None
    for i in tqdm(range(steps), desc='dinov2', unit='batch',
                  disable=steps <= 1):
      batch = images[i * bs:(i + 1) * bs]
      if len(batch) < bs:
        batch = np.concatenate([batch, np.zeros((bs - len(batch),
                                                 *batch.shape[1:]), np.uint8)])
      out = self._fn(self._params, batch)
      if pending is not None:
        j, prev = pending
        feats[j * bs:(j + 1) * bs] = np.asarray(prev)[:min(bs, n - j * bs)]
      pending = (i, out)
    if pending is not None:
      j, prev = pending
      feats[j * bs:(j + 1) * bs] = np.asarray(prev)[:n - j * bs]
    return {'features': feats}
