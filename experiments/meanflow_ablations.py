"""MeanFlow ablations on toy 2D (paper §5 / Table 1 analogues).

make sweep EXP=meanflow_ablations SWEEP=ratio
make sweep EXP=meanflow_ablations SWEEP=ratio,adaptive_p   # product
"""

from experiments.bench import get_config  # noqa: F401  (the protocol)

BASE = 'method=meanflow,dataset=toy2d:8gaussians'


def sweep_ratio():
  """Fraction of samples with r != t (paper Tab. 1a: 0 fails at 1 NFE)."""
  for r in (0.0, 0.25, 0.5, 0.75, 1.0):
    yield {'method.ratio_r_neq_t': r}


def sweep_adaptive_p():
  """Adaptive loss power p (paper Tab. 1d: p = 1 best on ImageNet)."""
  for p in (0.0, 0.5, 1.0, 1.5):
    yield {'method.adaptive_p': p}


def sweep_time_dist():
  """Time sampler (paper Tab. 1c: logit-normal beats uniform)."""
  yield {'method.time_dist': 'uniform'}
  yield {'method.time_dist': 'logit_normal'}
