"""Peer toy laws (torchcfm, Drifting demo): formulas, keys and toy metrics."""

import jax
import numpy as np
import pytest
from scipy import integrate

from onestep_bench.data import toy2d
from onestep_bench.evaluators import sample_stats as S

PEERS = ('8gaussians_torchcfm', 'checkerboard_drifting', 'swissroll_drifting')
N = 40_000


@pytest.fixture(scope='module')
def draws():
  """N exact points of each peer law (one compile per law)."""
  return {name: toy2d.Toy2D(name).reference(jax.random.key(0), N)
          for name in PEERS}


def _moments_close(x, mean, cov, k=5.0):
  """Sample mean / covariance within k standard errors of the exact ones."""
  n = len(x)
  se_mean = np.sqrt(np.diag(cov) / n)
  np.testing.assert_array_less(np.abs(x.mean(0) - mean), k * se_mean)
  # se of a (co)variance entry <= sqrt(E[(xi xj)^2] / n), from the sample.
  c = x - x.mean(0)
  se_cov = np.sqrt(np.mean((c[:, :, None] * c[:, None, :]) ** 2, 0) / n)
  np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), k * se_cov)


def test_8gaussians_torchcfm_is_torchcfms_law(draws):
  m = toy2d.Toy2D('8gaussians_torchcfm').spec.mixture
  # eight_normal_sample(n, 2, scale=5, var=0.1): centres 5 * unit vectors at
  # multiples of 45 degrees, covariance sqrt(0.1) I, equal weights.
  np.testing.assert_allclose(np.linalg.norm(m.centers, axis=1), 5.0)
  angles = np.sort(np.mod(np.arctan2(m.centers[:, 1], m.centers[:, 0]),
                          2 * np.pi))
  np.testing.assert_allclose(angles, np.arange(8) * np.pi / 4, atol=1e-12)
  assert m.std == pytest.approx(np.sqrt(np.sqrt(0.1)))
  np.testing.assert_allclose(m.weights, 1 / 8)
  x = draws['8gaussians_torchcfm']
  _moments_close(x, np.zeros(2), (12.5 + np.sqrt(0.1)) * np.eye(2))
  k = np.argmin(((x[:, None] - m.centers[None]) ** 2).sum(-1), 1)
  resid = x - m.centers[k]
  assert resid.std(0) == pytest.approx([0.1**0.25] * 2, rel=0.02)
  np.testing.assert_allclose(np.bincount(k) / N, 1 / 8, atol=0.006)


def test_checkerboard_drifting_is_the_demo_law(draws):
  clean = np.asarray(toy2d._checkerboard_drifting(jax.random.key(1), 20_000,
                                                  noise=0.0))
  assert np.abs(clean).max() <= 1.0
  cell = np.floor((clean + 1) * 2).astype(int)  # 0..3 per axis, side 0.5
  assert (cell[:, 0] % 2 == cell[:, 1] % 2).all()  # parities agree
  counts = np.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16)
  assert (counts.reshape(4, 4) > 0).sum() == 8
  np.testing.assert_allclose(counts[counts > 0] / 20_000, 1 / 8, atol=0.01)
  # Blurred law: U(-1, 1) marginals + N(0, 0.05^2); shared parity: cov 1/16.
  v = 1 / 3 + 0.05**2
  _moments_close(draws['checkerboard_drifting'], np.zeros(2),
                 np.array([[v, 1 / 16], [1 / 16, v]]))
  off = draws['checkerboard_drifting'] - np.clip(
      draws['checkerboard_drifting'], -1, 1)
  assert 0 < np.abs(off).max() < 6 * 0.05  # the blur crosses the border


def test_swissroll_drifting_is_the_demo_law(draws):
  clean = np.asarray(toy2d._swissroll_drifting(jax.random.key(2), 20_000,
                                               noise=0.0), np.float64)
  t = np.linalg.norm(clean, axis=1) * toy2d.SWISSROLL_SCALE
  assert t.min() >= np.pi / 2 - 1e-4 and t.max() <= 4.5 * np.pi + 1e-4
  np.testing.assert_allclose(clean * toy2d.SWISSROLL_SCALE,
                             np.stack([t * np.cos(t), t * np.sin(t)], 1),
                             atol=2e-4)
  assert np.abs(clean).max() <= 1.0 + 1e-6
  # Exact moments over t ~ U(pi/2, 9 pi/2), blur N(0, 0.03^2).
  lo, hi = np.pi / 2, 4.5 * np.pi

  def e(f):
    return integrate.quad(f, lo, hi, limit=200)[0] / (hi - lo)

  s = toy2d.SWISSROLL_SCALE
  mean = np.array([e(lambda t: t * np.cos(t)), e(lambda t: t * np.sin(t))])
  second = np.array([
      [e(lambda t: (t * np.cos(t)) ** 2), e(lambda t: t * t * np.cos(t)
                                            * np.sin(t))],
      [0.0, e(lambda t: (t * np.sin(t)) ** 2)]])
  second[1, 0] = second[0, 1]
  cov = (second - np.outer(mean, mean)) / s**2 + 0.03**2 * np.eye(2)
  _moments_close(draws['swissroll_drifting'], mean / s, cov)


@pytest.mark.parametrize('name', PEERS)
def test_peer_samplers_are_deterministic_per_key(name):
  ds = toy2d.Toy2D(name)
  f = jax.jit(ds.sample, static_argnums=1)
  a, b = f(jax.random.key(3), 256)['x'], f(jax.random.key(3), 256)['x']
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, f(jax.random.key(4), 256)['x'])
  assert a.shape == (256, 2) and a.dtype == np.float32


def test_every_toy_metric_works_on_the_peer_laws(draws):
  for name in PEERS:
    ds = toy2d.Toy2D(name)
    x = draws[name][:2000]  # scored against the seed-1 reference: disjoint
    sd = float(x.std())
    kw = dict(seed=1, n_ref=N, n_proj=32, n_kernel=500)
    out = S.sample_stats(x, ds, **kw)
    assert all(np.isfinite(v) for v in out.values()), (name, out)
    shifted = S.sample_stats(x + 0.25 * sd, ds, **kw)
    # An exact sample sits within 0.1 sd (sliced W2), a 0.25 sd shift not.
    assert out['sliced_w2'] < 0.1 * sd < shifted['sliced_w2'], (name, out)
    for k in ('mmd_rbf', 'energy_distance', 'mean_err'):
      assert shifted[k] > out[k], (name, k)
    has_modes = name == '8gaussians_torchcfm'
    assert ('hq_frac' in out) == has_modes, name  # checkerboard-like: none
    if has_modes:
      assert out['modes_covered'] == 8 and out['num_modes'] == 8
      assert out['hq_frac'] == pytest.approx(1 - np.exp(-4.5), abs=0.01)
      assert out['mode_weight_tv'] < 0.06
      assert shifted['hq_frac'] < out['hq_frac'] - 0.1
