"""Drifting Models: a one-step generator trained to follow a drifting field.

Deng, Li, Li, Du, He 2026, "Generative Modeling via Drifting", arXiv
2602.04770. Spec: specs/drifting_tm_fdistill.md §1.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from onestep_bench import method as base

_HI = jax.lax.Precision.HIGHEST  # fp32 distances even where TF32 is default


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
      # Generated samples (= negatives) per step; 0 means the data batch
      # size. Positives are the data batch (official toy: 2048 + 2048).
      num_gen=0,
      # Image-only keys (feature encoder, per-class groups, CFG α, memory
      # banks; spec §1.4-1.7) belong to the image issue.
  ))


# --------------------------------------------------------------------- field
def _cdist(x: jax.Array, y: jax.Array) -> jax.Array:
  """‖x_i - y_k‖₂, squared distance clamped ≥ 1e-8 (official `cdist`).

  Args:
    x: [G, N, C].
    y: [G, M, C].

  Returns:
    [G, N, M] float32.
  """
  # Centre per group first: translation-invariant, and it keeps the
  # |x|² + |y|² - 2xy expansion accurate for data far from the origin.
  mu = jnp.mean(y, axis=1, keepdims=True)
  x, y = x - mu, y - mu
  xy = jnp.einsum('gnc,gmc->gnm', x, y, precision=_HI)
  sq = (jnp.sum(x * x, -1)[:, :, None] + jnp.sum(y * y, -1)[:, None, :]
        - 2.0 * xy)
  return jnp.sqrt(jnp.maximum(sq, 1e-8))


def _log_mass_and_mean(log_a: jax.Array,
                       t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Row mass log Σ_k A_ik and mean Σ_k A_ik T_k / Σ_k A_ik, stably.

  Args:
    log_a: [G, N, K] log affinities (may hold -inf for zero weights).
    t: [G, K, C] target coordinates.

  Returns:
    ([G, N] log row mass (-inf if empty), [G, N, C] weighted mean of T).
  """
  mx = jnp.max(log_a, -1, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  e = jnp.exp(log_a - mx)
  mass = jnp.sum(e, -1)
  mean = jnp.einsum('gnk,gkc->gnc', e, t, precision=_HI)
  mean = mean / jnp.maximum(mass, 1e-30)[..., None]
  return mx[..., 0] + jnp.log(mass), mean


def _log_weights(w: jax.Array | None, g: int, m: int) -> jax.Array:
  """[G, M] log target weights (log 0 = -inf); None means unit weights."""
  if w is None:
    return jnp.zeros((g, m), jnp.float32)
  w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (g, m))
  return jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)


def drift_field(
    x: jax.Array, pos: jax.Array, neg: jax.Array, *,
    temperatures: Sequence[float] = (0.02, 0.05, 0.2),
    pos_weights: jax.Array | None = None,
    neg_weights: jax.Array | None = None,
    self_mask: bool = True, feature_norm: bool = True,
    drift_norm: bool = True, floor: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The drifting field V(x) on groups of vectors (spec §1.3), no gradient.

  Args:
    x: [G, N, C] generated vectors (queries).
    pos: [G, P, C] positive (data) vectors.
    neg: [G, Q, C] negative vectors. With `self_mask`, the first N of them
      must be `x` itself (official layout [gen | extra negatives]); their
      diagonal is masked with +100 normalised distance units.
    temperatures: kernel temperatures τ (normalised units if
      `feature_norm`, data units otherwise); the field sums over them.
    pos_weights: [G, P] or [P] or None (ones); applied after the softmaxes.
    neg_weights: [G, Q] or [Q] or None (ones), e.g. CFG weight w on
      unconditional negatives.
    self_mask: mask the generated-generated diagonal (needs Q ≥ N).
    feature_norm: divide by the global scale (paper A.6); else raw units.
    drift_norm: scale each V_τ to unit RMS before summing (paper A.6).
    floor: floor on softmax_row·softmax_col (official 1e-6; 0 = none).

  Returns:
    v: [G, N, C] field in normalised coordinates x/ρ (the regression target
      is x/ρ + v); ρ = 1 without `feature_norm`.
    stats: scalars `scale` (s), `rho` (ρ), `field_rms` (RMS of Σ_τ V_τ
      before drift normalisation, data units) and `nn_dist` (mean distance
      of x to its nearest positive, data units).
  """
  sg = lambda a: jax.lax.stop_gradient(jnp.asarray(a, jnp.float32))
  x, pos, neg = sg(x), sg(pos), sg(neg)
  g, n, c = x.shape
  q = neg.shape[1]
  if self_mask and q < n:
    raise ValueError(f'self_mask needs the generated set first among the '
                     f'negatives: got {q} negatives for {n} queries.')
  targets = jnp.concatenate([neg, pos], axis=1)  # [G, M, C]
  logw = jnp.concatenate([_log_weights(neg_weights, g, q),
                          _log_weights(pos_weights, g, pos.shape[1])], 1)
  dist = _cdist(x, targets)  # [G, N, M]
  w = jnp.exp(logw)
  scale = jnp.mean(dist * w[:, None, :]) / jnp.mean(w)
  if feature_norm:
    rho = jnp.maximum(scale / math.sqrt(c), 1e-3)
    dist_n = dist / jnp.maximum(scale, 1e-3)
  else:
    rho, dist_n = jnp.ones((), jnp.float32), dist
  if self_mask:
    dist_n = dist_n + 100.0 * jnp.eye(n, targets.shape[1], dtype=jnp.float32)
  t_n = targets / rho

  v, v_raw = jnp.zeros_like(x), jnp.zeros_like(x)
  for tau in temperatures:
    logits = -dist_n / tau
    log_a = 0.5 * (jax.nn.log_softmax(logits, -1)
                   + jax.nn.log_softmax(logits, -2))
    if floor > 0:
      log_a = jnp.maximum(log_a, 0.5 * math.log(floor))
    log_a = log_a + logw[:, None, :]
    log_sn, mean_n = _log_mass_and_mean(log_a[..., :q], t_n[:, :q])
    log_sp, mean_p = _log_mass_and_mean(log_a[..., q:], t_n[:, q:])
    log_pair = log_sp + log_sn  # [G, N]: log S⁺S⁻
    diff = mean_p - mean_n      # V_τ = S⁺S⁻ (E⁺[T] - E⁻[T])
    v_tau = jnp.exp(log_pair)[..., None] * diff
    v_raw = v_raw + v_tau
    if drift_norm:
      top = jnp.max(log_pair)
      top = jnp.where(jnp.isfinite(top), top, 0.0)
      v_rel = jnp.exp(log_pair - top)[..., None] * diff
      v = v + v_rel / jnp.sqrt(jnp.maximum(jnp.mean(v_rel**2), 1e-8))
    else:
      v = v + v_tau
  stats = dict(scale=scale, rho=rho,
               field_rms=rho * jnp.sqrt(jnp.mean(v_raw**2)),
               nn_dist=jnp.mean(jnp.min(dist[..., q:], -1)))
  return v, stats


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
    **field_kwargs: `temperatures`, `feature_norm`, `drift_norm`, `floor`.

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
class Method(base.Method):
  """One-step generator f_θ(ε) = net(ε, t=1, h=1) trained by drifting.

  Toy / raw-space form: one group holding all generated samples, the data
  batch as positives (no feature encoder; spec §1.8, §1.11). Unconditional:
  per-class groups, CFG and feature encoders come with the image issue.
  """

  supported_nfe = (1,)

  def generate(self, params, eps: jax.Array) -> jax.Array:
    """The generator x = f_θ(ε): one pass at t = h = 1 (null label)."""
    return self.apply(params, eps, 1.0, 1.0, None)

  def loss(self, params, batch, key, state):
    """Eq. 1 on one group: num_gen samples vs the data batch (positives)."""
    del state
    pos = batch['x']
    n = self.mcfg.num_gen or pos.shape[0]
    x = self.generate(params, self.noise(key, n))
    loss, stats = drift_loss(
        x.reshape(1, n, -1), pos.reshape(1, pos.shape[0], -1),
        temperatures=tuple(self.mcfg.temperatures),
        feature_norm=self.mcfg.feature_norm, drift_norm=self.mcfg.drift_norm,
        floor=self.mcfg.affinity_floor)
    # The loss is ≈ ‖Σ_τ Ṽ_τ‖², constant by construction with drift_norm
    # (lambertae/drifting#3); field_rms / nn_dist are what converge.
    return loss, dict(field_rms=stats['field_rms'], nn_dist=stats['nn_dist'],
                      feature_scale=stats['scale'])

  def sample(self, params, key, n, *, nfe, labels=None, guidance=None):
    """Samples f_θ(ε), ε ~ N(0, I), with exactly one network evaluation."""
    self.check_nfe(nfe)
    del guidance
    if labels is not None:
      raise NotImplementedError(
          'methods/drifting.py is unconditional for now (per-class groups '
          'and CFG come with the image issue); call sample with labels=None.')
    return self.generate(params, self.noise(key, n))
