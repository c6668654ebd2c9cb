"""IDX file reader (the MNIST / Fashion-MNIST format), with clear errors.

Format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a big-endian
header `0x00 0x00 <dtype> <ndim>`, then `ndim` uint32 sizes, then the data.
Files may be gzip-compressed (`.gz`, as the Debian package ships them).
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'),
           0x0C: np.dtype('>i4'), 0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


class IdxError(ValueError):
  """A missing, truncated or malformed IDX file."""


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX(.gz) file into an array of its declared shape and dtype."""
  try:
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # gzip raises these on truncation
    raise IdxError(f'Cannot read IDX file {path}: {e}. The file is missing '
                   'or corrupt; reinstall it (see the dataset error message).'
                   ) from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
    raise IdxError(f'{path} is not an IDX file (bad magic {raw[:4]!r}).')
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise IdxError(f'{path}: truncated header.')
  shape = struct.unpack(f'>{ndim}I', raw[4:header])
  dtype = np.dtype(_DTYPES[raw[2]])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header != expected:
    raise IdxError(f'{path}: header says shape {shape} ({expected} bytes) but '
                   f'the file has {len(raw) - header} data bytes; it is '
                   'truncated or corrupt.')
  return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(
      dtype.newbyteorder('='))


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes `array` as IDX (gzip if `path` ends in .gz); used by tests."""
  code = {np.dtype(v).newbyteorder('='): k for k, v in _DTYPES.items()}
  dtype = np.dtype(array.dtype).newbyteorder('=')
  header = bytes([0, 0, code[dtype], array.ndim]) + struct.pack(
      f'>{array.ndim}I', *array.shape)
  body = array.astype(dtype.newbyteorder('>')).tobytes()
  opener = gzip.open if path.endswith('.gz') else open
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with opener(path, 'wb') as f:
    f.write(header + body)
