"""The one declared tuning procedure: search spaces, budget, development sets.

Every method gets the same procedure (`onestep_bench/tuning.py`): K = 8
trials — trial 0 is the bench (paper) defaults, trials 1..7 are drawn
without replacement from the method's grid below with a fixed RNG — each at
the family's bench budget, on seeds never reported (TRIAL_SEED + trial), on
development data no board scores, on a validation measure that is not the
reported one, averaged over NFE 1 and 4:
  toy2d   dev set `toy2d:25gaussians` (never ranked); sliced W2 against an
          independent exact reference with its own seed.
  images  dev set `digits` minus a validation split carved from its train
          split (`data.holdout` = HOLDOUT, `data.holdout_seed` =
          HOLDOUT_SEED: training never sees those images, and the dev
          dataset holds no test split); FID in the board's feature space
          recipe (classifier:digits, trained on the dev train split)
          against the statistics of the held-out images, never the test
          split.
The winner's overrides become the method's `tuned` protocol
(`experiments/bench.py:…,protocol=tuned`) on every dataset of the family
(FAMILY_DATASETS), committed with the trial table in
`results/tuning/<family>/`.

Every space has the shared optimizer axis `train.lr` plus at most three of
the method's own keys, each the axis its paper ablates (cited); values
include the paper / official default. `space(method, family)` is the grid a
family searches: SPACES, with the family's entries of FAMILY_SPACES on top
where a toy value does not carry over to images.
"""

from __future__ import annotations

K_TRIALS = 8               # the same K for every method and family
TRIAL_SEED = 1000          # trial seeds 1000..1007: never a reported seed
# Development sets (tuned on): one per dataset family. The toy one is never
# ranked; the image one is a ranked dataset, so it is tuned on its train
# split minus HOLDOUT and scored on that held-out part (see above).
DEV_SETS = {'toy2d': 'toy2d:25gaussians', 'images': 'digits'}
# Datasets (the name before ':') a family's winner applies to with
# protocol=tuned. mnist shares fashion_mnist's bench protocol.
FAMILY_DATASETS = {'toy2d': ('toy2d',),
                   'images': ('digits', 'fashion_mnist', 'mnist')}
# Validation split carved from the dev set's train split (`data.holdout`):
# 20% of digits' 1437 train images = 287 (the board's test split is 360;
# the generator then trains on 1150). Families absent here validate on
# fresh exact samples (toy).
HOLDOUT = {'images': 0.2}
HOLDOUT_SEED = 7_919       # `data.holdout_seed`: which images are held out
VAL_NFE = (1, 4)           # validation objective: mean over these NFEs

_LR = {'train.lr': (3e-4, 1e-3, 3e-3)}  # shared by every method

_SCM = {**_LR, 'method.tangent_norm': ('l2', 'none'),
        'method.adaptive_weighting': (True, False),
        'method.tangent_warmup_frac': (0.0, 10_000 / 350_000, 0.1)}

SPACES: dict[str, dict[str, tuple]] = {
    # Lipman et al. 2023 use uniform t; SD3 (Esser et al. 2024, Sec. 3.1)
    # shows logit-normal t helps, with location 0 (SD3) or -0.4 (EDM).
    'flow_matching': {**_LR, 'method.time_dist': ('uniform', 'logit_normal'),
                      'method.p_mean': (-0.4, 0.0)},
    # MeanFlow (Geng et al. 2025) Tab. 1a (ratio of r != t), Tab. 1c (time
    # sampler), Tab. 1e (adaptive-weight power p).
    'meanflow': {**_LR,
                 'method.ratio_r_neq_t': (0.25, 0.5, 0.75),
                 'method.time_dist': ('uniform', 'logit_normal'),
                 'method.adaptive_p': (0.0, 0.5, 1.0)},
    # TVM (Zhou et al. 2025): time law of s, gap law mean, teacher EMA
    # (official 0.99; 0 = stop-gradient of θ).
    'tvm': {**_LR,
            'method.time_dist': ('uniform', 'logit_normal'),
            'method.gap_p_mean': (-0.8, 0.0),
            'method.teacher_ema': (0.0, 0.99, 0.999)},
    # Drifting (Deng et al. 2026): temperature set and the two
    # normalisations of App. A.6.
    'drifting': {**_LR,
                 'method.temperatures': ((0.02, 0.05, 0.2), (0.05, 0.2),
                                         (0.02, 0.05, 0.2, 0.5)),
                 'method.feature_norm': (True, False),
                 'method.drift_norm': (True, False)},
    # DTM (Shaul et al. 2025): head solver steps (Tab. 10; midpoint: 2
    # evaluations each), head width, and the head's input (the backbone's
    # hidden features, the paper's way, or its output).
    'transition_matching': {**_LR,
                            'method.head_steps': (2, 4, 8),
                            'method.head_width': (32, 64),
                            'method.head_input': ('hidden', 'output')},
    # iMF (Geng, Lu et al. 2025): the v-head ablation (auxiliary head vs
    # the boundary u(z, t, t)); the r = t fraction and adaptive-weight power
    # are MeanFlow's Tab. 1a / 1e axes on iMF's keys (official 0.5, 1.0).
    'imeanflow': {**_LR, 'method.v_head': ('aux', 'boundary'),
                  'method.data_proportion': (0.25, 0.5, 0.75),
                  'method.norm_p': (0.0, 0.5, 1.0)},
    # Shortcut models (Frans et al. 2024): share of self-consistency rows
    # (paper 1/4; official flag bootstrap_every=8 -> 1/8), EMA vs online
    # targets (official `bootstrap_ema`), number of step levels (official
    # denoise_timesteps=128).
    'shortcut': {**_LR,
                 'method.bootstrap_fraction': (0.125, 0.25, 0.5),
                 'method.bootstrap_ema': (True, False),
                 'method.max_steps': (32, 64, 128)},
    # sCM (Lu & Song 2024) §4: tangent normalisation, adaptive weighting,
    # tangent warm-up (official 10k of FastGen's 350k CIFAR-10 steps). The
    # same space for both variants (sCT `scm`, sCD `scd`).
    'scm': _SCM,
    'scd': _SCM,
    # f-distill (Xu, Nie, Vahdat 2025): the f-divergence (Tab. 2), GAN
    # weight and critic / student update ratio (FastGen defaults 1e-3, 5).
    'f_distill': {**_LR,
                  'method.f_div': ('js', 'rkl', 'sh'),
                  'method.gan_weight': (1e-3, 1e-2),
                  'method.student_update_freq': (5, 10)},
}

# Per-family replacements of SPACES entries (same keys, so the budget and
# the number of axes are unchanged). Only where the image default is not a
# grid value and the toy grid was built around the toy default:
FAMILY_SPACES: dict[str, dict[str, dict[str, tuple]]] = {
    'images': {
        # DTM head width: the toy grid (32, 64) brackets the toy default
        # 32; images default to 48 (IMAGE_PRESET), kept as the middle value.
        'transition_matching': {'method.head_width': (32, 48, 64)},
    },
}


def space(method: str, family: str) -> dict[str, tuple]:
  """The grid `family` searches for `method` (SPACES + FAMILY_SPACES)."""
  return {**SPACES[method], **FAMILY_SPACES.get(family, {}).get(method, {})}


def family_of(dataset: str) -> str:
  """The tuning family whose winner `protocol=tuned` applies to `dataset`.

  Raises:
    ValueError: no family covers the dataset (FAMILY_DATASETS).
  """
  name = str(dataset).partition(':')[0]
  for family, names in FAMILY_DATASETS.items():
    if name in names:
      return family
  raise ValueError(f'dataset {dataset!r} is in no tuning family '
                   f'({FAMILY_DATASETS}); protocol=tuned needs one '
                   '(experiments/tuning.py FAMILY_DATASETS).')
