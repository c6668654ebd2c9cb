"""The drifting field V(x) of `methods/drifting.py`, dense or query-blocked.

Deng, Li, Li, Du, He 2026, "Generative Modeling via Drifting", arXiv
2602.04770, eqs. 2-5 (Laplace kernel k(x, y) = exp(-‖x - y‖ / τ)):

  V_{p,q}(x) = (Z_p Z_q)⁻¹ E_{p,q}[k(x, y⁺) k(x, y⁻)(y⁺ - y⁻)]       (eq. 5)

batched as the official code (lambertae/drifting `drift_loss.py`, spec
docs/methods/drifting.md §1.3); the steps, the log-domain deviations and
the evidence are in the docstring of `methods/drifting.py`, which
re-exports the public names here (`drift_field`, `coverage_stats`,
`COVERAGE_K`). Private module (leading '_'): not a method plug-in.

Two implementations of one field. `_drift_field_dense` builds the
[G, N, M] distance / affinity arrays (N queries, M = Q + P targets); above
BLOCKED_MIN_BYTES per array, for vectors of C ≤ BLOCKED_MAX_DIM (toy
data), `drift_field` runs `_drift_field_blocked`, which recomputes
distances over query blocks of at most BLOCK_BYTES and never holds a
[G, N, M] array. They agree up to float summation order
(relative 3e-7 on loss and stats, 2.3e-6 on ∂loss/∂x; tests/
test_drifting_blocked.py). On XLA:CPU every materialised 32 MiB array
costs tens of ms of page faults and cache misses (docs/perf_peers.md §4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST  # fp32 distances even where TF32 is default

# Neighbour rank of the logged `coverage` (Naeem et al. 2020 use k = 5).
COVERAGE_K = 5
# `drift_field` runs over query blocks (`_drift_field_blocked`) when its
# [G, N, M] float32 arrays would exceed BLOCKED_MIN_BYTES, in blocks of at
# most BLOCK_BYTES: the dense path's 32 MiB arrays (toy batch 2048) each
# cost tens of ms of page faults and cache misses on XLA:CPU (measured,
# 2 cores: demo field at batch 2048 336 -> 53 ms; bench toy 1024, default
# field 117 -> 28 ms; docs/perf_peers.md §4). Read at trace time.
BLOCKED_MIN_BYTES = 4 * 2**20
BLOCK_BYTES = 2**20
# ... and only for vectors of at most BLOCKED_MAX_DIM coordinates: the
# blocked path computes the distances three times, cheap at toy C = 2 but
# not for image features (measured, 2 shared cores, ∂loss/∂x of 490
# (class, location) groups of 64 x 144, C = 64: dense 256 ms, blocked
# 910 ms (3-row blocks) / 370 ms (one block); at C = 4 blocked 214 ms vs
# dense 240), so image groups stay on the dense path.
BLOCKED_MAX_DIM = 16


def _dist_to(x: jax.Array, y_c: jax.Array, mu: jax.Array) -> jax.Array:
  """‖x_i - y_k‖₂ from y_c = y - mu (mu: y's per-group mean): [G, N, M].

  The squared distance is clamped ≥ 1e-8 (official `cdist`). Centring per
  group keeps |x|² + |y|² - 2xy accurate for data far from the origin.
  """
  x = x - mu
  xy = jnp.einsum('gnc,gmc->gnm', x, y_c, precision=_HI)
  sq = (jnp.sum(x * x, -1)[:, :, None] + jnp.sum(y_c * y_c, -1)[:, None, :]
        - 2.0 * xy)
  return jnp.sqrt(jnp.maximum(sq, 1e-8))


def _cdist(x: jax.Array, y: jax.Array) -> jax.Array:
  """‖x_i - y_k‖₂ of x [G, N, C] and y [G, M, C]: [G, N, M] float32."""
  mu = jnp.mean(y, axis=1, keepdims=True)
  return _dist_to(x, y - mu, mu)


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


def coverage_stats(d_gen: jax.Array, d_pos: jax.Array,
                   k: int = COVERAGE_K) -> dict[str, jax.Array]:
  """Mode-collapse metrics from generated->data and data->data distances.

  nn_dist (generated -> nearest data point) stays small when every sample
  sits in one mode; these look from the data side instead:

  * `nn_dist_rev`: mean over data points y_j of min_i ‖x_i - y_j‖, the
    distance from each data point to its nearest generated sample.
  * `coverage`: Naeem, Oh, Uh, Choi, Yoo 2020, "Reliable Fidelity and
    Diversity Metrics for Generative Models", eq. 4:
    (1/M) Σ_j 1[∃ i: ‖x_i - y_j‖ < NND_k(y_j)], with NND_k(y_j) the
    distance from y_j to its k-th nearest other data point. For N = M
    samples of the same law E[coverage] = 1 - Π_{l=1..k} (M-l)/(M+N-l)
    ≈ 1 - 2^-k (0.97 at k = 5, their default); a sample in one of K equal
    modes scores ≤ 1/K.

  Args:
    d_gen: [G, N, P] distances from generated samples to data points.
    d_pos: [G, P, P] distances among the data points (diagonal included;
      it is masked here).
    k: neighbour rank of the coverage radius (clipped to P - 1).

  Returns:
    {'nn_dist_rev', 'coverage'}: scalars, averaged over groups and data
    points; `coverage` is left out when P < 2.
  """
  p = d_pos.shape[-1]
  rev = jnp.min(d_gen, axis=-2)  # [G, P]
  out = dict(nn_dist_rev=jnp.mean(rev))
  if p >= 2:
    # rev_j < NND_k(y_j)  <=>  fewer than k other data points lie within
    # rev_j of y_j: one compare-and-count pass (XLA:CPU's top_k on [P, P]
    # costs more than the whole field).
    d_pos = d_pos + jnp.where(jnp.eye(p, dtype=bool), jnp.inf, 0.0)
    inside = jnp.sum(d_pos <= rev[..., None], axis=-1)  # [G, P]
    out['coverage'] = jnp.mean((inside < min(k, p - 1)).astype(jnp.float32))
  return out


def drift_field(
    x: jax.Array, pos: jax.Array, neg: jax.Array, *,
    temperatures: Sequence[float] = (0.02, 0.05, 0.2),
    pos_weights: jax.Array | None = None,
    neg_weights: jax.Array | None = None,
    self_mask: bool = True, feature_norm: bool = True,
    drift_norm: bool = True, floor: float = 0.0, coverage_k: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The drifting field V(x) (eq. 5) on groups of vectors, no gradient.

  Spec §1.3. Query-blocked (`_drift_field_blocked`) when a [G, N, M]
  float32 array would exceed BLOCKED_MIN_BYTES and C ≤ BLOCKED_MAX_DIM
  (toy vectors), dense (`_drift_field_dense`) otherwise: the same field up
  to float summation order.

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
    coverage_k: > 0 adds `coverage` (`coverage_stats`, this k) to the
      stats; costs one [G, P, P] distance matrix among the positives
      (blocked: over blocks of positives).

  Returns:
    v: [G, N, C] field in normalised coordinates x/ρ (the regression target
      is x/ρ + v); ρ = 1 without `feature_norm`.
    stats: scalars `scale` (s), `rho` (ρ), `field_rms` (RMS of Σ_τ V_τ
      before drift normalisation, data units), `nn_dist` (mean distance
      of x to its nearest positive, data units), `nn_dist_rev` (mean
      distance of a positive to its nearest x: blind to neither side, it
      grows when q drops modes of p) and, with `coverage_k`, `coverage`.
  """
  sg = lambda a: jax.lax.stop_gradient(jnp.asarray(a, jnp.float32))
  x, pos, neg = sg(x), sg(pos), sg(neg)
  g, n, c = x.shape
  q = neg.shape[1]
  if self_mask and q < n:
    raise ValueError(f'self_mask needs the generated set first among the '
                     f'negatives: got {q} negatives for {n} queries.')
  kw = dict(temperatures=tuple(temperatures), pos_weights=pos_weights,
            neg_weights=neg_weights, self_mask=self_mask,
            feature_norm=feature_norm, drift_norm=drift_norm, floor=floor,
            coverage_k=coverage_k)
  nbytes = 4 * g * n * (q + pos.shape[1])  # one [G, N, M] float32 array
  if c <= BLOCKED_MAX_DIM and nbytes > BLOCKED_MIN_BYTES:
    return _drift_field_blocked(x, pos, neg, **kw)
  return _drift_field_dense(x, pos, neg, **kw)


def _normalisers(scale, c: int, feature_norm: bool):
  """(ρ, distance divisor) of feature normalisation (paper A.6)."""
  if feature_norm:
    return jnp.maximum(scale / math.sqrt(c), 1e-3), jnp.maximum(scale, 1e-3)
  return jnp.ones((), jnp.float32), jnp.ones((), jnp.float32)


def _log_pair_and_diff(log_a, logw, t_n, q: int, floor: float):
  """One τ's log S⁺S⁻ [G, N] and E⁺[T] - E⁻[T] [G, N, C] from its log A."""
  if floor > 0:
    log_a = jnp.maximum(log_a, 0.5 * math.log(floor))
  log_a = log_a + logw[:, None, :]
  log_sn, mean_n = _log_mass_and_mean(log_a[..., :q], t_n[:, :q])
  log_sp, mean_p = _log_mass_and_mean(log_a[..., q:], t_n[:, q:])
  return log_sp + log_sn, mean_p - mean_n


def _sum_over_tau(per_tau, drift_norm: bool, shape):
  """(Σ_τ Ṽ_τ, Σ_τ V_τ) [G, N, C] from [(log S⁺S⁻, E⁺[T] - E⁻[T]) per τ]."""
  v = v_raw = jnp.zeros(shape, jnp.float32)
  for log_pair, diff in per_tau:
    v_tau = jnp.exp(log_pair)[..., None] * diff  # V_τ = S⁺S⁻ (E⁺ - E⁻)
    v_raw = v_raw + v_tau
    if drift_norm:
      top = jnp.max(log_pair)
      top = jnp.where(jnp.isfinite(top), top, 0.0)
      v_rel = jnp.exp(log_pair - top)[..., None] * diff
      v = v + v_rel / jnp.sqrt(jnp.maximum(jnp.mean(v_rel**2), 1e-8))
    else:
      v = v + v_tau
  return v, v_raw


def _drift_field_dense(x, pos, neg, *, temperatures, pos_weights,
                       neg_weights, self_mask, feature_norm, drift_norm,
                       floor, coverage_k):
  """`drift_field` on whole [G, N, M] arrays (inputs already sg float32)."""
  g, n, c = x.shape
  q = neg.shape[1]
  targets = jnp.concatenate([neg, pos], axis=1)  # [G, M, C]
  logw = jnp.concatenate([_log_weights(neg_weights, g, q),
                          _log_weights(pos_weights, g, pos.shape[1])], 1)
  dist = _cdist(x, targets)  # [G, N, M]
  w = jnp.exp(logw)
  scale = jnp.mean(dist * w[:, None, :]) / jnp.mean(w)
  rho, dnorm = _normalisers(scale, c, feature_norm)
  dist_n = dist / dnorm if feature_norm else dist
  if self_mask:
    dist_n = dist_n + 100.0 * jnp.eye(n, targets.shape[1], dtype=jnp.float32)
  t_n = targets / rho
  per_tau = []
  for tau in temperatures:
    logits = -dist_n / tau
    log_a = 0.5 * (jax.nn.log_softmax(logits, -1)
                   + jax.nn.log_softmax(logits, -2))
    per_tau.append(_log_pair_and_diff(log_a, logw, t_n, q, floor))
  v, v_raw = _sum_over_tau(per_tau, drift_norm, x.shape)
  d_gen = dist[..., q:]  # [G, N, P] generated -> positives, data units
  stats = dict(scale=scale, rho=rho,
               field_rms=rho * jnp.sqrt(jnp.mean(v_raw**2)),
               nn_dist=jnp.mean(jnp.min(d_gen, -1)),
               nn_dist_rev=jnp.mean(jnp.min(d_gen, -2)))
  if coverage_k > 0:
    stats.update(coverage_stats(d_gen, _cdist(pos, pos), coverage_k))
  return v, stats


def _block_rows(g: int, n: int, m: int) -> int:
  """Rows per block: [G, rows, M] float32 ≤ BLOCK_BYTES, fewest blocks.

  Balanced (ceil(n / blocks)), so the last block holds < `blocks` padded
  rows and at least one real one, whatever n.
  """
  target = max(1, min(n, BLOCK_BYTES // (4 * g * m)))
  blocks = -(-n // target)
  return -(-n // blocks)


def _blocks(a: jax.Array, b: int) -> jax.Array:
  """[G, N, ...] -> [ceil(N / b), G, b, ...], zero rows padded at the end."""
  g, n = a.shape[:2]
  nb = -(-n // b)
  a = jnp.pad(a, [(0, 0), (0, nb * b - n)] + [(0, 0)] * (a.ndim - 2))
  return jnp.moveaxis(a.reshape(g, nb, b, *a.shape[2:]), 1, 0)


def _unblock(a: jax.Array, n: int) -> jax.Array:
  """Inverse of `_blocks`: [nb, G, b, ...] -> [G, n, ...]."""
  nb, g, b = a.shape[:3]
  return jnp.moveaxis(a, 0, 1).reshape(g, nb * b, *a.shape[3:])[:, :n]


def _drift_field_blocked(x, pos, neg, *, temperatures, pos_weights,
                         neg_weights, self_mask, feature_norm, drift_norm,
                         floor, coverage_k):
  """`drift_field` over blocks of B queries: no [G, N, M] array is built.

  Same arguments (inputs already sg float32) and outputs as
  `_drift_field_dense`, equal up to float summation order. Three passes
  recompute each block's distances (cheap at toy C): A, the scale's sum
  and nearest-positive distances both ways; B, per τ the column
  log-sum-exp over all queries (the query softmax of step 3, carried);
  C, per block and τ the row softmax, log S⁺S⁻ and E⁺[T] - E⁻[T]. Padded
  rows (N not a multiple of B) are left out of A and B and cut from C.
  `coverage` likewise over blocks of positives (`_coverage_blocked`).
  """
  g, n, c = x.shape
  q, p = neg.shape[1], pos.shape[1]
  targets = jnp.concatenate([neg, pos], axis=1)  # [G, M, C]
  m = q + p
  logw = jnp.concatenate([_log_weights(neg_weights, g, q),
                          _log_weights(pos_weights, g, p)], 1)
  w = jnp.exp(logw)
  mu = jnp.mean(targets, axis=1, keepdims=True)
  t_c = targets - mu
  b = _block_rows(g, n, m)
  xs = _blocks(x, b)                                         # [nb, G, B, C]
  rows = jnp.arange(xs.shape[0])[:, None] * b + jnp.arange(b)  # [nb, B]
  cols = jnp.arange(m)

  def masked(d, r):  # + 100 on the generated-generated diagonal
    if not self_mask:
      return d
    return d + 100.0 * (r[:, None] == cols[None, :]).astype(jnp.float32)

  def pass_a(carry, inp):  # the scale's sum, nearest positives both ways
    s, colmin = carry
    xb, r = inp
    ok = (r < n)[None, :, None]
    d = _dist_to(xb, t_c, mu)
    s = s + jnp.sum(jnp.where(ok, d * w[:, None, :], 0.0))
    dp = d[..., q:]
    colmin = jnp.minimum(colmin, jnp.min(jnp.where(ok, dp, jnp.inf), 1))
    return (s, colmin), jnp.min(dp, -1)
  (s, rev), rowmin = jax.lax.scan(
      pass_a, (jnp.zeros((), jnp.float32), jnp.full((g, p), jnp.inf)),
      (xs, rows))
  scale = (s / (g * n * m)) / jnp.mean(w)
  rho, dnorm = _normalisers(scale, c, feature_norm)
  t_n = targets / rho

  def dist_n(xb, r):  # the block's normalised, self-masked distances
    return masked(_dist_to(xb, t_c, mu) / dnorm, r)

  def pass_b(lc, inp):  # column log-sum-exp over all queries, per τ
    xb, r = inp
    d = jnp.where((r < n)[None, :, None], dist_n(xb, r), jnp.inf)
    return tuple(jnp.logaddexp(acc, jax.nn.logsumexp(-d / tau, 1))
                 for acc, tau in zip(lc, temperatures, strict=True)), None
  lc, _ = jax.lax.scan(pass_b, tuple(jnp.full((g, m), -jnp.inf)
                                     for _ in temperatures), (xs, rows))

  def pass_c(inp):  # per block and τ: log S⁺S⁻, E⁺[T] - E⁻[T]
    d = dist_n(*inp)
    out = []
    for tau, lct in zip(temperatures, lc, strict=True):
      lg = -d / tau
      log_a = 0.5 * ((lg - jax.nn.logsumexp(lg, -1, keepdims=True))
                     + (lg - lct[:, None, :]))
      out.append(_log_pair_and_diff(log_a, logw, t_n, q, floor))
    return out
  per_tau = [(_unblock(lp, n), _unblock(df, n))
             for lp, df in jax.lax.map(pass_c, (xs, rows))]
  v, v_raw = _sum_over_tau(per_tau, drift_norm, x.shape)
  stats = dict(scale=scale, rho=rho,
               field_rms=rho * jnp.sqrt(jnp.mean(v_raw**2)),
               nn_dist=jnp.mean(_unblock(rowmin, n)),
               nn_dist_rev=jnp.mean(rev))
  if coverage_k > 0 and p >= 2:
    stats['coverage'] = _coverage_blocked(pos, rev, coverage_k)
  return v, stats


def _coverage_blocked(pos: jax.Array, rev: jax.Array, k: int) -> jax.Array:
  """`coverage_stats`' coverage over blocks of positives, from rev [G, P].

  Fewer than min(k, P - 1) other positives within rev_j of y_j, counted
  per block of positives (no [G, P, P] array).
  """
  g, p, _ = pos.shape
  mu = jnp.mean(pos, axis=1, keepdims=True)
  pc = pos - mu
  b = _block_rows(g, p, p)
  ps, revs = _blocks(pos, b), _blocks(rev, b)
  rows = jnp.arange(ps.shape[0])[:, None] * b + jnp.arange(b)
  cols = jnp.arange(p)

  def count(inp):
    yb, rb, r = inp
    d = jnp.where(r[:, None] == cols[None, :], jnp.inf,
                  _dist_to(yb, pc, mu))
    return jnp.sum(d <= rb[..., None], -1)
  inside = _unblock(jax.lax.map(count, (ps, revs, rows)), p)  # [G, P]
  return jnp.mean((inside < min(k, p - 1)).astype(jnp.float32))
