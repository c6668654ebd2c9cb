"""Tests for onestep_bench.evaluators.image_metrics (numpy / scipy only)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from onestep_bench.evaluators import image_metrics as im


def _rng(seed: int = 0) -> np.random.Generator:
  return np.random.default_rng(seed)


def _random_cov(rng: np.random.Generator, d: int, n: int) -> np.ndarray:
  return np.cov(rng.standard_normal((n, d)) @ rng.standard_normal((d, d)),
                rowvar=False)


def _sqrt_sym(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(a)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _closed_form_fid(mu1, s1, mu2, s2) -> float:
  # tr sqrt(S1 S2) = nuclear norm of S1^1/2 S2^1/2 (singular values).
  nuc = np.linalg.svd(_sqrt_sym(s1) @ _sqrt_sym(s2), compute_uv=False).sum()
  return float(np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) - 2 * nuc)


# ----------------------------------------------------------------- stats


def test_gaussian_stats_matches_np_cov():
  x = _rng().standard_normal((9000, 8)).astype(np.float32) * 3 + 5  # 3 chunks
  mu, sigma = im.gaussian_stats(x)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, np.mean(x.astype(np.float64), 0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10,
                             atol=1e-12)
  np.testing.assert_array_equal(sigma, sigma.T)
  with pytest.raises(ValueError, match='2-D'):
    im.gaussian_stats(x[0])


def test_weighted_stats_equal_stats_of_repeated_rows():
  rng = _rng(1)
  x = rng.standard_normal((300, 5))
  counts = np.bincount(rng.integers(0, 300, 300), minlength=300)
  mu, sigma = im._weighted_stats(x, counts)
  rep = np.repeat(x, counts, axis=0)
  np.testing.assert_allclose(mu, rep.mean(0), rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(sigma, np.cov(rep, rowvar=False), rtol=1e-11,
                             atol=1e-13)


# ------------------------------------------------------------------- FID


@pytest.mark.parametrize('method', ['sqrtm', 'eigh'])
def test_fid_of_identical_stats_is_zero(method):
  mu, sigma = im.gaussian_stats(_rng().standard_normal((2000, 32)) * 2 + 1)
  fid = im.frechet_distance(mu, sigma, mu, sigma, method=method)
  assert abs(fid) < 1e-6 * np.trace(sigma)


@pytest.mark.parametrize('method', ['sqrtm', 'eigh'])
def test_fid_diagonal_closed_form(method):
  rng = _rng(2)
  a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
  mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
  want = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(a) - np.sqrt(b))**2)
  got = im.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
  np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize('method', ['sqrtm', 'eigh'])
def test_fid_general_covariances_closed_form(method):
  rng = _rng(3)
  s1, s2 = _random_cov(rng, 24, 200), _random_cov(rng, 24, 300)
  assert not np.allclose(s1 @ s2, s2 @ s1)  # non-commuting
  mu1, mu2 = rng.standard_normal(24), rng.standard_normal(24)
  got = im.frechet_distance(mu1, s1, mu2, s2, method=method)
  np.testing.assert_allclose(got, _closed_form_fid(mu1, s1, mu2, s2),
                             rtol=1e-9)


def test_eigh_path_matches_sqrtm_on_sample_covariances():
  rng = _rng(4)
  x = rng.standard_normal((1500, 128)) @ rng.standard_normal((128, 128)) / 8
  y = rng.standard_normal((1500, 128)) * 1.2 + 0.1
  (mu1, s1), (mu2, s2) = im.gaussian_stats(x), im.gaussian_stats(y)
  ref = im.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(
      im.frechet_distance(mu1, s1, mu2, s2, method='eigh'), ref, rtol=1e-6)
  np.testing.assert_allclose(im.fid_from_features(x, mu2, s2), ref,
                             rtol=1e-12)


def test_eps_fallback_on_singular_covariances(caplog):
  # np.cov of 4 and 2 integer points in 4-D: both covariances are singular
  # and scipy's sqrtm of their product is NaN.
  x = np.array([[1, 1, -1, 0], [0, -1, 1, -1], [1, 0, -1, 1], [0, 1, 1, -1]],
               np.float64)
  y = np.array([[0, -1, 1, 0], [1, 1, 1, 1]], np.float64)
  (mu1, s1), (mu2, s2) = im.gaussian_stats(x), im.gaussian_stats(y)
  if np.isfinite(im._sqrtm(s1 @ s2)).all():
    pytest.skip('this scipy returns a finite sqrtm here; no fallback needed')
  with caplog.at_level(logging.WARNING):
    fid = im.frechet_distance(mu1, s1, mu2, s2)
  assert 'adding 1e-06 to diagonal' in caplog.text
  assert np.isfinite(fid)
  exact = im.frechet_distance(mu1, s1, mu2, s2, method='eigh')  # no eps
  assert abs(fid - exact) < 1e-2  # eps = 1e-6 moves the trace by ~sqrt(eps)


def test_fid_shape_and_input_errors():
  mu, s = np.zeros(4), np.eye(4)
  with pytest.raises(ValueError, match='Mean vectors'):
    im.frechet_distance(mu, s, np.zeros(5), np.eye(5))
  with pytest.raises(ValueError, match='sigma2 must be'):
    im.frechet_distance(mu, s, mu, np.eye(3))
  with pytest.raises(ValueError, match='sigma1 must be'):
    im.frechet_distance(mu, np.ones(4), mu, s)
  with pytest.raises(ValueError, match='method'):
    im.frechet_distance(mu, s, mu, s, method='svd')
  with pytest.raises(ValueError, match='Imaginary component'):
    im.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2),
                        np.diag([1.0, -1.0]))


# ------------------------------------------------------------- bootstrap


def _ref_stats(d: int) -> tuple[np.ndarray, np.ndarray]:
  return im.gaussian_stats(_rng(10).standard_normal((50_000, d)))


def test_bootstrap_replicate_is_fid_of_resampled_features():
  mu_ref, s_ref = _ref_stats(32)
  x = _rng(11).standard_normal((800, 32)) + 0.2
  lo, hi = im.fid_bootstrap_ci(x, mu_ref, s_ref, n_boot=1, seed=5,
                               method='percentile')
  idx = np.random.default_rng(5).integers(0, 800, 800)
  want = im.fid_from_features(x[idx], mu_ref, s_ref)  # sqrtm path
  assert lo == hi
  np.testing.assert_allclose(lo, want, rtol=1e-6)


def test_bootstrap_ci_contains_point_and_shrinks_with_n():
  d = 16
  mu_ref, s_ref = _ref_stats(d)
  widths = []
  for n in (500, 8000):
    x = _rng(n).standard_normal((n, d)) + 0.3
    fid = im.fid_from_features(x, mu_ref, s_ref)
    lo, hi = im.fid_bootstrap_ci(x, mu_ref, s_ref, n_boot=20, seed=0)
    assert lo < fid < hi
    widths.append(hi - lo)
    p_lo, p_hi = im.fid_bootstrap_ci(x, mu_ref, s_ref, n_boot=20, seed=0,
                                     method='percentile')
    b_lo, b_hi = im.fid_bootstrap_ci(x, mu_ref, s_ref, n_boot=20, seed=0,
                                     method='basic')
    np.testing.assert_allclose([b_lo, b_hi], [2 * fid - p_hi, 2 * fid - p_lo],
                               rtol=1e-9)
    np.testing.assert_allclose(hi - lo, p_hi - p_lo, rtol=1e-9)
  assert widths[1] < 0.5 * widths[0]  # ~1/sqrt(N): expect ~1/4


def test_percentile_interval_sits_above_biased_point_estimate():
  # The documented reason the default is 'centered': FID at N=2000, D=64 is
  # biased up by ~D^2/N-scale terms, and resampling adds that bias again.
  mu_ref, s_ref = _ref_stats(64)
  x = _rng(12).standard_normal((2000, 64)) + 0.3
  fid = im.fid_from_features(x, mu_ref, s_ref)
  lo, _ = im.fid_bootstrap_ci(x, mu_ref, s_ref, n_boot=10,
                              method='percentile')
  assert lo > fid


def test_bootstrap_argument_errors():
  x = np.zeros((10, 3))
  with pytest.raises(ValueError, match='n_boot'):
    im.fid_bootstrap_ci(x, np.zeros(3), np.eye(3), n_boot=0)
  with pytest.raises(ValueError, match='method'):
    im.fid_bootstrap_ci(x, np.zeros(3), np.eye(3), method='bca')
  with pytest.raises(ValueError, match='sigma1 must be'):
    im.fid_bootstrap_ci(x, np.zeros(3), np.eye(4))


# -------------------------------------------------------------------- IS


def _torch_fidelity_is(logits: np.ndarray, splits: int, seed: int):
  """torch-fidelity isc_features_to_metric, transcribed to numpy."""
  n = len(logits)
  f = logits[np.random.RandomState(seed).permutation(n)].astype(np.float64)
  log_p = f - f.max(1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
  p = np.exp(log_p)
  scores = []
  for i in range(splits):
    sl = slice(i * n // splits, (i + 1) * n // splits)
    q = p[sl].mean(0, keepdims=True)
    scores.append(np.exp((p[sl] * (log_p[sl] - np.log(q))).sum(1).mean()))
  return np.mean(scores), np.std(scores)


def test_is_of_uniform_predictions_is_one():
  mean, std = im.inception_score(np.zeros((1000, 1008)))
  assert abs(mean - 1) < 1e-6 and std < 1e-6
  mean, _ = im.inception_score(probs=np.full((100, 10), 0.1), splits=5)
  assert abs(mean - 1) < 1e-6


def test_is_of_balanced_one_hot_is_num_classes():
  c = 10
  onehot = np.eye(c)[np.arange(1000) % c]
  mean, std = im.inception_score(probs=onehot, splits=1)
  assert abs(mean - c) < 1e-6 and std == 0
  mean, _ = im.inception_score(60.0 * onehot, splits=1)  # ~one-hot softmax
  assert abs(mean - c) < 1e-6


def test_is_splits_follow_the_drifting_recipe():
  rng = _rng(20)
  n, c, splits = 1005, 7, 10
  labels = rng.integers(0, c, n)
  mean, std = im.inception_score(probs=np.eye(c)[labels], splits=splits)
  # One-hot rows: IS of a split = exp(entropy of its label histogram).
  perm = np.random.RandomState(2020).permutation(n)
  size = n // splits  # the last n % splits shuffled rows are dropped
  want = []
  for i in range(splits):
    h = np.bincount(labels[perm[i * size:(i + 1) * size]], minlength=c) / size
    want.append(np.exp(-np.sum(h[h > 0] * np.log(h[h > 0]))))
  np.testing.assert_allclose([mean, std], [np.mean(want), np.std(want)],
                             rtol=1e-6)
  assert std > 0
  other = im.inception_score(probs=np.eye(c)[labels], splits=splits, seed=0)
  assert other != (mean, std)


def test_is_matches_torch_fidelity_and_probs_path():
  logits = _rng(21).standard_normal((2000, 50)) * 3
  got = im.inception_score(logits)
  np.testing.assert_allclose(got, _torch_fidelity_is(logits, 10, 2020),
                             rtol=1e-6)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  np.testing.assert_allclose(im.inception_score(probs=p), got, rtol=1e-12)


def _adm_is(probs: np.ndarray, split_size: int) -> float:
  """guided-diffusion `compute_inception_score`, transcribed (no epsilon)."""
  scores = []
  for i in range(0, len(probs), split_size):
    part = probs[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


def test_is_split_size_follows_adm():
  logits = _rng(22).standard_normal((1200, 20)) * 3
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  # 500 + 500 + a partial 200, in the given order (no shuffle).
  assert im.is_split_rows(1200, 500) == [slice(0, 500), slice(500, 1000),
                                         slice(1000, 1200)]
  mean, std = im.inception_score(probs=p, split_size=500)
  assert mean == pytest.approx(_adm_is(p, 500), rel=1e-9)
  assert std > 0
  assert im.inception_score(logits, split_size=500)[0] == pytest.approx(
      mean, rel=1e-9)
  # N < split size: one split of all N rows, std 0.
  one, std1 = im.inception_score(probs=p, split_size=5000)
  assert one == pytest.approx(_adm_is(p, 1200), rel=1e-9) and std1 == 0
  # Row order matters (consecutive splits), `seed` does not.
  assert im.inception_score(probs=p[::-1], split_size=500)[0] != mean
  assert im.inception_score(probs=p, split_size=500, seed=0)[0] == mean
  # Smaller splits are biased low (p(y) from fewer rows).
  assert im.inception_score(probs=p, split_size=50)[0] < one
  with pytest.raises(ValueError, match='split_size'):
    im.inception_score(probs=p, split_size=0)


def test_is_argument_errors():
  with pytest.raises(ValueError, match='exactly one'):
    im.inception_score()
  with pytest.raises(ValueError, match='exactly one'):
    im.inception_score(np.zeros((20, 3)), probs=np.zeros((20, 3)))
  with pytest.raises(ValueError, match='splits'):
    im.inception_score(np.zeros((5, 3)), splits=10)
  with pytest.raises(ValueError, match='non-negative'):
    im.inception_score(probs=-np.ones((20, 3)))


# ------------------------------------------------------------------- P/R


def _brute_force_pr(real, fake, k):
  """Kynkaanniemi et al. 2019 with full distance matrices (test oracle)."""
  rr, ff, rf = cdist(real, real), cdist(fake, fake), cdist(real, fake)
  r_real = np.sort(rr, 1)[:, k]  # index 0 is the point itself
  r_fake = np.sort(ff, 1)[:, k]
  precision = np.mean((rf <= r_real[:, None]).any(0))
  recall = np.mean((rf <= r_fake[None, :]).any(1))
  return precision, recall


def test_pr_matches_brute_force_for_any_batch():
  rng = _rng(30)
  real = rng.standard_normal((400, 6))
  fake = rng.standard_normal((300, 6)) * 1.3 + 0.4
  want = _brute_force_pr(real, fake, 3)
  assert 0.1 < want[0] < 0.99 and 0.1 < want[1] < 0.99  # non-trivial case
  for batch, dtype in ((7, np.float64), (1024, np.float64), (64, np.float32)):
    got = im.precision_recall(real, fake, k=3, batch=batch, dtype=dtype)
    np.testing.assert_allclose(got, want, atol=0.006)  # float32: <= 2 flips


def test_pr_separated_clouds_are_zero():
  rng = _rng(31)
  real = rng.standard_normal((500, 8))
  fake = rng.standard_normal((500, 8)) + 50
  assert im.precision_recall(real, fake) == (0.0, 0.0)


def test_pr_same_distribution_is_near_one():
  rng = _rng(32)
  real, fake = rng.standard_normal((2, 3000, 4))
  p, r = im.precision_recall(real, fake)
  assert p >= 0.9 and r >= 0.9


def test_pr_half_mode_coverage():
  rng = _rng(33)
  centres = 30 * np.eye(4)  # 4 well-separated modes in 4-D
  real = centres[np.arange(4000) % 4] + rng.standard_normal((4000, 4))
  fake = centres[np.arange(2000) % 2] + rng.standard_normal((2000, 4))
  p, r = im.precision_recall(real, fake)
  assert p >= 0.9
  assert abs(r - 0.5) < 0.05


def test_pr_argument_errors():
  x = np.zeros((10, 3))
  with pytest.raises(ValueError, match='dims differ'):
    im.precision_recall(x, np.zeros((10, 4)))
  with pytest.raises(ValueError, match='k < min'):
    im.precision_recall(x, np.zeros((3, 3)), k=3)


# ------------------------------------------------------------------- KID


def test_kid_equals_direct_unbiased_mmd_on_full_sets():
  rng = _rng(40)
  x, y = rng.standard_normal((60, 5)), rng.standard_normal((80, 5)) + 0.5
  m = 60  # = min(N, M, subset_size): x is used whole, y subsampled
  mean, std = im.kid(x, y, num_subsets=1, subset_size=1000, seed=3)
  rs = np.random.RandomState(3)
  xs = x[rs.choice(60, m, replace=False)]
  ys = y[rs.choice(80, m, replace=False)]
  k = lambda a, b: (a @ b.T / 5 + 1)**3
  kxx, kyy, kxy = k(xs, xs), k(ys, ys), k(xs, ys)
  want = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) +
          (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
  np.testing.assert_allclose(mean, want, rtol=1e-10)
  assert std == 0


def test_kid_same_vs_shifted_distribution():
  rng = _rng(41)
  real = rng.standard_normal((2000, 16)).astype(np.float32)
  same = rng.standard_normal((2000, 16)).astype(np.float32)
  shifted = same + np.float32(0.5)
  kw = dict(num_subsets=20, subset_size=500)
  same_mean, same_std = im.kid(real, same, **kw)
  shift_mean, shift_std = im.kid(real, shifted, **kw)
  assert abs(same_mean) < 3 * same_std / np.sqrt(20) + 1e-3
  assert shift_mean > 10 * max(abs(same_mean), shift_std / np.sqrt(20))
  # float32 inner products vs float64: same estimator to ~1e-6 relative.
  np.testing.assert_allclose(
      im.kid(real.astype(np.float64), shifted, **kw)[0], shift_mean,
      rtol=1e-4)
  with pytest.raises(ValueError, match='dims differ'):
    im.kid(real, same[:, :3])
