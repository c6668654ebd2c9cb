"""Pickle-free weight files of the feature networks: resolve, hash, save, load.

A converted feature network is one `.npz` of float32 arrays plus a JSON
provenance record under `META_KEY` (uint8 bytes), written with sorted keys
(numpy's `savez` stores fixed zip timestamps), so the same weights always
give the same bytes and one sha256. Files are read with
`np.load(allow_pickle=False)`: nothing is ever unpickled.

The path of a weights file resolves as: an explicit path (a config value)
-> an environment variable -> a default under `~/.cache/onestep_bench/`.
A missing file raises one FileNotFoundError whose message the network module
writes (where to get the source, the converter command, the env variable).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

META_KEY = '__meta__'


def file_sha256(path: str) -> str:
  """Hex sha256 of a file."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def resolve(path: str | None, env: str, default: str,
            missing: Callable[[str, str], str]) -> str:
  """Explicit path -> $env -> default; FileNotFoundError if no file there.

  Args:
    path: an explicit path (None or '' to fall through).
    env: name of the environment variable consulted next.
    default: the default path (`~` expanded).
    missing: (resolved path, where it came from) -> the error message.

  Returns:
    The absolute path of an existing file.
  """
  source = 'the given path'
  if not path:
    path, source = os.environ.get(env), f'${env}'
  if not path:
    path, source = default, 'the default path'
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(missing(path, source))
  return path


def save_npz(arrays: Mapping[str, Any], path: str,
             meta: Mapping[str, Any]) -> None:
  """Writes float32 `arrays` + the JSON `meta` to `path`, atomically.

  Keys are sorted, so the same arrays and meta give the same bytes.
  """
  out = {k: np.asarray(arrays[k], np.float32) for k in sorted(arrays)}
  out[META_KEY] = np.frombuffer(json.dumps(dict(meta), sort_keys=True)
                                .encode(), np.uint8)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    np.savez(f, **out)
  os.replace(tmp, path)


def load_npz(path: str) -> dict[str, np.ndarray]:
  """The float32 arrays of a weights file, without its meta record."""
  with np.load(path, allow_pickle=False) as f:
    return {k: np.asarray(f[k], np.float32) for k in f.files
            if k != META_KEY}


def load_meta(path: str) -> dict[str, Any]:
  """The provenance record of a weights file ({} when it has none)."""
  with np.load(path, allow_pickle=False) as f:
    if META_KEY not in f.files:
      return {}
    return json.loads(f[META_KEY].tobytes().decode())


def check_shapes(params: Mapping[str, Any],
                 expected: Mapping[str, tuple[int, ...]], what: str) -> None:
  """ValueError unless `params` has exactly the names and shapes expected."""
  missing = sorted(set(expected) - set(params))
  unexpected = sorted(set(params) - set(expected))
  wrong = [f'{k}: got {tuple(np.shape(params[k]))}, expected {expected[k]}'
           for k in expected if k in params
           and tuple(np.shape(params[k])) != tuple(expected[k])]
  if missing or unexpected or wrong:
    def head(xs: list[str]) -> str:
      return ', '.join(xs[:8]) + (f' ... (+{len(xs) - 8})' if len(xs) > 8
                                  else '')
    raise ValueError(
        f'{what} params do not match ({len(expected)} tensors expected). '
        f'missing: [{head(missing)}]; unexpected: [{head(unexpected)}]; '
        f'wrong shape: [{head(wrong)}].')
