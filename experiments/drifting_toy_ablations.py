"""Drifting ablations on toy 2D (paper A.6 / Table B3 analogues).

make sweep EXP=drifting_toy_ablations SWEEP=temperatures
make sweep EXP=drifting_toy_ablations SWEEP=normalization
"""

from experiments.bench import get_config  # noqa: F401  (the protocol)

BASE = 'method=drifting,dataset=toy2d:8gaussians'


def sweep_temperatures():
  """Single vs multiple kernel temperatures (official R_list)."""
  for temps in ((0.02,), (0.05,), (0.2,), (0.02, 0.05, 0.2)):
    yield {'method.temperatures': temps}


def sweep_normalization():
  """Feature / drift normalisation on-off (paper A.6)."""
  for feat in (False, True):
    for drift in (False, True):
      yield {'method.feature_norm': feat, 'method.drift_norm': drift}


def sweep_batch():
  """Samples per step: the field is a finite-sample estimate."""
  for b in (256, 512, 1024, 2048):
    yield {'train.batch_size': b}
