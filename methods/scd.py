"""sCD: sCM's consistency distillation (Lu & Song 2024, arXiv 2410.11081).

The maths is `methods/scm.py` with `variant='scd'` (Alg. 1 with the
tangent from the teacher's PF-ODE, §4): this module is its own bench entry
so that sCD has `bench` rows beside sCT, and so that the harness trains its
teacher — a `flow_matching` run of the same dataset and seed
(`TEACHER_METHOD`) — first (`make bench METHOD=scd`, the tuning procedure),
which it never does for sCT. The teacher's training FLOPs count in the
row's `total_train_flops` (`Method.upstream_compute`).
"""

from __future__ import annotations

import ml_collections

from methods import scm

TEACHER_METHOD = scm.TEACHER
IMAGE_PRESET = scm.IMAGE_PRESET
Method = scm.Method


def get_config() -> ml_collections.ConfigDict:
  """The sCM defaults (methods/scm.py) with the distillation variant."""
  c = scm.get_config()
  c.variant = 'scd'
  return c
