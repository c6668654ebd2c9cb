"""Config, FastGen presets and teacher restore of `methods/f_distill.py`.

Xu, Nie, Vahdat 2025, arXiv 2502.15681 (spec docs/methods/f_distill.md
§3.9, defaults table, §3.12). Holds `TEACHER_METHOD`, `IMAGE_PRESET`, the
official recipes (`FASTGEN_CIFAR10`, `FASTGEN_IMAGENET64`, `PRESETS`),
`get_config`, `validate_config` (the body of `Method.validate_config`)
and the teacher source (`TeacherError`, `load_teacher`, `_teacher_hint`);
`methods/f_distill.py` re-exports these names (the harness, Makefile and
experiments read them there). Private module (leading '_'): not a method
plug-in.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from methods._f_distill_ratio import F_DIVERGENCES
from onestep_bench import config_check as cc
from onestep_bench import runs

PyTree = Any

# The teacher's method; experiments/bench.py and the Makefile read it to
# train the teacher first and find its run (`runs.default_workdir`) without
# naming methods.
TEACHER_METHOD = 'flow_matching'
# No image-specific options (experiments/bench.py applies IMAGE_PRESET).
IMAGE_PRESET: dict[str, Any] = {}

# Official recipes (NVlabs/FastGen) as `config.method` overrides; apply with
# `config.method.update(...)`. Sources by key (fastgen/configs/...; lines
# and the train-level values -- lr, batch, EMA, grad clip, the EDM time law
# and discriminator, which have no method key here -- in
# docs/methods/f_distill.md §3.12).
FASTGEN_CIFAR10 = dict(  # experiments/EDM/config_f_distill_cifar10.py
    f_div='kl',                  # ...cifar10.py:14
    gan_weight=1e-3,             # methods/config_dmd2.py:40
    student_update_freq=5,       # methods/config_dmd2.py:37
    ratio_lower=0.1,             # methods/config_f_distill.py:28
    ratio_upper=20.0,            # methods/config_f_distill.py:29
    logit_clip=10.0,             # fastgen/methods/.../f_distill.py:67
    ratio_normalization=True,    # methods/config_f_distill.py:32
    ratio_bins=10,               # methods/config_f_distill.py:33
    ratio_ema=0.0,               # methods/config_f_distill.py:34
    gan_same_t_noise=False,      # methods/config_dmd2.py:43
    disc_features='teacher',     # .../f_distill.py:146-153 (teacher feats)
    teacher_guidance=None,       # config.py:105 (guidance_scale unset)
    student_steps=1,             # config.py:141 (student_sample_steps)
)
FASTGEN_IMAGENET64 = dict(  # experiments/EDM/config_f_distill_in64.py
    FASTGEN_CIFAR10,
    f_div='js',                  # methods/config_f_distill.py:25 (default)
    gan_weight=3e-3,             # ...in64.py:23
    ratio_ema=0.5,               # ...in64.py:24
)
PRESETS = dict(cifar10=FASTGEN_CIFAR10, imagenet64=FASTGEN_IMAGENET64)


def get_config() -> ml_collections.ConfigDict:
  """f-distill defaults: FastGen values where they exist, toy-2D safe."""
  return ml_collections.ConfigDict(dict(
      # A flow_matching run dir of this harness (checkpoints/ + summary.json).
      # '' only with allow_untrained_teacher=True (smoke / contract tests:
      # the teacher is then a freshly initialised backbone).
      teacher_workdir='',
      allow_untrained_teacher=False,
      # FastGen FdistillConfig.f_div default 'js' (paper: JS best on IN-64 /
      # T2I; FastGen CIFAR-10 config uses 'kl'). Keys: _f_distill_ratio.py.
      f_div='js',
      alpha=0.5,            # only for f_div='alpha' (own addition)
      # FastGen DMD2 ModelConfig: gan_loss_weight_gen 1e-3 (CIFAR-10; IN-64
      # 3e-3, SDXL 5e-3). f-distill needs it > 0 (r comes from D).
      gan_weight=1e-3,
      # FastGen student_update_freq 5 (EDM; SD1.5 10): one student step
      # per 5 iterations, the other 4 update F and D (two-time-scale rule).
      student_update_freq=5,
      # Ratio clipping and normalisation: FastGen FdistillConfig
      # (ratio_lower 0.1, ratio_upper 20, bin_num 10, ratio_ema_rate 0.0 on
      # CIFAR-10, 0.5 on IN-64); logits clamped to ±10 before exp (code).
      ratio_lower=0.1,
      ratio_upper=20.0,
      logit_clip=10.0,
      ratio_normalization=True,
      ratio_bins=10,
      ratio_ema=0.0,
      # t ~ U[t_min, t_max] for the VSD / GAN / fake-score noise: FastGen's
      # flow-teacher configs (SD1.5: uniform, min_t 0.001, max_t 0.999).
      t_min=0.001,
      t_max=0.999,
      # FastGen gan_use_same_t_noise=False: real data gets its own t and e.
      gan_same_t_noise=False,
      # Discriminator head: 'fake_score' (DMD2), 'teacher' (FastGen), 'raw'.
      # Width/depth: own toy choice (FastGen's EDM heads are conv stacks on
      # UNet features, not applicable to the shared backbones).
      disc_features='fake_score',
      disc_width=128,
      disc_depth=2,
      # Fourier octaves of D's flat inputs (own toy choice; 0 = raw
      # coordinates; images use a conv head and ignore it).
      disc_fourier=6,
      # Teacher CFG scale on x̂0 (FastGen guidance_scale; None = off; SD1.5
      # 1.75). Only used with labelled data.
      teacher_guidance=ml_collections.config_dict.placeholder(float),
      # Student steps K (FastGen student_sample_steps; paper: 1).
      student_steps=1,
      # Learning rates of G / F / D; 0 = config.train.lr. FastGen uses one
      # lr for all three (1e-4 CIFAR-10, 2e-6 IN-64, 1e-5 SD1.5) with AdamW
      # wd 0.01, no warm-up; the bench protocol's optimizer is kept here.
      lr_student=0.0,
      lr_fake=0.0,
      lr_disc=0.0,
  ))


# ========================================================= validation
def validate_config(config: ml_collections.ConfigDict) -> None:
  """f, ratio / time / D settings, student steps and the teacher source.

  The teacher run itself (existence, method, data, backbone) is checked by
  `load_teacher` in `__init__` (TeacherError), before anything compiles.

  The body of `f_distill.Method.validate_config` (the harness calls that).
  """
  c, p = config.method, 'method'
  if not isinstance(c.teacher_workdir, str):
    raise cc.ConfigError('method.teacher_workdir', c.teacher_workdir,
                         'must be a run directory (a string)',
                         '--config.method.teacher_workdir=runs/...')
  if not cc.require_bool(c, p, 'allow_untrained_teacher') and (
      not c.teacher_workdir):
    raise cc.ConfigError(
        'method.teacher_workdir', '', 'f-distill needs a teacher (a '
        f'{TEACHER_METHOD} run of this harness)', _teacher_hint(config)
        + ', or set method.allow_untrained_teacher=True for smoke tests')
  f_div = cc.require_choice(c, p, 'f_div', [*F_DIVERGENCES, 'alpha'])
  alpha = cc.require_real(c, p, 'alpha', example=0.5)
  if f_div == 'alpha' and alpha in (0.0, 1.0):
    raise cc.ConfigError('method.alpha', alpha, "must not be 0 or 1 (those "
                         "limits are f_div='rkl' and 'kl')",
                         '--config.method.alpha=0.5')
  gan = cc.require_real(c, p, 'gan_weight', 0.0, example=1e-3)
  if gan == 0 and f_div != 'rkl':
    raise cc.ConfigError('method.gan_weight', gan, 'must be > 0: r comes '
                         'from the discriminator', "--config.method."
                         "gan_weight=1e-3, or f_div='rkl' for pure DMD")
  cc.require_int(c, p, 'student_update_freq', 2, example=5)
  lower = cc.require_real(c, p, 'ratio_lower', 0.0, lo_open=True,
                          example=0.1)
  cc.require_real(c, p, 'ratio_upper', lower, lo_open=True, example=20.0)
  cc.require_real(c, p, 'logit_clip', 0.0, lo_open=True, example=10.0)
  cc.require_bool(c, p, 'ratio_normalization')
  cc.require_int(c, p, 'ratio_bins', example=10)
  cc.require_real(c, p, 'ratio_ema', 0.0, 1.0, hi_open=True, example=0.0)
  t_min = cc.require_real(c, p, 't_min', 0.0, 1.0, hi_open=True,
                          example=0.001)
  cc.require_real(c, p, 't_max', t_min, 1.0, lo_open=True, example=0.999)
  cc.require_bool(c, p, 'gan_same_t_noise')
  cc.require_choice(c, p, 'disc_features', ('fake_score', 'teacher', 'raw'))
  cc.require_int(c, p, 'disc_width', example=128)
  cc.require_int(c, p, 'disc_depth', 0, example=2)
  cc.require_int(c, p, 'disc_fourier', 0, example=6)
  if c.teacher_guidance is not None:
    cc.require_real(c, p, 'teacher_guidance', 0.0, example=1.75)
    if not cc.labelled(config):
      raise cc.ConfigError('method.teacher_guidance', c.teacher_guidance,
                           'needs class labels, but the data is '
                           'unconditional', 'leave it unset (None)')
  k = cc.require_int(c, p, 'student_steps')
  for name in ('lr_student', 'lr_fake', 'lr_disc'):
    cc.require_real(c, p, name, 0.0, example=0.0)  # 0 = config.train.lr
  cc.check_supported_nfe(
      config, tuple(n for n in range(1, k + 1) if k % n == 0),
      f'f_distill with method.student_steps={k} (its divisors)')
  cc.refuse_guidance(config, "f_distill distils the teacher's CFG "
                     '(method.teacher_guidance) and samples without it')


# ===================================================== teacher restore
class TeacherError(ValueError):
  """The teacher run cannot be used; the message names the fix."""


def load_teacher(workdir: str, config: ml_collections.ConfigDict,
                 spec: Any, expect: PyTree | None = None) -> PyTree:
  """EMA params (numpy) of a `TEACHER_METHOD` run: `runs.load_ema_params`.

  Raises:
    TeacherError: missing dir / summary / checkpoint, wrong method, other
      dataset, or a backbone that differs from `config.model` (or from the
      shapes `expect`).
  """
  try:
    return runs.load_ema_params(workdir, method=TEACHER_METHOD,
                                config=config, spec=spec, expect=expect)
  except (runs.RunError, runs.RunMismatchError) as e:
    raise TeacherError(f'config.method.teacher_workdir: {e}') from e


def _teacher_hint(config: ml_collections.ConfigDict) -> str:
  """Where the bench teacher run is and how to train it."""
  run = runs.default_workdir(TEACHER_METHOD, config.data.name, config.seed)
  return (f'--config.method.teacher_workdir={run} (train it first: make '
          f'bench METHOD={TEACHER_METHOD} DATASET={config.data.name} '
          f'SEED={config.seed})')
