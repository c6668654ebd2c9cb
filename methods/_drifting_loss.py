"""Drifting: the eq. 1 loss and the image path's pure pieces.

Private helper of methods/drifting.py (Deng et al. 2026, arXiv 2602.04770;
spec docs/methods/drifting.md), which re-exports every name here: `drift_loss`
(eq. 1 on [G, N, C] groups, spec §1.3) and, for images, `sample_alpha` /
`cfg_negatives` (CFG in training, paper §3.5, A.7), `regroup` (one group per
(class, location), spec §1.4), `feature_loss` (eqs. 6-7) and
`image_sample_metrics` (online pixel-space metrics). The field itself
(`drift_field`, `coverage_stats`) is in methods/_drifting_field.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from methods._drifting_field import _cdist, coverage_stats, drift_field


# ---------------------------------------------------------------- eq. 1
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


# ---------------------------------------------------------------- images
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
