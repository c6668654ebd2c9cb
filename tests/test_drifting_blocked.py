"""The query-blocked drift field equals the dense one (methods/_drifting_field).

Byte thresholds are monkeypatched small, so the groups stay tiny: with
G = 2 groups, N = 13 queries and M = 13 + 3 + 10 targets, one block row is
4 * G * M = 208 bytes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from methods import _drifting_field as field
from methods import drifting

G, N, P, U, C = 2, 13, 10, 3, 3
ROW_BYTES = 4 * G * (N + U + P)


def _inputs(seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (G, N, C))
  pos = 0.7 * jax.random.normal(ks[1], (G, P, C)) + 0.5
  unc = jax.random.normal(ks[2], (G, U, C))
  pos_w = jax.random.uniform(ks[3], (G, P), minval=0.5, maxval=1.5)
  unc_w = jax.random.uniform(ks[4], (G, 1), minval=0.2, maxval=2.0)
  return x, pos, unc, pos_w, unc_w


def _force(monkeypatch, blocked: bool, block_rows: int = N):
  """Dense (threshold never reached) or blocked, `block_rows` rows a block."""
  monkeypatch.setattr(field, 'BLOCKED_MIN_BYTES', -1 if blocked else 2**62)
  monkeypatch.setattr(field, 'BLOCK_BYTES', block_rows * ROW_BYTES)


def _loss_stats_grad(extra, weights, **kw):
  x, pos, unc, pos_w, unc_w = _inputs()
  kw['pos_weights'] = pos_w if weights else None
  if extra:
    kw.update(extra_neg=unc, extra_neg_weights=unc_w if weights else None)
  f = lambda x: drifting.drift_loss(x, pos, **kw)
  (loss, stats), grad = jax.value_and_grad(f, has_aux=True)(x)
  return loss, stats, grad


# Relative tolerances. The generated set is among the negatives, so 1/26 of
# the distances here are self-distances at the 1e-8 clamp, pure rounding
# (~1e-4), whose order differs between the paths: scale ~2.5e-6 apart
# (dense 2e-7 from float64); at the toy bench's 1024 x 2048, 1 in 2048.
RTOL, GRAD_RTOL = 1e-5, 2e-5


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


CASES = [
    # (extra negatives, weights, floor, coverage_k, temperatures)
    (False, False, 0.0, 0, (0.05,)),
    (True, True, 0.0, 5, (0.02, 0.05, 0.2)),
    (True, True, 1e-3, 3, (0.02, 0.05, 0.2)),
    (True, False, 1e-3, 0, (0.2,)),
    (False, True, 0.0, 5, (0.05,)),
]


@pytest.mark.parametrize('block_rows', [N, 4, 5, 1])  # 1 block, exact, padded
@pytest.mark.parametrize('extra,weights,floor,coverage_k,taus', CASES)
def test_blocked_equals_dense(monkeypatch, block_rows, extra, weights, floor,
                              coverage_k, taus):
  kw = dict(extra=extra, weights=weights, floor=floor, coverage_k=coverage_k,
            temperatures=taus)
  _force(monkeypatch, False)
  loss_d, stats_d, grad_d = _loss_stats_grad(**kw)
  _force(monkeypatch, True, block_rows)
  loss_b, stats_b, grad_b = _loss_stats_grad(**kw)
  assert set(stats_b) == set(stats_d)
  assert ('coverage' in stats_d) == (coverage_k > 0)
  assert _rel(loss_b, loss_d) < RTOL, (loss_b, loss_d)
  for k in stats_d:
    assert _rel(stats_b[k], stats_d[k]) < RTOL, (k, stats_b[k], stats_d[k])
  assert _rel(grad_b, grad_d) < GRAD_RTOL
  assert float(jnp.max(jnp.abs(grad_d))) > 0  # a field that is not ~0


@pytest.mark.parametrize('feature_norm,drift_norm', [(False, False),
                                                     (True, False)])
def test_blocked_field_without_self_mask_or_normalisation(
    monkeypatch, feature_norm, drift_norm):
  """drift_field directly: self_mask=False, Q < N allowed, raw units."""
  x, pos, unc, pos_w, _ = _inputs(1)
  kw = dict(temperatures=(0.3, 1.0), pos_weights=pos_w, self_mask=False,
            feature_norm=feature_norm, drift_norm=drift_norm, coverage_k=2)
  _force(monkeypatch, False)
  v_d, s_d = drifting.drift_field(x, pos, unc, **kw)
  _force(monkeypatch, True, 4)
  v_b, s_b = drifting.drift_field(x, pos, unc, **kw)
  assert _rel(v_b, v_d) < GRAD_RTOL
  for k in s_d:
    assert _rel(s_b[k], s_d[k]) < RTOL, k


def _largest_intermediate(fun, *args) -> int:
  """Elements of the largest array any equation (sub-jaxprs too) makes."""
  def walk(jaxpr):
    big = 0
    for eqn in jaxpr.eqns:
      for v in eqn.outvars:
        big = max(big, int(np.prod(getattr(v.aval, 'shape', ()))))
      for p in eqn.params.values():
        for sub in p if isinstance(p, (list, tuple)) else (p,):
          inner = getattr(sub, 'jaxpr', sub)
          if hasattr(inner, 'eqns'):
            big = max(big, walk(inner))
    return big
  return walk(jax.make_jaxpr(fun)(*args).jaxpr)


def test_blocked_never_builds_a_full_array(monkeypatch):
  x, pos, unc, pos_w, unc_w = _inputs()
  def largest():  # a new function each time: traces are cached per function
    return _largest_intermediate(
        lambda x: jax.value_and_grad(lambda x: drifting.drift_loss(
            x, pos, unc, pos_weights=pos_w, extra_neg_weights=unc_w,
            coverage_k=5)[0])(x), x)
  _force(monkeypatch, False)
  assert largest() >= G * N * (N + U + P)  # the check sees the dense arrays
  _force(monkeypatch, True, 4)
  assert largest() <= G * 4 * (N + U + P)


def test_dispatcher_picks_blocked_above_the_threshold(monkeypatch):
  x, pos, unc, _, _ = _inputs()
  neg = jnp.concatenate([x, unc], 1)
  calls = []
  for name in ('_drift_field_dense', '_drift_field_blocked'):
    real = getattr(field, name)
    monkeypatch.setattr(field, name, lambda *a, _n=name, _f=real, **k: (
        calls.append(_n), _f(*a, **k))[1])
  nbytes = 4 * G * N * (N + U + P)  # one [G, N, M] float32 array
  for threshold, want in [(nbytes, '_drift_field_dense'),
                          (nbytes - 1, '_drift_field_blocked')]:
    monkeypatch.setattr(field, 'BLOCKED_MIN_BYTES', threshold)
    drifting.drift_field(x, pos, neg)
    assert calls[-1] == want, (threshold, calls)
  # Above the threshold, but vectors of more than BLOCKED_MAX_DIM
  # coordinates (image features) stay dense.
  wide = [jnp.tile(a, (1, 1, 6)) for a in (x, pos, neg)]  # C = 18
  drifting.drift_field(*wide)
  assert calls[-1] == '_drift_field_dense', calls
  monkeypatch.setattr(field, 'BLOCKED_MAX_DIM', 18)
  drifting.drift_field(*wide)
  assert calls[-1] == '_drift_field_blocked', calls
  # The defaults: 4 MiB arrays; the toy bench's batch 1024 (one group of
  # 1024 queries x 2048 targets, 8 MiB, C = 2) is blocked, batch 512 not.
  monkeypatch.undo()
  assert field.BLOCKED_MIN_BYTES == 4 * 2**20 and field.BLOCK_BYTES == 2**20
  assert 4 * 1024 * 2048 > field.BLOCKED_MIN_BYTES >= 4 * 512 * 1024
  assert field.BLOCKED_MAX_DIM >= 2


@pytest.mark.parametrize('n,m,block_bytes,rows', [
    (13, 26, 4 * 26 * 4, 4), (3, 26, 4 * 26 * 4, 3), (1024, 2048, 2**20, 128),
    (1000, 2000, 2**20, 125), (1021, 2042, 2**20, 128), (7, 10, 1, 1)])
def test_block_rows_are_balanced(monkeypatch, n, m, block_bytes, rows):
  monkeypatch.setattr(field, 'BLOCK_BYTES', block_bytes)
  b = field._block_rows(1, n, m)  # pylint: disable=protected-access
  assert b == rows
  assert b == 1 or 4 * b * m <= block_bytes
  blocks = -(-n // b)
  assert (blocks - 1) * b < n <= blocks * b  # the last block holds a real row
