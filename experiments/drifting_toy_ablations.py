"""Drifting ablations on toy 2D (paper A.6 / Table B3 analogues).

make sweep EXP=drifting_toy_ablations SWEEP=temperatures
make sweep EXP=drifting_toy_ablations SWEEP=normalization

Temperatures are in normalised-distance units with feature_norm=True. On toy
mixtures with separated modes (8gaussians here) `methods/drifting.py`
refuses sets whose largest τ is below 0.1 there (TOY_TAU_MAX_MIN): a
narrower kernel does not reach the neighbouring modes and holds a one-mode
collapse (issue 18 §2; 8gaussians, 1000 steps: (0.01,), (0.02,), (0.05,),
(0.02, 0.05) end on 1-2 of 8 modes). The
official toy demo's single τ = 0.05 runs in raw units, without feature or
drift normalisation: allowed (data units), but on 8gaussians it too ends
on one mode in 2 of 3 seeds; the logged `coverage` shows it.
"""

from experiments.bench import get_config  # noqa: F401  (the protocol)

BASE = 'method=drifting,dataset=toy2d:8gaussians'


def sweep_temperatures():
  """Single vs multiple kernel temperatures (official R_list)."""
  for temps in ((0.1,), (0.2,), (0.05, 0.2), (0.02, 0.05, 0.2)):
    yield {'method.temperatures': temps}
  # The official toy demo (lambertae.github.io drifting_model_demo.ipynb):
  # one τ = 0.05 on raw distances, no normalisation.
  yield {'method.temperatures': (0.05,), 'method.feature_norm': False,
         'method.drift_norm': False}


def sweep_normalization():
  """Feature / drift normalisation on-off (paper A.6)."""
  for feat in (False, True):
    for drift in (False, True):
      yield {'method.feature_norm': feat, 'method.drift_norm': drift}


def sweep_batch():
  """Samples per step: the field is a finite-sample estimate."""
  for b in (256, 512, 1024, 2048):
    yield {'train.batch_size': b}
