"""Feature-space image metrics: FID (+ bootstrap CI), IS, P/R and KID.

Pure numpy / scipy on host, agnostic of the feature network: every function
takes feature arrays ([N, D] pool3 / penultimate features, or [N, C] class
logits / probabilities) and returns Python floats. Reductions that decide
the number run in float64 (docs/evaluation.md §0, §4: float32 covariance
accumulation is a known source of FID disagreement, torcheval#192).

Reference implementation followed by each function:

  gaussian_stats      pytorch-fid `calculate_activation_statistics`
                      (`np.mean(act, 0)`, `np.cov(act, rowvar=False)`,
                      ddof 1), accumulated in float64 chunks.
  frechet_distance    pytorch-fid `fid_score.calculate_frechet_distance`
                      (sqrtm of sigma1 @ sigma2, eps * I retry, imaginary
                      check at atol 1e-3). `method='eigh'`: the cross-check
                      of docs/evaluation.md §0, tr sqrt(S1 S2) from the
                      eigenvalues of sqrt(S1) S2 sqrt(S1).
  fid_bootstrap_ci    nonparametric bootstrap over the generated features,
                      reference fixed (Efron & Tibshirani 1993: §13.3
                      percentile interval, §10.2 bias estimate).
  inception_score     openai/guided-diffusion `evaluations/evaluator.py`
                      `compute_inception_score` (`split_size=`: consecutive
                      splits of 5000 rows, the published protocol), or
                      lambertae/drifting `utils/fid_util.py`
                      `_compute_inception_score` (`splits=`: RandomState(2020)
                      shuffle, N // splits rows per split), which is
                      torch-fidelity `isc_features_to_metric` up to that
                      split rule; 1e-10 inside the logs (Drifting's).
  precision_recall    Kynkaenniemi et al. 2019, as in openai/guided-diffusion
                      `evaluations/evaluator.py` `ManifoldEstimator`
                      (k = 3, squared distances, `<=` ball test).
  kid                 torch-fidelity `metric_kid.py` (mbinkowski/MMD-GAN):
                      unbiased MMD^2, kernel (x.y / d + 1)^3, mean and std
                      over random subsets; clean-fid `kernel_distance` is the
                      same estimator.
"""

from __future__ import annotations

import warnings

import numpy as np
from absl import logging
from scipy import linalg

DEFAULT_N_BOOT = 10  # bootstrap replicates; each costs ~1 cov + 1 eigvalsh
_CHUNK_ROWS = 4096  # rows per float64 chunk in the covariance accumulation
IS_EPS = 1e-10  # inside the logs, as in the Drifting IS code
IS_SPLIT_SIZE = 5000  # rows per IS split in ADM's evaluator (published IS)


def _as_2d(x: np.ndarray, name: str) -> np.ndarray:
  """The input as a 2-D array (no copy); a clear ValueError otherwise."""
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f'{name} must be 2-D [N, D], got shape {x.shape}.')
  if not np.issubdtype(x.dtype, np.number):
    raise ValueError(f'{name} must be numeric, got dtype {x.dtype}.')
  return x


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of features, as pytorch-fid computes them.

  Equals `(np.mean(f, 0), np.cov(f, rowvar=False))` in float64 (ddof 1) up
  to summation order (~1e-15 relative), but converts the input to float64
  one chunk of `_CHUNK_ROWS` rows at a time: float32 [50000, 2048] features
  never exist as a full float64 copy (np.cov makes two).

  Args:
    features: [N, D] features, any float dtype, N >= 2.

  Returns:
    (mu [D], sigma [D, D]), both float64; sigma is exactly symmetric.
  """
  x = _as_2d(features, 'features')
  n, d = x.shape
  if n < 2:
    raise ValueError(f'gaussian_stats needs >= 2 rows, got {n}.')
  mu = np.zeros(d)
  for i in range(0, n, _CHUNK_ROWS):
    mu += x[i:i + _CHUNK_ROWS].sum(0, dtype=np.float64)
  mu /= n
  sigma = np.zeros((d, d))
  for i in range(0, n, _CHUNK_ROWS):
    c = x[i:i + _CHUNK_ROWS].astype(np.float64) - mu
    sigma += c.T @ c  # numpy calls syrk: symmetric to the last bit
  sigma /= n - 1
  return mu, sigma


def _weighted_stats(x: np.ndarray,
                    counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`gaussian_stats(np.repeat(x, counts, 0))` without materialising it.

  Args:
    x: [N, D] features.
    counts: [N] non-negative integer multiplicities, summing to n >= 2.

  Returns:
    (mu [D], sigma [D, D]) float64 of the multiset (ddof 1).
  """
  counts = np.asarray(counts)
  n = int(counts.sum())
  keep = np.flatnonzero(counts)
  mu = np.zeros(x.shape[1])
  for i in range(0, len(keep), _CHUNK_ROWS):
    rows = keep[i:i + _CHUNK_ROWS]
    mu += counts[rows].astype(np.float64) @ x[rows].astype(np.float64)
  mu /= n
  sigma = np.zeros((x.shape[1], x.shape[1]))
  for i in range(0, len(keep), _CHUNK_ROWS):
    rows = keep[i:i + _CHUNK_ROWS]
    c = x[rows].astype(np.float64) - mu
    c *= np.sqrt(counts[rows].astype(np.float64))[:, None]
    sigma += c.T @ c
  sigma /= n - 1
  return mu, sigma


def _check_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                 sigma2: np.ndarray) -> tuple[np.ndarray, ...]:
  """float64 copies of two (mu [D], sigma [D, D]) pairs; ValueError if not."""
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.ndim != 1 or mu1.shape != mu2.shape:
    raise ValueError('Mean vectors must be 1-D of equal length, got '
                     f'{mu1.shape} and {mu2.shape} (different feature '
                     'networks or layers?).')
  d = mu1.shape[0]
  for name, s in (('sigma1', sigma1), ('sigma2', sigma2)):
    if s.shape != (d, d):
      raise ValueError(f'{name} must be [{d}, {d}] to match the means, got '
                       f'{s.shape}.')
  return mu1, sigma1, mu2, sigma2


def _sqrtm(a: np.ndarray) -> np.ndarray:
  """scipy.linalg.sqrtm(a), silent on singular input (the caller checks).

  pytorch-fid calls `sqrtm(..., disp=False)` and discards the error
  estimate. scipy >= 1.16 deprecates `disp` (removed in 1.18) and with
  `disp=False` spends an extra D^3 product on that estimate; the returned
  matrix is the same either way.
  """
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', linalg.LinAlgWarning)
    warnings.simplefilter('ignore', RuntimeWarning)
    out = linalg.sqrtm(a)
  return out[0] if isinstance(out, tuple) else out


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root [D, D] of a PSD matrix (eigenvalues < 0 -> 0)."""
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(sqrt1: np.ndarray, sigma2: np.ndarray) -> float:
  """Trace of sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))), S1 = sqrt1^2.

  AB and A^1/2 B A^1/2 share eigenvalues; for PSD A, B these are real and
  >= 0, so the principal square root of AB has trace sum_i sqrt(lambda_i).
  Rounding-level negative eigenvalues are clipped to 0.
  """
  m = sqrt1 @ sigma2 @ sqrt1
  lam = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6,
                     method: str = 'sqrtm') -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrt(sigma1 sigma2).

  `method='sqrtm'` (default) is pytorch-fid's `calculate_frechet_distance`
  line for line: covmean = sqrtm(sigma1 @ sigma2); if it is not finite, a
  warning is logged and covmean = sqrtm((sigma1 + eps I) @ (sigma2 + eps I))
  (the trace terms keep the original sigmas); a complex covmean whose
  diagonal imaginary part is not allclose to 0 (atol 1e-3) raises, else its
  real part is used. Costs one real Schur decomposition of a [D, D] matrix:
  ~14 s at D=2048 on one core of the dev host (AMD EPYC, OpenBLAS).

  `method='eigh'` uses sqrt(sigma1) from a symmetric eigendecomposition and
  the eigenvalues of sqrt(sigma1) sigma2 sqrt(sigma1) (`_trace_sqrt_product`;
  docs/evaluation.md §0 cross-check). It needs PSD inputs (always true for
  covariances), never needs eps, and agrees with 'sqrtm' to ~1e-10
  relative on well-conditioned covariances (8e-14 at D=2048); ~4 s at
  D=2048 on the same core.

  Args:
    mu1: [D] mean of the first (generated) features.
    sigma1: [D, D] covariance of the first features.
    mu2: [D] mean of the second (reference) features.
    sigma2: [D, D] covariance of the second features.
    eps: diagonal offset for the non-finite retry ('sqrtm' only).
    method: 'sqrtm' (pytorch-fid parity) or 'eigh'.

  Returns:
    The squared Frechet distance (a Python float, "FID" when the features
    are Inception pool3).

  Raises:
    ValueError: shapes mismatch, unknown method, or a significant imaginary
      component in covmean.
  """
  mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
  diff = mu1 - mu2
  if method == 'eigh':
    tr_covmean = _trace_sqrt_product(_sqrt_psd(sigma1), sigma2)
  elif method == 'sqrtm':
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
      logging.warning('fid calculation produces singular product; adding %s '
                      'to diagonal of cov estimates', eps)
      offset = np.eye(sigma1.shape[0]) * eps
      covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
      if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        m = np.max(np.abs(covmean.imag))
        raise ValueError(f'Imaginary component {m} in sqrtm(sigma1 sigma2).')
      covmean = covmean.real
    tr_covmean = float(np.trace(covmean))
  else:
    raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}.")
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) -
               2 * tr_covmean)


def fid_from_features(fake_features: np.ndarray, ref_mu: np.ndarray,
                      ref_sigma: np.ndarray, **kwargs) -> float:
  """FID of features [N, D] against reference stats (mu [D], sigma [D, D]).

  `kwargs` go to `frechet_distance` (eps, method).
  """
  mu, sigma = gaussian_stats(fake_features)
  return frechet_distance(mu, sigma, ref_mu, ref_sigma, **kwargs)


def fid_bootstrap_ci(features: np.ndarray, mu_ref: np.ndarray,
                     sigma_ref: np.ndarray, n_boot: int = DEFAULT_N_BOOT,
                     seed: int = 0, level: float = 0.95,
                     method: str = 'centered') -> tuple[float, float]:
  """Bootstrap interval of FID over the generated features.

  Each replicate resamples the N generated rows with replacement (counts
  from `np.random.default_rng(seed)`), recomputes their (mu, sigma) in
  float64 exactly as `gaussian_stats` would on the resampled array, and
  scores it against the fixed reference, giving FID*_1..FID*_B. With q_lo,
  q_hi their ((1 - level) / 2, (1 + level) / 2) percentiles (linear
  interpolation; with the default 10 replicates close to their min / max,
  raise n_boot for calibrated tails) and FID the point estimate:

    'centered'   (default) [q_lo - bias, q_hi - bias], bias = mean(FID*) -
                 FID (Efron & Tibshirani 1993, §10.2 bias estimate): the
                 spread of FID at this N, placed around the point estimate.
                 Contains FID whenever mean(FID*) lies in [q_lo, q_hi].
    'percentile' [q_lo, q_hi] (Efron & Tibshirani 1993, §13.3).
    'basic'      [2 FID - q_hi, 2 FID - q_lo]: an interval for the
                 infinite-sample FID (bias removed), which need not contain
                 the finite-N FID.

  Why not plain 'percentile' by default: FID is biased upward at finite N
  (noise in mu and sigma adds ~tr(sigma)/N and more), and a resample with
  duplicates adds that bias again, so the replicates sit above FID. In a
  D=64 Gaussian test (N=2000, FID~6.4) the percentile interval was
  (6.79, 7.11) — it excludes the point estimate — while the replicate
  spread matched the spread of FID over fresh draws to ~2%; with FID
  near 0 the spread is overestimated ~2x (conservative).

  The trace term uses the 'eigh' path of `frechet_distance`: sqrt(sigma_ref)
  once, then one [D, D] eigvalsh per replicate. Cost per replicate: one
  weighted covariance (~0.63 N D^2 flops, only rows drawn at least once)
  plus ~3 D^3; the default n_boot is small for that reason (D=2048, one
  core: ~30 s for N=10k, ~70 s for N=50k at n_boot=10).

  Args:
    features: [N, D] generated features (N >= 2).
    mu_ref: [D] reference mean.
    sigma_ref: [D, D] reference covariance.
    n_boot: number of replicates (>= 1).
    seed: seeds the resampling.
    level: central coverage of the interval, in (0, 1).
    method: 'centered', 'percentile' or 'basic' (see above).

  Returns:
    (lo, hi) with lo <= hi.
  """
  x = _as_2d(features, 'features')
  n, d = x.shape
  if n < 2:
    raise ValueError(f'Bootstrap needs >= 2 rows, got {n}.')
  if n_boot < 1:
    raise ValueError(f'n_boot must be >= 1, got {n_boot}.')
  if not 0.0 < level < 1.0:
    raise ValueError(f'level must be in (0, 1), got {level}.')
  if method not in ('centered', 'percentile', 'basic'):
    raise ValueError("method must be 'centered', 'percentile' or 'basic', "
                     f'got {method!r}.')
  mu_ref, sigma_ref, _, _ = _check_stats(mu_ref, sigma_ref, np.zeros(d),
                                         np.zeros((d, d)))
  sqrt_ref = _sqrt_psd(sigma_ref)
  tr_ref = float(np.trace(sigma_ref))

  def fid(mu: np.ndarray, sigma: np.ndarray) -> float:
    diff = mu - mu_ref
    return float(diff.dot(diff) + np.trace(sigma) + tr_ref -
                 2 * _trace_sqrt_product(sqrt_ref, sigma))

  rng = np.random.default_rng(seed)
  fids = np.empty(n_boot)
  for b in range(n_boot):
    counts = np.bincount(rng.integers(0, n, n), minlength=n)
    fids[b] = fid(*_weighted_stats(x, counts))
  lo, hi = np.percentile(fids, [50 * (1 - level), 50 * (1 + level)])
  if method == 'percentile':
    return float(lo), float(hi)
  point = fid(*gaussian_stats(x))
  if method == 'basic':
    return float(2 * point - hi), float(2 * point - lo)
  bias = fids.mean() - point
  return float(lo - bias), float(hi - bias)


def _softmax64(logits: np.ndarray) -> np.ndarray:
  """Row softmax [n, C] in float64."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=1, keepdims=True)
  np.exp(z, out=z)
  z /= z.sum(axis=1, keepdims=True)
  return z


def is_split_rows(n: int, split_size: int) -> list[slice]:
  """ADM's Inception Score splits of `n` rows: consecutive `split_size` rows.

  openai/guided-diffusion `evaluations/evaluator.py`
  `compute_inception_score(activations, split_size=5000)` loops
  `for i in range(0, len(preds), split_size)`: rows in their given order,
  ceil(n / split_size) splits, the last one partial when split_size does
  not divide n, and a single split of all n rows when n < split_size.
  """
  if n < 1 or split_size < 1:
    raise ValueError(f'Need n >= 1 and split_size >= 1, got n={n}, '
                     f'split_size={split_size}.')
  return [slice(i, min(i + split_size, n)) for i in range(0, n, split_size)]


def inception_score(logits: np.ndarray | None = None, splits: int = 10,
                    seed: int = 2020, *,
                    probs: np.ndarray | None = None,
                    split_size: int | None = None) -> tuple[float, float]:
  """Inception Score, mean and std over splits (ADM or Drifting splits).

  Per split s, with p(y) the split mean of p(y|x):
    IS_s = exp(mean_x sum_y p(y|x) (log(p(y|x) + 1e-10) - log(p(y) + 1e-10))).
  Returns mean and (population, ddof 0) std of IS_s. The 1e-10 keeps
  0 log 0 finite (ADM has no epsilon; Drifting has this one).

  Splits, by argument:
    split_size=S (ADM, `is_split_rows`; what the evaluator uses, S = 5000
      by default): rows in their given order, consecutive splits of S rows,
      the last one partial; N < S gives one split of all N rows (std 0).
      `splits` and `seed` are ignored. The published ImageNet / CIFAR
      numbers are N = 50k, i.e. 10 splits of 5000. IS is biased low at
      small split sizes (p(y) is estimated from fewer rows; an IS of C
      distinct one-hot classes needs >> C rows per split), so a number at
      N < 50k or S != 5000 is not comparable with the published ones.
    split_size=None: Drifting's rule (lambertae/drifting
      `utils/fid_util.py` `_compute_inception_score`): rows shuffled with
      `np.random.RandomState(seed).permutation(N)` and cut into `splits`
      consecutive splits of N // splits rows (the last N % splits shuffled
      rows dropped; torch-fidelity `isc_features_to_metric` uses all rows
      with boundaries i * N // splits — identical when splits divides N).

  Pass exactly one of:
    logits: [N, C] class logits (Inception: the 1008 bias-free logits);
      softmax is taken in float64 (Drifting takes it in float32, then casts:
      a ~1e-7 relative difference).
    probs: [N, C] class probabilities (e.g. a classifier's softmax), used
      as given in float64.

  Args:
    logits: see above.
    splits: number of splits for the Drifting rule (10 in torch-fidelity
      and Drifting).
    seed: shuffle seed for the Drifting rule (2020 in torch-fidelity and
      Drifting).
    probs: see above.
    split_size: rows per split for ADM's rule (see above).

  Returns:
    (mean, std) over the splits; uniform predictions give (1, 0), one-hot
    predictions balanced over C classes within each split give C.
  """
  if (logits is None) == (probs is None):
    raise ValueError('Pass exactly one of logits= or probs=.')
  x = _as_2d(logits if probs is None else probs,
             'logits' if probs is None else 'probs')
  if not np.isfinite(x).all():
    raise ValueError('inception_score got non-finite inputs.')
  if probs is not None and x.min() < 0:
    raise ValueError('probs must be non-negative.')
  n = x.shape[0]
  if split_size is not None:
    rows = [x[sl] for sl in is_split_rows(n, int(split_size))]
  else:
    if splits < 1 or n < splits:
      raise ValueError(f'Need 1 <= splits <= N, got splits={splits}, N={n}.')
    perm = np.random.RandomState(seed).permutation(n)
    size = n // splits
    rows = [x[perm[i * size:(i + 1) * size]] for i in range(splits)]
  scores = np.empty(len(rows))
  for i, part in enumerate(rows):
    part = _softmax64(part) if probs is None else part.astype(np.float64)
    py = part.mean(axis=0, keepdims=True)
    kl = part * (np.log(part + IS_EPS) - np.log(py + IS_EPS))
    scores[i] = np.exp(kl.sum(axis=1).mean())
  return float(scores.mean()), float(scores.std())


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
  """Squared distances [n, m] = max(|a|^2 - 2 a.b + |b|^2, 0) (ADM's rule)."""
  a_sq = np.einsum('ij,ij->i', a, a)
  d = a @ b.T
  d *= -2
  d += a_sq[:, None]
  d += b_sq[None, :]
  return np.maximum(d, 0, out=d)


def _knn_radii(x: np.ndarray, k: int, batch: int) -> np.ndarray:
  """Squared distance [N] from each row of x to its k-th neighbour (not self).

  As ADM's `manifold_radii`: partition each distance row (self included,
  at distance 0) and take index k. The self-distance is set to exactly 0.
  """
  n = len(x)
  x_sq = np.einsum('ij,ij->i', x, x)
  radii = np.empty(n, x.dtype)
  for i in range(0, n, batch):
    d = _sq_dists(x[i:i + batch], x, x_sq)
    rows = np.arange(len(d))
    d[rows, i + rows] = 0
    radii[i:i + batch] = np.partition(d, k, axis=1)[:, k]
  return radii


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     batch: int = 1024,
                     dtype: type = np.float32) -> tuple[float, float]:
  """Improved precision and recall (Kynkaenniemi et al. 2019), as ADM.

  Each real point gets a ball whose squared radius is the squared distance
  to its k-th nearest other real point; likewise for fake points.
  precision = share of fake points inside (`<=`) at least one real ball;
  recall = share of real points inside at least one fake ball. Distances
  come in blocks of `batch` rows (memory O(batch * max(N, M))); one block of
  real x fake distances serves both directions, as ADM's `evaluate_pr`.

  ADM computes distances in float16 with a float32 fallback; the default
  here is float32 (float64 via `dtype`).

  Args:
    real: [N, D] reference features, N > k.
    fake: [M, D] generated features, M > k.
    k: neighbourhood size (ADM: 3).
    batch: rows per distance block.
    dtype: float dtype for the distances.

  Returns:
    (precision, recall) in [0, 1].
  """
  real = _as_2d(real, 'real').astype(dtype, copy=False)
  fake = _as_2d(fake, 'fake').astype(dtype, copy=False)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f'Feature dims differ: real {real.shape}, fake '
                     f'{fake.shape}.')
  if not 1 <= k < min(len(real), len(fake)):
    raise ValueError(f'Need 1 <= k < min(N, M); got k={k}, N={len(real)}, '
                     f'M={len(fake)}.')
  real_r = _knn_radii(real, k, batch)
  fake_r = _knn_radii(fake, k, batch)
  fake_sq = np.einsum('ij,ij->i', fake, fake)
  fake_in = np.zeros(len(fake), bool)  # inside some real ball: precision
  real_in = np.zeros(len(real), bool)  # inside some fake ball: recall
  for i in range(0, len(real), batch):
    d = _sq_dists(real[i:i + batch], fake, fake_sq)  # [b, M]
    fake_in |= (d <= real_r[i:i + batch, None]).any(axis=0)
    real_in[i:i + batch] = (d <= fake_r[None, :]).any(axis=1)
  return float(fake_in.mean()), float(real_in.mean())


def kid(real: np.ndarray, fake: np.ndarray, num_subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
  """Kernel Inception Distance: unbiased MMD^2, cubic polynomial kernel.

  k(x, y) = (x.y / D + 1)^3. For each of `num_subsets` draws, m =
  min(N, M, subset_size) rows of each set are chosen without replacement
  (`np.random.RandomState(seed).choice`, real first, then fake, as
  torch-fidelity orders its two inputs) and
    MMD^2_u = sum_{i!=j} (k(r_i, r_j) + k(f_i, f_j)) / (m (m - 1))
              - 2 sum_{i,j} k(r_i, f_j) / m^2.
  Inner products run in the input dtype when it is float32 (as
  torch-fidelity, on float32 features), otherwise float64; the cube and
  all sums are float64. Unbiased, so it can be slightly negative.

  Args:
    real: [N, D] reference features.
    fake: [M, D] generated features.
    num_subsets: number of subset draws (100).
    subset_size: subset size cap (1000).
    seed: seeds the subset draws.

  Returns:
    (mean, std) of MMD^2_u over the subsets (std with ddof 0).
  """
  real = _as_2d(real, 'real')
  fake = _as_2d(fake, 'fake')
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f'Feature dims differ: real {real.shape}, fake '
                     f'{fake.shape}.')
  dt = np.float32 if (real.dtype == fake.dtype == np.float32) else np.float64
  n, d = real.shape
  big_m = len(fake)
  m = min(n, big_m, subset_size)
  if m < 2:
    raise ValueError(f'KID needs subsets of >= 2 rows, got m={m}.')
  rng = np.random.RandomState(seed)
  mmds = np.empty(num_subsets)
  for s in range(num_subsets):
    z = np.concatenate([real[rng.choice(n, m, replace=False)],
                        fake[rng.choice(big_m, m, replace=False)]]).astype(
                            dt, copy=False)
    g = (z @ z.T).astype(np.float64)  # one syrk for K_rr, K_ff and K_rf
    g /= d
    g += 1
    g **= 3
    k_rr, k_ff, k_rf = g[:m, :m], g[m:, m:], g[:m, m:]
    within = (k_rr.sum() - np.trace(k_rr) + k_ff.sum() - np.trace(k_ff))
    mmds[s] = within / (m * (m - 1)) - 2 * k_rf.sum() / (m * m)
  return float(mmds.mean()), float(mmds.std())
