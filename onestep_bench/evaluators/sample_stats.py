"""Sample-based distances for 2-D toys, scored on host with numpy.

`sample_stats(samples, dataset)` compares generated points `x` [n, 2] with
exact draws of the toy. Lower is better for every metric except `hq_frac`
and `modes_covered` (`HIGHER_IS_BETTER`). Each `*_floor` is the same
statistic for a fresh exact sample of the same size: the finite-sample
noise floor, i.e. what a perfect sampler scores.

  sliced_w2: sliced Wasserstein-2 (Bonneel et al. 2015, "Sliced and Radon
    Wasserstein barycenters") against a large exact reference R (`n_ref`
    points). Along P directions (random rotation of P equispaced angles in
    [0, pi), fixed by `seed`) the sorted projections of x are compared with
    R's quantile function at levels (i + 0.5) / n:
    SW2 = sqrt(mean_theta mean_i (x_(i) . theta - Q_R,theta(levels_i))^2).
  mmd_rbf: squared MMD, unbiased U-statistic MMD^2_u (Gretton et al. 2012,
    JMLR, eq. 3), with the kernel k = sum_b exp(-|u - v|^2 / (2 b^2)) over
    bandwidths b in `BANDWIDTHS`, between m = min(n, n_kernel) points of x
    and m fresh exact points. Unbiased, so it can be slightly negative.
    Kernel entries are float32 (relative error ~1e-7), sums float64.
  energy_distance: 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo
    2013, "Energy statistics"), within terms as U-statistics, same
    subsamples as the MMD.
  mean_err, cov_err: |mean(x) - mu|_2 and |cov(x) - Sigma|_F (ddof 1), with
    (mu, Sigma) exact when the spec has them, else from R.
  The exact Gaussian only (`toy2d:gaussian`): gauss_w2 (closed-form W2 /
  Bures), white_cov_err, var_ratio_err (`gaussian_stats`).
  Gaussian mixtures only (VEEGAN, Srivastava et al. 2017; PacGAN, Lin et
  al. 2018): each point goes to its nearest centre; it is high quality (hq)
  when within `HQ_RADIUS` * std of it. In 2-D an exact sample is hq with
  probability 1 - exp(-4.5) = 0.9889 (not the 1-D 0.9973).
    hq_frac: share of hq points.
    modes_covered: modes k holding >= max(1, 0.1 * w_k * n) hq points.
    mode_weight_tv: 0.5 * sum_k |w^_k - w_k|, w^_k = share of the hq points
      on mode k (1.0 when none is hq). Detects mode-seeking collapse onto
      heavy modes and mode-covering flattening of weights.
    mode_weight_max_rel_err: max_k |w^_k - w_k| / w_k.
    num_modes: K.
  n_samples: n.

Keys: R = dataset.reference(jax.random.key(seed), n_ref), memoised per
(spec.name, seed, n_ref); fresh exact points come from the key
fold_in(key(seed), 1); directions from np.random.default_rng(seed), the
subsample of x from np.random.default_rng((seed, 1)).
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from onestep_bench.data import Mixture

BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
HIGHER_IS_BETTER = frozenset({'hq_frac', 'modes_covered'})
HQ_RADIUS = 3.0  # high-quality radius, in units of the mixture std
COVERED_SHARE = 0.1  # share of its expected hq count a covered mode needs
_CHUNK = 1 << 16  # pairwise entries per block (fits in cache)


def directions(n_proj: int, seed: int, dim: int = 2) -> np.ndarray:
  """Unit directions [n_proj, dim] fixed by seed.

  In 2-D: equispaced angles in [0, pi) with a random offset (stratified, so
  the mean over directions has far less Monte-Carlo noise); else isotropic.
  """
  rng = np.random.default_rng(seed)
  if dim == 2:
    angle = np.pi * (np.arange(n_proj) + rng.uniform()) / n_proj
    return np.stack([np.cos(angle), np.sin(angle)], -1)
  d = rng.standard_normal((n_proj, dim))
  return d / np.linalg.norm(d, axis=-1, keepdims=True)


def _project(x: np.ndarray, d: np.ndarray) -> np.ndarray:
  """Projections [p, n] of x [n, D] on d [p, D] (no BLAS: D is tiny)."""
  return sum(d[:, j, None] * x[None, :, j] for j in range(x.shape[1]))


def _sliced_w2_many(xs: Sequence[np.ndarray], ref: np.ndarray,
                    directions: np.ndarray) -> list[float]:
  """`sliced_w2(x, ref, directions)` for each x, sorting ref only once."""
  sq = np.zeros(len(xs))
  n_ref = len(ref)
  for d in np.array_split(directions, -(-len(directions) // 32)):
    ref_proj = np.sort(_project(ref, d), axis=1)  # [p, N]
    for i, x in enumerate(xs):
      pos = (np.arange(len(x)) + 0.5) / len(x) * (n_ref - 1)
      lo = np.floor(pos).astype(np.int64)
      hi = np.minimum(lo + 1, n_ref - 1)
      frac = pos - lo  # np.quantile's default 'linear' rule
      q = ref_proj[:, lo] * (1 - frac) + ref_proj[:, hi] * frac  # [p, n]
      sq[i] += np.square(np.sort(_project(x, d), axis=1) - q).mean(1).sum()
  return [float(np.sqrt(s / len(directions))) for s in sq]


def sliced_w2(x: np.ndarray, ref: np.ndarray, directions: np.ndarray) -> float:
  """Sliced W2 of x [n, D] to the quantiles of ref [N, D] along [P, D]."""
  return _sliced_w2_many([x], ref, directions)[0]


def _pair_sums(a: np.ndarray, b: np.ndarray | None,
               bandwidths: Sequence[float]) -> np.ndarray:
  """Sums of [k_b(a_i, b_j) for b in bandwidths] + [|a_i - b_j|], shape [B+1].

  Over all (i, j) pairs, or over ordered pairs i != j of `a` if b is None.
  Row blocks of ~_CHUNK entries stay in cache; entries are float32 (relative
  error ~1e-7, far below the statistics' noise), block sums add in float64.
  """
  within = b is None
  at = np.ascontiguousarray(np.asarray(a, np.float32).T)  # [D, m]
  bt = at if b is None else np.ascontiguousarray(np.asarray(b, np.float32).T)
  scales = (-0.5 / np.square(np.asarray(bandwidths, np.float64)))
  scales = scales.astype(np.float32)
  rows = max(1, _CHUNK // bt.shape[1])
  buf = np.empty(rows * bt.shape[1], np.float32)
  total = np.zeros(len(scales) + 1)

  def sums(d2: np.ndarray) -> np.ndarray:
    k = buf[:d2.size].reshape(d2.shape)
    out = np.empty(len(scales) + 1)
    for i, s in enumerate(scales):
      np.multiply(d2, s, out=k)
      out[i] = np.exp(k, out=k).sum()
    out[-1] = np.sqrt(d2, out=k).sum()
    return out

  for r0 in range(0, at.shape[1], rows):
    r1 = min(r0 + rows, at.shape[1])
    c0 = r0 if within else 0  # within: columns j >= r0 only
    d2 = np.zeros((r1 - r0, bt.shape[1] - c0), np.float32)
    for ad, bd in zip(at[:, r0:r1], bt[:, c0:], strict=True):
      d2 += np.square(ad[:, None] - bd[None, :])
    block = sums(d2)
    if within:  # square part [r0:r1]^2: keep its strict upper half
      sq = sums(np.ascontiguousarray(d2[:, :r1 - r0]))
      trace = np.r_[np.full(len(scales), r1 - r0), 0.0]  # k(0)=1, |0|=0
      block += (sq - trace) / 2 - sq
    total += block
  return 2 * total if within else total  # i < j  ->  ordered i != j


def _two_sample(x: np.ndarray, y: np.ndarray, bandwidths: Sequence[float],
                yy: np.ndarray | None = None) -> tuple[float, float]:
  """(MMD^2_u with the summed kernel, energy distance); yy: _pair_sums(y)."""
  m, n = len(x), len(y)
  xx = _pair_sums(x, None, bandwidths) / (m * (m - 1))
  yy = (_pair_sums(y, None, bandwidths) if yy is None else yy) / (n * (n - 1))
  xy = _pair_sums(x, y, bandwidths) / (m * n)
  mmd = float(np.sum(xx[:-1] + yy[:-1] - 2 * xy[:-1]))
  return mmd, float(2 * xy[-1] - xx[-1] - yy[-1])


def mmd_rbf(x: np.ndarray, y: np.ndarray,
            bandwidths: Sequence[float] = BANDWIDTHS) -> float:
  """Unbiased MMD^2 of x [m, D] vs y [n, D], kernel = sum of RBFs."""
  return _two_sample(x, y, bandwidths)[0]


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
  """Energy distance of x [m, D] vs y [n, D] (U-statistic within terms)."""
  return _two_sample(x, y, ())[1]


def mode_stats(x: np.ndarray, mixture: Mixture) -> dict[str, float]:
  """Mode coverage / quality of x [n, D] for a mixture (see module doc)."""
  centers = np.asarray(mixture.centers, np.float64)
  w = np.asarray(mixture.weights, np.float64)
  d2 = np.square(x[:, None, :] - centers[None]).sum(-1)  # [n, K]
  nearest = np.argmin(d2, axis=1)
  hq = d2[np.arange(len(x)), nearest] <= (HQ_RADIUS * mixture.std) ** 2
  counts = np.bincount(nearest[hq], minlength=len(w)).astype(np.float64)
  need = np.maximum(1.0, COVERED_SHARE * w * len(x))
  w_hat = counts / max(counts.sum(), 1.0)
  no_hq = not hq.any()
  return {
      'hq_frac': float(hq.mean()),
      'modes_covered': float(np.sum(counts >= need)),
      'mode_weight_tv': 1.0 if no_hq else float(0.5 * np.abs(w_hat - w).sum()),
      'mode_weight_max_rel_err': float(np.max(np.abs(w_hat - w) / w)),
      'num_modes': float(len(w)),
  }


class _RefKey:
  """Hashes as (spec.name, seed, n_ref); carries the dataset for a miss."""

  def __init__(self, dataset: Any, seed: int, n_ref: int):
    self.dataset = dataset
    self.key = (dataset.spec.name, seed, n_ref)

  def __hash__(self) -> int:
    return hash(self.key)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _RefKey) and self.key == other.key


@functools.lru_cache(maxsize=8)
def _big_reference(k: _RefKey) -> np.ndarray:
  """The memoised exact reference [n_ref, D] (read-only float64)."""
  _, seed, n_ref = k.key
  ref = np.array(k.dataset.reference(jax.random.key(seed), n_ref), np.float64)
  ref.flags.writeable = False
  return ref


def sample_stats(samples: np.ndarray, dataset: Any, *, seed: int = 0,
                 n_ref: int = 100_000, n_proj: int = 256,
                 n_kernel: int = 4000) -> dict[str, float]:
  """All toy metrics of `samples` [n, D] vs the exact `dataset` (module doc).

  Raises:
    ValueError: if samples are not [n >= 2, *spec.shape] or not all finite.
  """
  x = np.asarray(samples, np.float64)
  spec = dataset.spec
  if x.ndim != 2 or x.shape[1:] != tuple(spec.shape) or len(x) < 2:
    raise ValueError(f'samples must be [n >= 2, {spec.shape}]: got {x.shape}.')
  bad = int(np.sum(~np.isfinite(x).all(1)))
  if bad:
    raise ValueError(f'{bad} of {len(x)} samples are non-finite (NaN/inf); '
                     'a model emitting them gets no score.')
  n, m = len(x), min(len(x), n_kernel)
  ref = _big_reference(_RefKey(dataset, seed, n_ref))
  # One draw of n_ref points reuses the compiled sampler of the reference.
  fresh = np.asarray(dataset.reference(
      jax.random.fold_in(jax.random.key(seed), 1), max(n_ref, n + m)),
                     np.float64)
  exact, y = fresh[:n], fresh[n:n + m]
  rng = np.random.default_rng((seed, 1))
  sub = x[np.sort(rng.choice(n, m, replace=False))] if m < n else x
  dirs = directions(n_proj, seed, x.shape[1])
  # The sort (sliced W2) and the kernel sums release the GIL: overlap them.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    sliced = pool.submit(_sliced_w2_many, [x, exact], ref, dirs)
    yy = _pair_sums(y, None, BANDWIDTHS)
    mmd, ed = _two_sample(sub, y, BANDWIDTHS, yy)
    mmd_floor, ed_floor = _two_sample(exact[:m], y, BANDWIDTHS, yy)
    sw, sw_floor = sliced.result()
  mean = ref.mean(0) if spec.mean is None else np.asarray(spec.mean)
  cov = np.cov(ref.T) if spec.cov is None else np.asarray(spec.cov)
  out = {
      'sliced_w2': sw, 'sliced_w2_floor': sw_floor,
      'mmd_rbf': mmd, 'mmd_rbf_floor': mmd_floor,
      'energy_distance': ed, 'energy_distance_floor': ed_floor,
      'mean_err': float(np.linalg.norm(x.mean(0) - mean)),
      'cov_err': float(np.linalg.norm(np.cov(x.T) - cov)),
      'n_samples': float(n),
  }
  if spec.mean is not None and spec.cov is not None:  # the Gaussian set
    out.update(gaussian_stats(x, mean, cov))
  if spec.mixture is not None:
    out.update(mode_stats(x, spec.mixture))
  return out


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_stats(x: np.ndarray, mean: np.ndarray, cov: np.ndarray
                   ) -> dict[str, float]:
  """Per-axis errors against an exact Gaussian N(mean, cov).

  gauss_w2: the closed-form 2-Wasserstein distance between N(mean, cov)
    and the Gaussian with the samples' mean and covariance (Dowson &
    Landau 1982; the Bures metric on covariances): W2² = |m - μ|² +
    tr(Σ̂ + Σ - 2 (Σ^½ Σ̂ Σ^½)^½).
  white_cov_err: |Σ^-½ Σ̂ Σ^-½ - I|_F, the covariance error after
    whitening by the exact covariance, so a narrow axis counts as much as
    a wide one (the Frobenius `cov_err` is dominated by the wide axis).
  var_ratio_err: max_i |λ_i - 1| over the eigenvalues λ_i of
    Σ^-½ Σ̂ Σ^-½ (0 is exact; 0.24 means 24 % too much or too little
    variance along some direction).
  """
  m, c = x.mean(0), np.cov(x.T)
  root = _sqrtm_psd(cov)
  cross = _sqrtm_psd(root @ c @ root)
  w2 = float(np.sum((m - mean) ** 2) + np.trace(c + cov - 2 * cross))
  w, v = np.linalg.eigh(cov)
  inv_root = (v / np.sqrt(w)) @ v.T
  white = inv_root @ c @ inv_root
  ev = np.linalg.eigvalsh((white + white.T) / 2)
  return {'gauss_w2': float(np.sqrt(max(w2, 0.0))),
          'white_cov_err': float(np.linalg.norm(white - np.eye(len(m)))),
          'var_ratio_err': float(np.max(np.abs(ev - 1.0)))}
