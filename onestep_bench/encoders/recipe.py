"""The encoder pre-training recipe: defaults, per-dataset resolution.

`RECIPE` is what `load_or_train` trains when given no overrides; the
resolved recipe (`resolve_recipe`) and `CODE_VERSION` are part of the cache
key (cache.py), so changing either trains a fresh encoder.
"""

from __future__ import annotations

from typing import Any

from onestep_bench.data.images import ImageArrays

# Bump when a change to this package changes what a recipe trains or what
# the cached arrays mean: the cache key includes it, so old files are not
# reused.
# 2: convs pad k // 2 on every side (official `padding=1`), not 'SAME'.
CODE_VERSION = 2

# Deterministic pre-training recipe, sized for 2 CPU cores (the package
# docstring and tests/test_encoders.py say what it costs). 'auto' entries
# are resolved per dataset by `resolve_recipe` (patch: 1 for images ≤ 8 px,
# else 2; shift: 1 px for images ≤ 8 px, else 2) and the resolved values are
# hashed.
RECIPE: dict[str, Any] = dict(
    width=16,             # C: stage widths [C, 2C, 4C, ...]
    blocks=(1, 1, 1),     # basic blocks per stage
    max_groups=32,        # GroupNorm groups: largest divisor ≤ this ...
    min_group_channels=8,  # ... leaving ≥ 8 channels per group (paper's
                           # 256 / 32); 1 would make GN InstanceNorm at C ≤ 32
    decoder_convs=1,      # 3×3 conv + GN + ReLU per decoder up-block
    patch='auto',         # masked patch size p
    mask_prob=0.5,        # each p×p patch is zeroed with this probability
    steps=800,
    batch=64,
    lr=2e-3,
    warmup=50,           # linear warmup steps, then constant lr
    b1=0.9,
    b2=0.95,
    weight_decay=0.01,
    ema=0.999,            # EMA decay of the encoder weights (what is frozen)
    shift='auto',         # random translation, pixels (edge padding)
    seed=0,
)


def resolve_recipe(dataset: ImageArrays, recipe: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
  """RECIPE ∪ overrides, 'auto' resolved for the data, + dataset hflip.

  Raises:
    ValueError: an override key that `RECIPE` does not have.
  """
  r = dict(RECIPE, **(recipe or {}))
  unknown = sorted(set(r) - set(RECIPE))
  if unknown:
    raise ValueError(f'Unknown encoder recipe key(s) {unknown}; valid: '
                     f'{sorted(RECIPE)}.')
  small = min(dataset.spec.shape[:2]) <= 8
  if r['patch'] == 'auto':
    r['patch'] = 1 if small else 2
  if r['shift'] == 'auto':
    r['shift'] = 1 if small else 2
  r['blocks'] = [int(b) for b in r['blocks']]
  r['hflip'] = bool(dataset.hflip)
  return r
