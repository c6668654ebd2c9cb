"""Maths, sampler, config and teacher tests of methods/scm.py.

Spec: docs/methods/scm.md. Closed forms on `toy2d:gaussian`, x0 ~ N(μ, Σ),
Σ = Q diag(λ) Qᵀ. TrigFlow, x_t = cos t x0 + sin t z, z ~ N(0, σ_d² I): in
Σ's eigenbasis S(t)² = cos²t λ + σ_d² sin²t and
  dx_t/dt = −sin t μ + Q diag(S'/S) Qᵀ (x − cos t μ),
  S'/S = sin t cos t (σ_d² − λ) / S²,
  f*(x, t) = Φ_{t→0}(x) = μ + Q diag(√λ / S) Qᵀ (x − cos t μ).
Flow matching, z_s = (1 − s) x0 + s e (tests/test_meanflow.py):
  v(z, s) = −μ + Q diag((s − (1 − s) λ) / ((1 − s)² λ + s²)) Qᵀ (z − (1 − s) μ).
The two are derived independently; `scm.trig_velocity` must map one onto the
other exactly.
"""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_dots, method_setup, smoke_config

from methods import scd, scm
from onestep_bench import train
from onestep_bench.config_check import ConfigError

SD = 0.5


def _setup(**kw):
  if kw.get('method.variant') == 'scd':  # smoke sCD: a fresh teacher
    kw.setdefault('method.allow_untrained_teacher', True)
  return method_setup('scm', 'toy2d:gaussian', **kw)


_PARAMS = {}


def _params(method, scale=0.3):
  """N(0, scale²) weights of the (shared smoke) backbone's shapes, made once
  without compiling an init."""
  if not _PARAMS:
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(method.net.init, jax.random.key(0))
    _PARAMS['p'] = jax.tree.map(lambda s: jnp.asarray(
        scale * rng.standard_normal(s.shape), s.dtype), shapes)
  return _PARAMS['p']


def _closed_forms(spec, sd=SD):
  """(trig dx/dt, f*, F_cm*, FM v) for N(spec.mean, spec.cov); [B, 2]."""
  lam, q = (jnp.asarray(a) for a in np.linalg.eigh(spec.cov))
  mu = jnp.asarray(spec.mean)
  cos = lambda t: jnp.cos(t)[:, None]
  sin = lambda t: jnp.sin(t)[:, None]
  s2 = lambda t: cos(t)**2 * lam + sd**2 * sin(t)**2
  centred = lambda x, t: (x - cos(t) * mu) @ q

  def dxdt(x, t):
    gain = sin(t) * cos(t) * (sd**2 - lam) / s2(t)
    return -sin(t) * mu + (gain * centred(x, t)) @ q.T

  def f_star(x, t):
    return mu + (jnp.sqrt(lam / s2(t)) * centred(x, t)) @ q.T

  def big_f(x, t):  # f = cos t x − sin t σ_d F ⇔ F = (cos t x − f)/(σ_d sin t)
    return (cos(t) * x - f_star(x, t)) / (sd * sin(t))

  def v_fm(z, s):
    s_ = s[:, None]
    gain = (s_ - (1 - s_) * lam) / ((1 - s_)**2 * lam + s_**2)
    return -mu + (gain * ((z - (1 - s_) * mu) @ q)) @ q.T

  return dxdt, f_star, big_f, v_fm


def _points(n, seed, lo=0.05, hi=1.5, dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(seed))
  t = jax.random.uniform(k1, (n,), dtype, lo, hi)
  return 2.0 * jax.random.normal(k2, (n, 2), dtype), t


# --------------------------------------------------- 1. time conventions
def test_time_maps_and_conditional_velocity():
  tau = np.linspace(-5.0, 4.0, 64, dtype=np.float32)
  t = scm.proposal_time(tau, SD)
  np.testing.assert_allclose(jnp.tan(t), np.exp(tau) / SD, rtol=1e-5)
  s, lam, dlam = scm.fm_time(t, SD)
  # The sCM proposal is logit-normal in flow-matching time: s = sigmoid(τ).
  np.testing.assert_allclose(s, jax.nn.sigmoid(tau), atol=1e-6)
  np.testing.assert_allclose(scm.trig_time(s, SD), t, atol=1e-6)
  h = 1e-3  # λ' = dλ/dt
  np.testing.assert_allclose(dlam, (scm.fm_time(t + h, SD)[1] - scm.fm_time(
      t - h, SD)[1]) / (2 * h), atol=1e-4)
  np.testing.assert_allclose(scm.fm_time(np.array([0.0, np.pi / 2]), SD)[0],
                             [0.0, 1.0], atol=1e-6)  # data / noise ends
  # x_t = λ z_s for the same (x0, e), z = σ_d e; FM's e − x0 maps to
  # TrigFlow's cos t z − sin t x0 (sCT's dx_t/dt), and back.
  x0, e = np.random.default_rng(0).standard_normal((2, 64, 2), np.float32)
  c, si = jnp.cos(t)[:, None], jnp.sin(t)[:, None]
  x_t = c * x0 + si * SD * e
  np.testing.assert_allclose(
      x_t, lam[:, None] * ((1 - s[:, None]) * x0 + s[:, None] * e),
      atol=1e-5)
  got = scm.trig_velocity(x_t, t, e - x0, SD)
  np.testing.assert_allclose(got, c * SD * e - si * x0, atol=2e-5)
  np.testing.assert_allclose(scm.fm_velocity(x_t, t, got, SD), e - x0,
                             atol=5e-5)


# ---------------------------------------- 2. closed forms on `gaussian`
def test_fm_velocity_to_trigflow_exact_on_gaussian():
  _, ds, _ = _setup()
  with jax.enable_x64(True):
    dxdt, f_star, big_f, v_fm = _closed_forms(ds.spec)

    @jax.jit
    def run(x, t):
      s, lam, _ = scm.fm_time(t, SD)
      v = v_fm(x / lam[:, None], s)
      conv = scm.trig_velocity(x, t, v, SD)
      back = scm.fm_velocity(x, t, dxdt(x, t), SD)
      # f* is constant along the exact PF-ODE, and f*(x, 0) = x.
      df = jax.jvp(f_star, (x, t), (dxdt(x, t), jnp.ones_like(t)))[1]
      # A conversion with the wrong time map.
      bad = scm.trig_velocity(x, t, v_fm(x / lam[:, None], 2 * t / np.pi),
                              SD)
      # sCM's g = cos t df/dt for f* under the exact PF-ODE (the converted
      # FM velocity: the sCD path), with r = 1, r = 0.5, or a wrong F.
      tc = jnp.clip(t, 0.05, 1.5)
      xc = x * jnp.cos(tc)[:, None]
      sc, lamc, _ = scm.fm_time(tc, SD)
      vc = scm.trig_velocity(xc, tc, v_fm(xc / lamc[:, None], sc), SD)
      f_val, g = scm.scm_tangent(big_f, xc, tc, vc, 1.0, SD)
      g_half = scm.scm_tangent(big_f, xc, tc, vc, 0.5, SD)[1]
      g_bad = scm.scm_tangent(lambda x_, t_: 1.1 * big_f(x_, t_), xc, tc, vc,
                              1.0, SD)[1]
      return dict(conv=conv - dxdt(x, t), back=back - v, df=df,
                  f0=f_star(x, jnp.zeros_like(t)) - x, bad=bad - dxdt(x, t),
                  f_val=f_val - big_f(xc, tc), g=g,
                  g_n=scm.normalize_tangent(g, 'l2', 0.1), g_half=g_half,
                  g_bad=g_bad)
    out = {k: float(jnp.max(jnp.abs(v))) for k, v in run(
        *_points(256, 3, lo=0.0, hi=np.pi / 2, dtype=jnp.float64)).items()}
  for k in ('conv', 'back', 'df', 'f0', 'f_val', 'g', 'g_n'):
    assert out[k] < 1e-10, (k, out[k])
  for k in ('bad', 'g_half', 'g_bad'):  # each a clearly wrong variant
    assert out[k] > 0.05, (k, out[k])


def test_loss_vanishes_with_closed_form_networks():
  """The method's sCD loss path (teacher conversion, 'flow' F, JVP, norm)
  is 0 when the teacher is the exact FM velocity and the student the exact
  consistency function; a student off by 10% is not."""
  _, ds, method = _setup(**{'method.variant': 'scd',
                            'method.adaptive_weighting': False})
  with jax.enable_x64(True):
    _, _, big_f, v_fm = _closed_forms(ds.spec)

    def student_v(z, s, scale):  # backbone output giving F = scale · F*
      t = scm.trig_time(s, SD)
      x_t = scm.fm_time(t, SD)[1][:, None] * z
      return scm.fm_velocity(x_t, t, scale * SD * big_f(x_t, t), SD)

    method.net = types.SimpleNamespace(
        apply=lambda p, x, t, h, y: v_fm(x, t) if 'teacher' in p
        else student_v(x, t, p['scale']))
    batch = {'x': jnp.asarray(ds.sample(jax.random.key(5), 512)['x'],
                              jnp.float64)}
    loss_fn = jax.jit(lambda p: method.loss_terms(
        p, None, {'teacher': jnp.zeros(())}, batch, jax.random.key(6), None))
    loss, m = loss_fn({'scale': jnp.float64(1.0)})
    assert float(loss) < 1e-9 and float(m['mse']) < 1e-9
    assert float(loss_fn({'scale': jnp.float64(1.1)})[0]) > 1e-3


# ------------------------------------------ 3. JVP vs finite differences
def test_tangent_is_jvp_of_consistency_function():
  """g(r = 1) / cos t = d/dt f_θ(x_t, t) along x_t = cos t x0 + sin t z,
  for both parameterisations; f_θ(x, 0) = x exactly."""
  x0, z = np.random.default_rng(2).standard_normal((2, 8, 2), np.float32)
  z = SD * z
  t = jnp.array([0.25, 0.5, 0.75, 1.0, 1.25, 0.375, 0.625, 1.125])
  path = lambda u: jnp.cos(u)[:, None] * x0 + jnp.sin(u)[:, None] * z
  dxdt = jnp.cos(t)[:, None] * z - jnp.sin(t)[:, None] * x0
  eps = 2.0**-8
  for param in ('trigflow', 'flow'):
    _, _, method = _setup(**{'method.parameterization': param})
    params = _params(method)

    @jax.jit
    def run(params, method=method):
      fn = lambda x_, t_: method.trig_f(params, x_, t_)
      f = lambda u: method.consistency_fn(params, path(u), u)
      fd = (f(t + eps) - f(t - eps)) / (2 * eps)
      big_f, g1 = scm.scm_tangent(fn, path(t), t, dxdt, 1.0, SD)
      g0 = -jnp.cos(t)[:, None]**2 * (SD * big_f - dxdt)  # r = 0: no JVP
      zero = jnp.zeros_like(t)
      big_f0 = method.trig_f(params, x0, zero)
      return (fd, g1 / jnp.cos(t)[:, None], g0 / jnp.cos(t)[:, None],
              scm.consistency(big_f0, x0, zero, SD), big_f0)
    fd, df, df0, f0, big_f0 = run(params)
    assert float(jnp.max(jnp.abs(df))) > 0.5, 'test needs a non-trivial f'
    np.testing.assert_allclose(df, fd, atol=1e-2, rtol=1e-3, err_msg=param)
    # Sharp: the warm-up-weighted term (the JVP part) is O(1) here.
    assert float(jnp.max(jnp.abs(df0 - fd))) > 0.3, param
    assert float(jnp.max(jnp.abs(big_f0))) > 0.1
    np.testing.assert_array_equal(f0, x0, err_msg=param)  # boundary


# --------------------------------------------- 4. sampler honours nfe
def test_sampler_calls_backbone_nfe_times_on_its_grid():
  _, ds, method = _setup()
  params = _params(method)
  per_call = count_dots(jax.make_jaxpr(method.net.apply)(
      params, jnp.zeros((8, 2)), jnp.zeros(8), jnp.zeros(8), None).jaxpr)
  want = {1: [1.56454], 2: [1.56454, 1.1],
          3: [1.56454, math.atan(4.0), math.atan(1.0)],
          4: [1.56454, math.atan(6.0), math.atan(2.0), math.atan(2 / 3)]}
  for nfe, times in want.items():
    np.testing.assert_allclose(scm.sample_times(nfe, method.t_max, 1.1, SD),
                               times, atol=1e-5)
    if nfe != 3:  # traced (no compile): exactly nfe backbone passes
      sampler = lambda p, k, nfe=nfe: method.sample(p, k, 8, nfe=nfe)
      jaxpr = jax.make_jaxpr(sampler)(params, jax.random.key(1)).jaxpr
      assert per_call > 0 and count_dots(jaxpr) == nfe * per_call
  # The times the backbone sees at run time ('trigflow': backbone t = t),
  # with a cheap stand-in backbone.
  calls = []
  method.net = types.SimpleNamespace(apply=lambda p, x, t, h, y: (
      jax.debug.callback(lambda t_: calls.append(float(t_[0])), t),
      jnp.zeros_like(x))[1])
  x = jax.jit(lambda p, k: method.sample(p, k, 8, nfe=4))(
      params, jax.random.key(1))
  jax.effects_barrier()
  assert x.shape == (8, *ds.spec.shape)
  np.testing.assert_allclose(calls, want[4], atol=1e-5)


def test_multistep_sampler_with_exact_f_renoises_correctly():
  """With f*, every step's output is distributed as the data (Gaussian)."""
  _, ds, method = _setup()
  _, f_star, _, _ = _closed_forms(ds.spec)
  method.consistency_fn = lambda p, x, t, y=None: f_star(
      x, jnp.broadcast_to(t, x.shape[:1]))
  x = np.asarray(jax.jit(lambda k: method.sample(None, k, 50000, nfe=3))(
      jax.random.key(3)))
  np.testing.assert_allclose(x.mean(0), ds.spec.mean, atol=0.04)
  np.testing.assert_allclose(np.cov(x.T), ds.spec.cov, atol=0.06)


# ---------------------------------------------- 5. loss pieces, sCD init
def test_adaptive_weight_optimum_and_warmup():
  sq = np.array([0.5, 2.0, 1e-3])
  w_opt = -np.log(sq)  # argmin_w e^w sq − w: d/dw = e^w sq − 1 = 0
  np.testing.assert_allclose(np.exp(w_opt) * sq - 1, 0.0, atol=1e-12)
  np.testing.assert_allclose(scm.adaptive_loss(sq, w_opt), 1 + np.log(sq),
                             rtol=1e-6)
  np.testing.assert_array_equal(scm.adaptive_loss(sq, None), sq)
  np.testing.assert_array_equal(
      scm.weight_apply(scm.weight_init(8), jnp.ones(3)), 0.0)
  _, _, method = _setup(**{'train.num_steps': 700,
                           'method.tangent_warmup_frac': 0.1})
  np.testing.assert_allclose(
      [float(method.warmup_r(jnp.int32(s))) for s in (0, 35, 70, 500)],
      [0.0, 0.5, 1.0, 1.0])
  assert float(method.warmup_r(None)) == 1.0


def test_scd_student_starts_at_teacher():
  """θ = EMA = teacher at init ('flow' F = the teacher's TrigFlow velocity
  / σ_d), so the tangent is exactly 0 at the warm-up start (r = 0)."""
  _, _, method = _setup(**{'method.variant': 'scd'})
  assert method.param == 'flow' and method.scd
  teacher = jax.tree.map(np.asarray, _params(method))
  method._teacher = teacher  # pylint: disable=protected-access
  state = jax.jit(method.init)(jax.random.key(0), None)  # host callback
  for tree in (state.params, state.ema_params, state.extras['teacher']):
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(teacher),
                    strict=True):
      np.testing.assert_array_equal(a, b)
  assert set(state.extras) == {'teacher', 'weight', 'weight_opt'}
  x, t = _points(32, 7)

  @jax.jit
  def run(p):
    fn = lambda x_, t_: method.trig_f(p, x_, t_)
    v = method.teacher_velocity(p, x, t)
    return SD * fn(x, t), v, scm.scm_tangent(fn, x, t, v, 0.0, SD)[1]
  sd_f, v, g = run(state.params)
  np.testing.assert_allclose(sd_f, v, atol=1e-5)
  assert float(jnp.max(jnp.abs(v))) > 0.1
  assert float(jnp.max(jnp.abs(g))) < 1e-5
  _, _, sct = _setup()
  assert sct.param == 'trigflow' and sct.upstream_compute() == {}
  assert 'teacher' not in jax.eval_shape(sct.init, jax.random.key(0),
                                         None).extras


# ------------------------------------------------------ 6. config checks
@pytest.mark.parametrize('kw, key', [
    ({'method.variant': 'scx'}, 'method.variant'),
    ({'method.variant': 'scd', 'method.parameterization': 'trigflow'},
     'method.parameterization'),
    ({'method.variant': 'scd', 'method.allow_untrained_teacher': False},
     'method.teacher_workdir'),
    ({'method.mid_t': 1.6}, 'method.mid_t'),
    ({'method.tangent_c': 0.0}, 'method.tangent_c'),
    ({'method.tangent_norm': 'max'}, 'method.tangent_norm'),
    ({'method.weight_dim': 7}, 'method.weight_dim'),
    ({'method.sigma_data': 0.0}, 'method.sigma_data'),
    ({'method.tangent_warmup_frac': 1.5}, 'method.tangent_warmup_frac'),
])
def test_bad_config_names_key(kw, key):
  config = smoke_config('scm', 'toy2d:gaussian', **kw)
  with pytest.raises(ConfigError) as err:
    scm.Method.validate_config(config)
  assert err.value.key == key and 'Fix' in str(err.value)


def test_good_configs_and_teacher_entry():
  for kw in ({}, {'method.tangent_norm': 'none', 'method.tangent_c': 0.0}):
    scm.Method.validate_config(smoke_config('scm', 'toy2d:gaussian', **kw))
  scm.Method.validate_config(smoke_config('scd', 'toy2d:gaussian'))
  # Only the sCD entry names a teacher, so sCT never trains one.
  assert not hasattr(scm, 'TEACHER_METHOD')
  assert scd.TEACHER_METHOD == 'flow_matching' and scd.Method is scm.Method
  assert scd.get_config().variant == 'scd'
  with pytest.raises(scm.TeacherError, match='make bench METHOD=flow_'):
    _setup(**{'method.variant': 'scd',
              'method.allow_untrained_teacher': False})


# ------------------------------------------------- 7. teacher (slow)
@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('fm_teacher'))
  train.train_and_evaluate(smoke_config('flow_matching'), workdir)
  return workdir


@pytest.mark.slow
def test_scd_trains_from_teacher_run_and_counts_it(teacher_dir, tmp_path):
  from onestep_bench import runs  # pylint: disable=g-import-not-at-top
  config = smoke_config('scm', **{'method.variant': 'scd',
                                  'method.teacher_workdir': teacher_dir})
  summary = train.train_and_evaluate(config, str(tmp_path / 'scd'))
  teacher_flops = runs.read_summary(teacher_dir)['total_train_flops']
  assert summary['upstream_flops'] == {f'teacher:{teacher_dir}':
                                       teacher_flops}
  assert summary['total_train_flops'] == pytest.approx(
      summary['train_flops'] + teacher_flops)
  assert [r['nfe'] for r in summary['evals']] == [1, 2]
  # The run's initial student is the teacher's EMA, bit for bit.
  cfg, ds, m = method_setup('scm', 'toy2d:8gaussians', **{
      'method.variant': 'scd', 'method.teacher_workdir': teacher_dir})
  del cfg, ds
  state = jax.jit(m.init)(jax.random.key(0), None)
  want = runs.load_ema_params(teacher_dir, method='flow_matching',
                              config=m.config, spec=m.spec)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # sCT ignores the teacher dir that experiments/bench.py fills in.
  sct = smoke_config('scm', **{'method.teacher_workdir': teacher_dir})
  s_sct = train.train_and_evaluate(sct, str(tmp_path / 'sct'))
  assert s_sct['upstream_flops'] == {}
  with pytest.raises(scm.TeacherError, match='does not exist'):
    method_setup('scm', 'toy2d:8gaussians', **{
        'method.variant': 'scd',
        'method.teacher_workdir': str(tmp_path / 'none')})
