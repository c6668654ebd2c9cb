"""Maths tests of methods/tvm.py (docs/methods/tvm.md §2, meanflow.md §3)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from conftest import count_dots, method_setup, random_params, smoke_config

from methods import tvm
from onestep_bench.data import DataSpec
from onestep_bench.method import load_method


def _setup(dataset='toy2d:gaussian', **kw):
  return method_setup('tvm', dataset, **kw)


_random_params = random_params


def _closed_form(spec):
  """Exact v(z, t), Φ_{t→s}(z), u(z, t, s) for x ~ N(μ, Σ), e ~ N(0, I).

  Spec §3 items 1-3. In Σ's eigenbasis each direction is 1-D with
  S(t)² = (1-t)²λ + t²:
    v(z, t) = -μ + Q diag((t - (1-t)λ) / S²) Qᵀ (z - (1-t)μ),
    Φ_{t→s}(z) = (1-s)μ + Q diag(S(s) / S(t)) Qᵀ (z - (1-t)μ),
    u(z, t, s) = (z - Φ_{t→s}(z)) / (t - s)   (= TVM's κ_w F with w = 1).
  Batched: z [B, 2], t, s [B].
  """
  lam, q = np.linalg.eigh(spec.cov)
  mu, lam, q = (jnp.asarray(a) for a in (spec.mean, lam, q))
  sd = lambda t: jnp.sqrt((1 - t[:, None])**2 * lam + t[:, None]**2)
  centred = lambda z, t: (z - (1 - t[:, None]) * mu) @ q

  def v(z, t):
    return -mu + ((t[:, None] - (1 - t[:, None]) * lam) / sd(t)**2
                  * centred(z, t)) @ q.T

  def flow(z, t, s):
    return (1 - s[:, None]) * mu + (sd(s) / sd(t) * centred(z, t)) @ q.T

  def u(z, t, s):
    gain = (1 - sd(s) / sd(t)) / (t - s)[:, None]
    return -mu + (gain * centred(z, t)) @ q.T

  return v, flow, u


def _exact_backbone(spec, scale=1.0):
  """Stand-in net F(x, t, h) = scale·u(x, t, t - h), v(x, t) at h = 0."""
  v, _, u = _closed_form(spec)

  def apply(params, x, t, h, y=None, g=None):
    del params, y, g
    safe = jnp.maximum(h, 1e-3)
    return jnp.where(h[:, None] > 0, scale * u(x, t, t - safe), v(x, t))

  return types.SimpleNamespace(apply=apply)


# Dyadic times: s ± ε is exact in float32 for ε = 2^-8.
_T = jnp.array([0.5, 0.75, 0.625, 0.375, 1.0, 0.25, 0.875, 0.5])
_S = jnp.array([0.25, 0.0, 0.5, 0.125, 0.5, 0.125, 0.5, 0.375])


# ------------------------------------------------ 1. JVP = finite differences
def test_jvp_tangent_on_end_time_matches_central_differences():
  _, _, method = _setup()
  params = _random_params(method)
  x = jax.random.normal(jax.random.key(2), (8, 2))
  kappa = jnp.array([1.0, 2.0, 1.0, 1.5, 1.0, 1.0, 3.0, 1.0])
  f_fn = jax.jit(lambda s_: method.flow_field(params, x, _T, s_))
  big_f, f, dfds = jax.jit(tvm.jump_and_terminal_velocity, static_argnums=0)(
      f_fn, x, _T, _S, kappa)
  np.testing.assert_allclose(big_f, f_fn(_S), atol=1e-5)
  k = kappa[:, None]
  np.testing.assert_allclose(f, x + (_S - _T)[:, None] * k * big_f, atol=1e-5)
  eps = 2.0**-8
  jump = lambda s_: x + (s_ - _T)[:, None] * k * f_fn(s_)
  fd = (jump(_S + eps) - jump(_S - eps)) / (2 * eps)
  assert float(jnp.max(jnp.abs(dfds - k * big_f))) > 0.5, 'non-trivial ∂_s F'
  np.testing.assert_allclose(dfds, fd, atol=2e-3, rtol=1e-3)
  # Sharp: a +1 tangent on the gap h = t - s (sign error) is off by O(1).
  _, wrong = jax.jit(lambda: jax.jvp(
      lambda h: method.apply(params, x, _T, h), (_T - _S,),
      (jnp.ones_like(_S),)))()
  bad = k * (big_f + (_S - _T)[:, None] * wrong)
  assert float(jnp.max(jnp.abs(bad - fd))) > 0.1


def test_jump_at_s_equal_t_is_identity_with_instantaneous_velocity():
  """f(x, t, t) = x and ∂_s f|_{s=t} = κ F(x, t, 0) (spec §2.1, §3.6)."""
  _, _, method = _setup()
  params = _random_params(method)
  x = jax.random.normal(jax.random.key(3), (8, 2))
  kappa = jnp.full((8,), 2.0)
  f_fn = lambda s_: method.flow_field(params, x, _T, s_)

  @jax.jit
  def run():
    return (*tvm.jump_and_terminal_velocity(f_fn, x, _T, _T, kappa),
            method.apply(params, x, _T, 0.0))

  big_f, f, dfds, v = run()
  np.testing.assert_array_equal(f, x)
  np.testing.assert_allclose(dfds, 2.0 * v, rtol=1e-6)
  np.testing.assert_allclose(big_f, v, rtol=1e-6)


# ---------------------------------------------- 2. closed form on `gaussian`
def test_terminal_condition_holds_for_exact_flow_map_only():
  """∂_s f = v(f, s) for the exact map; a perturbed map violates it."""
  _, ds, _ = _setup()
  with jax.enable_x64(True):
    v, flow, u = _closed_form(ds.spec)
    n = 256
    k1, k2, k3 = jax.random.split(jax.random.key(8), 3)
    t = jax.random.uniform(k1, (n,), jnp.float64, 0.05, 1.0)
    s = t * jax.random.uniform(k2, (n,), jnp.float64, 0.0, 0.98)
    z = 2.0 * jax.random.normal(k3, (n, 2), jnp.float64)
    one = jnp.ones((n,), jnp.float64)
    _, f, dfds = tvm.jump_and_terminal_velocity(lambda s_: u(z, t, s_), z, t,
                                                s, one)
    np.testing.assert_allclose(f, flow(z, t, s), atol=1e-12)
    assert float(jnp.max(jnp.abs(dfds - v(f, s)))) < 1e-9
    # κ_w = w with F = u / w is the same map (scaled parameterization).
    _, f2, dfds2 = tvm.jump_and_terminal_velocity(
        lambda s_: u(z, t, s_) / 2.0, z, t, s, 2.0 * one)
    np.testing.assert_allclose(f2, f, atol=1e-12)
    np.testing.assert_allclose(dfds2, dfds, atol=1e-12)
    # Boundary: f(z, t, s -> t) = z with terminal velocity v(z, t).
    _, f3, dfds3 = tvm.jump_and_terminal_velocity(
        lambda s_: u(z, t, s_), z, t, t - 1e-7, one)
    np.testing.assert_allclose(f3, z, atol=1e-5)
    np.testing.assert_allclose(dfds3, v(z, t), atol=1e-5)
    # Perturbed maps fail clearly: scaled, and time-warped (the right
    # endpoint-velocity field but the map of a wrong end time).
    for wrong in (lambda s_: 1.1 * u(z, t, s_),
                  lambda s_: u(z, t, s_ * 0.9)):
      _, fw, dw = tvm.jump_and_terminal_velocity(wrong, z, t, s, one)
      rms = float(jnp.sqrt(jnp.mean(jnp.square(dw - v(fw, s)))))
      assert rms > 0.05, rms


def test_loss_terminal_term_vanishes_at_exact_map():
  """Through the method's loss code: exact F and teacher -> L_TV = 0."""
  config, ds, method = _setup()
  del config
  batch = ds.sample(jax.random.key(4), 512)
  d = method.draw(jax.random.key(5), batch)
  method.net = _exact_backbone(ds.spec)
  terms = method.loss_terms(None, None, batch['x'], d)
  assert float(jnp.max(terms['terminal'])) < 1e-6
  # FM residual at the exact velocity: its conditional mean is 0, so the
  # loss is the irreducible variance E|v - (e - x)|², > 0.
  assert float(jnp.mean(terms['fm'])) > 0.1
  method.net = _exact_backbone(ds.spec, scale=1.1)
  wrong = method.loss_terms(None, None, batch['x'], d)
  assert float(jnp.mean(wrong['terminal'])) > 1e-3


@pytest.mark.parametrize('nfe', [1, 2, 4])
def test_sampler_with_exact_map_is_exact_at_any_nfe(nfe):
  """With the exact map every K-step sampler sends e to μ + Σ^½ e."""
  _, ds, method = _setup()
  method.net = _exact_backbone(ds.spec)
  key = jax.random.key(9)
  x = method.sample(None, key, 512, nfe=nfe)
  lam, q = np.linalg.eigh(ds.spec.cov)
  root = q @ np.diag(np.sqrt(lam)) @ q.T
  e = np.asarray(method.noise(key, 512))
  np.testing.assert_allclose(x, ds.spec.mean + e @ root.T, atol=2e-5)


# ------------------------------------------------- 3. s = t: flow matching
@pytest.mark.parametrize('time_dist', [
    'logit_normal', pytest.param('uniform', marks=pytest.mark.slow)])
def test_zero_gap_reduces_to_flow_matching_exactly(time_dist):
  """Gap -> 0 masks L_TV; L_FM with w = 1 is flow_matching's loss."""
  kw = {'method.gap_p_mean': -40.0,  # Δ ~ 1e-17: s + Δ == s in float32
        'method.time_dist': time_dist}
  config, ds, method = _setup(**kw)
  fm = load_method(smoke_config('flow_matching', 'toy2d:gaussian', **{
      'method.time_dist': time_dist}), ds.spec)
  assert (fm.mcfg.p_mean, fm.mcfg.p_std) == (config.method.s_p_mean,
                                             config.method.s_p_std)
  params = _random_params(method)
  batch = ds.sample(jax.random.key(4), 64)
  key = jax.random.key(5)
  # Eager for the official law: bit for bit (under jit XLA may fuse the two
  # graphs differently, 1 ulp); jitted (cheaper) for the uniform one.
  run = (lambda f: f) if time_dist == 'logit_normal' else jax.jit
  loss, m = run(method.loss)(params, batch, key, None)
  fm_loss, _ = run(fm.loss)(params, batch, key, None)
  assert float(m['frac_s_eq_t']) == 1.0 and float(m['terminal_loss']) == 0
  np.testing.assert_allclose(loss, fm_loss, rtol=0 if run is not jax.jit
                             else 1e-6)
  np.testing.assert_array_equal(m['fm_loss'], loss)


# ------------------------------------------------------- 4. time sampling
def test_time_sampler_matches_official_distributions():
  _, _, method = _setup(**{'method.time_dist': 'logit_normal'})
  n = 20000
  t, s = method.sample_ts(jax.random.key(10), n)
  gap = t - s
  assert bool(jnp.all((s >= 0) & (s <= t) & (t <= 1)))
  # Gap: sigmoid(N(-0.8, 1)) (t = s + Δ never clips: s ≤ 1 - Δ).
  logit_gap = np.log(gap) - np.log1p(-gap)
  assert scipy.stats.kstest(logit_gap, 'norm', (-0.8, 1.0)).pvalue > 1e-3
  # s | Δ ~ logit-normal(-0.4, 1) truncated to s ≤ 1 - Δ: compare with the
  # same law by per-sample rejection (redraw s for each Δ until it fits).
  # Joint rejection of (Δ, s) pairs would be a different law: it would
  # also condition Δ, which the official inverse-CDF draw does not.
  rng = np.random.default_rng(0)
  d = 1 / (1 + np.exp(-rng.normal(-0.8, 1.0, n)))
  ref = np.full(n, np.inf)
  while np.any(todo := ref > 1 - d):
    ref[todo] = 1 / (1 + np.exp(-rng.normal(-0.4, 1.0, todo.sum())))
  assert scipy.stats.ks_2samp(np.asarray(s), ref).pvalue > 1e-3
  # The joint-rejection law is distinguishable (the test is sharp).
  r = 1 / (1 + np.exp(-rng.normal(-0.4, 1.0, 4 * n)))
  d4 = 1 / (1 + np.exp(-rng.normal(-0.8, 1.0, 4 * n)))
  assert scipy.stats.ks_2samp(np.asarray(s),
                              r[r <= 1 - d4][:n]).pvalue < 1e-6
  # s' ~ logit-normal(-0.4, 1), independent of (t, s).
  dr = method.draw(jax.random.key(11), {'x': jnp.zeros((n, 2))})
  sp = np.asarray(dr['s_prime'])
  assert scipy.stats.kstest(np.log(sp / (1 - sp)), 'norm',
                            (-0.4, 1.0)).pvalue > 1e-3
  assert abs(np.corrcoef(sp, np.asarray(dr['s']))[0, 1]) < 0.03


@pytest.mark.parametrize('gap_dist', ['uniform', 'logit_normal'])
def test_uniform_time_sampler(gap_dist):
  """time_dist='uniform' (toy default): s | Δ ~ U[0, 1 - Δ], s' ~ U[0, 1]."""
  _, _, method = _setup(**{'method.time_dist': 'uniform',
                            'method.gap_dist': gap_dist})
  t, s = method.sample_ts(jax.random.key(12), 20000)
  assert bool(jnp.all((s >= 0) & (s <= t) & (t <= 1)))
  gap = np.asarray(t - s)
  ref = 'uniform' if gap_dist == 'uniform' else scipy.stats.norm(-0.8, 1).cdf
  logit = gap if gap_dist == 'uniform' else np.log(gap / (1 - gap))
  assert scipy.stats.kstest(logit, ref).pvalue > 1e-3
  u = np.asarray(s) / (1 - gap)
  assert scipy.stats.kstest(u, 'uniform').pvalue > 1e-3
  dr = method.draw(jax.random.key(13), {'x': jnp.zeros((20000, 2))})
  assert scipy.stats.kstest(np.asarray(dr['s_prime']),
                            'uniform').pvalue > 1e-3


# -------------------------------------------------- 5. the sampler's NFE
@pytest.mark.parametrize('nfe', [1, 2, 4])
def test_sampler_calls_backbone_exactly_nfe_times(nfe):
  _, ds, method = _setup()
  params = jax.jit(method.net.init)(jax.random.key(0))
  x, t = jnp.zeros((16, 2)), jnp.zeros((16,))
  per_call = count_dots(jax.make_jaxpr(method.net.apply)(
      params, x, t, t, None).jaxpr)
  sampler = lambda p, k: method.sample(p, k, 16, nfe=nfe)
  dots = count_dots(jax.make_jaxpr(sampler)(params, jax.random.key(1)).jaxpr)
  assert per_call > 0 and dots == nfe * per_call
  calls, apply = [], method.net.apply
  method.net = types.SimpleNamespace(
      apply=lambda *a: calls.append(a[2:4]) or apply(*a))
  with jax.disable_jit():
    sampler(params, jax.random.key(1))
  assert len(calls) == nfe
  grid = np.linspace(1, 0, nfe + 1)
  np.testing.assert_allclose([float(c[0][0]) for c in calls], grid[:-1],
                             atol=1e-7)  # t_i
  np.testing.assert_allclose([float(c[1][0]) for c in calls],
                             grid[:-1] - grid[1:], atol=1e-7)  # gap 1/K


def test_loss_backbone_calls():
  """Unconditional: JVP at (x_t, t, t-s), teacher at (sg f, s, 0), FM at
  (x_s', s', 0): three calls of batch B (no null-label teacher call)."""
  _, ds, method = _setup()
  params = jax.jit(method.net.init)(jax.random.key(0))
  calls, apply = [], method.net.apply
  method.net = types.SimpleNamespace(
      apply=lambda *a: calls.append(a) or apply(*a))
  batch = ds.sample(jax.random.key(1), 32)
  d = method.draw(jax.random.key(2), batch)
  with jax.disable_jit():
    method.loss(params, batch, jax.random.key(2), None)
  assert [c[1].shape[0] for c in calls] == [32, 32, 32]
  primal = getattr(calls[0][3], 'primal', calls[0][3])  # a JVP tracer
  np.testing.assert_allclose(primal, d['t'] - d['s'], atol=1e-7)  # t - s
  np.testing.assert_allclose(calls[1][2], d['s'], rtol=1e-6)  # teacher at s
  np.testing.assert_array_equal(calls[1][3], 0.0)
  np.testing.assert_allclose(calls[2][2], d['s_prime'], rtol=1e-6)
  np.testing.assert_array_equal(calls[2][3], 0.0)


# ----------------------------------------- 6. teacher EMA, grad through JVP
def test_teacher_ema_updated_at_its_rate():
  config, ds, method = _setup(**{'method.teacher_ema': 0.9})
  key = jax.random.key(0)
  state = method.init(key, ds.sample(key, 8))
  for a, b in zip(jax.tree.leaves(state.extras['teacher']),
                  jax.tree.leaves(state.params), strict=True):
    np.testing.assert_array_equal(a, b)
  step = jax.jit(method.train_step)
  s1, m = step(state, ds.sample(jax.random.key(1), 64), jax.random.key(2))
  s2, _ = step(s1, ds.sample(jax.random.key(3), 64), jax.random.key(4))
  assert {'terminal_loss', 'fm_loss', 'frac_s_eq_t', 'gap_mean'} <= set(m)
  for prev, cur in ((state, s1), (s1, s2)):
    want = jax.tree.map(lambda p, q: 0.9 * q + 0.1 * p, cur.params,
                        prev.extras['teacher'])
    for a, b in zip(jax.tree.leaves(cur.extras['teacher']),
                    jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The eval EMA is the harness one (train.ema_decay), not the teacher.
  eval_ema = method.update_ema(s1.ema_params, s2.params, s1.step)
  for a, b in zip(jax.tree.leaves(s2.ema_params), jax.tree.leaves(eval_ema),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert config.train.ema_decay != 0.9


def test_gradient_flows_through_jvp_and_matches_finite_differences():
  """Reverse-over-forward: d loss/dθ (through ∂_s F) = finite differences."""
  _, ds, method = _setup()
  params = _random_params(method)
  batch = ds.sample(jax.random.key(4), 64)
  key = jax.random.key(5)
  # The teacher sees sg(f), so finite differences in θ (which move f) match
  # the gradient only for a teacher constant in x: the init net (zero output
  # layer, F⁻ ≡ 0). The target is trivial; the JVP path is what is tested.
  teacher = jax.jit(method.net.init)(jax.random.key(7))
  _, _, det = _setup(**{'method.detach_jvp': True})
  direction = _random_params(method, seed=11, scale=1.0)
  d = method.draw(key, batch)
  # The MLP casts its output to float32, so the loss carries float32
  # rounding: eps = 1e-3 balances it against the O(eps²) error (measured FD
  # error 4e-5 relative).
  eps = 1e-3

  @jax.jit  # one compile for everything (eager grad-of-JVP is slow)
  def check(params, teacher, direction, x, d):
    f64 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)
    p64, t64, dir64, x64 = f64(params), f64(teacher), f64(direction), f64(x)
    d = {k: f64(v) if v is not None else None for k, v in d.items()}
    lfn = lambda m: lambda p: jnp.mean(m.loss_terms(p, t64, x64, d)['terminal'])
    along = lambda g: sum(jnp.vdot(a, b) for a, b in zip(
        jax.tree.leaves(g), jax.tree.leaves(dir64), strict=True))
    shift = lambda c: jax.tree.map(lambda a, b: a + c * b, p64, dir64)
    fd = (lfn(method)(shift(eps)) - lfn(method)(shift(-eps))) / (2 * eps)
    return (along(jax.grad(lfn(method))(p64)), fd,
            along(jax.grad(lfn(det))(p64)))

  with jax.enable_x64(True):
    dot, fd, dot_det = (float(a) for a in check(params, teacher, direction,
                                                batch['x'], d))
  np.testing.assert_allclose(dot, fd, rtol=1e-3)
  # detach_jvp (ablation) drops the ∂_s F path: clearly another gradient.
  assert abs(dot_det - fd) > 5e-3 * abs(fd)  # 5x the FD tolerance


# --------------------------------------------------- 7. CFG (labelled data)
def _labelled(guidance_embed=True, **kw):
  config = smoke_config('tvm', 'toy2d:gaussian', **{
      'model.guidance_embed': guidance_embed, **kw})
  spec = DataSpec(name='toy2d:labelled', shape=(2,), num_classes=3)
  return load_method(config, spec)


def test_cfg_draw_and_guided_fm_target():
  method = _labelled(**{'method.class_dropout': 0.25,
                        'method.cfg_scale': 2.0})
  b = 4096
  x = jax.random.normal(jax.random.key(1), (b, 2))
  y = jnp.arange(b) % 3
  d = method.draw(jax.random.key(2), {'x': x, 'y': y})
  drop = d['y'] == 3
  assert abs(float(drop.mean()) - 0.25) < 0.03
  np.testing.assert_array_equal(d['w'], jnp.where(drop, 1.0, 2.0))
  np.testing.assert_array_equal(d['y'][~drop], y[~drop])
  # Stand-in F = a·x + [y = ∅] + g·1 (g = β): every term by hand.
  net = lambda p, x_, t_, h_, y_, g_: (p * x_ + (y_ == 3)[:, None]
                                       + g_[:, None])
  method.net = types.SimpleNamespace(apply=net)
  terms = method.loss_terms(1.5, 0.5, x, d)
  w, beta = d['w'][:, None], 1 / d['w'][:, None]
  sp, e = d['s_prime'][:, None], d['e']
  x_sp = (1 - sp) * x + sp * e
  u_null = 0.5 * x_sp + 1.0 + 1.0                  # teacher, ∅, β = 1
  u_fm = w * (1.5 * x_sp + drop[:, None] + beta)   # κ_w F_θ
  v_w = w * (e - x) + (1 - w) * u_null
  np.testing.assert_allclose(
      terms['fm'], jnp.mean(jnp.square(beta * (u_fm - v_w)), -1), rtol=1e-5)
  # Dropped samples: plain FM target e - x (w = 1).
  np.testing.assert_allclose(
      terms['fm'][drop],
      jnp.mean(jnp.square(u_fm - (e - x)), -1)[drop], rtol=1e-5)


def test_labelled_training_and_guided_sampling():
  method = _labelled()
  params = jax.jit(method.init)(jax.random.key(0), None).params
  batch = {'x': jax.random.normal(jax.random.key(1), (32, 2)),
           'y': jnp.arange(32) % 3}
  loss, m = jax.jit(method.loss)(params, batch, jax.random.key(2), None)
  assert np.isfinite(float(loss)) and np.isfinite(float(m['terminal_loss']))
  labels = jnp.arange(8) % 3
  for g in (None, 1.5):
    out = method.sample(params, jax.random.key(3), 8, nfe=2, labels=labels,
                        guidance=g)
    assert out.shape == (8, 2) and bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ValueError, match='needs class labels'):
    method.sample(params, jax.random.key(3), 8, nfe=1, guidance=2.0)
  plain = _labelled(guidance_embed=False)
  with pytest.raises(ValueError, match='guidance_embed'):
    plain.sample(params,
                 jax.random.key(3), 8, nfe=1, labels=labels, guidance=3.0)
  with pytest.raises(ValueError, match='config.model.guidance_embed'):
    _labelled(guidance_embed=False, **{'method.cfg_scale_max': 3.0})


@pytest.mark.slow  # ~45 s of DiT compile on 2 cores
def test_tvm_dit_loss_finite():
  """The semi-Lipschitz DiT (RMSNorm, QK-norm, RMS adaLN, spectral init,
  guidance embedder), labelled: loss and grads finite through JVP attention."""
  config = smoke_config('tvm', 'toy2d:gaussian')
  config.model = config.model.__class__(dict(
      name='dit', size='tiny', patch_size=2, norm='rmsnorm', qk_norm=True,
      modulation='rms_adaln', init='spectral', time_spectral_init=True,
      guidance_embed=True, freq_dim=32))
  spec = DataSpec(name='latents:test', shape=(4, 4, 2), num_classes=3,
                  kind='latent')
  method = load_method(config, spec)
  params = _random_params(method, scale=0.05)
  batch = {'x': jax.random.normal(jax.random.key(1), (8, 4, 4, 2)),
           'y': jnp.arange(8) % 3}
  (loss, m), g = jax.jit(jax.value_and_grad(method.loss, has_aux=True))(
      params, batch, jax.random.key(2), None)
  assert np.isfinite(float(loss)) and float(m['terminal_loss']) > 0
  assert np.isfinite(float(optax.global_norm(g)))
