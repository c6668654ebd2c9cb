"""TVM ablations (arXiv 2511.19797; docs/methods/tvm.md §2.3-§2.5).

Toy 2D (the default BASE, MLP backbone, unlabelled):
  make sweep EXP=tvm_ablations SWEEP=teacher_ema
  make sweep EXP=tvm_ablations SWEEP=gap,time_dist       # product
CFG and architecture need labels / a DiT, so those sweeps run on an image
set with this module's extra config arguments (`backbone=dit`: a tiny DiT
carrying every TVM option; `conditional=True`: class labels + guidance
embedder), chosen through the environment (BASE is one string per module):
  TVM_ABLATION_BASE=method=tvm,dataset=digits,backbone=dit \
    make sweep EXP=tvm_ablations SWEEP=architecture
  TVM_ABLATION_BASE=method=tvm,dataset=digits,conditional=True \
    make sweep EXP=tvm_ablations SWEEP=cfg_scale
The recorded reproducing command names this file and the full argument
string, so rows reproduce without the environment variable.
"""

from __future__ import annotations

import os

import ml_collections

from experiments import bench

BASE = os.environ.get('TVM_ABLATION_BASE',
                      'method=tvm,dataset=toy2d:8gaussians')

# TVM's semi-Lipschitz DiT (spec §2.5, official configs/im256_w2.yaml
# model_kwargs) at test size: 8x8 digits -> 16 tokens of patch 2.
_DIT = dict(name='dit', size='tiny', patch_size=2, norm='rmsnorm',
            qk_norm=True, modulation='rms_adaln', init='spectral',
            time_spectral_init=True, guidance_embed=False, freq_dim=64)
_EXTRA = {'backbone': 'default', 'conditional': 'False'}


def get_config(arg_string: str = '') -> ml_collections.ConfigDict:
  """bench.get_config plus `backbone=dit` and `conditional=True|False`."""
  extra, rest = dict(_EXTRA), []
  for item in filter(None, (arg_string or '').split(',')):
    key, _, value = item.partition('=')
    if key in extra:
      extra[key] = value
    else:
      rest.append(item)
  c = bench.get_config(','.join(rest))
  if extra['backbone'] == 'dit':
    if c.data.name.startswith('toy2d'):
      raise ValueError('backbone=dit needs image data (e.g. dataset=digits); '
                       'toy 2D has no (H, W, C) shape.')
    c.model = ml_collections.ConfigDict(_DIT)
  elif extra['backbone'] != 'default':
    raise ValueError(f"backbone={extra['backbone']!r}: use 'default' or "
                     "'dit'.")
  if extra['conditional'].lower() in ('1', 'true', 'yes'):
    c.data.conditional = True
    c.model.guidance_embed = True  # a valid option of mlp, unet and dit
  return c


def sweep_teacher_ema():
  """Decay of the teacher θ⁻ (official `ema_target_beta` 0.99; 0 = sg(θ))."""
  for d in (0.0, 0.9, 0.99, 0.999):
    yield {'method.teacher_ema': d}


def sweep_gap():
  """Gap Δ = t - s: sigmoid(N(m, 1)) (official m = -0.8) or U[0, 1]."""
  for m in (-2.0, -0.8, 0.0, 1.0):
    yield {'method.gap_dist': 'logit_normal', 'method.gap_p_mean': m}
  yield {'method.gap_dist': 'uniform'}


def sweep_time_dist():
  """Terminal / FM time law: official logit-normal(-0.4, 1) vs uniform."""
  yield {'method.time_dist': 'logit_normal'}
  yield {'method.time_dist': 'uniform'}


def sweep_detach_jvp():
  """Gradient through ∂_s F (official) vs stop-gradient (MeanFlow-style)."""
  for d in (False, True):
    yield {'method.detach_jvp': d}


def sweep_cfg_scale():
  """Training CFG scale w (`conditional=True`; official im256 2.0 / 1.75).

  Fixed w per run, then w ~ U[1, 3] (official min_cfg / max_cfg). The eval
  samples at cfg_scale (evals.*.guidance unset); for the random-w row set
  evals.main.guidance to compare at one w.
  """
  for w in (1.0, 1.5, 2.0, 3.0):
    yield {'method.cfg_scale': w, 'method.cfg_scale_max': 0.0}
  yield {'method.cfg_scale': 1.0, 'method.cfg_scale_max': 3.0}


def sweep_scale_param():
  """κ_w = w output scaling (official do_scale_param) on / off; CFG only."""
  for v in (True, False):
    yield {'method.scale_param': v}


def sweep_architecture():
  """TVM's DiT options (spec §2.5, `backbone=dit`) on / off.

  All on (official), each one off, all off (plain DiT as MeanFlow uses it).
  """
  on = {'model.norm': 'rmsnorm', 'model.qk_norm': True,
        'model.modulation': 'rms_adaln', 'model.init': 'spectral',
        'model.time_spectral_init': True}
  off = {'model.norm': 'layernorm', 'model.qk_norm': False,
         'model.modulation': 'adaln', 'model.init': 'dit',
         'model.time_spectral_init': False}
  yield dict(on)
  for k in ('model.norm', 'model.qk_norm', 'model.modulation', 'model.init'):
    row = dict(on, **{k: off[k]})
    if k == 'model.init':  # time_spectral_init only acts with init=spectral
      row['model.time_spectral_init'] = False
    yield row
  yield dict(off)
