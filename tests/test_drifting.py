"""Maths and contract tests of drifting (docs/methods/drifting.md §1.12)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench
from methods import drifting
from onestep_bench import data
from onestep_bench.method import UnsupportedNFEError, load_method


def _reference(x, pos, neg, pos_w, neg_w, taus, floor):
  """Official drift_loss.py field, one (group, query, target) at a time."""
  g_, n, c = x.shape
  v_out = np.zeros(x.shape)
  tgt = np.concatenate([neg, pos], 1)
  w = np.concatenate([neg_w, pos_w], 1)
  q, m = neg.shape[1], tgt.shape[1]
  dist = np.zeros((g_, n, m))
  for g in range(g_):
    for i in range(n):
      for k in range(m):
        dist[g, i, k] = np.sqrt(max(np.sum((x[g, i] - tgt[g, k])**2), 1e-8))
  scale = np.mean(dist * w[:, None]) / np.mean(w)
  rho = max(scale / np.sqrt(c), 1e-3)
  dn = dist / max(scale, 1e-3)
  for i in range(n):
    dn[:, i, i] += 100.0
  for tau in taus:
    v = np.zeros(x.shape)
    for g in range(g_):
      k_ = np.exp(-dn[g] / tau)
      row = k_ / k_.sum(1, keepdims=True)
      col = k_ / k_.sum(0, keepdims=True)
      a = np.sqrt(np.maximum(row * col, floor)) * w[g][None]
      for i in range(n):
        sp, sn = a[i, q:].sum(), a[i, :q].sum()
        for k in range(m):
          coef = a[i, k] * sn if k >= q else -a[i, k] * sp
          v[g, i] += coef * (tgt[g, k] - x[g, i]) / rho
    v_out += v / np.sqrt(max(np.mean(v**2), 1e-8))
  return v_out


@pytest.mark.parametrize('floor', [0.0, 1e-6])
def test_matches_slow_reference(floor):
  rng = np.random.default_rng(0)
  g, n, p, u, c = 2, 5, 7, 3, 3
  x = rng.normal(size=(g, n, c))
  pos = rng.normal(size=(g, p, c)) + 0.5
  neg = np.concatenate([x, rng.normal(size=(g, u, c))], 1)
  pos_w = rng.uniform(0.5, 1.5, size=(g, p))
  neg_w = np.concatenate([np.ones((g, n)), np.full((g, u), 0.7)], 1)
  taus = (0.05, 0.2)
  v, _ = drifting.drift_field(
      jnp.asarray(x), jnp.asarray(pos), jnp.asarray(neg), temperatures=taus,
      pos_weights=jnp.asarray(pos_w), neg_weights=jnp.asarray(neg_w),
      floor=floor)
  ref = _reference(x, pos, neg, pos_w, neg_w, taus, floor)
  np.testing.assert_allclose(np.asarray(v), ref, atol=1e-4, rtol=1e-3)


def _cloud(key, n, shift=0.0, c=2):
  return jax.random.normal(key, (1, n, c)) + jnp.array([shift, 0.0])[:c]


@pytest.mark.parametrize('drift_norm', [False, True])
def test_zero_when_positives_equal_negatives(drift_norm):
  kx, kp = jax.random.split(jax.random.key(0))
  x, p = _cloud(kx, 16), _cloud(kp, 24, 1.0)
  v, _ = drifting.drift_field(x, p, p, self_mask=False, drift_norm=drift_norm)
  assert float(jnp.max(jnp.abs(v))) < 1e-6


def test_antisymmetry():
  kx, kp, kq = jax.random.split(jax.random.key(1), 3)
  x, p, q = _cloud(kx, 16), _cloud(kp, 20, 1.0), _cloud(kq, 20, -0.5)
  for norm in (False, True):
    kw = dict(self_mask=False, drift_norm=norm, feature_norm=norm)
    v_pq, _ = drifting.drift_field(x, p, q, **kw)
    v_qp, _ = drifting.drift_field(x, q, p, **kw)
    assert float(jnp.max(jnp.abs(v_pq))) > 1e-2
    np.testing.assert_allclose(v_pq, -v_qp, atol=1e-5)


def _two_clusters(scale=1.0):
  kx, kp = jax.random.split(jax.random.key(2))
  x = 0.3 * jax.random.normal(kx, (1, 64, 2)) + jnp.array([-2.0, 0.0])
  p = 0.3 * jax.random.normal(kp, (1, 96, 2)) + jnp.array([2.0, 0.0])
  return scale * x, scale * p


def test_points_toward_data():
  x, p = _two_clusters()
  v, stats = drifting.drift_field(x, p, x)
  assert bool(jnp.all(v[..., 0] > 0))
  assert float(jnp.mean(v[..., 0])) > 5 * float(jnp.mean(jnp.abs(v[..., 1])))
  assert 3.0 < float(stats['nn_dist']) < 4.0


@pytest.mark.parametrize('scale,tau', [(1.0, 1e-4), (1e4, 0.05), (1e-4, 0.05),
                                       (1e4, 1e-4), (1e-4, 1e-4)])
@pytest.mark.parametrize('feature_norm', [True, False])
def test_stable_at_extreme_scales(scale, tau, feature_norm):
  x, p = _two_clusters(scale)
  if not feature_norm:
    tau = tau * scale  # same kernel in data units
  v, stats = drifting.drift_field(x, p, x, temperatures=(tau, 0.2 * scale),
                                  feature_norm=feature_norm)
  assert bool(jnp.all(jnp.isfinite(v)))
  assert all(bool(jnp.isfinite(s)) for s in stats.values())
  assert bool(jnp.all(v[..., 0] >= 0)) and float(jnp.mean(v[..., 0])) > 0.1
  loss, _ = drifting.drift_loss(x, p, temperatures=(tau,),
                                feature_norm=feature_norm)
  assert bool(jnp.isfinite(loss))


def test_gradient_identity():
  x, p = _two_clusters()
  u = jax.random.normal(jax.random.key(3), (1, 8, 2))
  kw = dict(temperatures=(0.05, 0.2))
  grad = jax.grad(lambda a: drifting.drift_loss(a, p, u, **kw)[0])(x)
  v, stats = drifting.drift_field(x, p, jnp.concatenate([x, u], 1), **kw)
  np.testing.assert_allclose(grad, -2.0 * v / (stats['rho'] * x.size),
                             rtol=1e-5, atol=1e-8)


def test_method_smoke():
  config = bench.get_config('method=drifting,dataset=toy2d:8gaussians,'
                            'smoke=True')
  dataset = data.build(config.data)
  method = load_method(config, dataset.spec)
  key = jax.random.key(0)
  batch = dataset.sample(key, config.train.batch_size)
  state = method.init(key, batch)
  step = jax.jit(method.train_step)
  new = state
  for i in range(2):  # the warm-up schedule gives lr = 0 at step 0
    new, metrics = step(new, batch, jax.random.fold_in(key, i))
    assert {'field_rms', 'nn_dist'} <= set(metrics)
    assert all(bool(jnp.isfinite(v)) for v in metrics.values())
  delta = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), new.params,
                       state.params)
  assert max(float(d) for d in jax.tree.leaves(delta)) > 0
  x = method.sample(new.ema_params, key, 10, nfe=1)
  assert x.shape == (10, 2) and bool(jnp.all(jnp.isfinite(x)))
  with pytest.raises(UnsupportedNFEError):
    method.sample(new.ema_params, key, 10, nfe=2)


# ------------------------------------------------------------------ images
def test_sample_alpha_matches_power_law():
  a = np.asarray(drifting.sample_alpha(jax.random.key(0), 200_000,
                                       alpha_max=4.0, power=3.0, p_one=0.0))
  assert a.min() >= 1.0 and a.max() <= 4.0
  # p(α) ∝ α^-3 on [1, 4]: P(α ≤ 2) = (1 - 2^-2) / (1 - 4^-2) = 0.8.
  np.testing.assert_allclose(np.mean(a <= 2.0), 0.8, atol=5e-3)
  b = np.asarray(drifting.sample_alpha(jax.random.key(1), 100_000,
                                       alpha_max=4.0, power=3.0, p_one=0.5))
  np.testing.assert_allclose(np.mean(b == 1.0), 0.5, atol=1e-2)


def test_regroup_is_class_then_location():
  f = jnp.arange(2 * 3 * 4 * 5).reshape(6, 4, 5)  # G=2 classes, N=3, L=4
  r = drifting.regroup(f, 2)
  assert r.shape == (8, 3, 5)
  # group (class 1, location 2) holds samples 3..5 at location 2.
  np.testing.assert_array_equal(r[1 * 4 + 2], f[3:6, 2])


def _image_method(dataset='digits', **kw):
  config = bench.get_config(f'method=drifting,dataset={dataset},smoke=True')
  config.update_from_flattened_dict(kw)
  ds = data.build(config.data)
  method = load_method(config, ds.spec)
  method.prepare(ds)
  return config, ds, method


def _two_steps(config, ds, method):
  key = jax.random.key(0)
  state = method.init(key, ds.sample(key, 2))
  step = jax.jit(method.train_step)
  for i in range(2):
    batch = ds.sample(jax.random.key(10 + i), config.train.batch_size,
                      groups=method.class_groups)
    state, metrics = step(state, batch, jax.random.key(i))
  assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  return state, metrics


def test_images_pixels_conditional_cfg():
  config, ds, method = _image_method(**{
      'data.conditional': True, 'model.guidance_embed': True,
      'model.style_tokens': 4, 'model.style_vocab': 8,
      'method.features': 'pixels', 'method.classes_per_step': 4,
      'method.num_unc': 4})
  assert method.class_groups == 4 and method.cfg
  state, metrics = _two_steps(config, ds, method)
  assert 'field_rms/global' in metrics and 'nn_dist' in metrics
  labels = jnp.arange(6) % 10
  # Two steps barely move the zero-initialised output paths; perturb.
  params = jax.tree.map(lambda a: a + 0.05, state.ema_params)
  x1 = method.sample(params, jax.random.key(3), 6, nfe=1,
                     labels=labels, guidance=1.0)
  x2 = method.sample(params, jax.random.key(3), 6, nfe=1,
                     labels=labels, guidance=3.0)
  assert x1.shape == (6, 8, 8, 1)
  assert float(jnp.max(jnp.abs(x1 - x2))) > 0, 'α must reach the generator'


def test_images_cfg_needs_guidance_embed():
  with pytest.raises(ValueError, match='guidance_embed=True'):
    _image_method(**{'data.conditional': True})


def test_unconditional_model_rejects_labels_and_guidance():
  _, _, method = _image_method(**{'method.features': 'pixels'})
  params = method.net.init(jax.random.key(0))
  with pytest.raises(ValueError, match='unconditional'):
    method.sample(params, jax.random.key(0), 2, nfe=1, labels=jnp.zeros(2, int))
  with pytest.raises(ValueError, match='without CFG'):
    method.sample(params, jax.random.key(0), 2, nfe=1, guidance=2.0)


def test_encoder_features_need_images():
  config = bench.get_config('method=drifting,dataset=toy2d:8gaussians,'
                            'smoke=True')
  config.method.features = 'encoder'
  with pytest.raises(ValueError, match='needs image data'):
    load_method(config, data.build(config.data).spec)


def test_images_encoder_features_unconditional(monkeypatch):
  from onestep_bench import encoders  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(encoders.RECIPE, 'steps', 5)
  config, ds, method = _image_method(**{'method.features': 'pixels+encoder'})
  assert method.class_groups == 0
  state, metrics = _two_steps(config, ds, method)
  enc_keys = [k for k in metrics if k.startswith('field_rms/enc/')]
  assert len(enc_keys) >= 5 and 'field_rms/global' in metrics
  # The encoder is frozen: its params never change.
  same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                      state.extras['encoder'],
                      jax.tree.map(jnp.asarray, method.encoder.params))
  assert all(jax.tree.leaves(same))
