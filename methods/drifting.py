"""Drifting Models: a one-step generator trained to follow a drifting field.

Deng, Li, Li, Du, He 2026, "Generative Modeling via Drifting", arXiv
2602.04770. Spec: docs/methods/drifting.md (its § numbers are cited below).

A generator x = f_θ(ε) pushes N(0, I) forward to q_θ. The drifting field
moves every generated sample toward data (positives y⁺ ~ p) and away from
other generated samples (negatives y⁻ ~ q), with a Laplace kernel
k(x, y) = exp(-‖x - y‖ / τ) (plain L2, not squared):

  V⁺_p(x) = E_p[k(x, y⁺)(y⁺ - x)] / Z_p(x),  V⁻_q(x) likewise   (eqs. 2-3)
  V_{p,q}(x) = V⁺_p(x) - V⁻_q(x)                                    (eq. 4)
             = (Z_p Z_q)⁻¹ E_{p,q}[k(x, y⁺) k(x, y⁻)(y⁺ - y⁻)]       (eq. 5)
  L(θ) = E_ε ‖f_θ(ε) - sg(f_θ(ε) + V(f_θ(ε)))‖²                      (eq. 1)

V is anti-symmetric (V_{p,q} = -V_{q,p}), so V ≡ 0 at q = p; the gradient
of L is -2V pulled back through f_θ. Sampling is exactly one forward pass.

The batched field follows the official code (lambertae/drifting
`drift_loss.py`, spec §1.3), on groups [G, N, C] of generated vectors with
targets T = [negatives (the generated set itself first, self-masked) |
positives] and target weights ω:
  1. D = ‖x_i - T_k‖₂ with the squared distance clamped at 1e-8.
  2. Feature normalisation (paper A.6): one global scale
     s = mean(ω D) / mean(ω) shared by all groups; coordinates are divided
     by ρ = max(s / √C, 1e-3) and distances by max(s, 1e-3); the
     generated-generated diagonal gets +100 (a finite self-mask).
  3. Per τ: A = sqrt(softmax_targets(-D/τ) · softmax_queries(-D/τ)), then
     A ← A ω; V_i = S⁻_i Σ⁺ A_ik (T_k - x_i) - S⁺_i Σ⁻ A_ik (T_k - x_i)
     with S^± the row sums of A over positive / negative columns.
  4. Drift normalisation (paper A.6): V_τ / sqrt(max(mean V_τ², 1e-8)),
     summed over τ; loss = mean((x/ρ - sg(x̄/ρ + Σ_τ Ṽ_τ))²).

Deviations (numerics only, same field): everything is in the log domain.
V_i is computed as S⁺_i S⁻_i (E⁺_i[T] - E⁻_i[T]) with E^± the A-weighted
means, so no (Σ c) x cancellation, no 0/0 and V(P, P) = 0 exactly. The
drift normalisation factors out the largest log S⁺S⁻ first, which equals
the official formula with the 1e-8 clamp taken relative to that largest
pair weight; it keeps the direction when every raw kernel underflows (tiny
τ). The official affinity floor (product ≥ 1e-6) is off by default: it
swamps the real affinities (~1/√(NM)) of toy-sized groups and training
fails (spec §1.12.7).

Temperature range (issue 18 §2, measured; `validate_config` refuses the
rest). The kernels are softmax-normalised (eqs. 2-3), so V sees the shape
of p and q within a few τ of x, not their mass: a set of generated samples
sitting on one mode of p with that mode's shape has V ≈ 0 whatever the
mass ratio, and only targets within a few τ can move mass between modes.
On toy2d:8gaussians (mode gap 1.53, ≈ 0.6 normalised units) the zero-
initialised output starts q as a point at the origin, which a narrow
kernel moves as one blob onto the nearest data (τ = 0.05: 1 of 8 modes by
step ~100 with both normalisations, with the official 1e-8 drift clamp,
and (seed 0) in raw units without normalisation, recovered by step 400).
A narrow τ then holds the collapse: on a one-mode sample the field
of τ ≤ 0.05 pulls the cluster together (corr(V_y, y) = -0.3 / -0.5 at
τ = 0.02 / 0.05), τ ≥ 0.1 spreads it along the ring (+0.8 / +1.0). 1000
bench steps, normalised units: (0.01,), (0.02,), (0.02, 0.05) and (0.05,)
(2 of 3 seeds) end on one mode, sliced W2 1.9, while `nn_dist` reads a
converged 0.02; (0.1,) (3 of 3 seeds), (0.2,) and the default reach 8/8.
(0.05,) with feature_norm only ends on 2 of 8 modes in 1 of 2 seeds;
25gaussians at (0.05,): 1 of 25 modes, sliced W2 1.37 (default 0.095).
Hence on toy mixtures with modes > TOY_SEPARATION = 10 stds apart the
largest τ must be ≥ TOY_TAU_MAX_MIN = 0.1 with feature_norm. Not refused:
8gaussians_torchcfm (modes 6.8 stds apart: 8/8 at (0.05,), sliced W2 0.10,
seed 0) and checkerboard (no gaps: 0.027 at (0.05,) and at the default).
It is not a departure from the official code: its
drift_loss.py with R_list = (0.05,) computes this field (the 1e-8 drift
clamp changes nothing here; with its 1e-6 affinity floor nothing trains
at toy group sizes), and its toy demo's one τ = 0.05 on raw distances
without normalisation (0.02-0.05 normalised units here) also ends on one
mode of 8gaussians in 2 of 3 seeds (seed 0: 8/8). The demo's data
(checkerboard, swiss roll) has no separated modes and its generator does
not start as a point. With feature_norm=False τ is in data units, which
the config does not know: not refused; `coverage` shows the collapse.
Drift normalisation of a single τ is a global scalar per step (no effect
on the direction of the step). On any data, a τ ≪ the sample spacing
makes the kernel a hard nearest-neighbour assignment: at τ = 1e-4 the
normalised field of that τ sits on a few queries (|V| up to ≈ √N; toy
samples were sent far off the data), so τ ≥ TAU_MIN = 0.01 with
feature_norm. Images keep the paper's single-τ ablation (A.6).

Collapse metrics (logged every step): `nn_dist` (generated -> nearest
positive) is blind to dropped modes; `nn_dist_rev` (positive -> nearest
generated) and `coverage` (Naeem et al. 2020, eq. 4, k = 5: share of data
points whose k-NN ball holds a generated sample; ≈ 0.97 for two draws of
one law, ≤ 1/K on one of K equal modes) see them; see `coverage_stats`.

Layout (over the ~400-line guide of issue 19: about half is the docstrings
and measured evidence the spec cites): the field itself (`drift_field`,
`coverage_stats`; dense, or for toy vectors above 4 MiB per [G, N, M]
array query-blocked) lives in methods/_drifting_field.py and is
re-exported here; here are `drift_loss` (eq. 1); the image path's pure
pieces
(`cfg_negatives`, `feature_loss`, `image_sample_metrics`); `Method`, whose
`loss` dispatches to `_toy_loss` (raw vectors, spec §1.8) or `_image_loss`
(feature keys from `_pixel_features` / `_encoder_features`, spec §1.4-1.5).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from methods._drifting_field import (
    COVERAGE_K,
    _cdist,
    coverage_stats,
    drift_field,
)
from onestep_bench import config_check as cc
from onestep_bench import method as base
from onestep_bench.data import toy2d

# Smallest temperature, in normalised-distance units (feature_norm=True),
# on any data: below it the kernel is a hard nearest-neighbour assignment
# and the field of one τ is carried by a handful of queries (see the
# module docstring, "Temperature range").
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


# --------------------------------------------------------------------- field
def drift_loss(
    x: jax.Array, pos: jax.Array, extra_neg: jax.Array | None = None, *,
    pos_weights: jax.Array | None = None,
    extra_neg_weights: jax.Array | None = None, **field_kwargs,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-feature-key loss mean((x/ρ - sg(x̄/ρ + V))²) (eq. 1, spec §1.3).

  The negatives are the generated set itself (self-masked) followed by
  `extra_neg` (e.g. unconditional real samples with CFG weight).

  Args:
    x: [G, N, C] generated vectors; gradients flow through x only.
    pos: [G, P, C] positives.
    extra_neg: [G, U, C] extra negatives, or None.
    pos_weights: [G, P] or None.
    extra_neg_weights: [G, U] or None (ones).
    **field_kwargs: `temperatures`, `feature_norm`, `drift_norm`, `floor`,
      `coverage_k`.

  Returns:
    (scalar loss, stats of `drift_field`). ∂loss/∂x = -2 V / (ρ · x.size).
  """
  xs = jax.lax.stop_gradient(x.astype(jnp.float32))
  g, n, _ = xs.shape
  neg, neg_w = xs, None
  if extra_neg is not None:
    neg = jnp.concatenate([xs, extra_neg.astype(jnp.float32)], 1)
    if extra_neg_weights is not None:
      neg_w = jnp.concatenate([jnp.ones((g, n), jnp.float32),
                               jnp.broadcast_to(extra_neg_weights,
                                                extra_neg.shape[:2])], 1)
  v, stats = drift_field(xs, pos, neg, pos_weights=pos_weights,
                         neg_weights=neg_w, self_mask=True, **field_kwargs)
  goal = jax.lax.stop_gradient(xs / stats['rho'] + v)
  return jnp.mean(jnp.square(x / stats['rho'] - goal)), stats


# -------------------------------------------------------------------- method
def sample_alpha(key: jax.Array, n: int, *, alpha_max: float, power: float,
                 p_one: float) -> jax.Array:
  """CFG strengths α ∈ [1, alpha_max], p(α) ∝ α^-power, α = 1 w.p. p_one.

  Inverse-CDF sampling as the official `train.py` (paper A.7). Returns [n].
  """
  k_u, k_one = jax.random.split(key)
  u = jax.random.uniform(k_u, (n,))
  if abs(power - 1.0) < 1e-6:
    alpha = alpha_max ** u
  else:
    e = 1.0 - power  # CDF ∝ α^e - 1
    alpha = (1.0 + u * (alpha_max ** e - 1.0)) ** (1.0 / e)
  return jnp.where(jax.random.uniform(k_one, (n,)) < p_one, 1.0, alpha)


def regroup(f: jax.Array, groups: int) -> jax.Array:
  """[G·N, L, C] per-sample features -> [G·L, N, C] groups (class, location).

  Each (class group, location) pair is one group of the field; the global
  feature scale stays shared across all of them (paper A.6).
  """
  gn, locs, c = f.shape
  f = f.reshape(groups, gn // groups, locs, c).transpose(0, 2, 1, 3)
  return f.reshape(groups * locs, gn // groups, c)


def cfg_negatives(
    k_alpha: jax.Array, k_unc: jax.Array, pos: jax.Array, groups: int,
    n: int, *, num_unc: int, alpha_max: float, power: float, p_one: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """CFG in training (paper §3.5, eqs. 8-9, A.7): α and the extra negatives.

  α is drawn per class group (`sample_alpha`); the unconditional negatives
  are `num_unc` real samples of random class per group (the batch's
  marginal is the data's), with kernel weight w = (α-1)(N-1)/N_unc
  (official `train.py`), so the fixed point is q(·|c) = α p(·|c) -
  (α-1) p(·|∅) (eq. 9).

  Args:
    k_alpha: key of the α draw.
    k_unc: key of the unconditional negatives' indices.
    pos: [B, ...] the positives (the data batch).
    groups: class groups G.
    n: generated samples per group N.
    num_unc: unconditional negatives per group N_unc.
    alpha_max: largest α.
    power: p(α) ∝ α^-power.
    p_one: probability of α = 1.

  Returns:
    (alpha [G·N], one per generated sample; unc [G·N_unc, ...] negatives,
    group-major; unc_w [G] their weight).
  """
  a_g = sample_alpha(k_alpha, groups, alpha_max=alpha_max, power=power,
                     p_one=p_one)
  alpha = jnp.repeat(a_g, n)
  idx = jax.random.randint(k_unc, (groups * num_unc,), 0, pos.shape[0])
  unc = pos[idx]
  unc_w = (a_g - 1.0) * (n - 1) / num_unc
  return alpha, unc, unc_w


def feature_loss(
    fx: dict[str, jax.Array], fp: dict[str, jax.Array], groups: int,
    fu: dict[str, jax.Array] | None = None, unc_w: jax.Array | None = None,
    **field_kwargs,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eq. 1 summed over feature keys j (eqs. 6-7), per (class, location).

  Σ_j mean((φ_j(x)/ρ_j - sg(φ_j(x)/ρ_j + V_j))²), each key j regrouped into
  one group per (class group, location) (`regroup`, spec §1.4) with its own
  global scale (paper A.6).

  Args:
    fx: {key: [G·N, L, C]} features of the generated samples (gradients
      flow through these).
    fp: {key: [G·P, L, C]} features of the positives, stop-gradient.
    groups: class groups G.
    fu: {key: [G·U, L, C]} features of the CFG negatives, stop-gradient, or
      None (no CFG).
    unc_w: [G] their weight (`cfg_negatives`), with `fu`.
    **field_kwargs: `drift_loss` options (`temperatures`, `feature_norm`,
      `drift_norm`, `floor`).

  Returns:
    (scalar loss, {'field_rms/<key>', 'num_feature_keys'}).
  """
  total, metrics = 0.0, {}
  for name in fx:
    xs, ps = regroup(fx[name], groups), regroup(fp[name], groups)
    kw = {}
    if fu is not None:
      us = regroup(fu[name], groups)
      kw = dict(extra_neg=us, extra_neg_weights=jnp.repeat(
          unc_w, fx[name].shape[1])[:, None])
    loss_k, stats = drift_loss(xs, ps, **kw, **field_kwargs)
    total = total + loss_k
    metrics[f'field_rms/{name}'] = stats['field_rms']
  metrics['num_feature_keys'] = jnp.asarray(len(fx), jnp.float32)
  return total, metrics


def image_sample_metrics(x: jax.Array, pos: jax.Array,
                         groups: int) -> dict[str, jax.Array]:
  """Online pixel-space sample metrics per class group (no gradient).

  The loss (eq. 1) is ≈ constant by construction with drift_norm
  (lambertae/drifting#3), so these are what a run is judged by: mean L2
  distance per pixel (÷ √D) from each generated image to its nearest
  positive of its group (`nn_dist`), the same among the positives
  (`nn_dist_data`), from each positive to its nearest generated image
  (`nn_dist_rev`) and `coverage` (Naeem et al. 2020, eq. 4; per group, so
  it sees a class collapse), see `coverage_stats`.

  Args:
    x: [G·N, ...] generated images, group-major.
    pos: [G·P, ...] positives, group-major.
    groups: class groups G.

  Returns:
    {'nn_dist', 'nn_dist_data', 'nn_dist_rev'[, 'coverage' when P ≥ 2]}.
  """
  p = pos.shape[0] // groups
  xr = regroup(x.reshape(x.shape[0], 1, -1), groups)
  pr = regroup(pos.reshape(pos.shape[0], 1, -1), groups)
  d_gen = _cdist(jax.lax.stop_gradient(xr), pr)
  d_pos = _cdist(pr, pr) + 1e9 * jnp.eye(p)
  dim = math.sqrt(xr.shape[-1])
  cover = coverage_stats(d_gen, d_pos)
  out = dict(nn_dist=jnp.mean(jnp.min(d_gen, -1)) / dim,
             nn_dist_data=jnp.mean(jnp.min(d_pos, -1)) / dim,
             nn_dist_rev=cover['nn_dist_rev'] / dim)
  if 'coverage' in cover:
    out['coverage'] = cover['coverage']
  return out


def separated_modes(toy_name: str) -> bool:
  """Whether toy2d:<toy_name> is a mixture with modes > TOY_SEPARATION σ apart.

  The narrow-kernel collapse (module docstring, "Temperature range") needs
  empty gaps between modes; toy2d:checkerboard has none and trains at a
  single τ = 0.05 like the default.
  """
  m = toy2d.MIXTURES.get(toy_name)
  if m is None:
    return False
  c = np.asarray(m.centers, np.float64)
  d = np.linalg.norm(c[:, None] - c[None], axis=-1) + np.diag(
      np.full(len(c), np.inf))
  return float(d.min()) / float(m.std) > TOY_SEPARATION


class Method(base.Method):
  """One-step generator x = f_θ(ε, c, α[, style]) trained by drifting.

  Toy data: one group of all generated samples against the data batch in
  raw coordinates (spec §1.8). Images (spec §1.4-1.5): the field is summed
  over feature keys — the raw output (`global`) and, with
  `features='pixels+encoder'`, the multi-scale keys of a frozen,
  harness-trained encoder — with one group per (class, location);
  labelled data adds per-class groups and CFG through weighted
  unconditional negatives, with α an input of the generator, so guided
  sampling stays one forward pass.
  """

  # Deng et al. eq. 5: the field at each generated sample is a softmax over
  # every sample of the batch, so a micro-batch's loss is not a part of it.
  grad_accum_refused = ('its drifting field couples every generated sample '
                        'to all samples of the batch (positives and '
                        'negatives), so the loss of a micro-batch is not a '
                        'part of the global-batch loss')

  supported_nfe = (1,)

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    """Every `config.method` key, before anything is built or compiled.

    Temperatures (module docstring, "Temperature range"): finite and > 0
    always; with feature_norm (normalised-distance units) each ≥ TAU_MIN,
    and on toy mixtures with separated modes (`separated_modes`) the
    largest ≥ TOY_TAU_MAX_MIN, the narrowest kernel measured not to hold a
    one-mode collapse. With feature_norm=False τ is
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

  def __init__(self, config, spec):
    super().__init__(config, spec)
    m = self.mcfg
    feats = m.features
    if feats == 'auto':
      feats = 'pixels'  # see get_config: the encoder keys are opt-in
    if feats not in FEATURES[1:]:
      raise ValueError(f'config.method.features={m.features!r}: use one of '
                       f'{FEATURES}.')
    if 'encoder' in feats and spec.kind != 'image':
      raise ValueError(f'config.method.features={feats!r} needs image data '
                       f'(got {spec.kind}); use features=pixels.')
    self.use_pixels = 'pixels' in feats
    self.use_encoder = 'encoder' in feats
    self.encoder = None  # set by `prepare`
    self.class_groups = (m.classes_per_step or spec.num_classes
                         if spec.num_classes else 0)
    self.cfg = bool(spec.num_classes and m.num_unc > 0
                    and m.cfg_alpha_max > 1.0)
    if self.cfg and not config.model.get('guidance_embed', False):
      raise ValueError(
          'drifting with CFG on labelled data feeds α to the generator: set '
          '--config.model.guidance_embed=True (or --config.method.num_unc=0 '
          'for no CFG).')
    self.style = (config.model.get('style_tokens', 0),
                  config.model.get('style_vocab', 64))

  # ------------------------------------------------------------- encoder
  def prepare(self, dataset) -> None:
    """Loads (or trains once and caches) the frozen feature encoder."""
    if not self.use_encoder or self.encoder is not None:
      return
    from onestep_bench import encoders  # pylint: disable=g-import-not-at-top
    recipe = dict(encoders.RECIPE)
    if self.mcfg.encoder_width:
      recipe['width'] = self.mcfg.encoder_width
    if self.mcfg.encoder_steps:
      recipe['steps'] = self.mcfg.encoder_steps
    self.encoder = encoders.load_or_train(
        dataset, recipe, max_locations=self.mcfg.encoder_max_locations)

  def upstream_compute(self) -> dict[str, float | None]:
    """The frozen encoder's MAE pre-training FLOPs (its cache metadata)."""
    if self.encoder is None:
      return {}
    info = self.encoder.info
    return {f'encoder:{info.get("cache_key", "")}': info.get('train_flops')}

  def init_extras(self, key, params):
    """The frozen encoder's params, when the field uses encoder features."""
    del key, params
    if not self.use_encoder:
      return {}
    if self.encoder is None:
      raise RuntimeError('methods/drifting.py: call method.prepare(dataset) '
                         'before init (the harness does) to load the frozen '
                         'feature encoder.')
    # Frozen: stored (and checkpointed) with the run, never optimized.
    return {'encoder': jax.tree.map(jnp.asarray, self.encoder.params)}

  def features(self, extras, x: jax.Array) -> dict[str, jax.Array]:
    """Feature dict {key: [B, L, C]} the field is computed on (paper A.5).

    `global` (`_pixel_features`) first, then the `enc/…` keys
    (`_encoder_features`), as selected by config.method.features.
    """
    return {**self._pixel_features(x), **self._encoder_features(extras, x)}

  def _pixel_features(self, x: jax.Array) -> dict[str, jax.Array]:
    """{'global': [B, 1, D]}: the raw output as one vector (paper A.5)."""
    if not self.use_pixels:
      return {}
    return {'global': x.reshape(x.shape[0], 1, -1)}

  def _encoder_features(self, extras, x: jax.Array) -> dict[str, jax.Array]:
    """{'enc/<key>': [B, L, C]}: the frozen encoder's multi-scale keys.

    Paper A.5 (feature maps of the latent-MAE, A.3); the encoder params in
    `extras` are frozen (stop-gradient), gradients flow back through x.
    """
    if not self.use_encoder:
      return {}
    enc = self.encoder.features(jax.lax.stop_gradient(extras['encoder']), x)
    return {f'enc/{k}': v for k, v in enc.items()}

  # ------------------------------------------------------------ generator
  def _style(self, key: jax.Array, n: int) -> jax.Array | None:
    tokens, vocab = self.style
    if not tokens:
      return None
    return jax.random.randint(key, (n, tokens), 0, vocab)

  def generate(self, params, eps: jax.Array, labels=None, alpha=None,
               style=None) -> jax.Array:
    """The generator x = f_θ(ε, c, α, style): one pass at t = h = 1."""
    return self.apply(params, eps, 1.0, 1.0, labels, alpha, style)

  # -------------------------------------------------------------- training
  def loss(self, params, batch, key, state):
    """Eq. 1 (summed over feature keys, eqs. 6-7): the toy or image path."""
    if self.spec.kind == 'toy2d':
      return self._toy_loss(params, batch['x'], key)
    return self._image_loss(params, batch, key, state.extras)

  def _field_kwargs(self) -> dict:
    """The `drift_loss` options of config.method (spec §1.3)."""
    m = self.mcfg
    return dict(temperatures=tuple(m.temperatures),
                feature_norm=m.feature_norm, drift_norm=m.drift_norm,
                floor=m.affinity_floor)

  def _toy_loss(self, params, pos: jax.Array, key: jax.Array):
    """Toy data (spec §1.8): eq. 1 on raw vectors, one group.

    Every generated sample against the whole data batch, in raw coordinates
    (no feature keys, classes or CFG); the plain key draws the noise (the
    recorded toy rows).

    Args:
      params: generator params.
      pos: [B, D] the data batch (positives).
      key: the noise key.

    Returns:
      (loss, metrics). The loss is ≈ ‖Σ_τ Ṽ_τ‖², constant by construction
      with drift_norm (lambertae/drifting#3); `field_rms` / `nn_dist` are
      what converge, and `nn_dist_rev` / `coverage` see dropped modes
      (`nn_dist` does not).
    """
    n = self.mcfg.num_gen or pos.shape[0]
    x = self.generate(params, self.noise(key, n))
    loss, stats = drift_loss(x.reshape(1, n, -1),
                             pos.reshape(1, pos.shape[0], -1),
                             coverage_k=COVERAGE_K, **self._field_kwargs())
    return loss, dict(field_rms=stats['field_rms'], nn_dist=stats['nn_dist'],
                      nn_dist_rev=stats['nn_dist_rev'],
                      coverage=stats['coverage'],
                      feature_scale=stats['scale'])

  def _image_loss(self, params, batch, key: jax.Array, extras):
    """Images (spec §1.4-1.5): eq. 1 over feature keys (eqs. 6-7).

    The batch holds G = class_groups one-class blocks of P positives
    (G = 1 unlabelled); N = num_gen or P samples are generated per block
    with its label and, with CFG, its α (`cfg_negatives`, paper A.7).

    Args:
      params: generator params.
      batch: {'x': [G·P, ...], 'y': [G·P] (labelled data)}.
      key: split into the noise, α, CFG-negative and style keys.
      extras: `init_extras` (the frozen encoder's params, if used).

    Returns:
      (loss, metrics): `feature_loss` and `image_sample_metrics`.
    """
    pos, m = batch['x'], self.mcfg
    g = self.class_groups or 1
    p = pos.shape[0] // g
    n = m.num_gen or p
    k_eps, k_alpha, k_unc, k_style = jax.random.split(key, 4)
    labels = alpha = unc = unc_w = None
    if self.spec.num_classes:
      labels = jnp.repeat(batch['y'][::p], n)               # [G·N]
    if self.cfg:
      alpha, unc, unc_w = cfg_negatives(
          k_alpha, k_unc, pos, g, n, num_unc=m.num_unc,
          alpha_max=m.cfg_alpha_max, power=m.cfg_alpha_power,
          p_one=m.cfg_p_one)
    x = self.generate(params, self.noise(k_eps, g * n), labels, alpha,
                      self._style(k_style, g * n))
    fx = self.features(extras, x)
    fp = jax.lax.stop_gradient(self.features(extras, pos))
    fu = (jax.lax.stop_gradient(self.features(extras, unc))
          if unc is not None else None)
    total, metrics = feature_loss(fx, fp, g, fu, unc_w, **self._field_kwargs())
    metrics.update(image_sample_metrics(x, pos, g))
    return total, metrics

  # -------------------------------------------------------------- sampling
  def _sample_keys(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(noise key, style key) of `sample`; toy noise uses the plain key.

    The plain key on toy data keeps the recorded toy rows reproducible.
    """
    k_eps, k_style = jax.random.split(key)
    if self.spec.kind == 'toy2d':
      k_eps = key
    return k_eps, k_style

  def sample(self, params, key, n, *, nfe, labels=None, guidance=None):
    """f_θ(ε, c, α), ε ~ N(0, I): exactly one network evaluation.

    `guidance` is the CFG strength α (trained in; default 1 = no guidance).
    """
    self.check_nfe(nfe)
    if labels is not None and not self.spec.num_classes:
      raise ValueError('this drifting model is unconditional; sample with '
                       'labels=None (or train with data.conditional=True).')
    if guidance is not None and not self.cfg:
      raise ValueError('this drifting model was trained without CFG; sample '
                       'with guidance=None.')
    k_eps, k_style = self._sample_keys(key)
    alpha = None
    if self.cfg:
      alpha = jnp.full((n,), 1.0 if guidance is None else guidance,
                       jnp.float32)
    return self.generate(params, self.noise(k_eps, n), labels, alpha,
                         self._style(k_style, n))
