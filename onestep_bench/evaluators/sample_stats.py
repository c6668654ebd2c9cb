"""Toy-2D sample metrics against exact reference samples.

All metrics compare generated samples with the dataset's *exact* sampler.
Lower is better unless listed in `HIGHER_IS_BETTER`.

- `sliced_w2`: sliced Wasserstein-2 (Bonneel et al. 2015) against a large
  reference sample (n_ref = 100k): for `n_proj` random directions, the sorted
  projections of the n samples are compared with the reference quantile
  function at levels (i + 0.5)/n; SW2 = sqrt(mean squared difference).
  `sliced_w2_floor` is the same statistic for a fresh exact sample of the
  same size: a perfect model scores the floor, not 0.
- `mmd_rbf`: unbiased squared MMD (Gretton et al. 2012, eq. 3) with a sum of
  RBF kernels over bandwidths `BANDWIDTHS`, on min(n, n_kernel = 2000)
  points;
  `mmd_rbf_floor` for an exact sample.
- `energy_distance`: 2E|X−Y| − E|X−X'| − E|Y−Y'| (Székely & Rizzo 2013),
  U-statistics within sets; `energy_distance_floor` for an exact sample.
- `mean_err`, `cov_err`: ‖mean − μ‖₂ and ‖cov − Σ‖_F, exact μ, Σ when the
  dataset knows them (`gaussian`), else from the reference sample.
- Gaussian mixtures only (VEEGAN / PacGAN protocol): a sample is high quality
  if it is within 3σ of its nearest centre. `hq_frac`; `modes_covered` = modes
  holding ≥ 10% of their expected share w_k·n of high-quality samples;
  `mode_weight_tv` = ½ Σ_k |ŵ_k − w_k| with ŵ the share of high-quality
  samples per mode (mode-seeking vs mode-covering shows here on
  8gaussians_imbalanced); `mode_weight_max_rel_err` = max_k |ŵ_k − w_k|/w_k.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from onestep_bench.data import Mixture

HIGHER_IS_BETTER = frozenset({'hq_frac', 'modes_covered'})
BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def directions(n_proj: int, seed: int) -> np.ndarray:
  """[n_proj, 2] unit vectors, fixed by seed."""
  v = np.random.default_rng(seed).normal(size=(n_proj, 2))
  return v / np.linalg.norm(v, axis=1, keepdims=True)


def sliced_w2(x: np.ndarray, ref: np.ndarray, dirs: np.ndarray, *,
              ref_sorted: np.ndarray | None = None) -> float:
  """SW2 between x [n, 2] and the quantile function of ref [m, 2].

  `ref_sorted` ([m, P], the sorted projections of ref) may be passed to
  reuse one sort across calls.
  """
  n = len(x)
  px = np.sort(x @ dirs.T, axis=0)                        # [n, P]
  if ref_sorted is None:
    ref_sorted = np.sort(ref @ dirs.T, axis=0)
  m = len(ref_sorted)
  # np.quantile's linear interpolation, on the pre-sorted columns.
  pos = (np.arange(n) + 0.5) / n * (m - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, m - 1)
  frac = (pos - lo)[:, None]
  pr = ref_sorted[lo] * (1 - frac) + ref_sorted[hi] * frac   # [n, P]
  return float(np.sqrt(np.mean((px - pr) ** 2)))


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None]
                    - 2 * a @ b.T, 0.0)


def _offdiag_mean(k: np.ndarray) -> float:
  n = len(k)
  return float((k.sum() - np.trace(k)) / (n * (n - 1)))


@functools.partial(jax.jit, static_argnums=1)
def _rbf_sum(d2: jax.Array, bandwidths: tuple[float, ...]) -> jax.Array:
  """Σ_σ exp(−d2 / (2σ²)) (XLA: numpy's exp is the evaluator's hot spot)."""
  return sum(jnp.exp(-d2 / (2 * s * s)) for s in bandwidths)


def mmd_rbf(x: np.ndarray, y: np.ndarray,
            bandwidths: tuple[float, ...] = BANDWIDTHS) -> float:
  """Unbiased squared MMD with k = Σ_σ exp(−‖a−b‖² / (2σ²))."""
  def k(d2):
    return np.asarray(_rbf_sum(d2.astype(np.float32), tuple(bandwidths)),
                      np.float64)
  return (_offdiag_mean(k(_sqdist(x, x))) + _offdiag_mean(k(_sqdist(y, y)))
          - 2 * float(k(_sqdist(x, y)).mean()))


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
  """2E|X−Y| − E|X−X'| − E|Y−Y'| (within-set terms as U-statistics)."""
  return (2 * float(np.sqrt(_sqdist(x, y)).mean())
          - _offdiag_mean(np.sqrt(_sqdist(x, x)))
          - _offdiag_mean(np.sqrt(_sqdist(y, y))))


def mode_stats(x: np.ndarray, mixture: Mixture) -> dict[str, float]:
  """High-quality fraction, modes covered and per-mode weight errors."""
  d2 = _sqdist(x, mixture.centers)
  nearest = d2.argmin(1)
  hq = np.sqrt(d2[np.arange(len(x)), nearest]) <= 3 * mixture.std
  counts = np.bincount(nearest[hq], minlength=len(mixture.weights))
  w = mixture.weights
  covered = counts >= 0.1 * w * hq.sum() if hq.any() else np.zeros_like(w)
  what = counts / max(hq.sum(), 1)
  return {
      'hq_frac': float(hq.mean()),
      'modes_covered': float(np.sum(covered)),
      'num_modes': float(len(w)),
      'mode_weight_tv': float(0.5 * np.abs(what - w).sum()) if hq.any()
                        else 1.0,
      'mode_weight_max_rel_err': float(np.max(np.abs(what - w) / w)),
  }


@functools.lru_cache(maxsize=8)
def _reference(dataset, seed: int, n: int,
               n_proj: int) -> tuple[np.ndarray, np.ndarray]:
  """(reference [n, 2], its sorted projections [n, n_proj]); memoised."""
  ref = dataset.reference(jax.random.key(seed), n)
  return ref, np.sort(ref @ directions(n_proj, seed).T, axis=0)


def sample_stats(samples: np.ndarray, dataset, *, seed: int = 0,
                 n_ref: int = 100_000, n_proj: int = 256,
                 n_kernel: int = 2000) -> dict[str, float]:
  """All toy metrics for samples [n, 2] of `dataset` (see module docstring).

  Raises:
    ValueError: if any sample is non-finite (a NaN model gets no score).
  """
  x = np.asarray(samples, np.float64).reshape(len(samples), -1)
  bad = int(np.sum(~np.all(np.isfinite(x), axis=1)))
  if bad:
    raise ValueError(f'{bad} of {len(x)} samples are non-finite; the model '
                     'diverged (no metrics are computed for NaN samples).')
  n = len(x)
  ref, ref_sorted = _reference(dataset, 10_000 + seed, n_ref, n_proj)
  fresh = dataset.reference(jax.random.key(20_000 + seed), n)
  fresh2 = dataset.reference(jax.random.key(30_000 + seed), n)
  dirs = directions(n_proj, 10_000 + seed)
  m = min(n, n_kernel)
  xs, fs, f2 = x[:m], fresh[:m], fresh2[:m]
  spec = dataset.spec
  mean = spec.mean if spec.mean is not None else ref.mean(0)
  cov = spec.cov if spec.cov is not None else np.cov(ref.T)
  out = {
      'n_samples': float(n),
      'sliced_w2': sliced_w2(x, ref, dirs, ref_sorted=ref_sorted),
      'sliced_w2_floor': sliced_w2(fresh, ref, dirs, ref_sorted=ref_sorted),
      'mmd_rbf': mmd_rbf(xs, fs),
      'mmd_rbf_floor': mmd_rbf(f2, fs),
      'energy_distance': energy_distance(xs, fs),
      'energy_distance_floor': energy_distance(f2, fs),
      'mean_err': float(np.linalg.norm(x.mean(0) - mean)),
      'cov_err': float(np.linalg.norm(np.cov(x.T) - cov)),
  }
  if spec.mixture is not None:
    out.update(mode_stats(x, spec.mixture))
  return out
