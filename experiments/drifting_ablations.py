"""Drifting ablations on images, unconditional (paper Tables 2-3, A.5-A.6).

Digits (8x8, the cheapest real image set) with the bench protocol's U-Net
and batch, at STEPS training steps (a third of the bench budget, so a sweep
fits a CPU session; every row records it); `ARGS=--smoke` for a dry run.
Class-conditional / CFG sweeps are in drifting_cfg_ablations.py, toy-2D ones
in drifting_toy_ablations.py.

  make sweep EXP=drifting_ablations SWEEP=features        # pixels vs encoder
  make sweep EXP=drifting_ablations SWEEP=temperatures
  make sweep EXP=drifting_ablations SWEEP=group_size      # N_gen per group
"""

from experiments.bench import get_config  # noqa: F401  (the protocol)

BASE = 'method=drifting,dataset=digits'
STEPS = {'train.num_steps': 1000}


def sweep_features():
  """Feature set (paper §5.2 / A.5): raw pixels, encoder keys, both."""
  for f in ('pixels', 'encoder', 'pixels+encoder'):
    yield {**STEPS, 'method.features': f}


def sweep_temperatures():
  """Single vs multiple kernel temperatures (paper A.6: multi-τ best)."""
  for temps in ((0.02,), (0.05,), (0.2,), (0.02, 0.05, 0.2)):
    yield {**STEPS, 'method.temperatures': temps}


def sweep_group_size():
  """Generated samples per group at fixed positives (paper Table 2)."""
  for n in (32, 64, 128, 256):
    yield {**STEPS, 'method.num_gen': n}
