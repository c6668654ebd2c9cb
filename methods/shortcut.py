"""Shortcut models: one network conditioned on the step size d.

Frans, Hafner, Levine, Abbeel 2024, "One Step Diffusion via Shortcut
Models", arXiv 2410.12557 (Sec. 3); written from the official JAX code
(kvfrans/shortcut-models, `targets_shortcut.py`, `train.py`, `model.py`,
`helper_inference.py`). Spec: docs/methods/shortcut.md.

Conventions (docs/methods/flow_matching.md §0): t = 0 is data, t = 1 is
noise, z_t = (1 - t) x + t e, v = e - x. The paper runs the other way
(t_p = 1 - t, x'_{t+d} = x_t + d s); every equation below is the paper's
rewritten with t = 1 - t_p and s = -s_p, so a step of size d goes from t to
t - d:

  z'_{t-d} = z_t - d s_θ(z_t, t, d)                                   (eq. 3)
  s(z_t, t, 2d) = s(z_t, t, d) / 2 + s(z'_{t-d}, t - d, d) / 2        (eq. 4)
  L(θ) = E ‖s_θ(z_t, t, d≈0) - (e - x)‖²  +  E ‖s_θ(z_t, t, 2d) - sg(s_tgt)‖²
  s_tgt = s_φ(z_t, t, d) / 2 + s_φ(z'_{t-d}, t - d, d) / 2            (eq. 5)

φ are the EMA parameters (`bootstrap_ema`, official default; `state.
ema_params`) or θ under stop-gradient. Step sizes are the M = `max_steps`
dyadic levels d = 2^-k, k = 0..K, K = log2 M. Level K (d = 1/M) is the
flow: it is trained by flow matching (the paper's d = 0) and is what an
M-step sampler queries, as in the official code (`dt_base = log2 M` for
both). A fraction `bootstrap_fraction` of each batch (official: 1/4, see
`get_config`) is self-consistency samples, split in equal groups over the
big steps 2d = 2^-j, j = K-1, ..., 0 (the remainder at j = 0), with t on
the grid of the big step, t ∈ {2d, 4d, ..., 1}; the rest is flow matching
with t on the 1/M grid, t ∈ {1/M, ..., 1}. z' and s_tgt are clipped to
[-clip, clip] (official ±4).

The step size enters the backbone as the second time input h: 'log2'
h = k = log2(1/d) (official: the integer `dt_base` into a timestep
embedder) or 'd' h = d, with h = 0 at the flow level (the paper's d = 0).
Labelled data (official CFG recipe): flow-matching labels are dropped to
the null class with `class_dropout`; with `bootstrap_cfg` the group at the
smallest big step (its half steps are the flow level) gets CFG-guided
half-step velocities s_∅ + w (s_y - s_∅), w = `cfg_scale`, and larger steps
inherit the guidance by bootstrapping. Sampling: K' = nfe Euler steps of
d = 1/nfe, z ← z - d s_θ(z, t_i, d), t_i = 1 - i/nfe; nfe must be a power
of two ≤ M. A `guidance` w runs the official CFG sampler (conditional and
null rows in one batched call: FLOPs ×2, measured by the evaluator).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from onestep_bench import config_check as cc
from onestep_bench import method as base

# The authors publish CelebA-HQ 256 and ImageNet 256 (latent DiT) recipes
# only (README.md of kvfrans/shortcut-models); none for small pixel images.
IMAGE_PRESET: dict[str, object] = {}
D_EMBEDS = ('log2', 'd')
FM_TIMES = ('grid', 'uniform')


def get_config() -> ml_collections.ConfigDict:
  """Shortcut-model defaults: the official values (sources inline)."""
  return ml_collections.ConfigDict(dict(
      # M, the number of smallest steps (d_min = 1/M): official
      # `denoise_timesteps` 128 (train.py model_config); paper Sec. 3 M = 128.
      max_steps=128,
      # Fraction of each batch with self-consistency targets. Paper Sec. 3.2
      # and App. A ("ratio of empirical to bootstrap targets" 0.75, as read
      # for this task); the official train.py flag default is
      # `bootstrap_every` = 8, i.e. 1/8, and README's commands keep it.
      bootstrap_fraction=0.25,
      # Targets from the EMA params: official `bootstrap_ema` = 1 (train.py;
      # targets_shortcut.py `call_model_ema`). The EMA is the harness's
      # (train.ema_decay, 0.999 = official `target_update_rate`).
      bootstrap_ema=True,
      # Clip of z' and s_tgt to [-clip, clip]: targets_shortcut.py
      # `jnp.clip(x_t2, -4, 4)`, `jnp.clip(v_target, -4, 4)`. 0 = off.
      clip=4.0,
      # Step-size input: 'log2' = log2(1/d) (official: model.py embeds
      # `dt_base` with a TimestepEmbedder) or 'd' (h = d, flow level h = 0).
      d_embed='log2',
      # Flow-matching t: 'grid' t ∈ {1/M, ..., 1} (targets_shortcut.py
      # `randint(0, denoise_timesteps) / denoise_timesteps`) or 'uniform'
      # t ~ U[0, 1] (flow_matching's law).
      fm_time='grid',
      # Labelled data only. Label dropout: official `class_dropout_prob` 0.1.
      class_dropout=0.1,
      # CFG in the bootstrap targets: README ImageNet-256 command
      # `--model.bootstrap_cfg 1 --model.cfg_scale 1.5` (flag defaults 0 and
      # 4.0; CelebA runs unconditional).
      bootstrap_cfg=True,
      cfg_scale=1.5,
  ))


def num_levels(max_steps: int) -> int:
  """K = log2 M for a power of two M >= 2."""
  k = int(round(math.log2(max_steps)))
  if max_steps < 2 or 2**k != max_steps:
    raise ValueError(f'method.max_steps={max_steps!r}: use a power of two '
                     '>= 2, e.g. 128.')
  return k


def bootstrap_exponents(n_boot: int, levels: int) -> np.ndarray:
  """Big-step exponents j (2d = 2^-j) of the self-consistency rows.

  Official `dt_base`: n_boot // K rows each at j = K-1, K-2, ..., 0 (in this
  order), the remainder at j = 0 (2d = 1).
  """
  per = n_boot // levels
  j = np.repeat(np.arange(levels - 1, -1, -1), per)
  return np.concatenate([j, np.zeros(n_boot - j.size, j.dtype)]).astype(
      np.int32)


def step_input(k: jax.Array, levels: int, mode: str) -> jax.Array:
  """Backbone input h for d = 2^-k (k = levels: the flow level)."""
  k = jnp.asarray(k, jnp.float32)
  if mode == 'log2':
    return k
  if mode == 'd':
    return jnp.where(k >= levels, 0.0, jnp.exp2(-k))
  raise ValueError(f'method.d_embed={mode!r}: use one of {D_EMBEDS}.')


def bcast(t: jax.Array, x: jax.Array) -> jax.Array:
  """[B] -> [B, 1, ..., 1] to broadcast against x."""
  return t.reshape(t.shape + (1,) * (x.ndim - 1))


def clip(x: jax.Array, bound: float) -> jax.Array:
  """Clips x to [-bound, bound]; bound 0 = no clip."""
  return jnp.clip(x, -bound, bound) if bound else x


class Method(base.Method):
  """Shortcut model s_θ(z, t, d) = backbone(z, t, h(d), y)."""

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    """Step levels, bootstrap batch split, target options, NFEs."""
    c, p = config.method, 'method'
    m = c.get('max_steps')
    if not cc.is_int(m) or m < 2 or m & (m - 1):
      raise cc.ConfigError(
          'method.max_steps', m, 'must be a power of two >= 2 (step sizes '
          'd = 2^-k, k = 0..log2 M)', 'e.g. --config.method.max_steps=128 '
          '(official)')
    levels = num_levels(m)
    frac = cc.require_real(c, p, 'bootstrap_fraction', 0.0, 1.0,
                           lo_open=True, hi_open=True, example=0.25)
    b = config.train.batch_size
    n_boot = int(b * frac + 1e-6)
    if n_boot < levels or n_boot >= b:
      raise cc.ConfigError(
          'method.bootstrap_fraction', frac, f'gives {n_boot} self-'
          f'consistency rows of train.batch_size={b}; need >= log2('
          f'max_steps) = {levels} (one group per step size) and < the batch '
          '(flow-matching rows)', f'raise train.batch_size or the fraction '
          f'(>= {levels}/{b}), or lower method.max_steps')
    cc.require_bool(c, p, 'bootstrap_ema')
    cc.require_real(c, p, 'clip', 0.0, example=4.0)
    cc.require_choice(c, p, 'd_embed', D_EMBEDS)
    cc.require_choice(c, p, 'fm_time', FM_TIMES)
    cc.require_prob(c, p, 'class_dropout')
    cc.require_bool(c, p, 'bootstrap_cfg')
    cc.require_real(c, p, 'cfg_scale', 0.0, example=1.5)
    cc.check_supported_nfe(config, tuple(2**k for k in range(levels + 1)),
                           f'shortcut with method.max_steps={m} (powers of '
                           'two <= max_steps)')

  def __init__(self, config: ml_collections.ConfigDict, spec):
    super().__init__(config, spec)
    self.levels = num_levels(self.mcfg.max_steps)
    self.supported_nfe = tuple(2**k for k in range(self.levels + 1))

  # ------------------------------------------------------------- the model
  def shortcut(self, params: base.PyTree, z: jax.Array, t: jax.Array,
               k: jax.Array, y: jax.Array | None = None) -> jax.Array:
    """s_θ(z, t, d = 2^-k); k = K is the flow level (d ≈ 0)."""
    return self.apply(params, z, t,
                      step_input(k, self.levels, self.mcfg.d_embed), y)

  def n_bootstrap(self, batch: int) -> int:
    """Self-consistency rows of a batch (official B // bootstrap_every)."""
    return int(batch * self.mcfg.bootstrap_fraction + 1e-6)

  def _guided(self, params, z, t, k, y, n_cfg):
    """Half-step velocity; rows [:n_cfg] CFG-guided (official batching)."""
    if not n_cfg:
      return self.shortcut(params, z, t, k, y)
    null = jnp.full((n_cfg,), self.spec.num_classes, y.dtype)
    out = self.shortcut(params, jnp.concatenate([z, z[:n_cfg]]),
                        jnp.concatenate([t, t[:n_cfg]]),
                        jnp.concatenate([k, k[:n_cfg]]),
                        jnp.concatenate([y, null]))
    cond, uncond = out[:z.shape[0]], out[z.shape[0]:]
    w = self.mcfg.cfg_scale
    return jnp.concatenate([uncond + w * (cond[:n_cfg] - uncond),
                            cond[n_cfg:]])

  def self_consistency_target(self, params: base.PyTree, z: jax.Array,
                              t: jax.Array, j: jax.Array,
                              y: jax.Array | None = None,
                              n_cfg: int = 0) -> jax.Array:
    """sg(s_tgt) for s(z, t, 2^-j): two half steps of 2^-(j+1) (eq. 5)."""
    bound, kh = self.mcfg.clip, j + 1
    dh = bcast(jnp.exp2(-kh.astype(jnp.float32)), z)
    s1 = self._guided(params, z, t, kh, y, n_cfg)
    z2 = clip(z - dh * s1, bound)
    s2 = self._guided(params, z2, t - dh.reshape(t.shape), kh, y, n_cfg)
    return jax.lax.stop_gradient(clip((s1 + s2) / 2, bound))

  # -------------------------------------------------------------- training
  def draw(self, key: jax.Array, n: int,
           shape: tuple[int, ...]) -> dict[str, jax.Array]:
    """Times, levels and noise of a batch of n rows of `shape`.

    Keys: fold 0 bootstrap (t, e), fold 1 flow matching (t, e; split as
    flow_matching.loss splits its key), fold 2 label dropout.
    """
    c, n_boot = self.mcfg, self.n_bootstrap(n)
    n_fm = n - n_boot
    kt, ke = jax.random.split(jax.random.fold_in(key, 0))
    j = jnp.asarray(bootstrap_exponents(n_boot, self.levels))
    # Uniform on the 2^j grid points {2d, 4d, ..., 1} of the big step 2d =
    # 2^-j (official `randint(0, 2^j)`; floor(u 2^j) of u ~ U[0, 1) is the
    # same law and compiles faster).
    sections = jnp.exp2(j.astype(jnp.float32))
    u = jax.random.uniform(kt, (n_boot,))
    t_b = (jnp.floor(u * sections) + 1) / sections
    e_b = jax.random.normal(ke, (n_boot, *shape))
    kt, ke = jax.random.split(jax.random.fold_in(key, 1))
    u = jax.random.uniform(kt, (n_fm,))  # as flow_matching draws its t
    if c.fm_time == 'grid':
      t_f = (jnp.floor(u * c.max_steps) + 1) / c.max_steps
    elif c.fm_time == 'uniform':
      t_f = u
    else:
      raise ValueError(f'method.fm_time={c.fm_time!r}: use one of '
                       f'{FM_TIMES}.')
    e_f = jax.random.normal(ke, (n_fm, *shape))
    drop = jax.random.bernoulli(jax.random.fold_in(key, 2), c.class_dropout,
                                (n_fm,))
    return dict(j=j, t_b=t_b, e_b=e_b, t_f=t_f, e_f=e_f, drop=drop)

  def targets(self, params: base.PyTree, target_params: base.PyTree,
              batch: base.Batch, key: jax.Array) -> dict[str, jax.Array]:
    """Inputs (z, t, k, y) and regression target of every row.

    Rows [:n_boot] are self-consistency rows (k = j, target from
    `target_params`), the rest flow matching (k = K, target e - x).
    """
    del params
    x, y = batch['x'], batch.get('y')
    n, n_boot = x.shape[0], self.n_bootstrap(x.shape[0])
    d = self.draw(key, n, x.shape[1:])
    x_b, x_f = x[:n_boot], x[n_boot:]
    z_b = (1 - bcast(d['t_b'], x_b)) * x_b + bcast(d['t_b'], x_b) * d['e_b']
    z_f = (1 - bcast(d['t_f'], x_f)) * x_f + bcast(d['t_f'], x_f) * d['e_f']
    y_b = y_in = None
    n_cfg = 0
    if y is not None and self.spec.num_classes > 0:
      y_b = y[:n_boot]  # official: bootstrap labels are never dropped
      y_f = jnp.where(d['drop'], self.spec.num_classes, y[n_boot:])
      y_in = jnp.concatenate([y_b, y_f])
      if self.mcfg.bootstrap_cfg:
        n_cfg = n_boot // self.levels  # official `num_dt_cfg`
    tgt_b = self.self_consistency_target(target_params, z_b, d['t_b'],
                                         d['j'], y_b, n_cfg)
    k_f = jnp.full((n - n_boot,), self.levels, jnp.int32)
    return dict(z=jnp.concatenate([z_b, z_f]),
                t=jnp.concatenate([d['t_b'], d['t_f']]),
                k=jnp.concatenate([d['j'], k_f]), y=y_in,
                target=jnp.concatenate([tgt_b, d['e_f'] - x_f]))

  def loss(self, params, batch, key, state):
    """Mean over the batch of the per-row MSE (official `mse_v`), eq. 5.

    Metrics: `loss_flow` / `loss_bootstrap` (the two row groups),
    `frac_bootstrap`, `v_target_rms` (RMS of the bootstrap targets).
    """
    if self.mcfg.bootstrap_ema:
      if state is None:
        raise ValueError('shortcut with method.bootstrap_ema=True needs the '
                         'TrainState (its ema_params make the targets); pass '
                         'it, or set method.bootstrap_ema=False.')
      target_params = state.ema_params
    else:
      target_params = params
    r = self.targets(params, target_params, batch, key)
    pred = self.shortcut(params, r['z'], r['t'], r['k'], r['y'])
    n = pred.shape[0]
    nb = self.n_bootstrap(n)
    per_row = jnp.mean(jnp.square(pred - r['target']).reshape(n, -1), -1)
    metrics = dict(loss_flow=jnp.mean(per_row[nb:]),
                   loss_bootstrap=jnp.mean(per_row[:nb]),
                   frac_bootstrap=jnp.asarray(nb / n, jnp.float32),
                   v_target_rms=jnp.sqrt(jnp.mean(jnp.square(
                       r['target'][:nb]))))
    return jnp.mean(per_row), metrics

  # -------------------------------------------------------------- sampling
  def sample(self, params, key, n, *, nfe, labels=None, guidance=None):
    """Euler steps of d = 1/nfe from t = 1 at the level d (eq. 3)."""
    self.check_nfe(nfe)
    guided = guidance is not None and guidance != 1.0
    if guidance is not None and (labels is None or not self.spec.num_classes):
      raise ValueError(f'guidance={guidance} needs class labels (CFG); '
                       'leave it None on unlabelled data.')
    k = int(round(math.log2(nfe)))
    h = step_input(k, self.levels, self.mcfg.d_embed)
    d = 1.0 / nfe
    if guided:
      labels = jnp.concatenate(
          [labels, jnp.full_like(labels, self.spec.num_classes)])

    def step(z, i):
      t = 1.0 - i.astype(jnp.float32) * d
      if not guided:
        return z - d * self.apply(params, z, t, h, labels), None
      cond, uncond = jnp.split(
          self.apply(params, jnp.concatenate([z, z]), t, h, labels), 2)
      return z - d * (uncond + guidance * (cond - uncond)), None

    return jax.lax.scan(step, self.noise(key, n), jnp.arange(nfe))[0]
