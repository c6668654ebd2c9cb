"""Gradient accumulation (`train.grad_accum`, `Method.loss_and_grads`).

* k = 1 is the pre-change code path, bit for bit (train steps of flow
  matching and meanflow, scm's two-network gradient).
* k = 2, 4 on a loss that is a mean of per-sample terms with the randomness
  fixed per sample (carried in the batch): the accumulated loss, metrics and
  gradients equal the global-batch ones to 1e-6 (flow matching; meanflow,
  whose target is a JVP). With the real losses (randomness from the key):
  equal to the mean over micro-batches i = rows i, i + k, ... with key
  fold_in(key, i), taken one by one.
* On the 8-device mesh the split moves no batch data (no all-gather /
  all-to-all / collective-permute in the compiled step) and matches 1 device.
* config_check refuses bad k (not an int >= 1, not a divisor, micro-batch
  not divisible over the mesh) and methods whose loss couples the batch.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import method_setup, random_params, smoke_config

from methods import flow_matching as fm
from methods import meanflow as mf
from onestep_bench import config_check, sharding, train
from onestep_bench.config_check import ConfigError
from onestep_bench.method import method_module, split_microbatches


def _set_k(method, k):
  method.config.train.grad_accum = k


def _state(method, params):
  return method.init(jax.random.key(0), None).replace(
      params=params, ema_params=params)


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                             strict=True))


def _assert_close(a, b, tol=1e-6):
  """max |a - b| <= tol * max(1, max |b|) per leaf.

  float32: the mean of k partial means differs from the one global mean by
  rounding on the scale of the leaf's largest terms (measured <= 4e-7 of
  max |g|), so the bound is relative to each leaf's scale.
  """
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(1.0, float(np.max(np.abs(y))))
    assert float(np.max(np.abs(x - y))) <= tol * scale, (
        float(np.max(np.abs(x - y))), scale)


# ---------------------------------------------------------- k = 1: unchanged
def _pre_change_train_step(method, state, batch, key):
  """The base `Method.train_step` as it was before `loss_and_grads`."""
  grad_fn = jax.value_and_grad(method.loss, has_aux=True)
  (loss, metrics), grads = grad_fn(state.params, batch, key, state)
  updates, opt_state = method.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = method.update_ema(state.ema_params, params, state.step)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                 param_norm=optax.global_norm(params))
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state, ema_params=ema), metrics


@pytest.mark.parametrize('name', ['flow_matching', 'meanflow'])
def test_k1_train_steps_bit_identical_to_pre_change_path(name):
  _, ds, method = method_setup(name)
  assert method.grad_accum == 1  # the smoke config has no grad_accum key
  state = _state(method, random_params(method))
  new, old = jax.jit(method.train_step), jax.jit(
      functools.partial(_pre_change_train_step, method))
  s_new = s_old = state
  for i in range(3):
    key = jax.random.key(i)
    batch = ds.sample(jax.random.fold_in(key, 7), 32)
    s_new, m_new = new(s_new, batch, key)
    s_old, m_old = old(s_old, batch, key)
  for a, b in zip(jax.tree.leaves((s_new, m_new)),
                  jax.tree.leaves((s_old, m_old)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_k1_scm_two_network_grads_bit_identical():
  _, ds, method = method_setup('scm', **{'method.adaptive_weighting': True})
  state = method.init(jax.random.key(0), None)
  state = state.replace(params=random_params(method))
  batch, key = ds.sample(jax.random.key(1), 32), jax.random.key(2)
  phi = state.extras['weight']

  def old(state):  # scm.train_step's call before loss_and_grads
    fn = lambda p, ph: method.loss_terms(p, ph, None, batch, key, state.step)
    return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
        state.params, phi)

  def new(state):
    fn = lambda pp, b, k, s: method.loss_terms(pp[0], pp[1], None, b, k,
                                               s.step)
    return method.loss_and_grads((state.params, phi), batch, key, state, fn)

  for a, b in zip(jax.tree.leaves(jax.jit(new)(state)),
                  jax.tree.leaves(jax.jit(old)(state)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------- k > 1: the global-batch gradient
class _FixedFM(fm.Method):
  """Flow matching with per-sample (t, e) carried in the batch: no key."""

  def loss(self, params, batch, key, state):
    del key, state
    x, t, e = batch['x'], batch['t'], batch['e']
    z = (1 - t[:, None]) * x + t[:, None] * e
    err = self.velocity(params, z, t) - (e - x)
    per = jnp.mean(jnp.square(err), -1)
    return jnp.mean(per), {'err_mean': jnp.mean(err), 't_mean': jnp.mean(t)}


class _FixedMF(mf.Method):
  """MeanFlow's JVP target and adaptive weight, (t, r, e) in the batch."""

  def loss(self, params, batch, key, state):
    del key, state
    x, t, r, e = batch['x'], batch['t'], batch['r'], batch['e']
    z = (1 - t[:, None]) * x + t[:, None] * e
    u_fn = lambda z_, t_, r_: self.average_velocity(params, z_, t_, r_)
    u, u_tgt = mf.mean_flow_target(u_fn, z, t, r, e - x)
    # c = 1, not the official 1e-3: 1 / (L + 1e-3) weights small-error
    # samples ~1000x, which amplifies float32 rounding past the tolerance.
    loss = jnp.mean(mf.adaptive_weighted(jnp.square(u - u_tgt), 1.0, 1.0))
    return loss, {'gap': jnp.mean(t - r)}


def _fixed_batch(n, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  t = jax.random.uniform(ks[1], (n,))
  return {'x': jax.random.normal(ks[0], (n, 2)), 't': t,
          'r': t * jax.random.uniform(ks[2], (n,)),
          'e': jax.random.normal(ks[3], (n, 2))}


@pytest.mark.parametrize('cls, name, k', [
    (_FixedFM, 'flow_matching', 2), (_FixedMF, 'meanflow', 4),
    pytest.param(_FixedFM, 'flow_matching', 4, marks=pytest.mark.slow),
    pytest.param(_FixedMF, 'meanflow', 2, marks=pytest.mark.slow)])
def test_accumulated_grads_equal_full_batch_grads(cls, name, k):
  config, ds, _ = method_setup(name)
  method = cls(config, ds.spec)
  params, batch = random_params(method), _fixed_batch(64)
  run = jax.jit(lambda p, b: method.loss_and_grads(p, b, jax.random.key(0),
                                                   None))
  (l1, m1), g1 = run(params, batch)
  _set_k(method, k)
  (lk, mk), gk = jax.jit(lambda p, b: method.loss_and_grads(
      p, b, jax.random.key(0), None))(params, batch)
  _assert_close(((lk, mk), gk), ((l1, m1), g1))
  assert float(optax.global_norm(g1)) > 1e-2  # a real gradient was compared
  # A wrong split (e.g. averaging a half batch twice) is caught.
  (lh, _), gh = run(params, jax.tree.map(lambda a: a[:32], batch))
  assert _max_diff(g1, gh) > 1e-4


@pytest.mark.parametrize('name', ['flow_matching', 'meanflow'])
def test_accumulation_is_the_mean_over_strided_micro_batches(name):
  config, ds, method = method_setup(name)
  del config
  k, key = 4, jax.random.key(3)
  params, batch = random_params(method), ds.sample(jax.random.key(4), 32)
  _set_k(method, k)
  (loss, metrics), grads = jax.jit(
      lambda p: method.loss_and_grads(p, batch, key, None))(params)
  _set_k(method, 1)
  one = jax.jit(lambda p, b, kk: method.loss_and_grads(p, b, kk, None))
  outs = [one(params, jax.tree.map(lambda a, i=i: a[i::k], batch),
              jax.random.fold_in(key, i)) for i in range(k)]
  mean = jax.tree.map(lambda *a: sum(a) / k, *outs)
  _assert_close(((loss, metrics), grads), mean)
  assert float(optax.global_norm(grads)) > 1e-2


@pytest.mark.parametrize('name, kw', [
    ('scm', {'method.adaptive_weighting': True}),  # own train_step, 2 nets
    pytest.param('tvm', {}, marks=pytest.mark.slow)])  # super() + extras
def test_train_step_overrides_accumulate(name, kw):
  _, ds, method = method_setup(name, **kw)
  state = method.init(jax.random.key(0), None)
  state = state.replace(params=random_params(method))
  batch, key = ds.sample(jax.random.key(1), 32), jax.random.key(2)
  _set_k(method, 2)
  new, metrics = jax.jit(method.train_step)(state, batch, key)
  _set_k(method, 1)
  one = jax.jit(lambda b, kk: method.train_step(state, b, kk)[1]['loss'])
  want = sum(float(one(jax.tree.map(lambda a, i=i: a[i::2], batch),
                       jax.random.fold_in(key, i))) for i in range(2)) / 2
  np.testing.assert_allclose(float(metrics['loss']), want, rtol=1e-6)
  # Step 0 has lr 0 (warm-up): the update shows in the Adam moments.
  assert float(metrics['grad_norm']) > 0
  assert _max_diff(new.opt_state, state.opt_state) > 0
  if name == 'scm':
    assert float(metrics['weight_grad_norm']) > 0
    assert _max_diff(new.extras['weight_opt'], state.extras['weight_opt']) > 0


def test_split_is_strided():
  b = {'x': jnp.arange(12).reshape(6, 2), 'y': jnp.arange(6)}
  s = split_microbatches(b, 3)
  assert s['x'].shape == (3, 2, 2)
  np.testing.assert_array_equal(s['y'], [[0, 3], [1, 4], [2, 5]])
  np.testing.assert_array_equal(s['x'][1], b['x'][1::3])


# --------------------------------------------------------------- the mesh
def _compiled_step(k, data):
  config = smoke_config('flow_matching', **{'mesh.data': data,
                                            'train.batch_size': 32})
  config.train.grad_accum = k
  config_check.validate(config, method_module('flow_matching').Method)
  from onestep_bench import data as data_lib  # pylint: disable=g-import-not-at-top
  from onestep_bench.method import load_method  # pylint: disable=g-import-not-at-top
  ds = data_lib.build(config.data)
  method = load_method(config, ds.spec)
  mesh = sharding.make_mesh(config.mesh)
  state = jax.jit(method.init, out_shardings=sharding.replicated(mesh))(
      jax.random.key(0), None)
  shard = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  chunk = train.make_train_chunk(method, ds, mesh, 32, shard)
  arrays = jax.device_put(ds.arrays, sharding.replicated(mesh))
  return chunk, state, arrays


def test_micro_batches_keep_the_data_sharding():
  assert jax.device_count() == 8
  chunk, state, arrays = _compiled_step(2, 8)
  hlo = chunk.lower(state, jax.random.key(1), arrays, 1,
                    None).compile().as_text()
  assert 'all-reduce' in hlo  # the data-parallel gradient sum
  for op in ('all-gather', 'all-to-all', 'collective-permute'):
    assert op not in hlo, op  # no batch (or anything) moved between devices
  s8, m8 = chunk(state, jax.random.key(1), arrays, 2)
  chunk1, state1, arrays1 = _compiled_step(2, 1)
  s1, m1 = chunk1(state1, jax.random.key(1), arrays1, 2)
  np.testing.assert_allclose(np.asarray(m8['loss']), np.asarray(m1['loss']),
                             rtol=1e-5, atol=1e-5)
  assert _max_diff(s8.params, s1.params) < 1e-5


# ----------------------------------------------------------- config_check
def _check(method, k, batch=64, **kw):
  c = smoke_config(method, **kw)
  c.train.batch_size = batch
  if not isinstance(k, int):  # the bench configs declare an int: re-declare
    with pytest.raises(TypeError):  # ml_collections refuses the float ...
      c.train.grad_accum = k
    with c.unlocked():  # ... and config_check refuses it where undeclared
      del c.train['grad_accum']
      c.train.grad_accum = k
  c.train.grad_accum = k
  config_check.validate(c, method_module(method).Method)


@pytest.mark.parametrize('k, batch, match', [
    (0, 64, r'must be an int >= 1'),
    (2.0, 64, r'must be an int >= 1'),
    (3, 64, r'must divide train\.batch_size=64'),
    (16, 64, r'micro-batches of 4 rows .* not divisible by the 8 devices'),
])
def test_config_check_refuses_bad_k(k, batch, match):
  with pytest.raises(ConfigError, match=match) as e:
    _check('flow_matching', k, batch, **{'mesh.data': -1})
  assert e.value.key == 'train.grad_accum' and e.value.value == k
  assert str(e.value).startswith(f'config.train.grad_accum={k!r}')


def test_config_check_accepts_good_k():
  _check('flow_matching', 1)
  _check('flow_matching', 2, **{'mesh.data': -1})  # 32 rows over 8 devices
  _check('meanflow', 4)
  _check('tvm', 2)


@pytest.mark.parametrize('name, why', [
    ('drifting', 'drifting field couples'),
    ('f_distill', 'batch mean'),
])
def test_config_check_refuses_batch_coupled_methods(name, why):
  with pytest.raises(ConfigError, match=why) as e:
    _check(name, 2)
  assert e.value.key == 'train.grad_accum'
  assert 'grad_accum=1' in e.value.fix
  _check(name, 1)  # the default is fine


def test_config_check_revalidates_the_micro_batch():
  # Shortcut needs >= log2(max_steps) bootstrap rows in the batch its loss
  # sees: 64 rows x 0.25 = 16 >= 3 levels, but 64 / 16 = 4 rows give 1.
  _check('shortcut', 2, **{'method.max_steps': 8,
                           'method.bootstrap_fraction': 0.25})
  with pytest.raises(ConfigError, match=r'micro-batches of 4 rows.*shortcut'
                     ) as e:
    _check('shortcut', 16, **{'method.max_steps': 8,
                              'method.bootstrap_fraction': 0.25})
  assert e.value.key == 'train.grad_accum'


def test_paper_configs_expose_the_key():
  from experiments import paper  # pylint: disable=g-import-not-at-top
  c = paper.get_config('method=tvm,dataset=imagenet256_latent')
  c.evals = ml_collections.ConfigDict()  # its ADM / VAE files: not the point
  assert c.train.grad_accum == 1
  c.update_from_flattened_dict({'train.grad_accum': 2})  # CLI override
  config_check.validate(c, method_module('tvm').Method)
  c.train.grad_accum = 3
  with pytest.raises(ConfigError, match='must divide'):
    config_check.validate(c, method_module('tvm').Method)
  assert isinstance(c, ml_collections.ConfigDict)
