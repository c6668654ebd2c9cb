"""Maths tests of methods/meanflow.py (docs/methods/meanflow.md §1, §3)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_dots, method_setup, perturb, smoke_config
from scipy.integrate import solve_ivp

from methods import meanflow as mf
from onestep_bench.data import DataSpec
from onestep_bench.method import load_method


def _setup(dataset='toy2d:gaussian', **kw):
  return method_setup('meanflow', dataset, **kw)


def _random_params(method, seed=0, scale=0.3):
  """Eager draws (the JVP-vs-finite-difference tolerances below were
  validated on these exact draws)."""
  return perturb(method.net.init(jax.random.key(seed)),
                 jax.random.key(seed + 1), scale)


# Dyadic times: t ± ε and t - r ± ε are exact in float32 for ε = 2^-8.
_T = jnp.array([0.5, 0.75, 0.625, 0.375, 1.0, 0.25, 0.875, 0.5])
_R = jnp.array([0.25, 0.0, 0.5, 0.375, 0.0, 0.125, 0.5, 0.5])


# ------------------------------------------------ 1. JVP = finite differences
def test_jvp_matches_central_differences():
  _, _, method = _setup()
  params = _random_params(method)
  z = jax.random.normal(jax.random.key(2), (8, 2))
  v = jax.random.normal(jax.random.key(3), (8, 2))
  u_fn = lambda z_, t_, r_: method.average_velocity(params, z_, t_, r_)
  u, dudt = jax.jit(mf.mean_flow_jvp, static_argnums=0)(u_fn, z, _T, _R, v)
  np.testing.assert_allclose(u, u_fn(z, _T, _R), rtol=1e-6)
  eps = 2.0**-8
  fd = (u_fn(z + eps * v, _T + eps, _R) - u_fn(z - eps * v, _T - eps, _R)) / (
      2 * eps)
  assert float(jnp.max(jnp.abs(dudt))) > 1.0, 'test needs a non-trivial u'
  np.testing.assert_allclose(dudt, fd, atol=2e-2, rtol=1e-3)
  # The check is sharp: dropping the t-tangent through h = t - r (a common
  # bug: conditioning on r instead of t - r) is off by O(1).
  _, no_h = jax.jvp(lambda z_, t_: method.apply(params, z_, t_, _T - _R),
                    (z, _T), (v, jnp.ones_like(_T)))
  assert float(jnp.max(jnp.abs(no_h - fd))) > 0.5


# ------------------------------------------------- 2. r = t is flow matching
def test_r_equals_t_reduces_to_flow_matching_exactly():
  kw = {'method.ratio_r_neq_t': 0.0, 'method.tr_rule': 'min',
        'method.time_dist': 'logit_normal', 'method.adaptive_p': 0.0}
  config, ds, method = _setup(**kw)
  fm_config = smoke_config('flow_matching', 'toy2d:gaussian',
                           **{'method.time_dist': 'logit_normal'})
  fm = load_method(fm_config, ds.spec)
  assert (fm.mcfg.p_mean, fm.mcfg.p_std) == (config.method.p_mean_t,
                                             config.method.p_std_t)
  params = _random_params(method)
  batch = ds.sample(jax.random.key(4), 64)
  key = jax.random.key(5)

  # Target: u_tgt = e - x exactly; prediction: the FM velocity exactly.
  x, t = batch['x'], jax.random.uniform(jax.random.key(6), (64,))
  e = jax.random.normal(jax.random.key(7), x.shape)
  z = (1 - t[:, None]) * x + t[:, None] * e
  u_fn = lambda z_, t_, r_: method.average_velocity(params, z_, t_, r_)
  u, u_tgt = mf.mean_flow_target(u_fn, z, t, t, e - x)
  np.testing.assert_array_equal(u_tgt, e - x)
  np.testing.assert_array_equal(u, fm.velocity(params, z, t))

  # Loss: with p = 0 the MeanFlow loss (per-sample sum) = dim x FM (mean),
  # bit for bit when run eagerly (under jit XLA may fuse the two graphs
  # differently: 1 ulp).
  loss, m = method.loss(params, batch, key, None)
  fm_loss, _ = fm.loss(params, batch, key, None)
  np.testing.assert_array_equal(loss, 2 * fm_loss)
  np.testing.assert_allclose(m['mse'], loss, rtol=1e-6)
  np.testing.assert_allclose(m['v_loss'], loss, rtol=1e-6)
  assert float(m['frac_r_neq_t']) == 0.0


# ---------------------------------------------- 3. closed form on `gaussian`
def _closed_form(spec):
  """Exact v(z, t), u(z, r, t), Φ_{t→r} for x ~ N(μ, Σ), e ~ N(0, I).

  z_t ~ N((1-t)μ, (1-t)²Σ + t²I). In Σ's eigenbasis (Σ = Q diag(λ) Qᵀ; I
  commutes with Σ) each direction is 1-D with S(t)² = (1-t)²λ + t²:
    v = E[e - x | z_t] = -μ + Q diag((t - (1-t)λ) / S²) Qᵀ (z - (1-t)μ),
    Φ_{t→r}(z) = (1-r)μ + Q diag(S(r) / S(t)) Qᵀ (z - (1-t)μ),
    u(z, r, t) = (z - Φ_{t→r}(z)) / (t - r)
               = -μ + Q diag((1 - S(r)/S(t)) / (t - r)) Qᵀ (z - (1-t)μ).
  Batched: z [B, 2], t, r [B].
  """
  lam, q = np.linalg.eigh(spec.cov)
  mu = jnp.asarray(spec.mean)
  lam, q = jnp.asarray(lam), jnp.asarray(q)
  s = lambda t: jnp.sqrt((1 - t[:, None])**2 * lam + t[:, None]**2)
  centred = lambda z, t: (z - (1 - t[:, None]) * mu) @ q  # eigen-coordinates

  def v(z, t):
    return -mu + ((t[:, None] - (1 - t[:, None]) * lam) / s(t)**2
                  * centred(z, t)) @ q.T

  def flow(z, t, r):
    return (1 - r[:, None]) * mu + (s(r) / s(t) * centred(z, t)) @ q.T

  def u(z, t, r):  # meanflow's u_fn(z, t, r) argument order
    gain = (1 - s(r) / s(t)) / (t - r)[:, None]
    return -mu + (gain * centred(z, t)) @ q.T

  return v, flow, u


def test_closed_form_flow_map_solves_the_ode():
  _, ds, _ = _setup()
  with jax.enable_x64(True):
    v, flow, _ = _closed_form(ds.spec)
    rhs = lambda tau, z: np.asarray(v(jnp.asarray(z)[None],
                                      jnp.array([tau])))[0]
    for z0, t, r in [((0.3, -1.2), 0.9, 0.1), ((2.0, 0.5), 1.0, 0.0),
                     ((-1.0, 1.0), 0.6, 0.45)]:
      sol = solve_ivp(rhs, (t, r), z0, rtol=1e-11, atol=1e-12)
      exact = flow(jnp.array([z0]), jnp.array([t]), jnp.array([r]))[0]
      np.testing.assert_allclose(sol.y[:, -1], exact, atol=1e-8)


def test_closed_form_satisfies_meanflow_identity():
  _, ds, _ = _setup()
  with jax.enable_x64(True):
    v, _, u = _closed_form(ds.spec)
    n = 256
    k1, k2, k3 = jax.random.split(jax.random.key(8), 3)
    a = jax.random.uniform(k1, (n,), jnp.float64, 0.02, 1.0)
    b = jax.random.uniform(k2, (n,), jnp.float64, 0.0, 1.0)
    t, r = jnp.maximum(a, b), jnp.minimum(a, b) * 0.99
    z = 2.0 * jax.random.normal(k3, (n, 2), jnp.float64)
    # The method's own JVP and target, fed the exact u and marginal v.
    u_val, u_tgt = mf.mean_flow_target(u, z, t, r, v(z, t))
    assert float(jnp.max(jnp.abs(u_val - u_tgt))) < 1e-10
    # Boundary u(z, t, t) = v(z, t) (limit r -> t).
    np.testing.assert_allclose(u(z, t, t - 1e-7), v(z, t), atol=1e-5)
    # A wrong u fails the identity clearly.
    wrong = lambda z_, t_, r_: 1.1 * u(z_, t_, r_)
    w_val, w_tgt = mf.mean_flow_target(wrong, z, t, r, v(z, t))
    assert float(jnp.sqrt(jnp.mean(jnp.square(w_val - w_tgt)))) > 0.05
    # So would the paper's tangent without the h = t - r path, (v, 1) on
    # (z, t) with the gap frozen.
    _, dudt_wrong = jax.jvp(lambda z_, t_: u(z_, t_, t_ - (t - r)), (z, t),
                            (v(z, t), jnp.ones_like(t)))
    assert float(jnp.max(jnp.abs(
        u_val - (v(z, t) - (t - r)[:, None] * dudt_wrong)))) > 0.05


@pytest.mark.parametrize('nfe', [1, 2, 4])
def test_sampler_with_exact_u_is_exact_at_any_nfe(nfe):
  """With the exact u, every K-step sampler maps e to μ + Σ^½ e (semigroup)."""
  _, ds, method = _setup()
  _, _, u = _closed_form(ds.spec)
  method.net = types.SimpleNamespace(
      apply=lambda params, x, t, h, y: u(x, t, t - h))
  key = jax.random.key(9)
  x = method.sample(None, key, 512, nfe=nfe)
  lam, q = np.linalg.eigh(ds.spec.cov)
  root = q @ np.diag(np.sqrt(lam)) @ q.T
  e = np.asarray(method.noise(key, 512))
  np.testing.assert_allclose(x, ds.spec.mean + e @ root.T, atol=2e-5)


# -------------------------------------------- 4. the sampler honours nfe
@pytest.mark.parametrize('nfe', [1, 2, 4])
def test_sampler_calls_backbone_exactly_nfe_times(nfe):
  _, ds, method = _setup()
  params = method.net.init(jax.random.key(0))
  x, t = jnp.zeros((16, 2)), jnp.zeros((16,))
  per_call = count_dots(jax.make_jaxpr(method.net.apply)(
      params, x, t, t, None).jaxpr)
  sampler = lambda p, k: method.sample(p, k, 16, nfe=nfe)
  dots = count_dots(jax.make_jaxpr(sampler)(params, jax.random.key(1)).jaxpr)
  assert per_call > 0 and dots == nfe * per_call
  # And by direct count: scan runs as a Python loop without jit.
  calls, apply = [], method.net.apply
  method.net = types.SimpleNamespace(
      apply=lambda *a: calls.append(a[2]) or apply(*a))
  with jax.disable_jit():
    sampler(params, jax.random.key(1))
  assert len(calls) == nfe
  np.testing.assert_allclose([float(c[0]) for c in calls],
                             np.linspace(1, 0, nfe + 1)[:-1], atol=1e-7)


# ------------------------------------------------- (t, r) sampler, CFG path
@pytest.mark.parametrize('rule', ['prefix', 'random'])
def test_time_sampler(rule):
  _, _, method = _setup(**{'method.mask_rule': rule,
                            'method.ratio_r_neq_t': 0.25})
  t, r = method.sample_tr(jax.random.key(10), 4096)
  assert bool(jnp.all((r <= t) & (r >= 0) & (t <= 1)))
  frac = float(jnp.mean(t != r))
  if rule == 'prefix':  # official: the first int(0.75 B) have r = t
    assert frac == 0.25 and bool(jnp.all(t[:3072] == r[:3072]))
  else:
    assert abs(frac - 0.25) < 0.03


def test_cfg_guided_velocity_and_labelled_loss():
  config = smoke_config('meanflow', 'toy2d:gaussian', **{
      'method.cfg_omega': 2.0, 'method.cfg_kappa': 0.0,
      'method.class_dropout': 0.25})
  spec = DataSpec(name='toy2d:labelled', shape=(2,), num_classes=3)
  method = load_method(config, spec)
  params = _random_params(method)
  b = 64
  z, v = jax.random.normal(jax.random.key(1), (2, b, 2))
  t = jnp.full((b,), 0.5)
  y = jnp.arange(b) % 3
  v_g, y_in = method.guided_velocity(params, z, t, v, y, jax.random.key(2))
  drop = y_in == 3
  assert 0 < int(drop.sum()) < b and bool(jnp.all(drop[:int(drop.sum())]))
  u_null = method.apply(params, z, t, 0.0, jnp.full((b,), 3))
  np.testing.assert_allclose(v_g[~drop], (2 * v - u_null)[~drop], atol=1e-6)
  np.testing.assert_array_equal(v_g[drop], v[drop])
  batch = {'x': z, 'y': y}
  loss, metrics = jax.jit(method.loss)(params, batch, jax.random.key(3), None)
  assert np.isfinite(float(loss)) and np.isfinite(float(metrics['v_loss']))
