"""Provenance of a run: its config hash, code version and library versions.

Every results row carries these (docs/protocol.md, "Rules for every number"):
`config_hash` groups the seeds of one config on the leaderboard, `git_sha`
keeps rows of uncommitted code off the headline, and the versions go into
the run summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np


def config_hash(config: ml_collections.ConfigDict) -> str:
  """12-hex hash of the config without the seed and the mesh.

  Seeds of one config share it, so the leaderboard can aggregate them. The
  mesh is placement, not maths: a run on 8 devices (or FSDP) computes the same
  function as on 1, up to float summation order (tests/test_sharding.py), and
  may resume on another device count.
  """
  d = config.to_dict()
  d.pop('seed', None)
  d.pop('mesh', None)
  dc = d.get('data') or {}
  # The input pipeline's threads / prefetch depth are placement too; the
  # default pipeline is left out so configs without the key keep their hash.
  for k in ('grain_threads', 'grain_prefetch'):
    dc.pop(k, None)
  if dc.get('pipeline', 'device') in ('device', None):
    dc.pop('pipeline', None)
  # Gradient accumulation: k = 1 is the plain step; left out so configs
  # without the key keep their hash (k > 1 draws its noise per micro-batch).
  tc = d.get('train') or {}
  if tc.get('grad_accum', 1) in (1, None):
    tc.pop('grad_accum', None)
  # Optimizer / schedule options added later (method.make_optimizer): the
  # default optimizer and a decay length no schedule reads are left out, so
  # configs without the keys keep their hash.
  if tc.get('optimizer', 'adamw') in ('adamw', None):
    tc.pop('optimizer', None)
  if tc.get('schedule') != 'inv_sqrt':
    tc.pop('decay_steps', None)
  # A run this one depends on (a distillation teacher) is named by its
  # workdir; the default one (runs.default_workdir) ends in the run's own
  # `_seed<k>`, which would hash the seeds of one config apart. That suffix
  # is normalised, so any other path (another teacher) still changes the
  # hash.
  mc = d.get('method') or {}
  own = re.compile(rf'_seed{int(config.get("seed", 0))}/*$')
  for k, v in mc.items():
    if k.endswith('_workdir') and isinstance(v, str):
      mc[k] = own.sub('_seed<own>', v)
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str)
                        .encode()).hexdigest()[:12]


def git_sha() -> str:
  """Short SHA of the code that ran (+dirty if uncommitted changes)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    sha = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root,
                         capture_output=True, text=True, check=True,
                         timeout=10).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--', '.'],
                           cwd=root, capture_output=True, text=True,
                           timeout=10).stdout.strip()
    return sha + ('+dirty' if dirty else '')
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


def versions() -> dict[str, str]:
  """Versions of the libraries that ran (recorded in the summary)."""
  import flax
  import optax
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top,multiple-imports
  return {'python': sys.version.split()[0], 'jax': jax.__version__,
          'flax': flax.__version__, 'optax': optax.__version__,
          'orbax': ocp.__version__, 'numpy': np.__version__}
