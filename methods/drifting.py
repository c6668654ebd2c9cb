"""Drifting Models: a one-step generator trained to follow a drifting field.

Deng, Li, Li, Du, He 2026, "Generative Modeling via Drifting", arXiv
2602.04770. Spec: docs/methods/drifting.md (its § numbers are cited below).

A generator x = f_θ(ε) pushes N(0, I) forward to q_θ. The drifting field
moves every generated sample toward data (positives y⁺ ~ p) and away from
other generated samples (negatives y⁻ ~ q), with a Laplace kernel
k(x, y) = exp(-‖x - y‖ / τ) (plain L2, not squared):

  V⁺_p(x) = E_p[k(x, y⁺)(y⁺ - x)] / Z_p(x),  V⁻_q(x) likewise   (eqs. 2-3)
  V_{p,q}(x) = V⁺_p(x) - V⁻_q(x)                                    (eq. 4)
             = (Z_p Z_q)⁻¹ E_{p,q}[k(x, y⁺) k(x, y⁻)(y⁺ - y⁻)]       (eq. 5)
  L(θ) = E_ε ‖f_θ(ε) - sg(f_θ(ε) + V(f_θ(ε)))‖²                      (eq. 1)

V is anti-symmetric (V_{p,q} = -V_{q,p}), so V ≡ 0 at q = p; the gradient
of L is -2V pulled back through f_θ. Sampling is exactly one forward pass.

The batched field follows the official code (lambertae/drifting
`drift_loss.py`, spec §1.3), on groups [G, N, C] of generated vectors with
targets T = [negatives (the generated set itself first, self-masked) |
positives] and target weights ω:
  1. D = ‖x_i - T_k‖₂ with the squared distance clamped at 1e-8.
  2. Feature normalisation (paper A.6): one global scale
     s = mean(ω D) / mean(ω) shared by all groups; coordinates are divided
     by ρ = max(s / √C, 1e-3) and distances by max(s, 1e-3); the
     generated-generated diagonal gets +100 (a finite self-mask).
  3. Per τ: A = sqrt(softmax_targets(-D/τ) · softmax_queries(-D/τ)), then
     A ← A ω; V_i = S⁻_i Σ⁺ A_ik (T_k - x_i) - S⁺_i Σ⁻ A_ik (T_k - x_i)
     with S^± the row sums of A over positive / negative columns.
  4. Drift normalisation (paper A.6): V_τ / sqrt(max(mean V_τ², 1e-8)),
     summed over τ; loss = mean((x/ρ - sg(x̄/ρ + Σ_τ Ṽ_τ))²).

Deviations (numerics only, same field): everything is in the log domain.
V_i is computed as S⁺_i S⁻_i (E⁺_i[T] - E⁻_i[T]) with E^± the A-weighted
means, so no (Σ c) x cancellation, no 0/0 and V(P, P) = 0 exactly. The
drift normalisation factors out the largest log S⁺S⁻ first, which equals
the official formula with the 1e-8 clamp taken relative to that largest
pair weight; it keeps the direction when every raw kernel underflows (tiny
τ). The official affinity floor (product ≥ 1e-6) is off by default: it
swamps the real affinities (~1/√(NM)) of toy-sized groups and training
fails (spec §1.12.7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from onestep_bench import method as base

_HI = jax.lax.Precision.HIGHEST  # fp32 distances even where TF32 is default


def get_config() -> ml_collections.ConfigDict:
  """Drifting defaults (official ImageNet recipe; toy-safe floor)."""
  return ml_collections.ConfigDict(dict(
      # Kernel temperatures in normalised-distance units: official `R_list`,
      # paper A.6 (multi-τ beats any single one, 8.46 vs ≥ 8.67 FID).
      temperatures=(0.02, 0.05, 0.2),
      # Feature normalisation (global scale s, ρ = s/√C): paper A.6,
      # official drift_loss.py. The official toy notebook uses raw space.
      feature_norm=True,
      # Drift normalisation, unit RMS per τ: paper A.6, official code.
      drift_norm=True,
      # Floor on softmax_row·softmax_col. Official 1e-6; 0 here because the
      # official value breaks groups of ~1000 (spec §1.12.7).
      affinity_floor=0.0,
      # Generated samples (= negatives) per group; 0 means the positives per
      # group. Positives are the data batch (official toy: 2048 + 2048;
      # ImageNet: 64 generated and 64 positives per class, Table A1).
      num_gen=0,
      # Feature set the field is computed on (paper §3.4, A.5): 'pixels'
      # (the raw generator output: the `global` key, the only term of the
      # toy / robotics runs), 'encoder' (frozen encoder keys only), or
      # 'pixels+encoder' (official: `global` + the encoder's multi-scale
      # keys). 'auto' = 'pixels' everywhere for now: with this harness's
      # GroupNorm ResNet-MAE the encoder keys collapse image contrast
      # (results/ablations/drifting_ablations__features.csv, digits, 1000
      # steps, classifier FID-10K: pixels 47.9, encoder 1412.7,
      # pixels+encoder 1355.7; samples have pixel std 0.05-0.07 vs 0.74).
      features='auto',
      # Frozen feature encoder (images): the harness trains a small
      # ResNet-MAE on the training split (paper A.3 latent-MAE recipe, scaled
      # down; onestep_bench/encoders.py) and caches it. Never the evaluator's
      # network. 0 = the recipe default for width / steps.
      encoder_width=0,
      encoder_steps=0,
      # Map keys (per-location vectors, pooled mean/std maps) with more than
      # this many locations are left out. Official: none left out (32x32
      # latents: 1024). 49 keeps the field affordable on 2 CPU cores
      # (digits: 245 -> 117 location groups, counted; the per-step cost is
      # dominated by the N x M softmaxes of every (class, location) group).
      encoder_max_locations=49,
      # Class groups per step on labelled data (official N_c: 64 ablation,
      # 128 final). 0 = every class once (10 for digits / Fashion-MNIST).
      # Positives per class = batch_size / groups (official 64).
      classes_per_step=0,
      # CFG in training (paper §3.5, A.7): N_unc real samples of random
      # class as extra negatives with weight w = (α-1)(N_neg-1)/N_unc, α fed
      # to the generator (config.model.guidance_embed=True). Official N_unc
      # 16 (ablation) / 32 (final); 0 disables CFG.
      num_unc=16,
      # α ∈ [1, cfg_alpha_max] with p(α) ∝ α^-cfg_alpha_power, and α = 1
      # with probability cfg_p_one (official: [1, 4], power 3 ablation / 5
      # B/2; L/2: p_one 0.5).
      cfg_alpha_max=4.0,
      cfg_alpha_power=3.0,
      cfg_p_one=0.0,
  ))


# --------------------------------------------------------------------- field
def _cdist(x: jax.Array, y: jax.Array) -> jax.Array:
  """‖x_i - y_k‖₂, squared distance clamped ≥ 1e-8 (official `cdist`).

  Args:
    x: [G, N, C].
    y: [G, M, C].

  Returns:
    [G, N, M] float32.
  """
  # Centre per group first: translation-invariant, and it keeps the
  # |x|² + |y|² - 2xy expansion accurate for data far from the origin.
  mu = jnp.mean(y, axis=1, keepdims=True)
  x, y = x - mu, y - mu
  xy = jnp.einsum('gnc,gmc->gnm', x, y, precision=_HI)
  sq = (jnp.sum(x * x, -1)[:, :, None] + jnp.sum(y * y, -1)[:, None, :]
        - 2.0 * xy)
  return jnp.sqrt(jnp.maximum(sq, 1e-8))


def _log_mass_and_mean(log_a: jax.Array,
                       t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Row mass log Σ_k A_ik and mean Σ_k A_ik T_k / Σ_k A_ik, stably.

  Args:
    log_a: [G, N, K] log affinities (may hold -inf for zero weights).
    t: [G, K, C] target coordinates.

  Returns:
    ([G, N] log row mass (-inf if empty), [G, N, C] weighted mean of T).
  """
  mx = jnp.max(log_a, -1, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  e = jnp.exp(log_a - mx)
  mass = jnp.sum(e, -1)
  mean = jnp.einsum('gnk,gkc->gnc', e, t, precision=_HI)
  mean = mean / jnp.maximum(mass, 1e-30)[..., None]
  return mx[..., 0] + jnp.log(mass), mean


def _log_weights(w: jax.Array | None, g: int, m: int) -> jax.Array:
  """[G, M] log target weights (log 0 = -inf); None means unit weights."""
  if w is None:
    return jnp.zeros((g, m), jnp.float32)
  w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (g, m))
  return jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)


def drift_field(
    x: jax.Array, pos: jax.Array, neg: jax.Array, *,
    temperatures: Sequence[float] = (0.02, 0.05, 0.2),
    pos_weights: jax.Array | None = None,
    neg_weights: jax.Array | None = None,
    self_mask: bool = True, feature_norm: bool = True,
    drift_norm: bool = True, floor: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The drifting field V(x) on groups of vectors (spec §1.3), no gradient.

  Args:
    x: [G, N, C] generated vectors (queries).
    pos: [G, P, C] positive (data) vectors.
    neg: [G, Q, C] negative vectors. With `self_mask`, the first N of them
      must be `x` itself (official layout [gen | extra negatives]); their
      diagonal is masked with +100 normalised distance units.
    temperatures: kernel temperatures τ (normalised units if
      `feature_norm`, data units otherwise); the field sums over them.
    pos_weights: [G, P] or [P] or None (ones); applied after the softmaxes.
    neg_weights: [G, Q] or [Q] or None (ones), e.g. CFG weight w on
      unconditional negatives.
    self_mask: mask the generated-generated diagonal (needs Q ≥ N).
    feature_norm: divide by the global scale (paper A.6); else raw units.
    drift_norm: scale each V_τ to unit RMS before summing (paper A.6).
    floor: floor on softmax_row·softmax_col (official 1e-6; 0 = none).

  Returns:
    v: [G, N, C] field in normalised coordinates x/ρ (the regression target
      is x/ρ + v); ρ = 1 without `feature_norm`.
    stats: scalars `scale` (s), `rho` (ρ), `field_rms` (RMS of Σ_τ V_τ
      before drift normalisation, data units) and `nn_dist` (mean distance
      of x to its nearest positive, data units).
  """
  sg = lambda a: jax.lax.stop_gradient(jnp.asarray(a, jnp.float32))
  x, pos, neg = sg(x), sg(pos), sg(neg)
  g, n, c = x.shape
  q = neg.shape[1]
  if self_mask and q < n:
    raise ValueError(f'self_mask needs the generated set first among the '
                     f'negatives: got {q} negatives for {n} queries.')
  targets = jnp.concatenate([neg, pos], axis=1)  # [G, M, C]
  logw = jnp.concatenate([_log_weights(neg_weights, g, q),
                          _log_weights(pos_weights, g, pos.shape[1])], 1)
  dist = _cdist(x, targets)  # [G, N, M]
  w = jnp.exp(logw)
  scale = jnp.mean(dist * w[:, None, :]) / jnp.mean(w)
  if feature_norm:
    rho = jnp.maximum(scale / math.sqrt(c), 1e-3)
    dist_n = dist / jnp.maximum(scale, 1e-3)
  else:
    rho, dist_n = jnp.ones((), jnp.float32), dist
  if self_mask:
    dist_n = dist_n + 100.0 * jnp.eye(n, targets.shape[1], dtype=jnp.float32)
  t_n = targets / rho

  v, v_raw = jnp.zeros_like(x), jnp.zeros_like(x)
  for tau in temperatures:
    logits = -dist_n / tau
    log_a = 0.5 * (jax.nn.log_softmax(logits, -1)
                   + jax.nn.log_softmax(logits, -2))
    if floor > 0:
      log_a = jnp.maximum(log_a, 0.5 * math.log(floor))
    log_a = log_a + logw[:, None, :]
    log_sn, mean_n = _log_mass_and_mean(log_a[..., :q], t_n[:, :q])
    log_sp, mean_p = _log_mass_and_mean(log_a[..., q:], t_n[:, q:])
    log_pair = log_sp + log_sn  # [G, N]: log S⁺S⁻
    diff = mean_p - mean_n      # V_τ = S⁺S⁻ (E⁺[T] - E⁻[T])
    v_tau = jnp.exp(log_pair)[..., None] * diff
    v_raw = v_raw + v_tau
    if drift_norm:
      top = jnp.max(log_pair)
      top = jnp.where(jnp.isfinite(top), top, 0.0)
      v_rel = jnp.exp(log_pair - top)[..., None] * diff
      v = v + v_rel / jnp.sqrt(jnp.maximum(jnp.mean(v_rel**2), 1e-8))
    else:
      v = v + v_tau
  stats = dict(scale=scale, rho=rho,
               field_rms=rho * jnp.sqrt(jnp.mean(v_raw**2)),
               nn_dist=jnp.mean(jnp.min(dist[..., q:], -1)))
  return v, stats


def drift_loss(
    x: jax.Array, pos: jax.Array, extra_neg: jax.Array | None = None, *,
    pos_weights: jax.Array | None = None,
    extra_neg_weights: jax.Array | None = None, **field_kwargs,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-feature-key loss mean((x/ρ - sg(x̄/ρ + V))²) (eq. 1, spec §1.3).

  The negatives are the generated set itself (self-masked) followed by
  `extra_neg` (e.g. unconditional real samples with CFG weight).

  Args:
    x: [G, N, C] generated vectors; gradients flow through x only.
    pos: [G, P, C] positives.
    extra_neg: [G, U, C] extra negatives, or None.
    pos_weights: [G, P] or None.
    extra_neg_weights: [G, U] or None (ones).
    **field_kwargs: `temperatures`, `feature_norm`, `drift_norm`, `floor`.

  Returns:
    (scalar loss, stats of `drift_field`). ∂loss/∂x = -2 V / (ρ · x.size).
  """
  xs = jax.lax.stop_gradient(x.astype(jnp.float32))
  g, n, _ = xs.shape
  neg, neg_w = xs, None
  if extra_neg is not None:
    neg = jnp.concatenate([xs, extra_neg.astype(jnp.float32)], 1)
    if extra_neg_weights is not None:
      neg_w = jnp.concatenate([jnp.ones((g, n), jnp.float32),
                               jnp.broadcast_to(extra_neg_weights,
                                                extra_neg.shape[:2])], 1)
  v, stats = drift_field(xs, pos, neg, pos_weights=pos_weights,
                         neg_weights=neg_w, self_mask=True, **field_kwargs)
  goal = jax.lax.stop_gradient(xs / stats['rho'] + v)
  return jnp.mean(jnp.square(x / stats['rho'] - goal)), stats


# -------------------------------------------------------------------- method
def sample_alpha(key: jax.Array, n: int, *, alpha_max: float, power: float,
                 p_one: float) -> jax.Array:
  """CFG strengths α ∈ [1, alpha_max], p(α) ∝ α^-power, α = 1 w.p. p_one.

  Inverse-CDF sampling as the official `train.py` (paper A.7). Returns [n].
  """
  k_u, k_one = jax.random.split(key)
  u = jax.random.uniform(k_u, (n,))
  if abs(power - 1.0) < 1e-6:
    alpha = alpha_max ** u
  else:
    e = 1.0 - power  # CDF ∝ α^e - 1
    alpha = (1.0 + u * (alpha_max ** e - 1.0)) ** (1.0 / e)
  return jnp.where(jax.random.uniform(k_one, (n,)) < p_one, 1.0, alpha)


def regroup(f: jax.Array, groups: int) -> jax.Array:
  """[G·N, L, C] per-sample features -> [G·L, N, C] groups (class, location).

  Each (class group, location) pair is one group of the field; the global
  feature scale stays shared across all of them (paper A.6).
  """
  gn, locs, c = f.shape
  f = f.reshape(groups, gn // groups, locs, c).transpose(0, 2, 1, 3)
  return f.reshape(groups * locs, gn // groups, c)


class Method(base.Method):
  """One-step generator x = f_θ(ε, c, α[, style]) trained by drifting.

  Toy data: one group of all generated samples against the data batch in
  raw coordinates (spec §1.8). Images (spec §1.4-1.5): the field is summed
  over feature keys — the raw output (`global`) and, with
  `features='pixels+encoder'`, the multi-scale keys of a frozen,
  harness-trained encoder — with one group per (class, location);
  labelled data adds per-class groups and CFG through weighted
  unconditional negatives, with α an input of the generator, so guided
  sampling stays one forward pass.
  """

  supported_nfe = (1,)

  def __init__(self, config, spec):
    super().__init__(config, spec)
    m = self.mcfg
    feats = m.features
    if feats == 'auto':
      feats = 'pixels'  # see get_config: the encoder keys are opt-in
    if feats not in ('pixels', 'encoder', 'pixels+encoder'):
      raise ValueError(f"config.method.features={m.features!r}: use 'auto', "
                       "'pixels', 'encoder' or 'pixels+encoder'.")
    if 'encoder' in feats and spec.kind != 'image':
      raise ValueError(f'config.method.features={feats!r} needs image data '
                       f'(got {spec.kind}); use features=pixels.')
    self.use_pixels = 'pixels' in feats
    self.use_encoder = 'encoder' in feats
    self.encoder = None  # set by `prepare`
    self.class_groups = (m.classes_per_step or spec.num_classes
                         if spec.num_classes else 0)
    self.cfg = bool(spec.num_classes and m.num_unc > 0
                    and m.cfg_alpha_max > 1.0)
    if self.cfg and not config.model.get('guidance_embed', False):
      raise ValueError(
          'drifting with CFG on labelled data feeds α to the generator: set '
          '--config.model.guidance_embed=True (or --config.method.num_unc=0 '
          'for no CFG).')
    self.style = (config.model.get('style_tokens', 0),
                  config.model.get('style_vocab', 64))

  # ------------------------------------------------------------- encoder
  def prepare(self, dataset) -> None:
    """Loads (or trains once and caches) the frozen feature encoder."""
    if not self.use_encoder or self.encoder is not None:
      return
    from onestep_bench import encoders  # pylint: disable=g-import-not-at-top
    recipe = dict(encoders.RECIPE)
    if self.mcfg.encoder_width:
      recipe['width'] = self.mcfg.encoder_width
    if self.mcfg.encoder_steps:
      recipe['steps'] = self.mcfg.encoder_steps
    self.encoder = encoders.load_or_train(
        dataset, recipe, max_locations=self.mcfg.encoder_max_locations)

  def init_extras(self, key, params):
    del key, params
    if not self.use_encoder:
      return {}
    if self.encoder is None:
      raise RuntimeError('methods/drifting.py: call method.prepare(dataset) '
                         'before init (the harness does) to load the frozen '
                         'feature encoder.')
    # Frozen: stored (and checkpointed) with the run, never optimized.
    return {'encoder': jax.tree.map(jnp.asarray, self.encoder.params)}

  def features(self, extras, x: jax.Array) -> dict[str, jax.Array]:
    """Feature dict {key: [B, L, C]} the field is computed on (paper A.5)."""
    out = {}
    if self.use_pixels:
      out['global'] = x.reshape(x.shape[0], 1, -1)
    if self.use_encoder:
      enc = self.encoder.features(
          jax.lax.stop_gradient(extras['encoder']), x)
      out.update({f'enc/{k}': v for k, v in enc.items()})
    return out

  # ------------------------------------------------------------ generator
  def _style(self, key: jax.Array, n: int) -> jax.Array | None:
    tokens, vocab = self.style
    if not tokens:
      return None
    return jax.random.randint(key, (n, tokens), 0, vocab)

  def generate(self, params, eps: jax.Array, labels=None, alpha=None,
               style=None) -> jax.Array:
    """The generator x = f_θ(ε, c, α, style): one pass at t = h = 1."""
    return self.apply(params, eps, 1.0, 1.0, labels, alpha, style)

  # -------------------------------------------------------------- training
  def loss(self, params, batch, key, state):
    """Eq. 1 summed over feature keys (eqs. 6-7), groups per class/location."""
    pos = batch['x']
    m = self.mcfg
    field = dict(temperatures=tuple(m.temperatures),
                 feature_norm=m.feature_norm, drift_norm=m.drift_norm,
                 floor=m.affinity_floor)
    if self.spec.kind == 'toy2d':  # raw coordinates, one group (spec §1.8)
      n = m.num_gen or pos.shape[0]
      x = self.generate(params, self.noise(key, n))
      loss, stats = drift_loss(x.reshape(1, n, -1),
                               pos.reshape(1, pos.shape[0], -1), **field)
      # The loss is ≈ ‖Σ_τ Ṽ_τ‖², constant by construction with drift_norm
      # (lambertae/drifting#3); field_rms / nn_dist are what converge.
      return loss, dict(field_rms=stats['field_rms'],
                        nn_dist=stats['nn_dist'],
                        feature_scale=stats['scale'])

    g = self.class_groups or 1
    p = pos.shape[0] // g
    n = m.num_gen or p
    k_eps, k_alpha, k_unc, k_style = jax.random.split(key, 4)
    labels = alpha = unc = unc_w = None
    if self.spec.num_classes:
      labels = jnp.repeat(batch['y'][::p], n)               # [G·N]
    if self.cfg:
      a_g = sample_alpha(k_alpha, g, alpha_max=m.cfg_alpha_max,
                         power=m.cfg_alpha_power, p_one=m.cfg_p_one)
      alpha = jnp.repeat(a_g, n)
      # Unconditional negatives: real samples of random class (the batch's
      # marginal is the data's), weight w = (α-1)(N-1)/N_unc (paper A.7).
      idx = jax.random.randint(k_unc, (g * m.num_unc,), 0, pos.shape[0])
      unc = pos[idx]
      unc_w = (a_g - 1.0) * (n - 1) / m.num_unc               # [G]
    x = self.generate(params, self.noise(k_eps, g * n), labels, alpha,
                      self._style(k_style, g * n))
    fx = self.features(state.extras, x)
    fp = jax.lax.stop_gradient(self.features(state.extras, pos))
    fu = (jax.lax.stop_gradient(self.features(state.extras, unc))
          if unc is not None else None)
    total, metrics = 0.0, {}
    for name in fx:
      xs, ps = regroup(fx[name], g), regroup(fp[name], g)
      kw = {}
      if fu is not None:
        us = regroup(fu[name], g)
        kw = dict(extra_neg=us, extra_neg_weights=jnp.repeat(
            unc_w, fx[name].shape[1])[:, None])
      loss_k, stats = drift_loss(xs, ps, **kw, **field)
      total = total + loss_k
      metrics[f'field_rms/{name}'] = stats['field_rms']
    # Online sample metric (the loss is constant by construction): mean L2
    # distance, per pixel, from each generated image to its nearest positive
    # of its group, next to the same statistic among the positives.
    xr = regroup(x.reshape(g * n, 1, -1), g)
    pr = regroup(pos.reshape(g * p, 1, -1), g)
    d_gen = _cdist(jax.lax.stop_gradient(xr), pr)
    d_pos = _cdist(pr, pr) + 1e9 * jnp.eye(p)
    dim = math.sqrt(xr.shape[-1])
    metrics.update(nn_dist=jnp.mean(jnp.min(d_gen, -1)) / dim,
                   nn_dist_data=jnp.mean(jnp.min(d_pos, -1)) / dim,
                   num_feature_keys=jnp.asarray(len(fx), jnp.float32))
    return total, metrics

  # -------------------------------------------------------------- sampling
  def sample(self, params, key, n, *, nfe, labels=None, guidance=None):
    """f_θ(ε, c, α), ε ~ N(0, I): exactly one network evaluation.

    `guidance` is the CFG strength α (trained in; default 1 = no guidance).
    """
    self.check_nfe(nfe)
    if labels is not None and not self.spec.num_classes:
      raise ValueError('this drifting model is unconditional; sample with '
                       'labels=None (or train with data.conditional=True).')
    if guidance is not None and not self.cfg:
      raise ValueError('this drifting model was trained without CFG; sample '
                       'with guidance=None.')
    k_eps, k_style = jax.random.split(key)
    if self.spec.kind == 'toy2d':  # the recorded toy rows use the plain key
      k_eps = key
    alpha = None
    if self.cfg:
      alpha = jnp.full((n,), 1.0 if guidance is None else guidance,
                       jnp.float32)
    return self.generate(params, self.noise(k_eps, n), labels, alpha,
                         self._style(k_style, n))
