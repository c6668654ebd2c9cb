"""Procedural 2-D datasets with exact samplers.

All samplers are pure JAX (drawn inside the jitted train step). The Gaussian
mixtures expose their exact parameters (`DataSpec.mixture`) for mode metrics;
`gaussian` exposes its exact mean / covariance, so every probability path has
a closed-form flow map there (the sanity dataset for all methods).

Conventions (fixed here, in code, because papers differ):
  gaussian:              N(MEAN, COV), anisotropic and correlated.
  8gaussians:            8 equal modes on a circle of radius 2, std 0.1.
  8gaussians_imbalanced: same modes, weights proportional to 8, 7, ..., 1.
  25gaussians:           5x5 grid {-2,-1,0,1,2}^2, std 0.05, equal weights.
  checkerboard:          uniform on 8 unit squares of a 4x4 board in [-2, 2]^2.
  moons:                 two interleaved half circles + N(0, 0.05^2), centred.
  spirals:               two opposite Archimedean arms + N(0, 0.07^2).

Peer laws, reproduced exactly so numbers can be set beside those projects'
(formulas below; the functions' docstrings cite the source lines):
  8gaussians_torchcfm:   torchcfm `utils.sample_8gaussians`: 8 equal-weight
                         modes on a circle of radius 5, covariance
                         sqrt(0.1) I (std 0.1**0.25 = 0.562).
  checkerboard_drifting: the Drifting toy demo's checkerboard: uniform on the
                         8 cells of a 4x4 board of side 0.5 in [-1, 1]^2
                         whose row and column parities agree, + N(0, 0.05^2).
  swissroll_drifting:    the Drifting toy demo's swiss roll: t = pi/2 + 4 pi u,
                         (t cos t, t sin t) / (9 pi / 2) + N(0, 0.03^2).
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

# torchcfm `eight_normal_sample`'s centres, in its order, times scale=5.
_TORCHCFM_CENTERS = 5.0 * np.array(
    [(1, 0), (-1, 0), (0, 1), (0, -1),
     (1 / np.sqrt(2), 1 / np.sqrt(2)), (1 / np.sqrt(2), -1 / np.sqrt(2)),
     (-1 / np.sqrt(2), 1 / np.sqrt(2)), (-1 / np.sqrt(2), -1 / np.sqrt(2))])

MIXTURES: dict[str, Mixture] = {
    '8gaussians': Mixture(_ring(), np.full(8, 1 / 8), 0.1),
    # torchcfm `sample_8gaussians(n) = eight_normal_sample(n, 2, scale=5,
    # var=0.1)`; `_mixture_sampler` documents the law.
    '8gaussians_torchcfm': Mixture(_TORCHCFM_CENTERS, np.full(8, 1 / 8),
                                   0.1**0.25),
    '8gaussians_imbalanced': Mixture(
        _ring(), np.arange(8, 0, -1) / np.arange(8, 0, -1).sum(), 0.1),
    '25gaussians': Mixture(_GRID, np.full(25, 1 / 25), 0.05),
}


def _mixture_sampler(m: Mixture) -> Callable[[jax.Array, int], jax.Array]:
  """Sampler of x = centers[k] + std * N(0, I), k ~ Categorical(weights).

  For `8gaussians_torchcfm` this is torchcfm's law (`TORCHCFM_UTILS`,
  `eight_normal_sample(n, 2, scale=5, var=0.1)`): k uniform over the 8
  centres `scale * {(+-1, 0), (0, +-1), (+-1, +-1) / sqrt(2)}` (torch
  `multinomial(ones(8))`), noise `MultivariateNormal(0, sqrt(var) I)` whose
  second argument is the *covariance*, so std = var**0.25 = 0.1**0.25.
  """

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


DRIFTING_DEMO = ('https://github.com/lambertae/lambertae.github.io/blob/main/'
                 'projects/drifting/notebooks/drifting_model_demo.ipynb')
TORCHCFM_UTILS = ('https://github.com/atong01/conditional-flow-matching/blob/'
                  'main/torchcfm/utils.py')
SWISSROLL_SCALE = 4.5 * np.pi  # max |coordinate| of the noise-free roll


def _checkerboard_drifting(key: jax.Array, n: int,
                           noise: float = 0.05) -> jax.Array:
  """The checkerboard of the official Drifting toy demo, exactly.

  Source: `sample_checkerboard(n, noise=0.05)` in the demo notebook linked
  from the paper's README ("Open Toy Demo In Colab"), `DRIFTING_DEMO`:

    b, a, c ~ U{0, 1};  i = 2 a + b;  j = 2 c + b;  u, v ~ U(0, 1)
    x = ((i + u, j + v) - 2) / 2 + noise * N(0, I_2),   noise = 0.05.

  So (i, j) is uniform on the 8 cells of {0..3}^2 with i = j (mod 2), and
  the noise-free point uniform on those cells, side 0.5, in [-1, 1]^2: the
  project's `checkerboard` / 2, then blurred. Moments: mean 0, var of each
  coordinate 1/3 + noise^2, covariance 1/16 (the shared parity b).
  """
  kb, ka, kc, ku, kn = jax.random.split(key, 5)
  b = jax.random.randint(kb, (n,), 0, 2)
  i = 2 * jax.random.randint(ka, (n,), 0, 2) + b
  j = 2 * jax.random.randint(kc, (n,), 0, 2) + b
  cells = jnp.stack([i, j], -1).astype(jnp.float32)
  pts = (cells + jax.random.uniform(ku, (n, 2)) - 2.0) / 2.0
  return pts + noise * jax.random.normal(kn, (n, 2))


def _swissroll_drifting(key: jax.Array, n: int,
                        noise: float = 0.03) -> jax.Array:
  """The swiss roll of the official Drifting toy demo (population scale).

  Source: `sample_swiss_roll(n, noise=0.03)` in `DRIFTING_DEMO`:

    u ~ U(0, 1);  t = pi / 2 + 4 pi u;  p = (t cos t, t sin t)
    x = p / (max |p| + 1e-8) + noise * N(0, I_2),   noise = 0.03,

  where the notebook's max runs over both coordinates of the *batch*. Its
  population value is 9 pi / 2 (`SWISSROLL_SCALE`; t sin t at t = 9 pi / 2,
  u = 1, the only point where |p| reaches it), used here so the law does not
  depend on the batch size: a batch of 2048 (the demo's) has a max below
  it by 5e-4 relative on average, i.e. points <= 5e-4 from this law's,
  far inside the 0.03 blur. The blur is 0.03, not the checkerboard's 0.05.
  """
  ku, kn = jax.random.split(key)
  t = 0.5 * jnp.pi + 4.0 * jnp.pi * jax.random.uniform(ku, (n,))
  pts = jnp.stack([t * jnp.cos(t), t * jnp.sin(t)], -1) / SWISSROLL_SCALE
  return pts + noise * jax.random.normal(kn, (n, 2))


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
    'checkerboard_drifting': _checkerboard_drifting,
    'swissroll_drifting': _swissroll_drifting,
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
    """{'x': [n, 2] float32}, exact samples (jit-able).

    Unlabelled, so `groups` (class-grouped batches) does not apply.
    """
    del groups
    del arrays
    return {'x': self._sample(key, n)}

  def reference(self, key: jax.Array, n: int) -> np.ndarray:
    """[n, 2] float64 exact samples for evaluation."""
    return np.asarray(jax.jit(self._sample, static_argnums=1)(key, n),
                      np.float64)
