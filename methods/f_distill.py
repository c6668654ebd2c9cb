"""f-distill: one-step distillation by f-divergence distribution matching.

Xu, Nie, Vahdat 2025, "One-step Diffusion Models with f-Divergence
Distribution Matching", arXiv 2502.15681. Spec: docs/methods/f_distill.md
§3; reference code NVlabs/FastGen `methods/distribution_matching/
{f_distill,dmd2}.py`, `methods/common_loss.py`. Conventions (flow_matching):
t = 0 data, t = 1 noise, x_t = (1 - t) x + t e, so α_t = 1 - t, σ_t = t; a
velocity v = e - x gives x̂0 = x_t - t v (spec §3.9).

Networks (all the harness backbone, all initialised from the teacher P, a
flow_matching run restored from `method.teacher_workdir`): the student G
(TrainState.params), a fake score F (trained on student samples), and a small
discriminator head D. The student is the teacher's x̂0 map at t = 1:
x = G(z) = z - v_θ(z, 1), z ~ N(0, I) (1 NFE).

Objective ∫ w(t) D_f(p_t ‖ q_t) dt with r = p_t / q_t. Its gradient (paper §3,
spec §3.2) is the DMD score difference weighted per sample by h(r):
  ∇_θ D_f = E[ h(r(x_t)) (∇log q_t - ∇log p_t)(x_t) α_t ∂G/∂θ ],
  h(r) = f''(r) r²,   ∇log q_t - ∇log p_t = α_t (x̂0_F - x̂0_P) / σ_t².
f choices (`f_div`), r from D and its two-stage normalisation:
methods/_f_distill_ratio.py docstring (spec §3.4).

Student loss (student step, every `student_update_freq`-th iteration):
  Δ = h · (x̂0_F - x̂0_P) / (mean_dims |x - x̂0_P| + 1e-6)    (no grad; the
      denominator is DMD's time-dependent weight w(t), spec §3.2)
  L_G = ½ mean((x - sg(x - Δ))²) + λ_GAN mean softplus(-D(x_t))
Fake-score + discriminator step (all other iterations), x = sg(G(z)):
  L_F = mean ‖v_F(x_t, t) - (e - x)‖²          (FM, the teacher's own loss)
  L_D = mean softplus(D(x_t)) + mean softplus(-D(x'_t')), x' ~ data, with an
        independent t', e' (FastGen gan_use_same_t_noise=False).
Each net has its own optax optimizer (AdamW from config.train; per-net lr
overrides); the student's EMA is updated every iteration (FastGen callback).

Discriminator features (`disc_features`). The shared backbones return only
x-shaped outputs, so D is a small head on (x_t, x̂0_N(x_t, t), t) where N is
the fake score (default; DMD2 §4.3 puts D on the fake score), the teacher
(FastGen), or nothing ('raw': D sees (x_t, t) only, spec §3.9 toy). x̂0_F - x̂0_P
is exactly the score difference ∝ ∇ log r, so these are informative features.
The D loss does not train F (a stop-gradient): F's *output* is the score the
VSD term uses, so unlike DMD2's shared encoder it must not be bent by D.
The head (MLP on Fourier features / conv stack): methods/_f_distill_ratio.py.

Multi-step students (FastGen `student_sample_steps`, spec §3.7):
`student_steps = K` trains G on the grid t_k = 1 - k/K with DMD2-style
backward simulation (the input at t_k is the student's own no-grad rollout,
re-noised: x_{t_{k+1}} = (1 - t_{k+1}) x̂0 + t_{k+1} e), not FastGen's noised
real data. It samples with any nfe dividing K on the sub-grid. K = 1 (paper).

Helpers (re-exported here): methods/_f_distill_ratio.py (f-weights, VSD,
D head), methods/_f_distill_config.py (config, presets, config checks,
teacher restore). File I/O is the harness's: the teacher run is found,
checked and restored by onestep_bench/runs.py (`load_ema_params`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from methods import _f_distill_config
from methods._f_distill_config import (  # noqa: F401 (API)
  FASTGEN_CIFAR10,
  FASTGEN_IMAGENET64,
  IMAGE_PRESET,
  PRESETS,
  TEACHER_METHOD,
  TeacherError,
  _teacher_hint,
  get_config,
  load_teacher,
)
from methods._f_distill_ratio import (  # noqa: F401 (API)
  F_DIVERGENCES,
  density_ratio,
  disc_apply,
  disc_init,
  f_divergence,
  f_weight,
  fourier_features,
  normalize_ratio,
  vsd_delta,
  vsd_loss,
)
from onestep_bench import method as base
from onestep_bench import runs

PyTree = Any


# ============================================================= method
def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
  return t.reshape(t.shape + (1,) * (x.ndim - 1))


class Method(base.Method):
  """f-distill with a teacher-initialised student, fake score and D head."""

  # The student step normalises its weights by batch means: h(r) / mean_batch
  # h(r) (`f_weight`) and the per-t-bin EMA of r (`normalize_ratio`, a state
  # update per step), so micro-batch gradients would not average to it.
  grad_accum_refused = ('its student loss normalises the f-weights by their '
                        'batch mean (h(r) / mean h(r)) and folds batch means '
                        'into the ratio bins, so micro-batch gradients do not '
                        'average to the global-batch gradient')

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    """f, ratio / time / D settings, student steps and the teacher source.

    The checks: `validate_config` in methods/_f_distill_config.py.
    """
    _f_distill_config.validate_config(config)

  def __init__(self, config: ml_collections.ConfigDict, spec: Any):
    super().__init__(config, spec)
    c = self.mcfg
    self.h_fn = f_divergence(c.f_div, c.alpha)[1]
    if c.student_update_freq < 2:
      raise ValueError('method.student_update_freq must be >= 2 (the other '
                       'iterations train the fake score and D).')
    if c.disc_features not in ('fake_score', 'teacher', 'raw'):
      raise ValueError(f'method.disc_features={c.disc_features!r}: use '
                       "'fake_score', 'teacher' or 'raw'.")
    if c.gan_weight <= 0 and c.f_div != 'rkl':
      raise ValueError('method.gan_weight must be > 0: r comes from the '
                       "discriminator (FastGen asserts this too); use "
                       "f_div='rkl' for pure DMD.")
    k = int(c.student_steps)
    if k < 1:
      raise ValueError(f'method.student_steps={k} must be >= 1.')
    self.supported_nfe = tuple(n for n in range(1, k + 1) if k % n == 0)
    # Each net's optimizer counts its own updates (one student step per K
    # iterations, the critics the other K - 1; `base.make_optimizer`).
    kk, tc = c.student_update_freq, config.train
    self.tx = base.make_optimizer(tc, lr=c.lr_student, share=1 / kk,
                                  offset=1)
    self.tx_fake = base.make_optimizer(tc, lr=c.lr_fake, share=1 - 1 / kk,
                                       offset=1)
    self.tx_disc = base.make_optimizer(tc, lr=c.lr_disc, share=1 - 1 / kk,
                                       offset=1)
    # The teacher is read here, on the host, before anything compiles (the
    # harness jits `init`); `init` pulls it in through a host callback so
    # it is not baked into the program as a constant.
    self._teacher: PyTree | None = None
    if c.teacher_workdir:
      self._teacher = load_teacher(
          c.teacher_workdir, config, spec,
          expect=jax.eval_shape(self.net.init, jax.random.key(0)))
    elif not c.allow_untrained_teacher:
      raise TeacherError(
          'config.method.teacher_workdir is empty: f-distill needs a '
          f'{TEACHER_METHOD} run of this harness, e.g. '
          + _teacher_hint(config)
          + ', or set method.allow_untrained_teacher=True for smoke tests.')

  # ------------------------------------------------------------- state
  def upstream_compute(self) -> dict[str, float | None]:
    """The teacher run's total training FLOPs (its summary.json)."""
    wd = self.mcfg.teacher_workdir
    if not wd:
      return {}
    s = runs.read_summary(wd)
    return {f'teacher:{wd}': s.get('total_train_flops')}

  def init(self, key, example_batch):
    """Student, EMA, fake score = teacher; fresh D; ratio bins = 1."""
    del example_batch
    kt, kd = jax.random.split(key)
    if self._teacher is None:  # allow_untrained_teacher (smoke tests)
      teacher = self.net.init(kt)
    else:
      host = self._teacher
      teacher = jax.pure_callback(
          lambda: host, jax.tree.map(
              lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), host))
    copy = lambda p: jax.tree.map(jnp.array, p)
    n_feat = 0 if self.mcfg.disc_features == 'raw' else 1
    disc = disc_init(kd, tuple(self.spec.shape), n_feat, self.mcfg.disc_width,
                     self.mcfg.disc_depth, self.mcfg.disc_fourier)
    fake = copy(teacher)
    params = copy(teacher)
    return base.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state=self.tx.init(params), ema_params=copy(teacher),
        extras=dict(teacher=teacher, fake=fake,
                    fake_opt=self.tx_fake.init(fake), disc=disc,
                    disc_opt=self.tx_disc.init(disc),
                    ratio_bins=jnp.ones((self.mcfg.ratio_bins,), jnp.float32)))

  # ---------------------------------------------------------- networks
  def x0(self, params, x_t, t, y=None):
    """x̂0 = x_t - t v(x_t, t): the denoiser of any of G, F, P."""
    return x_t - _bcast(jnp.broadcast_to(t, x_t.shape[:1]), x_t) * self.apply(
        params, x_t, t, 0.0, y)

  def teacher_x0(self, teacher, x_t, t, y=None):
    """Teacher x̂0, with CFG on x̂0 when `teacher_guidance` is set."""
    out = self.x0(teacher, x_t, t, y)
    g = self.mcfg.teacher_guidance
    if g is not None and y is not None and self.spec.num_classes:
      null = jnp.full_like(y, self.spec.num_classes)
      out = out + (g - 1.0) * (out - self.x0(teacher, x_t, t, null))
    return out

  def generate(self, params, key, n, y=None):
    """Training samples of G: [n, *shape] (backward simulation if K > 1)."""
    k_steps = int(self.mcfg.student_steps)
    kz, ki, ks = jax.random.split(key, 3)
    z = self.noise(kz, n)
    if k_steps == 1:
      return self.x0(params, z, 1.0, y)
    ts = jnp.linspace(1.0, 0.0, k_steps + 1)
    idx = jax.random.randint(ki, (n,), 0, k_steps)
    sg = jax.lax.stop_gradient(params)

    def body(j, x):
      x0 = self.x0(sg, x, ts[j], y)
      e = self.noise(jax.random.fold_in(ks, j), n)
      nxt = (1 - ts[j + 1]) * x0 + ts[j + 1] * e
      return jnp.where(_bcast(j < idx, x), nxt, x)
    x_in = jax.lax.stop_gradient(jax.lax.fori_loop(0, k_steps - 1, body, z))
    return self.x0(params, x_in, ts[idx], y)

  def _time(self, key, n):
    c = self.mcfg
    return c.t_min + (c.t_max - c.t_min) * jax.random.uniform(key, (n,))

  def _noised(self, x, key):
    kt, ke = jax.random.split(key)
    t = self._time(kt, x.shape[0])
    e = jax.random.normal(ke, x.shape)
    return (1 - _bcast(t, x)) * x + _bcast(t, x) * e, t, e

  def disc(self, p, x_t, feat, t):
    """D's logit ≈ log p_t/q_t (data over student) at x_t; [B]."""
    return disc_apply(p, x_t, feat, t, self.mcfg.disc_fourier)

  def _disc_feat(self, extras, x_t, t, y, x0_fake=None):
    """D's feature map at x_t: x̂0 of F or P, or None ('raw')."""
    mode = self.mcfg.disc_features
    if mode == 'raw':
      return None
    if mode == 'fake_score':
      return self.x0(extras['fake'], x_t, t, y) if x0_fake is None else x0_fake
    return self.x0(extras['teacher'], x_t, t, y)

  # ------------------------------------------------------------ losses
  def student_loss(self, params, extras, batch, key):
    """(L_G, (metrics, new ratio bins)) of the student step."""
    c, y = self.mcfg, batch.get('y')
    n = batch['x'].shape[0]
    kg, kn = jax.random.split(key)
    x = self.generate(params, kg, n, y)
    x_t, t, _ = self._noised(x, kn)
    x0_f = self.x0(extras['fake'], x_t, t, y)
    x0_p = jax.lax.stop_gradient(self.teacher_x0(extras['teacher'], x_t, t, y))
    feat = self._disc_feat(extras, x_t, t, y, x0_f)  # grads reach x via x_t
    x0_f = jax.lax.stop_gradient(x0_f)
    logit = self.disc(extras['disc'], x_t, feat, t)
    r = density_ratio(jax.lax.stop_gradient(logit), c.ratio_lower,
                      c.ratio_upper, c.logit_clip)
    bins = extras['ratio_bins']
    r_n = r
    if c.ratio_normalization:
      r_n, bins = normalize_ratio(r, t, bins, c.ratio_ema)
    h = f_weight(r_n, self.h_fn)
    l_vsd = vsd_loss(x, vsd_delta(x, x0_f, x0_p, h))
    l_gan = jnp.mean(jax.nn.softplus(-logit))
    metrics = dict(vsd_loss=l_vsd, gan_gen=l_gan, r_mean=jnp.mean(r),
                   h_min=jnp.min(h), h_max=jnp.max(h))
    return l_vsd + c.gan_weight * l_gan, (metrics, bins)

  def critic_loss(self, nets, params, extras, batch, key):
    """(L_F + L_D, metrics): fake score (FM) and discriminator losses."""
    fake, disc = nets
    c, y, real = self.mcfg, batch.get('y'), batch['x']
    kg, kn, kr = jax.random.split(key, 3)
    x = jax.lax.stop_gradient(self.generate(params, kg, real.shape[0], y))
    x_t, t, e = self._noised(x, kn)
    v = self.apply(fake, x_t, t, 0.0, y)
    l_fm = jnp.mean(jnp.square(v - (e - x)))
    if c.gan_same_t_noise:
      t_r, xr_t = t, (1 - _bcast(t, real)) * real + _bcast(t, real) * e
    else:
      xr_t, t_r, _ = self._noised(real, kr)
    ex = dict(extras, fake=jax.lax.stop_gradient(fake))
    x0_f = x_t - _bcast(t, x_t) * jax.lax.stop_gradient(v)
    f_fake = self._disc_feat(ex, x_t, t, y, x0_f)
    f_real = self._disc_feat(ex, xr_t, t_r, y)
    lg_f = self.disc(disc, x_t, f_fake, t)
    lg_r = self.disc(disc, xr_t, f_real, t_r)
    l_d = jnp.mean(jax.nn.softplus(lg_f)) + jnp.mean(jax.nn.softplus(-lg_r))
    metrics = dict(fake_loss=l_fm, disc_loss=l_d,
                   d_acc=0.5 * (jnp.mean(lg_r > 0) + jnp.mean(lg_f < 0)))
    return l_fm + l_d, metrics

  def loss(self, params, batch, key, state):
    """The student loss L_G (the contract's `loss`; train_step is custom)."""
    loss, (metrics, _) = self.student_loss(params, state.extras, batch, key)
    return loss, metrics

  # -------------------------------------------------------- train step
  @property
  def step_cycle(self) -> int:
    """K = `student_update_freq`: one student step per K train steps."""
    return int(self.mcfg.student_update_freq)

  def step_phase(self, step: int) -> int:
    """0: student update (step % K == 0); 1: fake score + D update."""
    return 0 if step % self.step_cycle == 0 else 1

  def train_step(self, state, batch, key, phase=None):
    """Student step if step % K == 0, else fake-score + D step; EMA always.

    `phase` = `step_phase(step)` when the harness knows it statically (one
    step per dispatch): then only that branch is traced, no `lax.cond`
    (XLA:CPU ran this step ~10x slower with the cond on Fashion-MNIST).
    Same result either way (tested).

    Metrics: `loss` / `grad_norm` of the update that ran; the student-only
    metrics are reported x K on student steps (0 otherwise) and the critic
    ones x K/(K-1) on the other steps, so their mean over whole K-cycles
    (the harness logs means over 100-step windows) is the per-update mean.
    """
    kk = self.mcfg.student_update_freq
    ex = state.extras
    zero_s = {k: jnp.float32(0) for k in ('vsd_loss', 'gan_gen', 'r_mean',
                                           'h_min', 'h_max')}
    zero_c = {k: jnp.float32(0) for k in ('fake_loss', 'disc_loss', 'd_acc')}

    def student(_):
      grad_fn = jax.value_and_grad(self.student_loss, has_aux=True)
      (loss, (m, bins)), g = grad_fn(state.params, ex, batch, key)
      upd, opt = self.tx.update(g, state.opt_state, state.params)
      params = optax.apply_updates(state.params, upd)
      m = {k: v * kk for k, v in m.items()}
      out = (params, opt, ex['fake'], ex['fake_opt'], ex['disc'],
             ex['disc_opt'], bins)
      return out, dict(zero_c, **m, loss=loss, grad_norm=optax.global_norm(g))

    def critic(_):
      grad_fn = jax.value_and_grad(self.critic_loss, has_aux=True)
      (loss, m), (gf, gd) = grad_fn((ex['fake'], ex['disc']), state.params,
                                    ex, batch, key)
      uf, fopt = self.tx_fake.update(gf, ex['fake_opt'], ex['fake'])
      ud, dopt = self.tx_disc.update(gd, ex['disc_opt'], ex['disc'])
      m = {k: v * kk / (kk - 1) for k, v in m.items()}
      out = (state.params, state.opt_state, optax.apply_updates(ex['fake'], uf),
             fopt, optax.apply_updates(ex['disc'], ud), dopt, ex['ratio_bins'])
      return out, dict(zero_s, **m, loss=loss,
                       grad_norm=optax.global_norm((gf, gd)))

    if phase is None:
      out, metrics = jax.lax.cond(state.step % kk == 0, student, critic, None)
    else:
      out, metrics = (student if phase == 0 else critic)(None)
    params, opt, fake, fopt, disc, dopt, bins = out
    ema = self.update_ema(state.ema_params, params, state.step)
    metrics['param_norm'] = optax.global_norm(params)
    extras = dict(ex, fake=fake, fake_opt=fopt, disc=disc, disc_opt=dopt,
                  ratio_bins=bins)
    return state.replace(step=state.step + 1, params=params, opt_state=opt,
                         ema_params=ema, extras=extras), metrics

  # ---------------------------------------------------------- sampling
  def sample(self, params, key, n, *, nfe, labels=None, guidance=None):
    """Student steps on t_i = 1 - i/nfe, re-noising x̂0 in between."""
    self.check_nfe(nfe)
    del guidance  # teacher CFG is distilled in (teacher_guidance)
    kz, ke = jax.random.split(key)
    ts = jnp.linspace(1.0, 0.0, nfe + 1)
    x0 = self.x0(params, self.noise(kz, n), 1.0, labels)
    if nfe == 1:
      return x0

    def step(x0, i):
      e = self.noise(jax.random.fold_in(ke, i), n)
      x = (1 - ts[i]) * x0 + ts[i] * e
      return self.x0(params, x, ts[i], labels), None
    return jax.lax.scan(step, x0, jnp.arange(1, nfe))[0]
