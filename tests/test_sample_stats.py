"""Toy metrics: closed forms, noise floors, mode statistics, bad input."""

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import cdist

from onestep_bench.data import toy2d
from onestep_bench.evaluators import sample_stats as S

# Same n_ref as the default: one sampler compilation per dataset.
FAST = {'n_proj': 64, 'n_kernel': 1000}


def _gauss(seed, n, shift=(0.0, 0.0)):
  return np.random.default_rng(seed).normal(size=(n, 2)) + np.asarray(shift)


def _exact(name, seed, n=10_000):
  """Exact samples drawn with numpy (no jax compilation per size)."""
  ds = toy2d.Toy2D(name)
  rng = np.random.default_rng(1000 + seed)
  z = rng.normal(size=(n, 2))
  if name == 'gaussian':
    chol = np.linalg.cholesky(toy2d.GAUSSIAN_COV)
    return ds, toy2d.GAUSSIAN_MEAN + z @ chol.T
  m = ds.spec.mixture
  return ds, m.centers[rng.choice(len(m.weights), n, p=m.weights)] + m.std * z


def test_directions_are_unit_and_average_exactly():
  d = S.directions(256, 3)
  np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=1e-12)
  mu = np.array([1.0, 0.5])  # stratified angles: mean (d.mu)^2 = |mu|^2 / 2
  assert np.mean((d @ mu) ** 2) == pytest.approx(mu @ mu / 2, rel=1e-9)
  np.testing.assert_array_equal(d, S.directions(256, 3))
  assert not np.allclose(d, S.directions(256, 4))


def test_building_blocks_match_brute_force():
  # Unequal sizes; 300 rows is not a multiple of the row block.
  x, y = _gauss(0, 300), _gauss(1, 200, (0.3, 0.0))
  dxx, dyy, dxy = cdist(x, x), cdist(y, y), cdist(x, y)
  off = lambda k: (k.sum() - np.trace(k)) / (len(k) * (len(k) - 1))
  mmd = sum(off(np.exp(-dxx**2 / (2 * b * b)))
            + off(np.exp(-dyy**2 / (2 * b * b)))
            - 2 * np.exp(-dxy**2 / (2 * b * b)).mean() for b in S.BANDWIDTHS)
  assert S.mmd_rbf(x, y) == pytest.approx(mmd, rel=1e-5, abs=1e-7)
  energy = 2 * dxy.mean() - off(dxx) - off(dyy)
  assert S.energy_distance(x, y) == pytest.approx(energy, rel=1e-5)
  d = S.directions(16, 0)
  q = np.quantile(y @ d.T, (np.arange(300) + 0.5) / 300, axis=0)
  sw = np.sqrt(np.mean((np.sort(x @ d.T, axis=0) - q) ** 2))
  assert S.sliced_w2(x, y, d) == pytest.approx(sw, rel=1e-10)


def test_identical_samples_score_about_zero():
  x = _gauss(2, 2000)
  d = S.directions(64, 0)
  # Levels (i + 0.5)/n sit between order statistics: O(spacing), not 0.
  assert S.sliced_w2(x, x, d) < 0.02
  assert S.sliced_w2(x, x + [0.1, 0.0], d) == pytest.approx(
      0.1 / np.sqrt(2), rel=0.1)
  # x vs itself is not two independent samples; the U-statistics then give
  # -(2/m)(1 - mean k) per bandwidth and -(2/m) mean |x - x'|: tiny, <= 0.
  assert -2 * len(S.BANDWIDTHS) / len(x) < S.mmd_rbf(x, x) <= 0
  assert -2 * 3 / len(x) < S.energy_distance(x, x) <= 0


def test_sliced_w2_of_shifted_gaussian():
  # N(mu, I) vs N(0, I): SW2^2 = E_theta[(theta . mu)^2] = |mu|^2 / 2.
  mu = np.array([1.0, 0.5])
  got = S.sliced_w2(_gauss(3, 20_000, mu), _gauss(4, 100_000),
                    S.directions(256, 0))
  assert got == pytest.approx(np.linalg.norm(mu) / np.sqrt(2), rel=0.02)


@pytest.mark.parametrize('shift', [0.5, 1.0])
def test_energy_and_mmd_closed_form(shift):
  # X ~ N(0, I), Y ~ N(mu, I) in 2-D: |X - Y| ~ Rice(|mu|, sqrt 2) and
  # |X - X'| ~ Rayleigh(sqrt 2); E exp(-|Z|^2 / 2b^2) for Z ~ N(m, 2I) is
  # b^2 / (b^2 + 2) exp(-|m|^2 / (2 (b^2 + 2))).
  x, y = _gauss(5, 3000), _gauss(6, 3000, (shift, 0.0))
  energy = (2 * stats.rice(shift / np.sqrt(2), scale=np.sqrt(2)).mean()
            - 2 * np.sqrt(np.pi))
  b2 = np.square(S.BANDWIDTHS)
  mmd = np.sum(b2 / (b2 + 2) * 2 * (1 - np.exp(-shift**2 / (2 * (b2 + 2)))))
  assert S.energy_distance(x, y) == pytest.approx(energy, rel=0.2)
  assert S.mmd_rbf(x, y) == pytest.approx(mmd, rel=0.2)


def test_distances_grow_with_shift():
  ref = _gauss(7, 1500)
  vals = np.array([[S.energy_distance(_gauss(8, 1500, (s, 0)), ref),
                    S.mmd_rbf(_gauss(8, 1500, (s, 0)), ref)]
                   for s in (0.0, 0.25, 0.5, 1.0, 2.0)])
  assert np.all(np.diff(vals, axis=0) > 0)
  assert np.all(np.abs(vals[0]) < 0.01)


def test_exact_samples_sit_at_the_floor():
  ds, x = _exact('8gaussians', 0)
  s = S.sample_stats(x, ds)  # defaults: what the runner uses
  assert s['n_samples'] == 10_000 and s['num_modes'] == 8
  assert s['sliced_w2'] < 2 * s['sliced_w2_floor'] + 0.005
  assert 0.01 < s['sliced_w2_floor'] < 0.1
  for k in ('mmd_rbf', 'mmd_rbf_floor', 'energy_distance',
            'energy_distance_floor'):
    assert abs(s[k]) < 3e-3, (k, s[k])
  assert s['hq_frac'] == pytest.approx(1 - np.exp(-4.5), abs=0.004)
  assert s['modes_covered'] == 8
  assert s['mode_weight_tv'] < 0.03
  assert s['mode_weight_max_rel_err'] < 0.15
  assert s['mean_err'] < 0.05 and s['cov_err'] < 0.1
  assert S.HIGHER_IS_BETTER <= set(s)
  assert all(isinstance(v, float) for v in s.values())
  # Deterministic given the seed; another seed gives other noise.
  fast = S.sample_stats(x, ds, **FAST)
  assert S.sample_stats(x, ds, **FAST) == fast
  assert S.sample_stats(x, ds, seed=1, **FAST)['mmd_rbf'] != fast['mmd_rbf']


def test_too_wide_modes_are_caught():
  ds, x = _exact('8gaussians', 1)
  centers = ds.spec.mixture.centers
  nearest = np.argmin(cdist(x, centers), axis=1)
  s = S.sample_stats(centers[nearest] + 2 * (x - centers[nearest]), ds,
                     **FAST)  # std 0.2 instead of 0.1
  assert s['sliced_w2'] > 1.5 * s['sliced_w2_floor']
  # The small bandwidths see the width; energy distance (~|x - y|) barely.
  assert s['mmd_rbf'] > 0.02 > 5 * abs(s['mmd_rbf_floor'])
  assert s['hq_frac'] == pytest.approx(1 - np.exp(-9 / 8), abs=0.02)
  assert s['modes_covered'] == 8


def test_collapsed_samples_cover_one_mode():
  ds = toy2d.Toy2D('8gaussians')
  x = ds.spec.mixture.centers[0] + 0.05 * _gauss(9, 5000)
  s = S.sample_stats(x, ds, **FAST)
  assert s['modes_covered'] == 1 and s['hq_frac'] == 1.0
  assert s['mode_weight_tv'] == pytest.approx(7 / 8, abs=1e-12)
  assert s['mode_weight_max_rel_err'] == pytest.approx(7.0, abs=1e-9)
  assert s['sliced_w2'] > 10 * s['sliced_w2_floor']


def test_mode_weights_use_only_high_quality_samples():
  ds, x = _exact('8gaussians', 5, 8000)
  junk = np.full((8000, 2), 0.4)  # far from every centre: not hq
  s = S.mode_stats(np.concatenate([x, junk]), ds.spec.mixture)
  assert s['hq_frac'] == pytest.approx(0.5 * (1 - np.exp(-4.5)), abs=0.01)
  assert s['modes_covered'] == 8 and s['mode_weight_tv'] < 0.03


def test_sparse_mode_is_not_covered():
  # Covered: >= 10% of the expected w_k * n = 1000 points, i.e. >= 100 hq.
  ds, x = _exact('8gaussians', 6, 8000)
  mode = np.argmin(cdist(x, ds.spec.mixture.centers), axis=1)
  for keep, covered in ((20, 7), (300, 8)):
    y = np.concatenate([x[mode != 7], x[mode == 7][:keep]])
    y = np.concatenate([y, np.full((len(x) - len(y), 2), 0.4)])  # n = 8000
    assert S.mode_stats(y, ds.spec.mixture)['modes_covered'] == covered


def test_no_high_quality_samples():
  ds = toy2d.Toy2D('25gaussians')
  x = np.full((100, 2), 0.5) + 0.001 * _gauss(10, 100)  # between centres
  s = S.mode_stats(x, ds.spec.mixture)
  assert s['hq_frac'] == 0.0 and s['modes_covered'] == 0
  assert s['mode_weight_tv'] == 1.0 and s['mode_weight_max_rel_err'] == 1.0


def test_mode_weights_on_imbalanced_target():
  # Mode covering with flat weights shows only in the weight error.
  imb = toy2d.Toy2D('8gaussians_imbalanced')
  w = imb.spec.mixture.weights
  _, balanced = _exact('8gaussians', 2, 20_000)
  s = S.mode_stats(balanced, imb.spec.mixture)
  expected = 0.5 * np.abs(1 / 8 - w).sum()  # = 0.2222
  assert expected == pytest.approx(2 / 9)
  assert s['modes_covered'] == 8
  assert s['mode_weight_tv'] == pytest.approx(expected, abs=0.01)
  assert s['mode_weight_max_rel_err'] == pytest.approx(
      np.max(np.abs(1 / 8 - w) / w), rel=0.1)
  _, exact = _exact('8gaussians_imbalanced', 3, 20_000)
  assert S.mode_stats(exact, imb.spec.mixture)['mode_weight_tv'] < 0.02


def test_gaussian_moments():
  ds, x = _exact('gaussian', 4, 20_000)
  s = S.sample_stats(x, ds, **FAST)
  assert s['mean_err'] < 0.04 and s['cov_err'] < 0.1
  # Exact (mu, Sigma) from the spec, not the reference sample's estimate.
  assert s['mean_err'] == pytest.approx(
      np.linalg.norm(x.mean(0) - toy2d.GAUSSIAN_MEAN), rel=1e-12)
  assert s['cov_err'] == pytest.approx(
      np.linalg.norm(np.cov(x.T) - toy2d.GAUSSIAN_COV), rel=1e-12)
  assert 'hq_frac' not in s and 'modes_covered' not in s
  s2 = S.sample_stats(x + [1.0, 1.0], ds, **FAST)
  assert s2['mean_err'] == pytest.approx(np.sqrt(2), abs=0.04)
  assert s2['cov_err'] == pytest.approx(s['cov_err'], abs=1e-9)
  s3 = S.sample_stats(x * 1.5, ds, **FAST)  # cov x 2.25
  assert s3['cov_err'] > 1.0


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_nonfinite_samples_rejected(bad):
  ds = toy2d.Toy2D('moons')
  x = np.zeros((100, 2))
  x[3, 1] = bad
  with pytest.raises(ValueError, match='1 of 100 samples are non-finite'):
    S.sample_stats(x, ds)


def test_bad_shape_rejected():
  ds = toy2d.Toy2D('moons')
  with pytest.raises(ValueError, match='samples must be'):
    S.sample_stats(np.zeros((100, 3)), ds)


def test_gaussian_stats_see_the_narrow_axis():
  """24 % too little variance on the narrow axis: the Frobenius cov error
  hides it, the whitened error and W2 (Bures) show it (closed forms)."""
  from onestep_bench.data.toy2d import GAUSSIAN_COV
  from onestep_bench.evaluators.sample_stats import gaussian_stats
  w, v = np.linalg.eigh(GAUSSIAN_COV)
  mean = np.array([0.5, -1.0])
  rng = np.random.default_rng(0)
  z = rng.standard_normal((400_000, 2))
  z = (z - z.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(z.T))).T
  exact = mean + (z * np.sqrt(w)) @ v.T         # cov exactly GAUSSIAN_COV
  exact_stats = gaussian_stats(exact, mean, GAUSSIAN_COV)
  assert exact_stats['gauss_w2'] < 1e-6
  assert exact_stats['white_cov_err'] < 1e-9
  shrunk = mean + (z * np.sqrt(w * [0.76, 1.0])) @ v.T  # narrow axis first
  s = gaussian_stats(shrunk, mean, GAUSSIAN_COV)
  assert s['var_ratio_err'] == pytest.approx(0.24, abs=1e-9)
  assert s['white_cov_err'] == pytest.approx(0.24, abs=1e-9)
  bures = abs(np.sqrt(w[0]) - np.sqrt(0.76 * w[0]))  # commuting case
  assert s['gauss_w2'] == pytest.approx(bures, rel=1e-6)
  frob = np.linalg.norm(np.cov(shrunk.T) - GAUSSIAN_COV)
  assert frob / np.linalg.norm(GAUSSIAN_COV) < s['white_cov_err'] / 2
