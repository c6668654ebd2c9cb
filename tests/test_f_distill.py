"""Maths, teacher-restore and training-step tests of methods/f_distill.py.

Spec: docs/methods/f_distill.md §3.10 (sanity tests 1, 2, 5, 6), §3.11
(v -> x0 conversion), plus the teacher contract (restore round trip, clear
errors).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import smoke_config

from methods import f_distill as fd
from methods import flow_matching
from onestep_bench import checkpoint, data, train
from onestep_bench.method import UnsupportedNFEError, load_method

ALL_F = sorted(fd.F_DIVERGENCES) + ['alpha']
_R = np.geomspace(0.1, 20.0, 41).astype(np.float32)


def _untrained(**kw):
  """Smoke f_distill config with a freshly initialised teacher."""
  return smoke_config('f_distill', **{'method.allow_untrained_teacher': True,
                                      **kw})


def _method(config):
  ds = data.build(config.data)
  return ds, load_method(config, ds.spec)


# -------------------------------------------------------------- presets
@pytest.mark.parametrize('name', sorted(fd.PRESETS))
def test_fastgen_presets_validate(name):
  """Each FastGen preset names get_config keys and passes validate_config."""
  preset = fd.PRESETS[name]
  assert set(preset) <= set(fd.get_config()), (
      set(preset) - set(fd.get_config()))
  config = smoke_config('f_distill', 'digits',
                        **{'method.allow_untrained_teacher': True})
  config.method.update(preset)
  fd.Method.validate_config(config)
  for k, v in preset.items():
    assert config.method[k] == v, k


# ---------------------------------------------------------------- maths
@pytest.mark.parametrize('name', ALL_F)
@pytest.mark.parametrize('alpha', [0.5])
def test_h_is_f_second_derivative_times_r_squared(name, alpha):
  f, h = fd.f_divergence(name, alpha)
  f2 = jax.vmap(jax.grad(jax.grad(f)))(jnp.asarray(_R))
  np.testing.assert_allclose(h(jnp.asarray(_R)) * np.ones_like(_R),
                             f2 * _R**2, rtol=2e-3)
  assert abs(float(f(jnp.float32(1.0)))) < 1e-6, 'f(1) = 0'
  assert np.all(f2 > 0), 'f convex'
  assert np.all(np.asarray(h(jnp.asarray(_R))) >= 0)


@pytest.mark.parametrize('alpha', [-1.0, 0.25, 0.75, 2.0])
def test_alpha_divergence_family(alpha):
  f, h = fd.f_divergence('alpha', alpha)
  f2 = jax.vmap(jax.grad(jax.grad(f)))(jnp.asarray(_R))
  np.testing.assert_allclose(h(jnp.asarray(_R)), f2 * _R**2, rtol=2e-3)
  np.testing.assert_allclose(h(jnp.asarray(_R)), _R**alpha, rtol=1e-5)
  with pytest.raises(ValueError, match='rkl'):
    fd.f_divergence('alpha', 1.0)


def test_unknown_f_raises():
  with pytest.raises(ValueError, match='js'):
    fd.f_divergence('tv')


def test_reverse_kl_weight_is_constant():
  """RKL: h ≡ 1 whatever r (= DMD), up to the stage-2 epsilon (§3.10.6)."""
  r = jnp.asarray(np.random.default_rng(0).uniform(0.1, 20, 64), jnp.float32)
  h = fd.f_weight(r, fd.f_divergence('rkl')[1])
  np.testing.assert_allclose(h, 1.0, rtol=2e-6)


@pytest.mark.parametrize('name', ['js', 'kl', 'sh', 'jf', 'sf', 'neyman'])
def test_stage2_normalisation_has_unit_mean(name):
  r = jnp.asarray(np.random.default_rng(1).uniform(0.1, 20, 256), jnp.float32)
  h = fd.f_weight(r, fd.f_divergence(name)[1])
  assert float(jnp.mean(h)) == pytest.approx(1.0, abs=1e-5)
  # Monotone like h(r): larger r (teacher-likely) never gets less weight
  # for the mode-covering divergences.
  order = np.argsort(np.asarray(r))
  diffs = np.diff(np.asarray(h)[order])
  if name in ('js', 'kl', 'sh', 'jf'):
    assert np.all(diffs >= -1e-6)
  else:
    assert np.all(diffs <= 1e-6)


def test_density_ratio_clipping():
  logit = jnp.array([-50.0, -3.0, 0.0, 2.0, 50.0])
  r = fd.density_ratio(logit, 0.1, 20.0, 10.0)
  np.testing.assert_allclose(r, [0.1, 0.1, 1.0, np.exp(2.0), 20.0],
                             rtol=1e-6)


def test_ratio_bins():
  """Stage 1: only non-empty bins move; EMA folded in before dividing."""
  t = jnp.array([0.05, 0.05, 0.55, 0.95])
  r = jnp.array([1.0, 3.0, 4.0, 0.5])
  bins = jnp.full((10,), 2.0)
  r0, b0 = fd.normalize_ratio(r, t, bins, ema=0.0)
  b0 = np.asarray(b0)
  np.testing.assert_allclose(b0[[0, 5, 9]], [2.0, 4.0, 0.5], rtol=1e-6)
  np.testing.assert_allclose(np.delete(b0, [0, 5, 9]), 2.0)
  np.testing.assert_allclose(r0, [0.5, 1.5, 1.0, 1.0], rtol=1e-5)
  _, b5 = fd.normalize_ratio(r, t, bins, ema=0.5)
  np.testing.assert_allclose(np.asarray(b5)[[0, 5, 9]], [2.0, 3.0, 1.25],
                             rtol=1e-6)


def test_vsd_gradient_is_delta_over_numel_towards_teacher():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
  x0_p = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
  x0_f = x + 0.3
  h = jnp.ones((8,))
  delta = fd.vsd_delta(x, x0_f, x0_p, h)
  w = 1 / (np.mean(np.abs(np.asarray(x - x0_p)), 1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(delta, (x0_f - x0_p) * w, rtol=1e-5)
  g = jax.grad(lambda x_: fd.vsd_loss(x_, delta))(x)
  np.testing.assert_allclose(g, delta / x.size, rtol=1e-5)
  # Identical fake and teacher denoisers: no VSD signal (§3.10.1).
  assert float(jnp.max(jnp.abs(fd.vsd_delta(x, x0_p, x0_p, h)))) == 0.0


def test_x0_conversion_and_student_init_is_teacher_euler_step():
  """x̂0 = x_t - t v (spec §3.9); G(z) = teacher's 1-step Euler sample."""
  ds, m = _method(_untrained())
  state = jax.jit(m.init)(jax.random.key(0), None)
  z = m.noise(jax.random.key(1), 16)
  fm = flow_matching.Method(m.config, ds.spec)
  teacher = state.extras['teacher']
  np.testing.assert_allclose(m.x0(state.params, z, 1.0),
                             z - fm.velocity(teacher, z, 1.0), atol=1e-6)
  # Oracle velocity v = e - x recovers x exactly.
  x = jnp.ones((4, 2))
  e = jax.random.normal(jax.random.key(2), (4, 2))
  t = jnp.array([0.1, 0.4, 0.7, 0.99])
  x_t = (1 - t[:, None]) * x + t[:, None] * e
  m2 = load_method(m.config, ds.spec)
  m2.apply = lambda p, x_, t_, h=None, y=None, g=None: e - x
  np.testing.assert_allclose(m2.x0(None, x_t, t), x, atol=1e-5)


def test_zero_student_gradient_when_fake_equals_teacher():
  """§3.10.1: F = P at init and λ_GAN = 0 -> the student gradient is 0."""
  ds, m = _method(_untrained(**{'method.f_div': 'js'}))
  key = jax.random.key(0)
  state = jax.jit(m.init)(key, None)
  # Non-trivial nets: perturb the (shared) teacher = fake = student weights.
  noisy = jax.tree.map(
      lambda a: a + 0.1 * jax.random.normal(key, a.shape), state.params)
  ex = dict(state.extras, teacher=noisy, fake=noisy)
  m.mcfg.gan_weight = 0.0
  batch = ds.sample(key, 64)
  g = jax.jit(jax.grad(lambda p: m.student_loss(p, ex, batch, key)[0]))(
      noisy)
  assert max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g)) == 0.0


def test_gan_weight_required_except_rkl():
  with pytest.raises(ValueError, match='gan_weight'):
    _method(_untrained(**{'method.gan_weight': 0.0}))
  _method(_untrained(**{'method.gan_weight': 0.0, 'method.f_div': 'rkl'}))


def test_alternating_updates():
  """Step 0 updates G only; step 1 updates F and D only; EMA every step."""
  ds, m = _method(_untrained(**{'method.f_div': 'kl'}))
  key = jax.random.key(0)
  s0 = jax.jit(m.init)(key, None)
  step = jax.jit(m.train_step)
  s1, m1 = step(s0, ds.sample(jax.random.key(1), 64), jax.random.key(2))
  s2, m2 = step(s1, ds.sample(jax.random.key(3), 64), jax.random.key(4))

  def changed(a, b):
    return any(bool(jnp.any(x != y)) for x, y in zip(
        jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
  assert changed(s0.params, s1.params)
  assert not changed(s0.extras['fake'], s1.extras['fake'])
  assert not changed(s0.extras['disc'], s1.extras['disc'])
  assert not changed(s1.params, s2.params)
  assert changed(s1.extras['fake'], s2.extras['fake'])
  assert changed(s1.extras['disc'], s2.extras['disc'])
  assert not changed(s0.extras['teacher'], s2.extras['teacher'])
  assert float(m1['fake_loss']) == 0.0 and float(m1['vsd_loss']) >= 0.0
  assert float(m2['gan_gen']) == 0.0 and float(m2['disc_loss']) > 0.0
  assert float(m1['h_min']) > 0.0  # reported x K on student steps
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_static_phase_equals_cond():
  """The static phase (one step per dispatch) gives the lax.cond result."""
  ds, m = _method(_untrained())
  assert m.step_cycle == m.mcfg.student_update_freq
  s = jax.jit(m.init)(jax.random.key(0), None)
  cond = jax.jit(m.train_step)
  static = jax.jit(m.train_step, static_argnames='phase')
  for i in range(2):  # a student step, then a critic step
    b, k = ds.sample(jax.random.key(10 + i), 64), jax.random.key(20 + i)
    a, ma = cond(s, b, k)
    c, mc = static(s, b, k, phase=m.step_phase(i))
    for x, y in zip(jax.tree.leaves((a, ma)), jax.tree.leaves((c, mc)),
                    strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6,
                                 atol=1e-7)
    s = a


def test_multistep_student_nfe_and_backward_simulation():
  ds, m = _method(_untrained(**{'method.student_steps': 4}))
  assert m.supported_nfe == (1, 2, 4)
  state = jax.jit(m.init)(jax.random.key(0), None)
  x = jax.jit(m.generate, static_argnums=2)(state.params, jax.random.key(1),
                                            32)
  assert x.shape == (32, 2) and np.all(np.isfinite(x))
  for nfe in (1, 2, 4):
    fn = jax.jit(lambda p, k, nfe=nfe: m.sample(p, k, 8, nfe=nfe))
    assert fn(state.params, jax.random.key(2)).shape == (8, 2)
  with pytest.raises(UnsupportedNFEError):
    m.sample(state.params, jax.random.key(2), 8, nfe=3)
  _, m1 = _method(_untrained())
  assert m1.supported_nfe == (1,)


@pytest.mark.parametrize('feat', ['fake_score', 'teacher', 'raw'])
def test_disc_heads_shapes(feat):
  key = jax.random.key(0)
  n_feat = 0 if feat == 'raw' else 1
  for shape, oct_ in (((2,), 6), ((16, 16, 1), 0)):
    p = fd.disc_init(key, shape, n_feat, 16, 2, oct_)
    if len(shape) == 3:
      assert len(p['down']) == 2  # 16 -> 8 -> 4
    x = jnp.ones((3, *shape))
    out = jax.jit(fd.disc_apply, static_argnums=4)(
        p, x, None if feat == 'raw' else x, jnp.array([0.1, 0.5, 0.9]), oct_)
    assert out.shape == (3,) and np.all(np.isfinite(out))


def test_ratio_estimator_recovers_log_ratio():
  """§3.10.4: D trained on p = N(0, I) vs q = N(m, I) -> logit ≈ log p/q."""
  import optax  # pylint: disable=g-import-not-at-top
  mu = jnp.array([1.0, 0.0])
  p = fd.disc_init(jax.random.key(0), (2,), 0, 32, 2, 0)
  tx = optax.adam(3e-3)
  opt = tx.init(p)
  t = jnp.full((512,), 0.5)

  @jax.jit
  def step(p, opt, key):
    kp, kq = jax.random.split(key)
    xp = jax.random.normal(kp, (512, 2))
    xq = jax.random.normal(kq, (512, 2)) + mu

    def loss(p):
      return (jnp.mean(jax.nn.softplus(fd.disc_apply(p, xq, None, t)))
              + jnp.mean(jax.nn.softplus(-fd.disc_apply(p, xp, None, t))))
    g = jax.grad(loss)(p)
    u, opt = tx.update(g, opt)
    return optax.apply_updates(p, u), opt
  for i in range(600):
    p, opt = step(p, opt, jax.random.key(i))
  x = jax.random.normal(jax.random.key(9), (512, 2)) * 0.7 + mu / 2
  true = -(x @ mu) + 0.5 * mu @ mu   # log N(x; 0, I) - log N(x; mu, I)
  est = fd.disc_apply(p, x, None, t)
  assert np.corrcoef(est, true)[0, 1] > 0.95
  assert float(jnp.mean(jnp.abs(est - true))) < 0.25
  xq = jax.random.normal(jax.random.key(10), (4096, 2)) + mu
  r = fd.density_ratio(fd.disc_apply(p, xq, None, jnp.full((4096,), .5)),
                       1e-3, 1e3)
  assert float(jnp.mean(r)) == pytest.approx(1.0, abs=0.15)  # E_q[r] = 1


# ------------------------------------------------------------- teacher
@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  """A tiny flow_matching run of the harness (smoke protocol, 8 steps)."""
  workdir = str(tmp_path_factory.mktemp('teacher'))
  train.train_and_evaluate(smoke_config('flow_matching'), workdir)
  return workdir


def _student_config(teacher, **kw):
  return smoke_config('f_distill', **{'method.teacher_workdir': teacher, **kw})


def test_teacher_restore_round_trip(teacher_dir):
  config = _student_config(teacher_dir)
  ds, m = _method(config)
  state = jax.jit(m.init)(jax.random.key(3), None)  # jitted as in train.py
  fm_cfg = smoke_config('flow_matching')
  fm = flow_matching.Method(fm_cfg, ds.spec)
  target = jax.eval_shape(fm.init, jax.random.key(0), None)
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), target)
  want = checkpoint.Checkpointer(teacher_dir).restore_latest(target)
  assert int(want.step) == fm_cfg.train.num_steps
  for name, tree in (('teacher', state.extras['teacher']),
                     ('fake', state.extras['fake']), ('student', state.params),
                     ('ema', state.ema_params)):
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(want.ema_params),
                    strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  # The student's 1-NFE sample at init is the teacher's 1-step Euler sample.
  z = fm.noise(jax.random.key(4), 8)
  np.testing.assert_allclose(m.x0(state.params, z, 1.0),
                             z - fm.velocity(want.ema_params, z, 1.0),
                             atol=1e-6)


@pytest.mark.slow
def test_student_trains_from_teacher_run(teacher_dir, tmp_path):
  """The harness path: jitted init (host callback), steps, eval, summary."""
  config = _student_config(teacher_dir)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['steps'] == config.train.num_steps
  assert [r['nfe'] for r in summary['evals']] == [1]
  assert np.isfinite(summary['evals'][0]['metrics']['energy_distance'])


def test_teacher_errors(teacher_dir, tmp_path):
  with pytest.raises(fd.TeacherError, match='teacher_workdir is empty'):
    # (the smoke protocol allows an untrained teacher; a real run does not)
    _method(smoke_config('f_distill',
                         **{'method.allow_untrained_teacher': False}))
  missing = str(tmp_path / 'nope')
  with pytest.raises(fd.TeacherError, match='does not exist.*method=flow_'):
    _method(_student_config(missing))
  assert not os.path.exists(missing)  # nothing created
  with pytest.raises(fd.TeacherError, match=r'config\.model in width'):
    _method(_student_config(teacher_dir, **{'model.width': 48}))
  with pytest.raises(fd.TeacherError, match='trained on'):
    cfg = _student_config(teacher_dir)
    cfg.data.name = 'toy2d:moons'
    _method(cfg)
  nosum = str(tmp_path / 'nosum')
  shutil.copytree(teacher_dir, nosum)
  os.remove(os.path.join(nosum, 'summary.json'))
  with pytest.raises(fd.TeacherError, match='no summary.json'):
    _method(_student_config(nosum))
  nockpt = str(tmp_path / 'nockpt')
  shutil.copytree(teacher_dir, nockpt)
  shutil.rmtree(os.path.join(nockpt, 'checkpoints'))
  with pytest.raises(fd.TeacherError, match='no checkpoint'):
    _method(_student_config(nockpt))
  other = str(tmp_path / 'other')
  shutil.copytree(teacher_dir, other)
  path = os.path.join(other, 'summary.json')
  summary = json.load(open(path))
  summary['config']['method']['name'] = 'meanflow'
  json.dump(summary, open(path, 'w'))
  with pytest.raises(fd.TeacherError, match='must be flow_matching'):
    _method(_student_config(other))


@pytest.mark.slow
def test_resume_is_bitwise(teacher_dir, tmp_path):
  """Every array (student, F, D, optimizers, ratio bins) is in TrainState."""
  config = _student_config(teacher_dir, **{'train.num_steps': 12,
                                           'train.checkpoint_every_steps': 6,
                                           'train.steps_per_dispatch': 3})
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  s_full = train.train_and_evaluate(config, full)
  shutil.copytree(full, part)
  shutil.rmtree(os.path.join(part, 'checkpoints', '12'))
  s_part = train.train_and_evaluate(config, part)
  ds, m = _method(config)
  target = jax.eval_shape(m.init, jax.random.key(0), None)
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), target)
  a = checkpoint.Checkpointer(full).restore_latest(target)
  b = checkpoint.Checkpointer(part).restore_latest(target)
  assert int(a.step) == int(b.step) == 12
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert s_full['evals'][0]['metrics'] == s_part['evals'][0]['metrics']
