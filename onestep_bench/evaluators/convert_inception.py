r"""Converts pytorch-fid's Inception checkpoint to a pickle-free `.npz`.

  python -m onestep_bench.evaluators.convert_inception \
      --src pt_inception-2015-12-05-6726825d.pth \
      --dst ~/.cache/onestep_bench/inception_v3_fid.npz

The source is
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
(fetch it on a machine with internet). Its sha256 must equal
`inception.TORCH_WEIGHTS_SHA256` (6726825d0af5f729cebd5821db510b11b1cfad8f
aad88a03f1befd49fb9129b2, 95,628,359 bytes) unless `--allow_unverified` is
given (tests convert random weights): such a file records `verified: false`
and its rows are labelled `inception_v3/<preprocess>/unverified`. The output
is deterministic; the sha256 of the official one is printed and belongs in
`inception.OFFICIAL_NPZ_SHA256` (not yet recorded: the real weights cannot
be downloaded where this was written). The state_dict is read with
`torch.load(weights_only=True)` (no arbitrary unpickling); torch is needed
only here (`pip install -e '.[parity]'`). Names are kept; conv weights go
OIHW -> HWIO and `fc.weight` [1008, 2048] -> [2048, 1008]; the key set and
shapes are checked against `inception.param_shapes()`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onestep_bench.evaluators import inception


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """pytorch-fid Inception3 state_dict -> params in `inception`'s layout.

  Args:
    state_dict: name -> torch tensor (or array) as saved by pytorch-fid:
      `Conv2d_1a_3x3.conv.weight` [32, 3, 3, 3], `...bn.running_var`,
      `fc.weight` [1008, 2048], ... `*.num_batches_tracked` are dropped.

  Returns:
    name -> float32 array with `inception.param_shapes()`.

  Raises:
    ValueError: keys or shapes differ from the FID Inception.
  """
  params = {}
  for name, value in state_dict.items():
    if name.endswith('num_batches_tracked'):
      continue
    if hasattr(value, 'detach'):  # torch.Tensor
      value = value.detach().cpu().float().numpy()
    params[name] = inception.to_jax_layout(name,
                                           np.asarray(value, np.float32))
  inception.check_params(params)
  return params


def convert(src: str, dst: str, allow_unverified: bool = False) -> str:
  """Converts the checkpoint at `src` to `dst`; returns dst's sha256.

  Raises:
    ValueError: src's sha256 is not `inception.TORCH_WEIGHTS_SHA256` and
      `allow_unverified` is False.
  """
  sha = inception.file_sha256(src)
  verified = sha == inception.TORCH_WEIGHTS_SHA256
  if not verified:
    if not allow_unverified:
      raise ValueError(
          f'{src} has sha256 {sha}, not {inception.TORCH_WEIGHTS_SHA256}: it '
          f'is not pytorch-fid\'s {inception.TORCH_WEIGHTS_NAME} '
          f'({inception.TORCH_WEIGHTS_URL}). Download that file again, or '
          'pass --allow_unverified to convert other weights (tests only; '
          'their rows are labelled .../unverified).')
    print(f'warning: converting unverified weights {src} (sha256 {sha}); '
          'results will be labelled inception_v3/<preprocess>/unverified.',
          file=sys.stderr)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "convert_inception needs torch: pip install -e '.[parity]'") from e
  state_dict = torch.load(src, map_location='cpu', weights_only=True)
  params = convert_state_dict(state_dict)
  inception.save_params(params, dst, verified=verified, source_sha256=sha)
  return inception.file_sha256(dst)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point."""
  parser = argparse.ArgumentParser(
      prog='python -m onestep_bench.evaluators.convert_inception',
      description=__doc__.split('\n', 1)[0])
  parser.add_argument('--src', required=True,
                      help=f'path to {inception.TORCH_WEIGHTS_NAME}')
  parser.add_argument('--dst', default=inception.DEFAULT_WEIGHTS_PATH,
                      help='output .npz (default: %(default)s)')
  parser.add_argument('--allow_unverified', action='store_true',
                      help='skip the sha256 check (tests, random weights)')
  args = parser.parse_args(argv)
  dst = os.path.abspath(os.path.expanduser(args.dst))
  sha = convert(os.path.expanduser(args.src), dst, args.allow_unverified)
  print(f'wrote {dst} (sha256 {sha}). Use it via the default path, '
        f'InceptionExtractor(weights_path=...) or {inception.WEIGHTS_ENV}.')
  if inception.OFFICIAL_NPZ_SHA256 is None and inception.weights_verified(dst):
    print('This is the official conversion: record its sha256 as '
          'inception.OFFICIAL_NPZ_SHA256.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
