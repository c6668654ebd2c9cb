"""Drifting: config defaults, official presets and `validate_config`.

Private helper of methods/drifting.py (Deng et al. 2026, arXiv 2602.04770;
spec docs/methods/drifting.md §1.14-1.15), which re-exports every public
name here: the temperature limits (`TAU_MIN`, `TOY_TAU_MAX_MIN`,
`TOY_SEPARATION`; the evidence is drifting.py's module docstring,
"Temperature range"), `FEATURES`, the official recipes (`OFFICIAL_*`,
`PRESETS`), `get_config`, `separated_modes`, and the body of
`Method.validate_config`.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from onestep_bench import config_check as cc
from onestep_bench.data import toy2d

# Smallest temperature, in normalised-distance units (feature_norm=True),
# on any data: below it the kernel is a hard nearest-neighbour assignment
# and the field of one τ is carried by a handful of queries (see
# drifting.py's module docstring, "Temperature range").
TAU_MIN = 0.01
# Toy Gaussian mixtures whose modes lie more than TOY_SEPARATION stds apart
# (8gaussians 15, 25gaussians 20; 8gaussians_torchcfm 6.8 is not), with
# feature_norm=True: the largest temperature (normalised units) must be at
# least TOY_TAU_MAX_MIN, or the generator collapses onto one mode.
TOY_TAU_MAX_MIN = 0.1
TOY_SEPARATION = 10.0
FEATURES = ('auto', 'pixels', 'encoder', 'pixels+encoder')

# Official recipes as `config.method` overrides; every value's source (repo,
# file, line) and the train- / model-level values they come with (lr, batch
# = classes x positives, EMA, style tokens, the MAE's depth) are tabled in
# docs/methods/drifting.md §1.15. Apply with `config.method.update(...)`.
# lambertae/drifting configs/gen/*.yaml + drift_loss.py (floor 1e-6, both
# normalisations) + models/mae_model.py (`global` + every MAE key, all
# locations: 32x32 maps = 1024).
_OFFICIAL_IMAGENET = dict(
    temperatures=(0.02, 0.05, 0.2), feature_norm=True, drift_norm=True,
    affinity_floor=1e-6, features='pixels+encoder',
    encoder_max_locations=1024, num_gen=64, cfg_alpha_max=4.0,
    cfg_p_one=0.0)
# configs/gen/latent_ablation.yaml + configs/mae/latent_ablation_256.yaml
OFFICIAL_LATENT_ABLATION = dict(
    _OFFICIAL_IMAGENET, classes_per_step=64, num_unc=16, cfg_alpha_power=3.0,
    encoder_width=256, encoder_steps=30_000)
# configs/gen/latent_sota_B.yaml + configs/mae/latent_640.yaml
OFFICIAL_LATENT_B2 = dict(
    _OFFICIAL_IMAGENET, classes_per_step=128, num_unc=32,
    cfg_alpha_power=5.0, encoder_width=640, encoder_steps=200_000)
OFFICIAL_LATENT_L2 = dict(  # configs/gen/latent_sota_L.yaml
    OFFICIAL_LATENT_B2, cfg_alpha_power=3.0, cfg_p_one=0.5)
# configs/gen/pixel_sota_{B,L}.yaml (the same method values; 128 positives
# per class) + configs/mae/pixel_640.yaml; its ConvNeXt keys have no
# counterpart here.
OFFICIAL_PIXEL = dict(OFFICIAL_LATENT_B2)
# lambertae.github.io projects/drifting/notebooks/drifting_model_demo.ipynb:
# one τ = 0.05 on raw distances, no normalisation, 2048 gen + 2048 data.
OFFICIAL_TOY = dict(
    temperatures=(0.05,), feature_norm=False, drift_norm=False,
    affinity_floor=0.0, num_gen=0, features='pixels', num_unc=0)
PRESETS = dict(latent_ablation=OFFICIAL_LATENT_ABLATION,
               latent_b2=OFFICIAL_LATENT_B2, latent_l2=OFFICIAL_LATENT_L2,
               pixel=OFFICIAL_PIXEL, toy=OFFICIAL_TOY)


def get_config() -> ml_collections.ConfigDict:
  """Drifting defaults (official ImageNet recipe; toy-safe floor)."""
  return ml_collections.ConfigDict(dict(
      # Kernel temperatures in normalised-distance units: official `R_list`,
      # paper A.6 (multi-τ beats any single one, 8.46 vs ≥ 8.67 FID).
      temperatures=(0.02, 0.05, 0.2),
      # Feature normalisation (global scale s, ρ = s/√C): paper A.6,
      # official drift_loss.py. The official toy notebook uses raw space.
      feature_norm=True,
      # Drift normalisation, unit RMS per τ: paper A.6, official code.
      drift_norm=True,
      # Floor on softmax_row·softmax_col. Official 1e-6; 0 here because the
      # official value breaks groups of ~1000 (spec §1.12.7).
      affinity_floor=0.0,
      # Generated samples (= negatives) per group; 0 means the positives per
      # group. Positives are the data batch (official toy: 2048 + 2048;
      # ImageNet: 64 generated and 64 positives per class, Table A1).
      num_gen=0,
      # Feature set the field is computed on (paper §3.4, A.5): 'pixels'
      # (the raw generator output: the `global` key, the only term of the
      # toy / robotics runs), 'encoder' (frozen encoder keys only), or
      # 'pixels+encoder' (official: `global` + the encoder's multi-scale
      # keys). 'auto' = 'pixels' everywhere for now: the encoder keys are
      # blind to contrast (GroupNorm, as the official MAE) and hold the
      # zero-initialised generator at low contrast (spec §1.13; results/
      # archive/ablations_v1/drifting_ablations__features.csv, digits, 1000
      # steps, classifier FID-10K: pixels 47.9, encoder 1412.7,
      # pixels+encoder 1355.7; samples have pixel std 0.05-0.07 vs 0.74).
      features='auto',
      # Frozen feature encoder (images): the harness trains a small
      # ResNet-MAE on the training split (paper A.3 latent-MAE recipe, scaled
      # down; onestep_bench/encoders/) and caches it. Never the evaluator's
      # network. 0 = the recipe default for width / steps.
      encoder_width=0,
      encoder_steps=0,
      # Map keys (per-location vectors, pooled mean/std maps) with more than
      # this many locations are left out. Official: none left out (32x32
      # latents: 1024). 49 keeps the field affordable on 2 CPU cores
      # (digits: 245 -> 117 location groups, counted; the per-step cost is
      # dominated by the N x M softmaxes of every (class, location) group).
      encoder_max_locations=49,
      # Class groups per step on labelled data (official N_c: 64 ablation,
      # 128 final). 0 = every class once (10 for digits / Fashion-MNIST).
      # Positives per class = batch_size / groups (official 64).
      classes_per_step=0,
      # CFG in training (paper §3.5, A.7): N_unc real samples of random
      # class as extra negatives with weight w = (α-1)(N_neg-1)/N_unc, α fed
      # to the generator (config.model.guidance_embed=True). Official N_unc
      # 16 (ablation) / 32 (final); 0 disables CFG.
      num_unc=16,
      # α ∈ [1, cfg_alpha_max] with p(α) ∝ α^-cfg_alpha_power, and α = 1
      # with probability cfg_p_one (official: [1, 4], power 3 ablation / 5
      # B/2; L/2: p_one 0.5).
      cfg_alpha_max=4.0,
      cfg_alpha_power=3.0,
      cfg_p_one=0.0,
  ))


def separated_modes(toy_name: str) -> bool:
  """Whether toy2d:<toy_name> is a mixture with modes > TOY_SEPARATION σ apart.

  The narrow-kernel collapse (drifting.py's module docstring, "Temperature
  range") needs empty gaps between modes; toy2d:checkerboard has none and
  trains at a single τ = 0.05 like the default.
  """
  m = toy2d.MIXTURES.get(toy_name)
  if m is None:
    return False
  c = np.asarray(m.centers, np.float64)
  d = np.linalg.norm(c[:, None] - c[None], axis=-1) + np.diag(
      np.full(len(c), np.inf))
  return float(d.min()) / float(m.std) > TOY_SEPARATION


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Every `config.method` key, before anything is built or compiled.

  Temperatures (drifting.py's module docstring, "Temperature range"):
  finite and > 0 always; with feature_norm (normalised-distance units)
  each ≥ TAU_MIN, and on toy mixtures with separated modes
  (`separated_modes`) the largest ≥ TOY_TAU_MAX_MIN, the narrowest kernel
  measured not to hold a one-mode collapse. With feature_norm=False τ is
  in data units, which the config does not know, so only τ > 0 is checked
  (the logged `coverage` shows a collapse there).

  Raises:
    onestep_bench.config_check.ConfigError: the first bad value.
  """
  c, p = config.method, 'method'
  family, _, toy_name = str(config.data.name).partition(':')
  toy = family == 'toy2d'
  feature_norm = cc.require_bool(c, p, 'feature_norm')
  cc.require_bool(c, p, 'drift_norm')
  taus, key = c.get('temperatures'), 'method.temperatures'
  default = '--config.method.temperatures="(0.02, 0.05, 0.2)" (official)'
  if not (isinstance(taus, (tuple, list)) and taus
          and all(cc.is_real(t) and t > 0 for t in taus)):
    raise cc.ConfigError(
        key, taus, 'must be a non-empty tuple of finite numbers > 0 (the '
        'kernel is exp(-d/τ))', default)
  if feature_norm and min(taus) < TAU_MIN:
    raise cc.ConfigError(
        key, tuple(taus), f'must each be >= {TAU_MIN} with feature_norm='
        'True (units of the mean pairwise distance): a narrower kernel is a '
        'hard nearest-neighbour assignment whose normalised field sits on '
        'a few samples', default)
  if (feature_norm and toy and separated_modes(toy_name)
      and max(taus) < TOY_TAU_MAX_MIN):
    raise cc.ConfigError(
        key, tuple(taus), f'must include a τ >= {TOY_TAU_MAX_MIN} on toy '
        'mixtures with separated modes, with feature_norm=True: a narrower '
        'kernel does not reach the neighbouring modes and holds a one-mode '
        'collapse (1000 steps: (0.01,), (0.02,), (0.05,) and (0.02, 0.05) '
        'end on 1-2 of 8 modes of 8gaussians, (0.05,) on 1 of 25 of '
        '25gaussians)', 'add a broad τ, e.g. '
        '--config.method.temperatures='
        '"(0.05, 0.2)" or the default "(0.02, 0.05, 0.2)"')
  floor = cc.require_real(c, p, 'affinity_floor', 0.0, 1.0, hi_open=True,
                          example=0.0)
  num_gen = cc.require_int(c, p, 'num_gen', 0, example=0)
  batch = config.train.batch_size
  if toy and floor > 0:
    n = num_gen or batch
    if floor * n * (n + batch) > 0.1:  # typical A² ≈ 1/(N·M), spec §1.12.7
      raise cc.ConfigError(
          'method.affinity_floor', floor, f'must be <= 0.1/(N·M) = '
          f'{0.1 / (n * (n + batch)):.2g} for one group of N={n} generated '
          f'x M={n + batch} targets: a larger floor swamps the real '
          'affinities (≈ 1/√(N·M)) and nothing trains',
          '--config.method.affinity_floor=0.0')
  feats = cc.require_choice(c, p, 'features', FEATURES)
  if toy and 'encoder' in feats:
    raise cc.ConfigError('method.features', feats, 'needs image data '
                         f'(got {config.data.name})',
                         '--config.method.features=pixels')
  for name in ('encoder_width', 'encoder_steps'):
    cc.require_int(c, p, name, 0, example=0)
  cc.require_int(c, p, 'encoder_max_locations', example=49)
  groups = cc.require_int(c, p, 'classes_per_step', 0, example=0)
  num_unc = cc.require_int(c, p, 'num_unc', 0, example=16)
  alpha_max = cc.require_real(c, p, 'cfg_alpha_max', 1.0, example=4.0)
  cc.require_real(c, p, 'cfg_alpha_power', example=3.0)
  cc.require_prob(c, p, 'cfg_p_one')
  labelled = cc.labelled(config)
  if labelled and groups and cc.is_int(batch) and batch % groups:
    raise cc.ConfigError(
        'method.classes_per_step', groups, f'must divide train.batch_size='
        f'{batch} (one block of positives per class group)',
        '--config.method.classes_per_step=0 (every class once)')
  if labelled and num_unc > 0 and alpha_max > 1.0:  # CFG in training
    if not config.model.get('guidance_embed', False):
      raise cc.ConfigError(
          'model.guidance_embed', config.model.get('guidance_embed'),
          'must be True: drifting with CFG on labelled data feeds α to the '
          'generator', '--config.model.guidance_embed=True (or '
          '--config.method.num_unc=0 for no CFG)')
    for name, g in cc.guidance_evals(config):
      if not cc.is_real(g) or g < 1.0:
        raise cc.ConfigError(
            f'evals.{name}.guidance', g, 'must be a CFG strength α >= 1 '
            f'(trained on [1, {alpha_max}]; 1 = no guidance)',
            f'--config.evals.{name}.guidance=1.0')
  else:
    cc.refuse_guidance(config, 'this drifting run trains without CFG '
                       '(unlabelled data, num_unc=0 or cfg_alpha_max=1)')
