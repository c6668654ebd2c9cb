"""Toy metrics: zero on identical samples, known values, mode statistics."""

import jax
import numpy as np
import pytest

from onestep_bench.data import toy2d
from onestep_bench.evaluators import sample_stats as S

RNG = np.random.default_rng(0)


def test_identical_samples_score_zero():
  x = RNG.normal(size=(2000, 2))
  d = S.directions(64, 0)
  # Quantile levels (i + 0.5)/n sit half a sample off the order statistics:
  # identical sets score O(spacing), far below any real difference.
  assert S.sliced_w2(x, x, d) < 0.02
  assert S.sliced_w2(x, x + 0.1, d) > 0.05
  # The U-statistic MMD of a set with itself is ~0 (minus diagonal terms).
  assert abs(S.mmd_rbf(x, x)) < 2 * len(S.BANDWIDTHS) / len(x) + 1e-6


def test_sliced_w2_of_shifted_gaussian():
  # N(0, I) vs N(mu, I): SW2² = E_θ[(θ·mu)²] = |mu|²/2 in 2-D.
  x = RNG.normal(size=(20_000, 2))
  ref = RNG.normal(size=(100_000, 2))
  mu = np.array([1.0, 0.5])
  got = S.sliced_w2(x + mu, ref, S.directions(512, 1))
  assert got == pytest.approx(np.linalg.norm(mu) / np.sqrt(2), rel=0.03)


def test_energy_and_mmd_grow_with_shift():
  ref = RNG.normal(size=(1500, 2))
  vals = [(S.energy_distance(RNG.normal(size=(1500, 2)) + s, ref),
           S.mmd_rbf(RNG.normal(size=(1500, 2)) + s, ref))
          for s in (0.0, 0.5, 2.0)]
  assert vals[0][0] < 0.01 < vals[1][0] < vals[2][0]
  assert vals[0][1] < 0.01 < vals[1][1] < vals[2][1]


def test_exact_samples_at_floor_and_all_modes():
  ds = toy2d.Toy2D('8gaussians')
  s = S.sample_stats(ds.reference(jax.random.key(7), 10_000), ds)
  assert s['sliced_w2'] < 2 * s['sliced_w2_floor'] + 0.02
  assert s['hq_frac'] == pytest.approx(1 - np.exp(-4.5), abs=0.005)
  assert s['modes_covered'] == 8 and s['mode_weight_tv'] < 0.03


def test_collapsed_samples_detected():
  ds = toy2d.Toy2D('8gaussians')
  c = ds.spec.mixture.centers[0]
  x = c + 0.05 * RNG.normal(size=(5000, 2))
  s = S.sample_stats(x, ds)
  assert s['modes_covered'] == 1
  assert s['mode_weight_tv'] == pytest.approx(7 / 8, abs=1e-6)
  assert s['sliced_w2'] > 10 * s['sliced_w2_floor']


def test_balanced_samples_on_imbalanced_target():
  # Mode covering without matching weights shows only in the weight error.
  bal, imb = toy2d.Toy2D('8gaussians'), toy2d.Toy2D('8gaussians_imbalanced')
  s = S.sample_stats(bal.reference(jax.random.key(3), 20_000), imb)
  expected = 0.5 * np.abs(1 / 8 - imb.spec.mixture.weights).sum()
  assert s['modes_covered'] == 8
  assert s['mode_weight_tv'] == pytest.approx(expected, abs=0.02)


def test_gaussian_moments():
  ds = toy2d.Toy2D('gaussian')
  x = ds.reference(jax.random.key(4), 20_000)
  s = S.sample_stats(x, ds)
  assert s['mean_err'] < 0.05 and s['cov_err'] < 0.1
  s2 = S.sample_stats(x + 1.0, ds)
  assert s2['mean_err'] == pytest.approx(np.sqrt(2), abs=0.05)


def test_nonfinite_samples_rejected():
  ds = toy2d.Toy2D('moons')
  x = np.zeros((100, 2))
  x[3, 1] = np.nan
  with pytest.raises(ValueError, match='1 of 100 samples are non-finite'):
    S.sample_stats(x, ds)
