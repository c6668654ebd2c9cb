"""Config, image preset and config checks of `methods/transition_matching.py`.

Shaul, Singer, Gat, Lipman 2025, arXiv 2506.23589 (spec
docs/methods/transition_matching.md §2). Holds `get_config`,
`IMAGE_PRESET`, `HEAD_INPUTS`, `divisors` and `validate_config` (the body
of `Method.validate_config`); `methods/transition_matching.py` re-exports
these names (the harness, experiments and tests read them there). Private
module (leading '_'): not a method plug-in.
"""

from __future__ import annotations

import ml_collections

from methods._transition_matching_head import HEAD_SAMPLERS
from onestep_bench import config_check as cc
from onestep_bench import models


def get_config() -> ml_collections.ConfigDict:
  """DTM defaults for toy 2D (paper T2I values in the comments)."""
  return ml_collections.ConfigDict(dict(
      # 0: continuous τ ~ U[0, 1) (spec §2.3 [I]: the paper samples DTM at
      # 1-128 steps, Tabs. 10-11, so one model must serve every T); > 0:
      # the paper's discrete grid τ = k/train_T (Alg. 3; T2I: 32).
      train_T=0,
      # What the head reads. 'hidden' (paper §2.5: the head replaces the
      # backbone's final layer): the last hidden activation, per token
      # (MLP: last hidden layer, width 128 on toy; U-Net: the last decoder
      # map, head_patch² pixels of it; DiT: its final tokens). 'output'
      # (the earlier design): a backbone with rep_dim output channels.
      # Toy evidence (8gaussians, bench, seed 0, one run each, midpoint x 4
      # head on both): sliced W2 T=1/2/4 'hidden' 0.160 / 0.099 / 0.091,
      # 'output' 0.134 / 0.087 / 0.098 -- inside the seed spread (the
      # 'output' + Euler x 8 config over seeds 0-2: T=1 0.142-0.192, T=4
      # 0.056-0.096), so the paper's design is kept; images not run yet.
      head_input='hidden',
      # head_input='output' only: representation channels of the backbone
      # output (per pixel / per sample); X_τ is zero-padded to this width.
      # [I] toy: 32 (16x the data dim).
      rep_dim=32,
      # Head token = head_patch x head_patch x C pixels (paper: 2x2x4 of a
      # 32x32x4 latent, §2.3); vectors are always one token (the sample).
      head_patch=1,
      # MAR-style head (paper §2.5: 6 blocks of width 1024, ~2% of the
      # backbone's params, c_head/c_backbone ≈ 0.04, spec §2.6). [I] toy:
      # 2 blocks of width 32, c_head/c_backbone ≈ 0.13 (the toy backbone is
      # tiny). Width 64 is better at T = 1-2 but 4x the head cost
      # (measured with the earlier 'output' + Euler x 8 head: 8gaussians
      # energy distance T=1/2/4: w32 0.017 / 0.0020 / 0.0016 at effective
      # NFE 2.0/4.1/8.2; w64 0.0059 / 0.00006 / 0.0007 at 5.1/10.2/20.4).
      head_width=32,
      head_depth=2,
      head_freq_dim=32,  # sinusoidal width of the s/t embedders (as model)
      # Head ODE solver and its steps per transition. Paper: 'euler', 64
      # steps in the main tables (quality saturates at 4 for T = 16, Tab.
      # 10; 1 Euler step = FM-Euler). [I] 'midpoint' x 4 = 8 head
      # evaluations, the cost of the earlier Euler x 8, chosen on the exact
      # kernel of toy2d:gaussian (head output covariance / Cov(Y | X_τ),
      # eigenvalues at τ = 0, 0.5, 0.75): Euler 8 / 16 / 64 / 256 evals
      # 0.61-0.72 / 0.79-0.85 / 0.94-0.96 / 0.985-0.99; midpoint 4 / 8 / 16
      # evals 0.84-0.98 / 0.987-0.996 / 0.998-0.999; Heun 8 / 16 evals
      # 0.94-1.07 / 0.987-1.03. Samples vs Σ (200k, T = 1/2/4, trace):
      # Euler x 8 0.71 / 0.77 / 0.85, midpoint x 4 0.998 / 0.995 / 0.999.
      # Learned 8gaussians model (bench, seed 0, 'output' head), same
      # weights: sliced W2 T=1/2/4 Euler x 8 0.142 / 0.087 / 0.096,
      # midpoint x 4 0.134 / 0.087 / 0.098, Euler x 64 0.131 / 0.084 /
      # 0.094 (at 4.5x the head cost).
      head_steps=4,
      head_sampler='midpoint',
      # (s, Y_0) draws per token per backbone pass (paper: 1; MAR uses 4).
      head_batch_mul=1,
      # Label dropout to the null class (spec §2.8: 0.1-0.15; paper 0.15).
      class_dropout=0.1,
  ))


# Image overrides of `get_config` (digits / Fashion-MNIST with the small
# U-Net of experiments/bench.py). [I], untuned (no image run yet): 2x2 head
# tokens as the paper; the head reads 2x2 pixels of the U-Net's last
# decoder map (16 channels: 64 per token); a 2 x 48 head, c_head/c_backbone
# ≈ 0.11, so midpoint x 4 (8 head evaluations) makes the effective NFE
# 1.94 T on digits (the earlier 'output' + Euler x 8 head: 1.97 T). rep_dim
# = 8 (32 per token) serves head_input='output' only (its zero-padded input
# / wider output convs add 3% to the U-Net's FLOPs).
IMAGE_PRESET = dict(rep_dim=8, head_patch=2, head_width=48, head_depth=2,
                    head_steps=4)


# What the head reads from the backbone (`head_input`).
HEAD_INPUTS = ('hidden', 'output')


def divisors(n: int) -> tuple[int, ...]:
  """Positive divisors of n: the T a discrete-τ model samples exactly."""
  return tuple(k for k in range(1, n + 1) if n % k == 0)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Grid, representation / head sizes; NFEs dividing a discrete train_T."""
  c, p = config.method, 'method'
  big_t = cc.require_int(c, p, 'train_T', 0, example=0)
  rep = cc.require_int(c, p, 'rep_dim', example=32)
  patch = cc.require_int(c, p, 'head_patch')
  cc.require_int(c, p, 'head_width', example=32)
  cc.require_int(c, p, 'head_depth', 0, example=2)
  f = cc.require_int(c, p, 'head_freq_dim', 2, example=32)
  if f % 2:
    raise cc.ConfigError('method.head_freq_dim', f, 'must be even '
                         '(sinusoidal features come in sin / cos pairs)',
                         f'--config.method.head_freq_dim={f + 1}')
  cc.require_int(c, p, 'head_steps', example=4)
  cc.require_choice(c, p, 'head_sampler', tuple(HEAD_SAMPLERS))
  head_input = cc.require_choice(c, p, 'head_input', HEAD_INPUTS)
  cc.require_int(c, p, 'head_batch_mul')
  cc.require_prob(c, p, 'class_dropout')
  image = not str(config.data.name).startswith('toy2d:')
  if head_input == 'hidden' and image and config.model.name == 'mlp':
    raise cc.ConfigError(
        'method.head_input', head_input, "'output' with the mlp backbone "
        'on images (its hidden features are one vector, not per token)',
        '--config.method.head_input=output')
  if head_input == 'hidden' and image and config.model.name == 'dit':
    dit_p = config.model.get('patch_size',
                             models.options('dit')['patch_size'])
    if patch % dit_p:
      raise cc.ConfigError(
          'method.head_patch', patch, f'must be a multiple of the DiT '
          f'patch_size ({dit_p}): the head reads whole DiT tokens',
          f'--config.method.head_patch={dit_p}')
  if str(config.data.name).startswith('toy2d:'):  # vectors of 2 channels
    if patch != 1:
      raise cc.ConfigError('method.head_patch', patch, 'must be 1 for '
                           'vector data (one token = the whole sample)',
                           '--config.method.head_patch=1')
    if head_input == 'output' and rep < 2:
      raise cc.ConfigError('method.rep_dim', rep, 'must be >= the data '
                           'channels (2): X_τ is zero-padded to it',
                           '--config.method.rep_dim=32')
  if big_t:
    cc.check_supported_nfe(config, divisors(big_t), 'transition_matching '
                           f'with method.train_T={big_t} (its divisors)')
