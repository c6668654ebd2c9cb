"""Drifting ablations, class-conditional with CFG (paper §3.5, A.7, B.3).

Digits with labels: 8 class groups of 16 positives per step (batch 128),
α fed to the generator (guidance_embed), N_unc unconditional real negatives
with weight w = (α-1)(N_gen-1)/N_unc. Every point is scored unguided (main
eval, α = 1) and at each α in GUIDANCE (still 1 NFE: α is an input).

  make sweep EXP=drifting_cfg_ablations SWEEP=negatives   # N_unc
  make sweep EXP=drifting_cfg_ablations SWEEP=cfg         # training α range
"""

from __future__ import annotations

import ml_collections

from experiments import bench

BASE = 'method=drifting,dataset=digits'
GUIDANCE = (1.5, 2.0, 3.0)


def get_config(arg_string: str = '') -> ml_collections.ConfigDict:
  """The bench protocol, made class-conditional, plus guided evals."""
  c = bench.get_config(arg_string)
  c.data.conditional = True
  c.model.guidance_embed = True
  c.method.classes_per_step = 8
  main = c.evals.main
  for a in GUIDANCE:
    ev = ml_collections.ConfigDict(main.to_dict())
    ev.nfe, ev.guidance = (1,), a
    c.evals[f'cfg{a:g}'.replace('.', 'p')] = ev
  return c


def sweep_negatives():
  """Unconditional negatives per class group.

  0 would disable CFG, and the guided evals with it: the sampler refuses α for
  a model trained without.
  """
  for u in (4, 8, 16, 32):
    yield {'method.num_unc': u}


def sweep_cfg():
  """Training α range, p(α) ∝ α^-3 on [1, α_max] (official [1, 4])."""
  for a in (2.0, 4.0):
    yield {'method.cfg_alpha_max': a}
