"""Procedural 2-D datasets with exact samplers.

All samplers are pure JAX (drawn inside the jitted train step). The Gaussian
mixtures expose their exact parameters (`DataSpec.mixture`) for mode metrics;
`gaussian` exposes its exact mean / covariance, so every probability path has
a closed-form flow map there (the sanity dataset for all methods).

Conventions (fixed here, in code, because papers differ):
  gaussian:              N(MEAN, COV), anisotropic and correlated.
  8gaussians:            8 modes on a circle of radius 2, std 0.1, equal weights.
  8gaussians_imbalanced: same modes, weights proportional to 8, 7, ..., 1.
  25gaussians:           5x5 grid {-2,-1,0,1,2}^2, std 0.05, equal weights.
  checkerboard:          uniform on 8 unit squares of a 4x4 board in [-2, 2]^2.
  moons:                 two interleaved half circles + N(0, 0.05^2), centred.
  spirals:               two opposite Archimedean arms + N(0, 0.07^2).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from onestep_bench.data import DataSpec, Mixture

GAUSSIAN_MEAN = np.array([1.0, -0.5])
_ROT = np.array([[np.cos(np.pi / 6), -np.sin(np.pi / 6)],
                 [np.sin(np.pi / 6), np.cos(np.pi / 6)]])
GAUSSIAN_COV = _ROT @ np.diag([1.5**2, 0.3**2]) @ _ROT.T


def _ring(k: int = 8, radius: float = 2.0) -> np.ndarray:
  a = 2 * np.pi * np.arange(k) / k
  return radius * np.stack([np.cos(a), np.sin(a)], -1)


_GRID = np.stack(np.meshgrid(np.arange(-2.0, 3.0), np.arange(-2.0, 3.0),
                             indexing='ij'), -1).reshape(-1, 2)

MIXTURES: dict[str, Mixture] = {
    '8gaussians': Mixture(_ring(), np.full(8, 1 / 8), 0.1),
    '8gaussians_imbalanced': Mixture(
        _ring(), np.arange(8, 0, -1) / np.arange(8, 0, -1).sum(), 0.1),
    '25gaussians': Mixture(_GRID, np.full(25, 1 / 25), 0.05),
}


def _mixture_sampler(m: Mixture) -> Callable[[jax.Array, int], jax.Array]:
  def sample(key: jax.Array, n: int) -> jax.Array:
    kc, kn = jax.random.split(key)
    idx = jax.random.choice(kc, len(m.weights), (n,), p=jnp.asarray(m.weights))
    return jnp.asarray(m.centers, jnp.float32)[idx] + m.std * jax.random.normal(
        kn, (n, 2))
  return sample


def _gaussian(key: jax.Array, n: int) -> jax.Array:
  chol = jnp.asarray(np.linalg.cholesky(GAUSSIAN_COV), jnp.float32)
  z = jax.random.normal(key, (n, 2))
  return jnp.asarray(GAUSSIAN_MEAN, jnp.float32) + z @ chol.T


def _checkerboard(key: jax.Array, n: int) -> jax.Array:
  k1, k2, k3 = jax.random.split(key, 3)
  x1 = jax.random.uniform(k1, (n,), minval=-2.0, maxval=2.0)
  row = 2.0 * jax.random.randint(k2, (n,), 0, 2) - 2.0  # -2 or 0
  x2 = jax.random.uniform(k3, (n,)) + row + jnp.floor(x1) % 2
  return jnp.stack([x1, x2], -1)


def _moons(key: jax.Array, n: int) -> jax.Array:
  k1, k2, k3 = jax.random.split(key, 3)
  theta = jax.random.uniform(k1, (n,), maxval=jnp.pi)
  upper = jax.random.bernoulli(k2, 0.5, (n,))
  x = jnp.where(upper, jnp.cos(theta), 1.0 - jnp.cos(theta))
  y = jnp.where(upper, jnp.sin(theta), 0.5 - jnp.sin(theta))
  pts = jnp.stack([x - 0.5, y - 0.25], -1) * 1.5
  return pts + 0.05 * jax.random.normal(k3, (n, 2))


def _spirals(key: jax.Array, n: int) -> jax.Array:
  k1, k2, k3 = jax.random.split(key, 3)
  r = jnp.sqrt(jax.random.uniform(k1, (n,))) * 3 * jnp.pi
  sign = 2.0 * jax.random.bernoulli(k2, 0.5, (n,)) - 1.0
  pts = sign[:, None] * jnp.stack([-jnp.cos(r) * r, jnp.sin(r) * r], -1) / 3.5
  return pts + 0.07 * jax.random.normal(k3, (n, 2))


SAMPLERS: dict[str, Callable[[jax.Array, int], jax.Array]] = {
    'gaussian': _gaussian,
    'checkerboard': _checkerboard,
    'moons': _moons,
    'spirals': _spirals,
    **{k: _mixture_sampler(m) for k, m in MIXTURES.items()},
}


class Toy2D:
  """An exact 2-D sampler with the `Dataset` API."""

  def __init__(self, name: str):
    if name not in SAMPLERS:
      raise ValueError(f'Unknown toy dataset toy2d:{name!r}. Available: '
                       + ', '.join(f'toy2d:{n}' for n in sorted(SAMPLERS)))
    self._sample = SAMPLERS[name]
    gauss = name == 'gaussian'
    self.spec = DataSpec(
        name=f'toy2d:{name}', shape=(2,), num_classes=0, kind='toy2d',
        mixture=MIXTURES.get(name),
        mean=GAUSSIAN_MEAN.copy() if gauss else None,
        cov=GAUSSIAN_COV.copy() if gauss else None)

  arrays: dict[str, jax.Array] = {}  # exact samplers hold no data

  def sample(self, key: jax.Array, n: int,
             arrays: dict[str, jax.Array] | None = None, *,
             groups: int = 0) -> dict[str, jax.Array]:
    """{'x': [n, 2] float32}, exact samples (jit-able); unlabelled, so
    `groups` (class-grouped batches) does not apply.
    """
    del groups
    del arrays
    return {'x': self._sample(key, n)}

  def reference(self, key: jax.Array, n: int) -> np.ndarray:
    """[n, 2] float64 exact samples for evaluation."""
    return np.asarray(jax.jit(self._sample, static_argnums=1)(key, n),
                      np.float64)
