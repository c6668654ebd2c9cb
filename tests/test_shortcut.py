"""Maths tests of methods/shortcut.py (docs/methods/shortcut.md)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import method_setup, smoke_config

from methods import shortcut as sc
from onestep_bench import config_check as cc
from onestep_bench.data import DataSpec
from onestep_bench.method import TrainState, load_method

K = 7  # log2 of the default max_steps = 128


def _setup(dataset='toy2d:gaussian', **kw):
  return method_setup('shortcut', dataset, **kw)


def _closed_form(spec):
  """Exact v(z, t) and shortcut s*(z, t, d) for x ~ N(μ, Σ), e ~ N(0, I).

  In Σ's eigenbasis, S(t)² = (1-t)²λ + t² per direction (as in
  tests/test_meanflow.py):
    v = -μ + Q diag((t - (1-t)λ) / S²) Qᵀ (z - (1-t)μ),
    Φ_{t→r}(z) = (1-r)μ + Q diag(S(r)/S(t)) Qᵀ (z - (1-t)μ),
    s*(z, t, d) = (z - Φ_{t→t-d}(z)) / d   (the exact d-step velocity).
  """
  lam, q = np.linalg.eigh(spec.cov)
  mu, lam, q = (jnp.asarray(a, jnp.float32) for a in (spec.mean, lam, q))
  sd = lambda t: jnp.sqrt((1 - t[:, None])**2 * lam + t[:, None]**2)
  centred = lambda z, t: (z - (1 - t[:, None]) * mu) @ q

  def v(z, t):
    return -mu + ((t[:, None] - (1 - t[:, None]) * lam) / sd(t)**2
                  * centred(z, t)) @ q.T

  def s(z, t, d):
    gain = (1 - sd(t - d) / sd(t)) / d[:, None]
    return -mu + (gain * centred(z, t)) @ q.T

  return v, s


def _exact_net(spec, mode='log2', flow='v'):
  """Stand-in backbone: s*(x, t, d) at level d = 2^-k, decoded from h.

  flow='v': the flow level (k = K) is the instantaneous velocity (what flow
  matching learns); flow='shortcut': it is s*(·, 1/M) (every level exact).
  flow='v_everywhere': v at every level (the wrong, flow-only model).
  """
  v, s = _closed_form(spec)

  def apply(params, x, t, h, y=None):
    del params, y
    if mode == 'log2':
      is_flow, d = h >= K, jnp.exp2(-h)
    else:
      is_flow, d = h == 0, h
    d = jnp.where(is_flow, 2.0**-K, d)
    if flow == 'v_everywhere':
      return v(x, t)
    exact = s(x, t, d)
    return jnp.where(is_flow[:, None], v(x, t), exact) if flow == 'v' else (
        exact)

  return types.SimpleNamespace(apply=apply)


def _linear_net(label_gain=0.0):
  """s = a · (x (1 + t) + 0.1 h + label_gain · y): hand-computable."""
  def apply(params, x, t, h, y=None):
    out = x * (1 + t[:, None]) + 0.1 * h[:, None]
    if y is not None:
      out = out + label_gain * y[:, None].astype(jnp.float32)
    return params['a'] * out
  return types.SimpleNamespace(apply=apply)


def _batch(spec, n, seed, num_classes=0):
  """n draws of N(μ, Σ) made with numpy (eager jax.random would compile)."""
  rng = np.random.default_rng(seed)
  root = np.linalg.cholesky(np.asarray(spec.cov, np.float64))
  x = np.asarray(spec.mean) + rng.normal(size=(n, 2)) @ root.T
  out = {'x': jnp.asarray(x, jnp.float32)}
  if num_classes:
    out['y'] = jnp.asarray(rng.integers(0, num_classes, n), jnp.int32)
  return out


def _state(ema):
  return TrainState(step=jnp.zeros((), jnp.int32), params=None,
                    opt_state=None, ema_params=ema, extras={})



# ------------------------------------------------ 1. levels, d and t grids
def test_bootstrap_fraction_levels_and_time_grids():
  _, ds, method = _setup()
  n = 4096
  nb = method.n_bootstrap(n)
  assert nb == 1024  # official B // bootstrap_every with 1/4
  j = sc.bootstrap_exponents(nb, K)
  per = nb // K  # 146 rows per level, official order K-1 .. 0, rest at 0
  np.testing.assert_array_equal(j[:K * per],
                                np.repeat(np.arange(K - 1, -1, -1), per))
  assert np.all(j[K * per:] == 0) and nb - K * per == 2
  method.net = _linear_net()
  batch = _batch(ds.spec, n, 1)
  r = jax.jit(lambda b, k: method.targets(None, {'a': 1.0}, b, k))(
      batch, jax.random.key(0))
  t_b, t_f = np.asarray(r['t'][:nb]), np.asarray(r['t'][nb:])
  # The model inputs: bootstrap rows at k = j, flow rows at k = K.
  np.testing.assert_array_equal(r['k'][:nb], j)
  assert np.all(np.asarray(r['k'][nb:]) == K)
  # t on the grid of the big step 2^-j: t 2^j ∈ {1, ..., 2^j}.
  grid = t_b * 2.0**j
  np.testing.assert_array_equal(grid, np.round(grid))
  assert grid.min() >= 1 and np.all(grid <= 2.0**j)
  assert np.all(t_b[j == 0] == 1.0)
  # ... and uniform on it (level j = 2: 146 rows over 4 points).
  counts = np.bincount(grid[j == 2].astype(int), minlength=5)[1:]
  assert counts.sum() == per and np.all(np.abs(counts / per - 0.25) < 0.1)
  # Flow-matching rows: t ∈ {1/128, ..., 1}, ~uniform.
  fm = t_f * 128
  np.testing.assert_array_equal(fm, np.round(fm))
  assert fm.min() >= 1 and fm.max() <= 128 and t_f.size == n - nb
  assert abs(t_f.mean() - 129 / 256) < 0.02


def test_step_input_embeddings():
  k = jnp.arange(K + 1)
  np.testing.assert_array_equal(sc.step_input(k, K, 'log2'), np.arange(8.0))
  np.testing.assert_array_equal(sc.step_input(k, K, 'd'),
                                [1, .5, .25, .125, 2**-4, 2**-5, 2**-6, 0])


# ------------------------------------- 2. flow rows are flow matching
def test_flow_rows_equal_flow_matching_loss():
  """d_embed='d' (flow at h = 0) + uniform t: flow_matching's loss."""
  _, ds, method = _setup(**{'method.d_embed': 'd',
                            'method.fm_time': 'uniform'})
  fm = load_method(smoke_config('flow_matching', 'toy2d:gaussian'), ds.spec)
  assert fm.mcfg.time_dist == 'uniform'
  # One stand-in net for both (it reads h, so a wrong flow input shows).
  method.net = fm.net = _linear_net()
  batch = _batch(ds.spec, 64, 4)
  nb = method.n_bootstrap(64)
  params = {'a': 0.9}

  @jax.jit
  def run(key):
    return (method.loss(params, batch, key, _state({'a': 1.1})),
            fm.loss(params, {'x': batch['x'][nb:]}, jax.random.fold_in(
                key, 1), None)[0])

  (loss, m), fm_loss = run(jax.random.key(5))
  np.testing.assert_allclose(m['loss_flow'], fm_loss, rtol=1e-6)
  # Total = row-weighted mean of the two groups.
  np.testing.assert_allclose(
      loss, (nb * m['loss_bootstrap'] + (64 - nb) * m['loss_flow']) / 64,
      rtol=1e-6)
  assert float(m['frac_bootstrap']) == 0.25
  assert float(m['loss_bootstrap']) > 0


# --------------------------------------- 3. self-consistency target by hand
def test_self_consistency_target_by_hand_with_ema_params():
  _, ds, method = _setup()
  method.net = _linear_net()
  batch = _batch(ds.spec, 64, 2)
  params, ema = {'a': 1.0}, {'a': 2.0}

  @jax.jit
  def run(key):
    r = method.targets(params, ema, batch, key)
    return (method.draw(key, 64, (2,)), r,
            method.shortcut(params, r['z'], r['t'], r['k']),
            method.loss(params, batch, key, _state(ema)))

  d, r, pred, (loss, m) = run(jax.random.key(3))
  nb = method.n_bootstrap(64)
  x = np.asarray(batch['x'][:nb], np.float64)
  t, j = np.asarray(d['t_b'], np.float64), np.asarray(d['j'])
  z = (1 - t[:, None]) * x + t[:, None] * np.asarray(d['e_b'])
  h = (j + 1.0)[:, None]  # half step 2^-(j+1), 'log2' input j + 1
  dh = 2.0**-(j + 1.0)
  f = lambda z_, t_: 2.0 * (z_ * (1 + t_[:, None]) + 0.1 * h)  # EMA a = 2
  s1 = f(z, t)
  z2 = np.clip(z - dh[:, None] * s1, -4, 4)
  s2 = f(z2, t - dh)
  want = np.clip((s1 + s2) / 2, -4, 4)
  clipped = np.abs((s1 + s2) / 2) > 4
  assert 0 < clipped.mean() < 0.9, 'test needs clipped and free targets'
  np.testing.assert_allclose(r['target'][:nb], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(r['z'][:nb], z, rtol=1e-6, atol=1e-6)
  # Flow rows: e - x at the same draws.
  x_f = np.asarray(batch['x'][nb:])
  np.testing.assert_allclose(r['target'][nb:], np.asarray(d['e_f']) - x_f,
                             atol=1e-6)
  # The loss regresses s_θ (a = 1) on these targets, made with
  # state.ema_params (a = 2; with params the hand values above would fail).
  np.testing.assert_allclose(loss, jnp.mean(jnp.square(pred - r['target'])),
                             rtol=1e-6)
  np.testing.assert_allclose(m['v_target_rms'],
                             np.sqrt(np.mean(want**2)), rtol=1e-5)


@pytest.mark.slow
def test_no_gradient_through_the_target():
  """bootstrap_ema=False: targets from θ, but under stop-gradient."""
  _, ds, method = _setup(**{'method.bootstrap_ema': False})
  method.net = _linear_net()
  batch = _batch(ds.spec, 64, 2)
  a = 0.7

  @jax.jit
  def run(key):
    g = jax.grad(lambda p: method.loss(p, batch, key, None)[0])({'a': a})
    r = method.targets(None, {'a': a}, batch, key)
    f = method.shortcut({'a': 1.0}, r['z'], r['t'], r['k'])
    return g['a'], jnp.mean(2 * (a * f - r['target']) * f)

  g, want = run(jax.random.key(3))
  np.testing.assert_allclose(g, want, rtol=1e-5)


# ------------------------------------------ 4. exact model: consistency
@pytest.mark.parametrize('mode', ['log2', pytest.param('d', marks=(
    pytest.mark.slow))])
def test_exact_shortcut_is_self_consistent(mode):
  """s*(z, t, 2d) = (s*(z, t, d) + s*(z', t - d, d)) / 2 (eq. 4), so the
  bootstrap loss of the exact shortcut vanishes; a flow-only model fails."""
  _, ds, method = _setup(**{'method.clip': 0.0, 'method.d_embed': mode})
  batch = _batch(ds.spec, 1024, 6)
  nb = method.n_bootstrap(1024)
  _, s = _closed_form(ds.spec)

  @jax.jit
  def run(key):  # one trace: the net is swapped while tracing
    out = {}
    for flow in ('shortcut', 'v', 'v_everywhere'):
      method.net = _exact_net(ds.spec, mode, flow)
      r = method.targets(None, None, batch, key)
      pred = method.shortcut(None, r['z'], r['t'], r['k'])
      exact = s(r['z'][:nb], r['t'][:nb],
                jnp.exp2(-r['k'][:nb].astype(jnp.float32)))
      out[flow] = (r['target'][:nb], pred[:nb], exact)
    return out

  out = run(jax.random.key(7))
  small = sc.bootstrap_exponents(nb, K) == K - 1
  # Every level exact: the targets are s*(z, t, 2d), the loss vanishes.
  target, pred, exact = out['shortcut']
  np.testing.assert_allclose(target, exact, atol=3e-5)
  assert float(jnp.mean(jnp.square(pred - target))) < 1e-9
  # Flow level = the instantaneous v (what FM learns): only the smallest
  # big step (its half steps are the flow level) is off, by O(1/M).
  target, _, exact = out['v']
  err = np.max(np.abs(np.asarray(target) - np.asarray(exact)), -1)
  assert err[~small].max() < 3e-5 and 1e-5 < err[small].max() < 0.05
  # The wrong model (v at every d) violates eq. 4 clearly.
  target, pred, _ = out['v_everywhere']
  assert float(jnp.mean(jnp.square(pred - target))) > 0.01


# ---------------------------------------------------------- 5. the sampler
def test_sampler_with_exact_shortcut_is_exact():
  """With s*, d = 1/nfe Euler steps map e to μ + Σ^½ e (the flow map), so
  1 NFE already draws the target law; the flow-only model collapses."""
  _, ds, method = _setup()
  key, n = jax.random.key(9), 4096

  @jax.jit
  def run(key):
    method.net = _exact_net(ds.spec, 'log2', flow='v')
    out = [method.sample(None, key, n, nfe=k) for k in (1, 2, 4)]
    method.net = _exact_net(ds.spec, 'log2', flow='v_everywhere')
    return out, method.sample(None, key, n, nfe=1), method.noise(key, n)

  xs, x_flow, e = run(key)
  lam, q = np.linalg.eigh(ds.spec.cov)
  root = q @ np.diag(np.sqrt(lam)) @ q.T
  for x in xs:
    np.testing.assert_allclose(x, ds.spec.mean + e @ root.T, atol=3e-5)
  x = np.asarray(xs[0])  # 1 NFE: the mean and covariance of N(μ, Σ)
  np.testing.assert_allclose(x.mean(0), ds.spec.mean, atol=0.08)
  np.testing.assert_allclose(np.cov(x.T), ds.spec.cov, atol=0.12)
  # Sharp: v at every d gives x = e - v(e, 1) = μ in one step.
  np.testing.assert_allclose(x_flow, np.broadcast_to(ds.spec.mean, x.shape),
                             atol=1e-5)


def test_sampler_times_and_step_inputs():
  """nfe steps at t_i = 1 - i/nfe with the step input of d = 1/nfe."""
  _, _, method = _setup()
  assert method.supported_nfe == (1, 2, 4, 8, 16, 32, 64, 128)
  # A net whose output encodes (t, h): z_nfe = e - d Σ_i (t_i² + 3 h_i).
  code = types.SimpleNamespace(
      apply=lambda p, x, t, h, y: jnp.broadcast_to(
          (t**2 + 3 * h)[:, None], x.shape))
  # The flow level (h = K, or 0 with 'd') at every step of nfe = M = 128:
  # a net that moves z only off that input leaves the noise as is.
  off_flow = lambda flow_h: types.SimpleNamespace(
      apply=lambda p, x, t, h, y: x * (h != flow_h)[:, None])
  key = jax.random.key(1)

  @jax.jit
  def run(key):
    out = {}
    for mode, flow_h in (('log2', K), ('d', 0.0)):
      method.mcfg.d_embed = mode
      method.net = code
      out[mode] = method.sample(None, key, 4, nfe=4)
      method.net = off_flow(flow_h)
      out[mode + '128'] = method.sample(None, key, 4, nfe=128)
      out[mode + '64'] = method.sample(None, key, 4, nfe=64)
    return out, method.noise(key, 4)

  out, e = run(key)
  ts = 1 - np.arange(4) / 4
  for mode, h in (('log2', 2.0), ('d', 0.25)):
    np.testing.assert_allclose(out[mode], e - np.sum(ts**2 + 3 * h) / 4,
                               rtol=1e-6)
    np.testing.assert_array_equal(out[mode + '128'], e)
    assert float(np.max(np.abs(out[mode + '64'] - e))) > 0.1


# --------------------------------------------------------------- 6. CFG
def test_bootstrap_cfg_targets_labels_and_guided_sampler():
  config = smoke_config('shortcut', 'toy2d:gaussian', **{
      'method.class_dropout': 0.5, 'method.cfg_scale': 1.5})
  spec = DataSpec(name='toy2d:labelled', shape=(2,), num_classes=3)
  method = load_method(config, spec)
  method.net = _linear_net(label_gain=0.5)
  n = 1024
  batch = _batch(DataSpec(name='toy2d:gaussian', shape=(2,),
                          mean=np.zeros(2), cov=np.eye(2)), n, 1, 3)
  labels = jnp.array([0, 1, 2, 1])

  @jax.jit
  def run(key, key_s):
    return (method.targets(None, {'a': 1.0}, batch, key),
            method.sample({'a': 1.0}, key_s, 4, nfe=1, labels=labels,
                          guidance=2.0), method.noise(key_s, 4))

  key = jax.random.key(3)
  r, out, e = run(jax.random.key(2), key)
  nb = method.n_bootstrap(n)
  n_cfg = nb // K
  y = np.asarray(batch['y'])
  np.testing.assert_array_equal(r['y'][:nb], y[:nb])  # never dropped
  drop = np.asarray(r['y'][nb:]) == 3
  assert abs(drop.mean() - 0.5) < 0.06
  np.testing.assert_array_equal(np.asarray(r['y'][nb:])[~drop], y[nb:][~drop])
  # Hand computation: s = x (1 + t) + 0.1 h + 0.5 y; guided rows [:n_cfg]
  # use s_∅ + w (s_y - s_∅) = x (1 + t) + 0.1 h + 0.5 (3 + w (y - 3)).
  z, t = np.asarray(r['z'][:nb], np.float64), np.asarray(r['t'][:nb])
  j = sc.bootstrap_exponents(nb, K)
  lab = y[:nb].astype(np.float64)
  lab[:n_cfg] = 3 + 1.5 * (lab[:n_cfg] - 3)
  assert np.all(j[:n_cfg] == K - 1)  # the group whose half steps are flow
  dh = 2.0**-(j + 1.0)
  f = lambda z_, t_: z_ * (1 + t_[:, None]) + 0.1 * (j + 1.0)[:, None] + (
      0.5 * lab[:, None])
  s1 = f(z, t)
  s2 = f(np.clip(z - dh[:, None] * s1, -4, 4), t - dh)
  np.testing.assert_allclose(r['target'][:nb], np.clip((s1 + s2) / 2, -4, 4),
                             rtol=1e-5, atol=1e-5)
  # Sampler CFG (official helper_inference): s_∅ + w (s_y - s_∅).
  h0 = 0.0  # log2 input of d = 1
  s = e * 2 + 0.1 * h0 + 0.5 * (3 + 2.0 * (np.asarray(labels) - 3))[:, None]
  np.testing.assert_allclose(out, e - s, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='labels'):
    method.sample({'a': 1.0}, key, 4, nfe=1, guidance=2.0)


# ------------------------------------------------------ 7. validate_config
@pytest.mark.parametrize('kw,key', [
    ({'method.max_steps': 100}, 'method.max_steps'),
    ({'method.max_steps': 1}, 'method.max_steps'),
    ({'method.bootstrap_fraction': 0.0}, 'method.bootstrap_fraction'),
    ({'method.bootstrap_fraction': 1.0}, 'method.bootstrap_fraction'),
    ({'method.bootstrap_fraction': 0.05}, 'method.bootstrap_fraction'),
    ({'method.d_embed': 'log'}, 'method.d_embed'),
    ({'method.fm_time': 'cont'}, 'method.fm_time'),
    ({'method.clip': -1.0}, 'method.clip'),
    ({'evals.main.nfe': (3, 100)}, 'evals.main.nfe'),
    ({'method.max_steps': 4, 'evals.main.nfe': (8,)}, 'evals.main.nfe'),
])
def test_validate_config_refuses(kw, key):
  config = smoke_config('shortcut', 'toy2d:gaussian', **kw)
  with pytest.raises(cc.ConfigError) as err:
    sc.Method.validate_config(config)
  assert err.value.key == key
  assert 'Fix:' in str(err.value)


def test_validate_config_accepts_defaults():
  sc.Method.validate_config(smoke_config('shortcut', 'toy2d:gaussian'))
  # 0.05 of the bench batch (1024) is 51 rows >= 7 levels: fine there.
  sc.Method.validate_config(smoke_config(
      'shortcut', 'toy2d:gaussian', **{'train.batch_size': 1024,
                                       'method.bootstrap_fraction': 0.05}))
