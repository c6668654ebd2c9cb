"""Transition Matching (DTM) ablations on toy 2D.

Analogues of paper Tabs. 10-11 and Fig. 10; spec
docs/methods/transition_matching.md §2.6 protocol.

T (transitions = backbone NFE) is an *evaluation* axis: the default model is
trained with continuous τ and sampled at every T in `evals.main.nfe`. Add
`transitions` to a product to evaluate the spec's T grid; compare rows by
`effective_nfe` in each run's summary.json (head steps cost FLOPs too).

make sweep EXP=transition_matching_ablations SWEEP=transitions,head_steps
make sweep EXP=transition_matching_ablations SWEEP=transitions,head_width
make sweep EXP=transition_matching_ablations SWEEP=train_T
"""

from experiments.bench import get_config  # noqa: F401  (the protocol)

BASE = 'method=transition_matching,dataset=toy2d:8gaussians'


def sweep_transitions():
  """Evaluate T in {1, 2, 4, 8, 16, 32} (spec §2.6 grid; one point)."""
  yield {'evals.main.nfe': (1, 2, 4, 8, 16, 32)}


def sweep_head_steps():
  """Head Euler steps N per transition.

  Paper Fig. 10 / Tab. 10: flat down to 1-4 at many T; 1 step = FM-Euler,
  so few T need more.
  """
  for n in (1, 2, 4, 8, 16, 32):
    yield {'method.head_steps': n}


def sweep_head_width():
  """Head size (paper: 6 x 1024, ~2% of the backbone): cost vs quality."""
  for w in (16, 32, 64, 128):
    yield {'method.head_width': w}


def sweep_head_depth():
  """Head depth in AdaLN residual blocks (paper: 6)."""
  for d in (1, 2, 4):
    yield {'method.head_depth': d}


def sweep_rep_dim():
  """Width of the backbone's representation h (the head's only input)."""
  for r in (8, 32, 128):
    yield {'method.rep_dim': r}


def sweep_head_batch_mul():
  """(s, Y_0) draws per backbone pass: 1 (paper) vs 4 (MAR)."""
  for m in (1, 4):
    yield {'method.head_batch_mul': m}


def sweep_train_T():
  """Continuous τ (one model for every T) vs the paper's discrete grids.

  A discrete model is evaluated only at T dividing train_T.
  """
  for t in (0, 1, 2, 4, 32):
    yield {'method.train_T': t}
