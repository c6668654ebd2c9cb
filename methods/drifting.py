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

Temperature range (issue 18 §2, measured; `validate_config` refuses the
rest). The kernels are softmax-normalised (eqs. 2-3), so V sees the shape
of p and q within a few τ of x, not their mass: a set of generated samples
sitting on one mode of p with that mode's shape has V ≈ 0 whatever the
mass ratio, and only targets within a few τ can move mass between modes.
On toy2d:8gaussians (mode gap 1.53, ≈ 0.6 normalised units) the zero-
initialised output starts q as a point at the origin, which a narrow
kernel moves as one blob onto the nearest data (τ = 0.05: 1 of 8 modes by
step ~100 with both normalisations, with the official 1e-8 drift clamp,
and (seed 0) in raw units without normalisation, recovered by step 400).
A narrow τ then holds the collapse: on a one-mode sample the field
of τ ≤ 0.05 pulls the cluster together (corr(V_y, y) = -0.3 / -0.5 at
τ = 0.02 / 0.05), τ ≥ 0.1 spreads it along the ring (+0.8 / +1.0). 1000
bench steps, normalised units: (0.01,), (0.02,), (0.02, 0.05) and (0.05,)
(2 of 3 seeds) end on one mode, sliced W2 1.9, while `nn_dist` reads a
converged 0.02; (0.1,) (3 of 3 seeds), (0.2,) and the default reach 8/8.
(0.05,) with feature_norm only ends on 2 of 8 modes in 1 of 2 seeds;
25gaussians at (0.05,): 1 of 25 modes, sliced W2 1.37 (default 0.095).
Hence on toy mixtures with modes > TOY_SEPARATION = 10 stds apart the
largest τ must be ≥ TOY_TAU_MAX_MIN = 0.1 with feature_norm. Not refused:
8gaussians_torchcfm (modes 6.8 stds apart: 8/8 at (0.05,), sliced W2 0.10,
seed 0) and checkerboard (no gaps: 0.027 at (0.05,) and at the default).
It is not a departure from the official code: its
drift_loss.py with R_list = (0.05,) computes this field (the 1e-8 drift
clamp changes nothing here; with its 1e-6 affinity floor nothing trains
at toy group sizes), and its toy demo's one τ = 0.05 on raw distances
without normalisation (0.02-0.05 normalised units here) also ends on one
mode of 8gaussians in 2 of 3 seeds (seed 0: 8/8). The demo's data
(checkerboard, swiss roll) has no separated modes and its generator does
not start as a point. With feature_norm=False τ is in data units, which
the config does not know: not refused; `coverage` shows the collapse.
Drift normalisation of a single τ is a global scalar per step (no effect
on the direction of the step). On any data, a τ ≪ the sample spacing
makes the kernel a hard nearest-neighbour assignment: at τ = 1e-4 the
normalised field of that τ sits on a few queries (|V| up to ≈ √N; toy
samples were sent far off the data), so τ ≥ TAU_MIN = 0.01 with
feature_norm. Images keep the paper's single-τ ablation (A.6).

Collapse metrics (logged every step): `nn_dist` (generated -> nearest
positive) is blind to dropped modes; `nn_dist_rev` (positive -> nearest
generated) and `coverage` (Naeem et al. 2020, eq. 4, k = 5: share of data
points whose k-NN ball holds a generated sample; ≈ 0.97 for two draws of
one law, ≤ 1/K on one of K equal modes) see them; see `coverage_stats`.

Layout: methods/_drifting_field.py holds the field (`drift_field`,
`coverage_stats`; dense, or for toy vectors above 4 MiB per [G, N, M]
array query-blocked), methods/_drifting_loss.py `drift_loss` (eq. 1) and
the image path's pure pieces (`cfg_negatives`, `feature_loss`,
`image_sample_metrics`), methods/_drifting_config.py the config
(`get_config`, `PRESETS`, the temperature limits and the body of
`validate_config`); all are re-exported here. Here is `Method`, whose
`loss` dispatches to `_toy_loss` (raw vectors, spec §1.8) or `_image_loss`
(feature keys from `_pixel_features` / `_encoder_features`, spec §1.4-1.5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from methods import _drifting_config as dcfg
from methods._drifting_config import (  # noqa: F401 (API)
    FEATURES,
    OFFICIAL_LATENT_ABLATION,
    OFFICIAL_LATENT_B2,
    OFFICIAL_LATENT_L2,
    OFFICIAL_PIXEL,
    OFFICIAL_TOY,
    PRESETS,
    TAU_MIN,
    TOY_SEPARATION,
    TOY_TAU_MAX_MIN,
    get_config,
    separated_modes,
)
from methods._drifting_field import (  # noqa: F401 (API)
    COVERAGE_K,
    _cdist,
    coverage_stats,
    drift_field,
)
from methods._drifting_loss import (  # noqa: F401 (API)
    cfg_negatives,
    drift_loss,
    feature_loss,
    image_sample_metrics,
    regroup,
    sample_alpha,
)
from onestep_bench import method as base


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

  guidance_input = True  # see base.Method.guidance_input

  # Deng et al. eq. 5: the field at each generated sample is a softmax over
  # every sample of the batch, so a micro-batch's loss is not a part of it.
  grad_accum_refused = ('its drifting field couples every generated sample '
                        'to all samples of the batch (positives and '
                        'negatives), so the loss of a micro-batch is not a '
                        'part of the global-batch loss')

  supported_nfe = (1,)

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    """Every `config.method` key (`_drifting_config.validate_config`)."""
    dcfg.validate_config(config)

  def __init__(self, config, spec):
    super().__init__(config, spec)
    m = self.mcfg
    feats = m.features
    if feats == 'auto':
      feats = 'pixels'  # see get_config: the encoder keys are opt-in
    if feats not in FEATURES[1:]:
      raise ValueError(f'config.method.features={m.features!r}: use one of '
                       f'{FEATURES}.')
    if 'encoder' in feats and spec.kind != 'image':
      raise ValueError(f'config.method.features={feats!r} needs image data '
                       f'(got {spec.kind}); use features=pixels.')
    self.feature_set = feats
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

  def upstream_compute(self) -> dict[str, float | None]:
    """The frozen encoder's MAE pre-training FLOPs (its cache metadata)."""
    if self.encoder is None:
      return {}
    info = self.encoder.info
    return {f'encoder:{info.get("cache_key", "")}': info.get('train_flops')}

  def init_extras(self, key, params):
    """The frozen encoder's params, when the field uses encoder features."""
    del key, params
    if not self.use_encoder:
      return {}
    if self.encoder is None:
      raise RuntimeError('methods/drifting.py: call method.prepare(dataset) '
                         'before init (the harness does) to load the frozen '
                         'feature encoder.')
    # Frozen: stored (and checkpointed) with the run, never optimized.
    return {'encoder': jax.tree.map(jnp.asarray, self.encoder.params)}

  def row_variant(self) -> str:
    """Image rows name the feature set (`features=pixels` etc.); toy: ''.

    Toy vectors only have the raw `global` key, so there is nothing to say.
    """
    return f'features={self.feature_set}' if self.spec.kind == 'image' else ''

  def features(self, extras, x: jax.Array) -> dict[str, jax.Array]:
    """Feature dict {key: [B, L, C]} the field is computed on (paper A.5).

    `global` (`_pixel_features`) first, then the `enc/…` keys
    (`_encoder_features`), as selected by config.method.features.
    """
    return {**self._pixel_features(x), **self._encoder_features(extras, x)}

  def _pixel_features(self, x: jax.Array) -> dict[str, jax.Array]:
    """{'global': [B, 1, D]}: the raw output as one vector (paper A.5)."""
    if not self.use_pixels:
      return {}
    return {'global': x.reshape(x.shape[0], 1, -1)}

  def _encoder_features(self, extras, x: jax.Array) -> dict[str, jax.Array]:
    """{'enc/<key>': [B, L, C]}: the frozen encoder's multi-scale keys.

    Paper A.5 (feature maps of the latent-MAE, A.3); the encoder params in
    `extras` are frozen (stop-gradient), gradients flow back through x.
    """
    if not self.use_encoder:
      return {}
    enc = self.encoder.features(jax.lax.stop_gradient(extras['encoder']), x)
    return {f'enc/{k}': v for k, v in enc.items()}

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
    """Eq. 1 (summed over feature keys, eqs. 6-7): the toy or image path."""
    if self.spec.kind == 'toy2d':
      return self._toy_loss(params, batch['x'], key)
    return self._image_loss(params, batch, key, state.extras)

  def _field_kwargs(self) -> dict:
    """The `drift_loss` options of config.method (spec §1.3)."""
    m = self.mcfg
    return dict(temperatures=tuple(m.temperatures),
                feature_norm=m.feature_norm, drift_norm=m.drift_norm,
                floor=m.affinity_floor)

  def _toy_loss(self, params, pos: jax.Array, key: jax.Array):
    """Toy data (spec §1.8): eq. 1 on raw vectors, one group.

    Every generated sample against the whole data batch, in raw coordinates
    (no feature keys, classes or CFG); the plain key draws the noise (the
    recorded toy rows).

    Args:
      params: generator params.
      pos: [B, D] the data batch (positives).
      key: the noise key.

    Returns:
      (loss, metrics). The loss is ≈ ‖Σ_τ Ṽ_τ‖², constant by construction
      with drift_norm (lambertae/drifting#3); `field_rms` / `nn_dist` are
      what converge, and `nn_dist_rev` / `coverage` see dropped modes
      (`nn_dist` does not).
    """
    n = self.mcfg.num_gen or pos.shape[0]
    x = self.generate(params, self.noise(key, n))
    loss, stats = drift_loss(x.reshape(1, n, -1),
                             pos.reshape(1, pos.shape[0], -1),
                             coverage_k=COVERAGE_K, **self._field_kwargs())
    return loss, dict(field_rms=stats['field_rms'], nn_dist=stats['nn_dist'],
                      nn_dist_rev=stats['nn_dist_rev'],
                      coverage=stats['coverage'],
                      feature_scale=stats['scale'])

  def _image_loss(self, params, batch, key: jax.Array, extras):
    """Images (spec §1.4-1.5): eq. 1 over feature keys (eqs. 6-7).

    The batch holds G = class_groups one-class blocks of P positives
    (G = 1 unlabelled); N = num_gen or P samples are generated per block
    with its label and, with CFG, its α (`cfg_negatives`, paper A.7).

    Args:
      params: generator params.
      batch: {'x': [G·P, ...], 'y': [G·P] (labelled data)}.
      key: split into the noise, α, CFG-negative and style keys.
      extras: `init_extras` (the frozen encoder's params, if used).

    Returns:
      (loss, metrics): `feature_loss` and `image_sample_metrics`.
    """
    pos, m = batch['x'], self.mcfg
    g = self.class_groups or 1
    p = pos.shape[0] // g
    n = m.num_gen or p
    k_eps, k_alpha, k_unc, k_style = jax.random.split(key, 4)
    labels = alpha = unc = unc_w = None
    if self.spec.num_classes:
      labels = jnp.repeat(batch['y'][::p], n)               # [G·N]
    if self.cfg:
      alpha, unc, unc_w = cfg_negatives(
          k_alpha, k_unc, pos, g, n, num_unc=m.num_unc,
          alpha_max=m.cfg_alpha_max, power=m.cfg_alpha_power,
          p_one=m.cfg_p_one)
    x = self.generate(params, self.noise(k_eps, g * n), labels, alpha,
                      self._style(k_style, g * n))
    fx = self.features(extras, x)
    fp = jax.lax.stop_gradient(self.features(extras, pos))
    fu = (jax.lax.stop_gradient(self.features(extras, unc))
          if unc is not None else None)
    total, metrics = feature_loss(fx, fp, g, fu, unc_w, **self._field_kwargs())
    metrics.update(image_sample_metrics(x, pos, g))
    return total, metrics

  # -------------------------------------------------------------- sampling
  def _sample_keys(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(noise key, style key) of `sample`; toy noise uses the plain key.

    The plain key on toy data keeps the recorded toy rows reproducible.
    """
    k_eps, k_style = jax.random.split(key)
    if self.spec.kind == 'toy2d':
      k_eps = key
    return k_eps, k_style

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
    k_eps, k_style = self._sample_keys(key)
    alpha = None
    if self.cfg:
      alpha = jnp.full((n,), 1.0 if guidance is None else guidance,
                       jnp.float32)
    return self.generate(params, self.noise(k_eps, n), labels, alpha,
                         self._style(k_style, n))
