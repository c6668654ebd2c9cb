"""pytorch-fid on this machine, for parity tests and `make perf` only.

torch, torchvision and pytorch-fid are never runtime dependencies (extra
`[parity]`); every import here is lazy. Nothing is downloaded: the FID
Inception skeleton is served from torchvision's random init.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

_TORCH_LIBS: list[Any] = []  # keeps the op-schema library alive


def import_torchvision() -> Any:
  """Imports torchvision; tolerates a C++ extension that does not load.

  PyPI's torchvision 0.28.0 (a CUDA build) cannot load its C++ ops beside
  the CPU torch 2.13.0 wheel, and its module-level `register_fake(
  'torchvision::nms')` then raises "operator torchvision::nms does not
  exist". The models (pure Python) are fine, so in that case we define the
  two op schemas it registers fakes for and import it again; the detection
  ops stay unusable, which pytorch-fid does not need.

  Raises:
    ImportError: torch or torchvision is not installed.
  """
  import torch  # pylint: disable=g-import-not-at-top
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
  except RuntimeError as e:
    if 'torchvision::nms' not in str(e):
      raise
    for name in [m for m in sys.modules
                 if m == 'torchvision' or m.startswith('torchvision.')]:
      del sys.modules[name]
    lib = torch.library.Library('torchvision', 'DEF')
    for op in ('nms', 'qnms'):
      lib.define(f'{op}(Tensor dets, Tensor scores, float iou_threshold) '
                 '-> Tensor')
    _TORCH_LIBS.append(lib)
    import torchvision  # pylint: disable=g-import-not-at-top
  return torchvision


@contextlib.contextmanager
def random_fid_weights(pfi: Any) -> Iterator[None]:
  """Inside: pytorch-fid's weight download returns a random init instead.

  The FID blocks subclass torchvision's, so the plain skeleton has the exact
  state_dict keys of the FID Inception checkpoint.
  """
  base = pfi._inception_v3(num_classes=1008, aux_logits=False,  # pylint: disable=protected-access
                           weights=None)
  orig = pfi.load_state_dict_from_url
  pfi.load_state_dict_from_url = lambda *a, **k: base.state_dict()
  try:
    yield
  finally:
    pfi.load_state_dict_from_url = orig
