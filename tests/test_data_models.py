"""Toy-2D exact samplers and the shared backbone."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from onestep_bench import data, models
from onestep_bench.data import toy2d


@pytest.mark.parametrize('name', sorted(toy2d.SAMPLERS))
def test_sampler_shapes_and_finite(name):
  ds = toy2d.Toy2D(name)
  x = jax.jit(ds.sample, static_argnums=1)(jax.random.key(0), 1000)['x']
  assert x.shape == (1000, 2) and x.dtype == jnp.float32
  assert np.all(np.isfinite(x))
  assert ds.spec.name == f'toy2d:{name}'


def test_gaussian_matches_closed_form():
  ds = toy2d.Toy2D('gaussian')
  x = ds.reference(jax.random.key(0), 200_000)
  np.testing.assert_allclose(x.mean(0), ds.spec.mean, atol=0.01)
  np.testing.assert_allclose(np.cov(x.T), ds.spec.cov, atol=0.02)
  assert np.linalg.cond(ds.spec.cov) > 10, 'must be anisotropic'


def test_imbalanced_mixture_weights():
  ds = toy2d.Toy2D('8gaussians_imbalanced')
  m = ds.spec.mixture
  x = ds.reference(jax.random.key(1), 100_000)
  k = np.argmin(((x[:, None] - m.centers[None]) ** 2).sum(-1), 1)
  np.testing.assert_allclose(np.bincount(k, minlength=8) / len(x), m.weights,
                             atol=0.005)
  assert m.weights.max() / m.weights.min() == pytest.approx(8.0)


def test_checkerboard_support():
  x = toy2d.Toy2D('checkerboard').reference(jax.random.key(2), 20_000)
  assert np.all(np.abs(x) <= 2.0 + 1e-6)
  cell = (np.floor(x[:, 0]) + np.floor(x[:, 1])) % 2
  assert np.all(cell == 0), 'points must lie on the dark squares only'


def test_unknown_dataset_errors():
  with pytest.raises(ValueError, match='Available'):
    data.build(ml_collections.ConfigDict({'name': 'toy2d:nope'}))
  with pytest.raises(ValueError, match='Unknown dataset'):
    data.build(ml_collections.ConfigDict({'name': 'nope'}))


def test_mlp_signature_and_jvp():
  spec = toy2d.Toy2D('moons').spec
  net = models.build(ml_collections.ConfigDict(
      {'name': 'mlp', 'width': 32, 'depth': 2, 'freq_dim': 16}), spec)
  params = net.init(jax.random.key(0))
  # Zero-init output layer: perturb so derivatives are non-trivial.
  params = jax.tree.map(lambda p: p + 0.05, params)
  assert net.num_params() == sum(p.size for p in jax.tree.leaves(params))
  x = jnp.ones((4, 2))
  t = jnp.full((4,), 0.3)
  y = net.apply(params, x, t, t)
  assert y.shape == (4, 2)
  # d/dt along (t, h) by jvp == central finite difference.
  f = lambda s: net.apply(params, x, s, s)
  _, dy = jax.jvp(f, (t,), (jnp.ones(4),))
  eps = 1e-3
  fd = (f(t + eps) - f(t - eps)) / (2 * eps)
  np.testing.assert_allclose(dy, fd, rtol=2e-2, atol=2e-3)


def test_unknown_backbone_errors():
  with pytest.raises(ValueError, match='Unknown backbone'):
    models.build(ml_collections.ConfigDict({'name': 'nope'}),
                 toy2d.Toy2D('moons').spec)
