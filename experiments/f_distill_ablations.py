"""f-distill ablations, unequal toy modes (docs/methods/f_distill.md §3.9).

8 modes with weights ∝ 8, 7, ..., 1 (`toy2d:8gaussians_imbalanced`): the
mode-seeking reverse KL (= DMD) should under-weight or drop small modes,
while forward KL / JS should keep more (paper §3, Table 1 trade-offs). Read
`mode_weight_tv`, `mode_weight_max_rel_err` and `modes_covered` next to the
sample metrics.

The student needs a flow-matching teacher of the same dataset and seed:

  make bench METHOD=flow_matching DATASET=toy2d:8gaussians_imbalanced SEED=0
  make sweep EXP=f_distill_ablations SWEEP=f_div
  make sweep EXP=f_distill_ablations SWEEP=f_div,gan_weight   # product

(`method.teacher_workdir` defaults to that run's directory,
runs/flow_matching/toy2d_8gaussians_imbalanced/bench_seed<seed>.)
"""

import ml_collections

from experiments import bench
from methods import f_distill
from onestep_bench import runs

BASE = 'method=f_distill,dataset=toy2d:8gaussians_imbalanced'


def get_config(arg_string: str = '') -> ml_collections.ConfigDict:
  """The bench protocol, with the teacher run of the same dataset and seed."""
  c = bench.get_config(arg_string)
  if c.protocol == 'smoke':  # tiny runs (sweeps --smoke): untrained teacher
    c.method.teacher_workdir = ''
    c.method.allow_untrained_teacher = True
  elif not c.method.teacher_workdir:
    c.method.teacher_workdir = runs.default_workdir(
        f_distill.TEACHER_METHOD, c.data.name, c.seed)
  return c


def sweep_f_div():
  """The divergence (paper Table 1; spec §3.3): RKL = DMD baseline."""
  for f in ('rkl', 'sf', 'js', 'sh', 'kl', 'jf', 'neyman'):
    yield {'method.f_div': f}
  yield {'method.f_div': 'alpha', 'method.alpha': 0.5}


def sweep_gan_weight():
  """λ_GAN on the student (FastGen 1e-3 CIFAR-10, 3e-3 IN-64, 5e-3 SDXL)."""
  for w in (1e-4, 1e-3, 3e-3, 1e-2, 3e-2):
    yield {'method.gan_weight': w}


def sweep_clipping():
  """Range of r = exp(logit) (FastGen [0.1, 20]); tighter -> closer to RKL."""
  for lo, hi in ((0.5, 2.0), (0.1, 20.0), (0.01, 100.0), (1e-3, 1e3)):
    yield {'method.ratio_lower': lo, 'method.ratio_upper': hi}


def sweep_normalization():
  """Stage-1 ratio normalisation: off, per batch (CIFAR), EMA 0.5 (IN-64).

  Stage 2 (h / mean h) is always on.
  """
  yield {'method.ratio_normalization': False}
  yield {'method.ratio_normalization': True, 'method.ratio_ema': 0.0}
  yield {'method.ratio_normalization': True, 'method.ratio_ema': 0.5}


def sweep_disc_features():
  """D's features besides x_t: x̂0 of F (DMD2), of P (FastGen), none."""
  for feat in ('fake_score', 'teacher', 'raw'):
    yield {'method.disc_features': feat}


def sweep_update_freq():
  """One student step per K iterations (FastGen: 5 EDM, 10 SD1.5)."""
  for k in (2, 5, 10):
    yield {'method.student_update_freq': k}


def sweep_student_steps():
  """Multi-step students with backward simulation (spec §3.7)."""
  for k in (1, 2, 4):
    yield {'method.student_steps': k}
