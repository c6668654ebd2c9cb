"""The converted VAE weights file: path resolution, save, load, provenance.

A weights file is a plain `.npz` (no pickle) of float32 arrays keyed by the
param path joined with dots (`encoder.down_blocks.0.resnets.0.conv1.kernel`,
conv kernels HWIO, linear kernels [in, out]; see `autoencoder_kl`), plus
`__meta__`: JSON bytes {'config': `VAEConfig.to_dict()`, 'source':
basename of the converted file, 'source_sha256': its sha256, 'format':
FORMAT}. Keys are written sorted and numpy's `savez` uses fixed zip
timestamps, so a conversion is deterministic: the same safetensors always
give the same `.npz` bytes, and its sha256 (`file_sha256`) identifies the
weights in result rows and latent sidecars. `convert.py` also writes it to
`<file>.sha256` (sha256sum format).

Lookup (`resolve_path`): an explicit path, else $ONESTEP_VAE_WEIGHTS, else
`<cache_dir>/vae/<config.name>.npz` (cache_dir: $ONESTEP_CACHE or
~/.cache/onestep_bench). A missing file raises `WeightsNotFoundError` with
the one command that makes it.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from onestep_bench.evaluators import weights_io
from onestep_bench.vae.autoencoder_kl import PRESETS, VAEConfig, build

FORMAT = 'onestep_bench.vae/v1'
META_KEY = '__meta__'
WEIGHTS_ENV = 'ONESTEP_VAE_WEIGHTS'
HF_REPOS = {'sd-vae-ft-ema': 'stabilityai/sd-vae-ft-ema',
            'sd-vae-ft-mse': 'stabilityai/sd-vae-ft-mse'}
SOURCE_NAME = 'diffusion_pytorch_model.safetensors'


class WeightsNotFoundError(FileNotFoundError):
  """The converted weights file is absent; the message names the fix."""


class WeightsError(ValueError):
  """A weights file does not match the architecture it is loaded for."""


def cache_dir() -> str:
  """$ONESTEP_CACHE or ~/.cache/onestep_bench (as the evaluators)."""
  return os.environ.get('ONESTEP_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'onestep_bench')


def default_path(name: str) -> str:
  """`<cache_dir>/vae/<name>.npz`."""
  return os.path.join(cache_dir(), 'vae', f'{name}.npz')


def convert_command(name: str, out: str) -> str:
  """The shell command that makes the weights file `out` for `name`."""
  repo = HF_REPOS.get(name, '<diffusers AutoencoderKL repo>')
  return (f'python -m onestep_bench.vae.convert --src=<dir of {repo}>/'
          f'{SOURCE_NAME} --out={out} --name={name}')


def resolve_path(path: str | None, name: str) -> str:
  """The weights file: path, else $ONESTEP_VAE_WEIGHTS, else the default.

  Raises:
    WeightsNotFoundError: the resolved file is missing (message: the file
      and the conversion command).
  """
  source = 'the path given'
  if not path:
    path, source = os.environ.get(WEIGHTS_ENV), f'${WEIGHTS_ENV}'
  if not path:
    path, source = default_path(name), 'the default path'
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    repo = HF_REPOS.get(name)
    where = (f'https://huggingface.co/{repo}/blob/main/{SOURCE_NAME}' if repo
             else f'the {SOURCE_NAME} of your AutoencoderKL')
    raise WeightsNotFoundError(
        f'VAE weights {path} (from {source}) not found. Make them once: '
        f'download {where} on a machine with internet, then run '
        f'`{convert_command(name, path)}` (or point {WEIGHTS_ENV} at a '
        'converted .npz).')
  return path


file_sha256 = weights_io.file_sha256


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Nested params -> {'a.b.c': leaf}."""
  out = {}
  for k, v in tree.items():
    key = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten`."""
  out: dict[str, Any] = {}
  for key, v in flat.items():
    node = out
    *parents, leaf = key.split('.')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


@functools.lru_cache(maxsize=16)
def _param_shapes(config: VAEConfig) -> tuple[tuple[str, tuple[int, ...]]]:
  return tuple((k, tuple(v.shape))
               for k, v in flatten(build(config).abstract()).items())


def param_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
  """Flat key -> shape of every param of `config` (nothing allocated)."""
  return dict(_param_shapes(config))


def check_params(flat: Mapping[str, Any], config: VAEConfig) -> None:
  """WeightsError unless `flat` has exactly the params of `config`."""
  try:
    weights_io.check_shapes(flat, param_shapes(config),
                            f'VAE (config {config.name!r})')
  except ValueError as e:
    raise WeightsError(str(e)) from None


def save(flat: Mapping[str, Any], config: VAEConfig, path: str, *,
         source: str | None = None,
         source_sha256: str | None = None) -> str:
  """Writes params + provenance to `path` atomically; returns its sha256."""
  check_params(flat, config)
  arrays = {k: np.asarray(flat[k], np.float32) for k in sorted(flat)}
  meta = {'format': FORMAT, 'config': config.to_dict(), 'source': source,
          'source_sha256': source_sha256}
  arrays[META_KEY] = np.frombuffer(
      json.dumps(meta, sort_keys=True).encode(), np.uint8)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)
  return file_sha256(path)


def load_meta(path: str) -> dict[str, Any]:
  """The `__meta__` record of a weights file."""
  with np.load(path, allow_pickle=False) as f:
    if META_KEY not in f.files:
      raise WeightsError(f'{path} has no {META_KEY}: not a file written by '
                         'onestep_bench.vae.convert; convert it again.')
    return json.loads(f[META_KEY].tobytes().decode())


def load(path: str, config: VAEConfig | None = None
         ) -> tuple[dict[str, Any], VAEConfig]:
  """(nested float32 params, config) from a weights file (never unpickles).

  Args:
    path: a converted `.npz`.
    config: the expected architecture; None takes the file's own. Only the
      architecture must agree (`name` may differ).

  Raises:
    WeightsError: the file's architecture or tensors differ from `config`.
  """
  meta = load_meta(path)
  stored = VAEConfig.from_dict(meta['config'])
  if config is not None:
    a = {**config.to_dict(), 'name': None}
    b = {**stored.to_dict(), 'name': None}
    if a != b:
      diff = sorted(k for k in a if a[k] != b[k])
      raise WeightsError(
          f'{path} holds a VAE with {[f"{k}={b[k]}" for k in diff]}, but '
          f'the config asks for {[f"{k}={a[k]}" for k in diff]}. Use the '
          "file's own config (config=None) or convert the right weights.")
  else:
    config = stored
  with np.load(path, allow_pickle=False) as f:
    flat = {k: np.asarray(f[k], np.float32) for k in f.files
            if k != META_KEY}
  check_params(flat, config)
  return unflatten(flat), config


def random_params(config: VAEConfig, seed: int = 0) -> dict[str, Any]:
  """Random nested float32 numpy params of `config` (tests).

  Kernels ~ N(0, 1 / fan_in), GroupNorm scales ~ 1 + N(0, 0.1²), biases ~
  N(0, 0.1²): drawn on the host in sorted key order, so the same seed gives
  the same params everywhere.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in sorted(param_shapes(config).items()):
    if key.endswith('.kernel'):
      v = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif key.endswith('.scale'):
      v = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      v = 0.1 * rng.standard_normal(shape)
    flat[key] = v.astype(np.float32)
  return unflatten(flat)


def preset(name: str) -> VAEConfig:
  """The published config called `name` (ValueError listing the presets)."""
  if name not in PRESETS:
    raise ValueError(f'unknown VAE preset {name!r}; presets: '
                     f'{sorted(PRESETS)} (or pass a VAEConfig).')
  return PRESETS[name]
