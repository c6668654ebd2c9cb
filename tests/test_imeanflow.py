"""Maths tests of methods/imeanflow.py (docs/methods/imeanflow.md)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import method_setup, perturb, smoke_config
from test_meanflow import _closed_form  # meanflow.md §3, shared closed forms

from methods import imeanflow as imf
from methods import meanflow as mf
from onestep_bench.config_check import ConfigError
from onestep_bench.data import DataSpec
from onestep_bench.method import load_method

# Dyadic times: t ± ε and t - r ± ε are exact in float32 for ε = 2^-8.
_T = jnp.array([0.5, 0.75, 0.625, 0.375, 1.0, 0.25, 0.875, 0.5])
_R = jnp.array([0.25, 0.0, 0.5, 0.375, 0.0, 0.125, 0.5, 0.5])


def _setup(dataset='toy2d:gaussian', **kw):
  return method_setup('imeanflow', dataset, **kw)


def _params(method, seed=0, scale=0.3):
  """Perturbed {'u'[, 'v']} (zero-init output layers hide bugs).

  Eager, as every test here: eager ops are compiled once per shape and
  shared by the tests (batch 8 throughout), a jit compiles each function.
  """
  return perturb(method.init(jax.random.key(seed), None).params,
                 jax.random.key(seed + 1), scale)


def _draw(n, t, r, seed=0):
  e = jax.random.normal(jax.random.key(seed), (n, 2))
  return dict(t=t, r=r, e=e, omega=jnp.ones((n,)), drop=jnp.zeros((n,), bool))


# ------------------------------------------------ 1. JVP = finite differences
@pytest.mark.parametrize('time_cond', ['t_and_h', 'h_only'])
def test_jvp_and_compound_velocity_match_finite_differences(time_cond):
  _, _, method = _setup(**{'method.time_cond': time_cond})
  params = _params(method)
  z, v = jax.random.normal(jax.random.key(2), (2, 8, 2))

  def run(params, z, v):
    u_fn = lambda z_, t_, r_: method.average_velocity(params, z_, t_, r_)
    u, big_v = imf.compound_velocity(u_fn, z, _T, _R, v)
    eps = 2.0**-8
    fd = (u_fn(z + eps * v, _T + eps, _R)
          - u_fn(z - eps * v, _T - eps, _R)) / (2 * eps)
    return u, big_v, fd, u_fn(z, _T, _R), u_fn(z, _T - 0.125, _R - 0.125)

  u, big_v, fd, u_eager, shift = run(params, z, v)
  assert float(jnp.max(jnp.abs(fd))) > 0.5, 'test needs a non-trivial u'
  np.testing.assert_allclose(u, u_eager, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(big_v, u + (_T - _R)[:, None] * fd, atol=2e-2)
  if time_cond == 'h_only':  # the backbone sees h = t - r only
    np.testing.assert_allclose(shift, u, rtol=1e-5, atol=1e-5)


# ---------------------------------------------- 2. r = t is flow matching
def test_r_equals_t_reduces_to_flow_matching():
  _, ds, method = _setup()
  fm = load_method(smoke_config('flow_matching', 'toy2d:gaussian'), ds.spec)
  params = _params(method)
  x = ds.sample(jax.random.key(4), 8)['x']
  t = jax.random.uniform(jax.random.key(6), (8,))
  d = _draw(8, t, t)
  z = (1 - t[:, None]) * x + t[:, None] * d['e']
  terms = method.loss_terms(params, x, None, d)
  v_fm, v_aux = fm.velocity(params['u'], z, t), fm.velocity(params['v'], z, t)
  np.testing.assert_array_equal(terms['V'], terms['u'])  # (t - r) = 0
  np.testing.assert_allclose(terms['u'], v_fm, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(terms['v_g'], d['e'] - x)
  # Per-sample L_u = dim x flow matching's per-sample mean squared error.
  fm_err = jnp.mean(jnp.square(v_fm - (d['e'] - x)), -1)
  np.testing.assert_allclose(terms['loss_u'], 2 * fm_err, rtol=1e-5)
  # The aux net's L_v is flow matching of params['v'].
  np.testing.assert_allclose(
      terms['loss_v'], 2 * jnp.mean(jnp.square(v_aux - (d['e'] - x)), -1),
      rtol=1e-5)


# ------------------------------------ 3. the identity with MeanFlow's loss
def test_tangent_e_minus_x_is_meanflow_value_and_gradient():
  """MF is the v-loss with tangent e - x (Sec. 4.1): same value and grad."""
  _, ds, method = _setup()
  params = _params(method)
  x = ds.sample(jax.random.key(7), 8)['x']
  e = jax.random.normal(jax.random.key(8), x.shape)
  z = (1 - _T[:, None]) * x + _T[:, None] * e

  def losses(p):
    u_fn = lambda z_, t_, r_: method.average_velocity(p, z_, t_, r_)
    _, big_v = imf.compound_velocity(u_fn, z, _T, _R, e - x)
    u, tgt = mf.mean_flow_target(u_fn, z, _T, _R, e - x)
    return jnp.sum(jnp.square(big_v - (e - x))), jnp.sum(jnp.square(u - tgt))

  a, b = losses(params)
  ga = jax.grad(lambda q: losses(q)[0])(params)
  gb = jax.grad(lambda q: losses(q)[1])(params)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  assert float(optax_norm(ga['u'])) > 1e-2
  for la, lb in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
    np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-5)


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(tree)))


def test_compound_velocity_depends_on_z_only():
  """Two (x, e) pairs with the same z_t: iMF's V is the same, MF's is not.

  With the boundary head (v_θ = u_θ(z, t, t)), which has no L_v.
  """
  _, ds, method = _setup(**{'method.v_head': 'boundary'})
  params = _params(method)
  x = ds.sample(jax.random.key(9), 8)['x']
  e = jax.random.normal(jax.random.key(10), x.shape)
  delta = jax.random.normal(jax.random.key(11), x.shape)
  t_, r = _T.at[4].set(0.75), _R  # t = 1 leaves no (x, e) freedom
  tb = t_[:, None]
  x2, e2 = x + tb * delta, e - (1 - tb) * delta  # same z_t
  z, z2 = (1 - tb) * x + tb * e, (1 - tb) * x2 + tb * e2
  np.testing.assert_allclose(z, z2, atol=1e-6)

  def both(xx, ee):
    imf_v = method.loss_terms(params, xx, None, dict(_draw(8, t_, r), e=ee))
    u_fn = lambda z_, t_, r_: method.average_velocity(params, z_, t_, r_)
    zz = (1 - tb) * xx + tb * ee
    return (imf_v['V'], imf.compound_velocity(u_fn, zz, t_, r, ee - xx)[1],
            imf_v['loss_v'])

  (imf_a, mf_a, lv), (imf_b, mf_b, _) = both(x, e), both(x2, e2)
  assert set(params) == {'u'} and float(jnp.max(lv)) == 0.0
  np.testing.assert_allclose(imf_a, imf_b, atol=1e-5)
  assert float(jnp.max(jnp.abs(mf_a - mf_b))) > 0.05


# ---------------------------------------------- 4. closed form on `gaussian`
def test_exact_u_makes_compound_velocity_the_marginal_velocity():
  _, ds, _ = _setup()
  with jax.enable_x64(True):
    v, _, u = _closed_form(ds.spec)
    n = 4096
    k1, k2, k3, k4 = jax.random.split(jax.random.key(12), 4)
    a = jax.random.uniform(k1, (n,), jnp.float64, 0.02, 1.0)
    b = jax.random.uniform(k2, (n,), jnp.float64, 0.0, 1.0)
    t, r = jnp.maximum(a, b), jnp.minimum(a, b) * 0.99
    mu = jnp.asarray(ds.spec.mean)
    root = jnp.asarray(np.linalg.cholesky(ds.spec.cov))
    x = mu + jax.random.normal(k3, (n, 2), jnp.float64) @ root.T
    e = jax.random.normal(k4, (n, 2), jnp.float64)
    z = (1 - t[:, None]) * x + t[:, None] * e

    def run(z, t, r, x, e):
      vz = v(z, t)
      wrong = lambda z_, t_, r_: 1.2 * u(z_, t_, r_)
      big = imf.compound_velocity(u, z, t, r, vz)[1]
      big_w = imf.compound_velocity(wrong, z, t, r, vz)[1]
      # E[(V - (e - x)) φ(z_t)] for φ = v(z_t, t): the expected gradient
      # of the loss along a perturbation φ of u.
      g = lambda b: jnp.sum((b - (e - x)) * vz, -1)
      return jnp.max(jnp.abs(big - vz)), g(big), g(big_w)

    err, g, g_w = run(z, t, r, x, e)
    # The tangent is the exact v(z, t): V = v (MeanFlow identity, v form).
    assert float(err) < 1e-10
    # So the expected gradient vanishes (5 standard errors); not for a wrong
    # u, where E[V - (e - x) | z] = 0.2 v.
    se = lambda a: float(jnp.std(a)) / np.sqrt(n)
    assert abs(float(jnp.mean(g))) < 5 * se(g)
    assert abs(float(jnp.mean(g_w))) > 20 * se(g_w)


@pytest.mark.parametrize('nfe', [1, 4])
def test_sampler_with_exact_u_reproduces_the_data(nfe):
  _, ds, method = _setup()
  _, _, u = _closed_form(ds.spec)
  method.net = types.SimpleNamespace(
      apply=lambda params, x, t, h, y: u(x, t, t - h))
  key = jax.random.key(13)
  x = method.sample({'u': None}, key, 512, nfe=nfe)
  lam, q = np.linalg.eigh(ds.spec.cov)
  root = q @ np.diag(np.sqrt(lam)) @ q.T
  e = np.asarray(method.noise(key, 512))
  np.testing.assert_allclose(x, ds.spec.mean + e @ root.T, atol=2e-5)


# ----------------------------------------------------- time and ω samplers
def test_time_sampler_is_sorted_logit_normal_with_fm_prefix():
  t, r = imf.sample_tr(jax.random.key(14), 4000, -0.4, 1.0, 0.5)
  assert bool(jnp.all(t[:2000] == r[:2000]))
  assert bool(jnp.all(r[2000:] < t[2000:]))
  # t = max of two logit-normals: P(t <= s) = Φ((logit s + 0.4) / 1)².
  cdf = lambda s: scipy.stats.norm.cdf(np.log(s / (1 - s)) + 0.4)**2
  assert scipy.stats.kstest(np.asarray(t), cdf).pvalue > 1e-3
  assert scipy.stats.kstest(np.asarray(t), lambda s: cdf(s)**0.5).pvalue < 1e-6


@pytest.mark.parametrize('beta', [1.0, 2.0])
def test_omega_sampler_is_the_power_law(beta):
  w = np.asarray(imf.sample_omega(jax.random.key(15), 4000, beta, 8.0))
  assert w.min() >= 1.0 and w.max() <= 8.0
  if beta == 1.0:
    cdf = lambda s: np.log(s) / np.log(8.0)
  else:
    cdf = lambda s: (s**(1 - beta) - 1) / (8.0**(1 - beta) - 1)
  assert scipy.stats.kstest(w, cdf).pvalue > 1e-3


def test_guided_target_fixed_point_is_the_cfg_field():
  rng = np.random.default_rng(16)
  v_cond, v_u = rng.normal(size=(2, 6, 2))
  omega = np.array([1.0, 1.5, 2.0, 4.0, 7.5, 8.0])
  cfg = omega[:, None] * v_cond + (1 - omega[:, None]) * v_u
  np.testing.assert_allclose(imf.guided_target(v_cond, cfg, v_u, omega), cfg,
                             rtol=1e-12, atol=1e-12)
  # ω = 1 is the unguided target, and the map v -> E[target] contracts
  # (factor 1 - 1/ω) onto the CFG field from any start.
  np.testing.assert_array_equal(
      imf.guided_target(v_cond, v_u * 3, v_u, np.ones(6)), v_cond)
  vv = np.zeros_like(v_cond)
  for _ in range(300):
    vv = imf.guided_target(v_cond, vv, v_u, omega)
  np.testing.assert_allclose(vv, cfg, atol=1e-10)
  assert np.max(np.abs(imf.guided_target(v_cond, v_cond, v_u, omega)
                       - cfg)) > 0.1  # one step is not there yet


def _labelled(dropout=0.5):
  config = smoke_config('imeanflow', 'toy2d:gaussian', **{
      'model.guidance_embed': True, 'method.class_dropout': dropout})
  spec = DataSpec(name='toy2d:labelled', shape=(2,), num_classes=3)
  return load_method(config, spec)


def test_labelled_draw_dropout_prefix_and_omega():
  method = _labelled()
  assert method.cfg
  b = 8
  x = jax.random.normal(jax.random.key(17), (b, 2))
  d = method.draw(jax.random.key(18), {'x': x, 'y': jnp.arange(b) % 3})
  n_drop = int(d['drop'].sum())
  assert 0 < n_drop < b and bool(jnp.all(d['drop'][:n_drop]))  # a prefix
  assert 1 <= float(d['omega'].min()) < float(d['omega'].max()) <= 8
  d0 = method.draw(jax.random.key(18), {'x': x})  # no labels: no CFG
  assert float(jnp.max(d0['omega'])) == 1.0 and not bool(d0['drop'].any())


@pytest.mark.slow
def test_labelled_loss_guidance_and_dropout():
  """CFG target on the kept labels, v_t on the dropped; ω at sampling."""
  method = _labelled()
  params = _params(method)
  b = 8
  x = jax.random.normal(jax.random.key(17), (b, 2))
  y = jnp.arange(b) % 3
  d = method.draw(jax.random.key(18), {'x': x, 'y': y})
  drop = d['drop']
  t, e, w = d['t'], d['e'], d['omega']
  z = (1 - t[:, None]) * x + t[:, None] * e

  def run(p):
    v_c = method.instantaneous_velocity(p, z, t, y, w)
    v_u = method.instantaneous_velocity(p, z, t, jnp.full((b,), 3), 1.0)
    terms = method.loss_terms(p, x, y, d)
    return terms, imf.guided_target(e - x, v_c, v_u, w)

  terms, want = run(params)
  np.testing.assert_allclose(terms['v_g'][~drop], want[~drop], atol=1e-5)
  np.testing.assert_array_equal(terms['v_g'][drop], (e - x)[drop])
  assert float(jnp.max(jnp.abs(want - (e - x)))) > 1e-2
  assert np.isfinite(float(jnp.mean(terms['loss_u'] + terms['loss_v'])))
  # ω is an input at sampling: 1 NFE is x = e - u_θ(e, 1, h=1 | y, ω).
  key, ones = jax.random.key(20), jnp.ones((b,))
  x4 = method.sample(params, key, b, nfe=1, labels=y, guidance=4.0)
  u4 = method.average_velocity(params, method.noise(key, b), ones, 0 * ones,
                               y, 4.0)
  u1 = method.average_velocity(params, method.noise(key, b), ones, 0 * ones,
                               y, 1.0)
  np.testing.assert_allclose(x4, method.noise(key, b) - u4, atol=1e-5)
  assert float(jnp.max(jnp.abs(u4 - u1))) > 1e-3
  with pytest.raises(ValueError, match='trained on'):
    method.sample(params, key, b, nfe=1, guidance=9.0)


# ------------------------------------------------------- config validation
@pytest.mark.parametrize('key,value,match', [
    ('method.v_head', 'heads', 'v_head'),
    ('method.time_cond', 't', 'time_cond'),
    ('method.data_proportion', 1.5, 'data_proportion'),
    ('method.p_std', 0.0, 'p_std'),
    ('method.norm_eps', 0.0, 'norm_eps'),
    ('method.cfg_omega_max', 0.5, 'cfg_omega_max'),
    ('method.sample_omega', 9.0, 'sample_omega'),
    ('evals.main.guidance', 2.0, 'evals.main.guidance'),
])
def test_validate_config_names_the_key(key, value, match):
  config = smoke_config('imeanflow', 'toy2d:gaussian', **{key: value})
  with pytest.raises(ConfigError, match=match):
    imf.Method.validate_config(config)


def test_validate_config_labelled():
  config = smoke_config('imeanflow', 'digits',
                        **{'data.conditional': True})
  imf.Method.validate_config(smoke_config('imeanflow', 'digits'))
  with pytest.raises(ConfigError, match='guidance_embed'):
    imf.Method.validate_config(config)
  config.model.guidance_embed = True
  imf.Method.validate_config(config)
  config.evals.main.guidance = 9.0
  with pytest.raises(ConfigError, match=r'evals.main.guidance.*\[1, 8.0\]'):
    imf.Method.validate_config(config)

