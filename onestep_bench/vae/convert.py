r"""Converts a diffusers `AutoencoderKL` safetensors file to the project's npz.

  python -m onestep_bench.vae.convert \
      --src=sd-vae-ft-ema/diffusion_pytorch_model.safetensors \
      --out=~/.cache/onestep_bench/vae/sd-vae-ft-ema.npz [--name=sd-vae-ft-ema]
      [--config=sd-vae-ft-ema/config.json]

The source is the `diffusion_pytorch_model.safetensors` of
https://huggingface.co/stabilityai/sd-vae-ft-ema (or `sd-vae-ft-mse`),
fetched on a machine with internet. It is read with `safetensors.numpy`
(no torch, no pickle). The architecture is `--config` (diffusers'
config.json) when given, else the preset `--name` (the SD VAE). Names are
mapped onto `autoencoder_kl`'s param paths:

  <path>.weight   conv [O, I, kh, kw] -> `<path>.kernel` [kh, kw, I, O]
                  linear [O, I]       -> `<path>.kernel` [I, O]
                  GroupNorm [C]       -> `<path>.scale`
  <path>.bias     -> `<path>.bias`
  attention (the 2022 uploads' names, renamed as diffusers does on load):
  query / key / value / proj_attn -> to_q / to_k / to_v / to_out.0; 1×1 conv
  kernels [C, C, 1, 1] there are squeezed to linear.

Every key and shape is checked against the architecture. The output records
the source's sha256 and is deterministic; its own sha256 is printed and
written to `<out>.sha256`. No published hash of the source is pinned here
(none could be checked where this was written), so the source sha256 is
recorded, not verified.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onestep_bench.vae import weights
from onestep_bench.vae.autoencoder_kl import VAEConfig

_LEGACY_ATTN = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v',
                'proj_attn': 'to_out.0'}


def _rename(name: str) -> str:
  """Legacy attention names -> diffusers' current ones."""
  parts = name.split('.')
  if len(parts) >= 3 and parts[-2] in _LEGACY_ATTN and 'attentions' in parts:
    parts[-2:-1] = _LEGACY_ATTN[parts[-2]].split('.')
  return '.'.join(parts)


def _is_linear(name: str) -> bool:
  return any(f'.{p}.' in f'.{name}' for p in ('to_q', 'to_k', 'to_v',
                                             'to_out'))


def convert_state_dict(state_dict: Mapping[str, Any], config: VAEConfig
                       ) -> dict[str, np.ndarray]:
  """A diffusers AutoencoderKL state_dict -> flat params of `config`.

  Args:
    state_dict: name -> array (numpy, or anything `np.asarray` takes).
    config: the architecture.

  Returns:
    flat key -> float32 array in `autoencoder_kl`'s layout.

  Raises:
    weights.WeightsError: keys or shapes differ from `config`.
  """
  flat = {}
  for name, value in state_dict.items():
    name = _rename(name)
    v = np.asarray(value, np.float32)
    path, leaf = name.rsplit('.', 1)
    if leaf == 'weight':
      if _is_linear(name):
        v = v.reshape(v.shape[0], v.shape[1]).T  # [O, I(, 1, 1)] -> [I, O]
        leaf = 'kernel'
      elif v.ndim == 4:
        v, leaf = v.transpose(2, 3, 1, 0), 'kernel'  # OIHW -> HWIO
      elif v.ndim == 1:
        leaf = 'scale'
    flat[f'{path}.{leaf}'] = np.ascontiguousarray(v)
  weights.check_params(flat, config)
  return flat


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy arrays (no torch)."""
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('onestep_bench.vae.convert needs safetensors: pip '
                      'install safetensors') from e
  return load_file(path)


def convert(src: str, out: str, config: VAEConfig) -> str:
  """Converts `src` (.safetensors) to `out` (.npz); returns out's sha256."""
  flat = convert_state_dict(read_safetensors(src), config)
  sha = weights.save(flat, config, out, source=os.path.basename(src),
                     source_sha256=weights.file_sha256(src))
  with open(f'{out}.sha256', 'w') as f:
    f.write(f'{sha}  {os.path.basename(out)}\n')
  return sha


def config_from_args(name: str, config_json: str | None) -> VAEConfig:
  """The architecture: diffusers' config.json if given, else preset `name`."""
  if config_json:
    with open(config_json) as f:
      return VAEConfig.from_diffusers(json.load(f), name)
  return weights.preset(name)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point."""
  parser = argparse.ArgumentParser(
      prog='python -m onestep_bench.vae.convert',
      description=__doc__.split('\n', 1)[0])
  parser.add_argument('--src', required=True,
                      help=f'path to {weights.SOURCE_NAME}')
  parser.add_argument('--out', default=None,
                      help='output .npz (default: <cache>/vae/<name>.npz)')
  parser.add_argument('--name', default='sd-vae-ft-ema',
                      help='label / preset: sd-vae-ft-ema or sd-vae-ft-mse')
  parser.add_argument('--config', default=None,
                      help="diffusers config.json (default: the preset's)")
  args = parser.parse_args(argv)
  src = os.path.expanduser(args.src)
  if not os.path.isfile(src):
    print(f'error: --src={args.src}: no such file. Download '
          f'{weights.SOURCE_NAME} first.', file=sys.stderr)
    return 2
  try:
    config = config_from_args(args.name, args.config)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  out = os.path.abspath(os.path.expanduser(
      args.out or weights.default_path(args.name)))
  sha = convert(src, out, config)
  print(f'wrote {out} (sha256 {sha}); load it with '
        f'onestep_bench.vae.load_decoder({out!r}) or set '
        f'{weights.WEIGHTS_ENV}.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
