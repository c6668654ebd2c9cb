"""Maths and contract tests of drifting (docs/methods/drifting.md §1.12)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench, drifting_toy_ablations
from methods import drifting
from onestep_bench import config_check as cc
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
    assert {'field_rms', 'nn_dist', 'nn_dist_rev', 'coverage'} <= set(metrics)
    assert all(bool(jnp.isfinite(v)) for v in metrics.values())
  delta = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), new.params,
                       state.params)
  assert max(float(d) for d in jax.tree.leaves(delta)) > 0
  x = method.sample(new.ema_params, key, 10, nfe=1)
  assert x.shape == (10, 2) and bool(jnp.all(jnp.isfinite(x)))
  with pytest.raises(UnsupportedNFEError):
    method.sample(new.ema_params, key, 10, nfe=2)


# ------------------------------------- temperatures, collapse (issue 18 §2)
_RING = 2.0 * np.stack([np.cos(np.pi * np.arange(8) / 4),
                        np.sin(np.pi * np.arange(8) / 4)], -1)


def _ring_sample(key, n, modes=8):
  """n points of 8gaussians (std 0.1), restricted to the first `modes`."""
  k1, k2 = jax.random.split(key)
  idx = jax.random.randint(k1, (n,), 0, modes)
  return (jnp.asarray(_RING, jnp.float32)[idx]
          + 0.1 * jax.random.normal(k2, (n, 2)))


@pytest.fixture(scope='module')
def ring_sets():
  """Data (8 modes), a one-mode generated set and a covering one."""
  pos = _ring_sample(jax.random.key(0), 512)
  return (pos[None], _ring_sample(jax.random.key(1), 512, modes=1)[None],
          _ring_sample(jax.random.key(2), 512)[None])


@pytest.mark.parametrize('tau,spreads', [(0.02, False), (0.05, False),
                                         (0.1, True), (0.2, True)])
def test_narrow_kernel_holds_one_mode_collapse(ring_sets, tau, spreads):
  """The cause of the toy collapse: on samples all in mode 0 (of 8), a
  single τ <= 0.05 (normalised units) pulls the cluster together along the
  ring (v_y anti-correlated with y: the one-mode state is attracting); a
  τ >= 0.1 reaches the neighbouring modes and spreads it. Drift
  normalisation only rescales a single τ's field, so both agree."""
  pos, one_mode, _ = ring_sets
  fields = [drifting.drift_field(one_mode, pos, one_mode, temperatures=(tau,),
                                 drift_norm=dn)[0][0] for dn in (False, True)]
  ratio = fields[1] / fields[0]
  np.testing.assert_allclose(ratio, float(jnp.median(ratio)), rtol=1e-3)
  corr = np.corrcoef(np.asarray(fields[1][:, 1]),
                     np.asarray(one_mode[0, :, 1]))[0, 1]
  assert corr > 0.5 if spreads else corr < -0.2, corr


def test_tiny_temperature_field_sits_on_few_samples(ring_sets):
  """τ = 1e-4 (issue 18 §2): after drift normalisation a handful of the 512
  queries carry the whole field (participation ratio ~ 1/N), which sent
  toy samples far off the data; at TAU_MIN it is spread over the queries."""
  pos, _, cover = ring_sets
  def participation(tau):
    v, _ = drifting.drift_field(cover, pos, cover, temperatures=(tau,))
    e = np.sum(np.asarray(v[0]) ** 2, -1)
    return e.sum() ** 2 / (e.size * np.sum(e ** 2))
  assert participation(1e-4) < 10.0 / cover.shape[1]
  assert participation(drifting.TAU_MIN) > 0.2


def test_collapse_metrics_see_what_nn_dist_misses(ring_sets):
  pos, one_mode, cover = ring_sets
  _, s1 = drifting.drift_field(one_mode, pos, one_mode, coverage_k=5)
  _, s8 = drifting.drift_field(cover, pos, cover, coverage_k=5)
  # nn_dist (generated -> data) is small for both ...
  assert float(s1['nn_dist']) < 0.05 and float(s8['nn_dist']) < 0.05
  # ... the data-side metrics are not.
  assert float(s1['nn_dist_rev']) > 1.5 > 0.1 > float(s8['nn_dist_rev'])
  assert float(s1['coverage']) < 0.2 and float(s8['coverage']) > 0.9


def test_coverage_matches_its_expected_value():
  """Naeem et al. 2020: E[coverage] = 1 - prod_l (M-l)/(M+N-l) for N = M
  draws of one law (0.969 at k = 5)."""
  kx, ky = jax.random.split(jax.random.key(4))
  n = 1000
  x = jax.random.normal(kx, (1, n, 2))
  y = jax.random.normal(ky, (1, n, 2))
  cdist = drifting._cdist  # pylint: disable=protected-access
  got = drifting.coverage_stats(cdist(x, y), cdist(y, y), 5)
  want = 1.0 - np.prod([(n - j) / (2 * n - j) for j in range(1, 6)])
  assert abs(float(got['coverage']) - want) < 0.02  # ~4 sigma at n = 1000
  # k is clipped to P - 1 and P = 1 has no coverage radius.
  one = drifting.coverage_stats(jnp.ones((1, 3, 1)), jnp.zeros((1, 1, 1)))
  assert set(one) == {'nn_dist_rev'}


def _validate(dataset='toy2d:8gaussians', **overrides):
  config = bench.get_config(f'method=drifting,dataset={dataset}')
  config.update_from_flattened_dict(overrides)
  drifting.Method.validate_config(config)


@pytest.mark.parametrize('dataset,overrides', [
    ('toy2d:8gaussians', {}),
    # the official toy demo: one τ = 0.05 in raw units, no normalisation
    ('toy2d:8gaussians', {'method.temperatures': (0.05,),
                          'method.feature_norm': False,
                          'method.drift_norm': False}),
    ('toy2d:8gaussians', {'method.temperatures': (0.05, 0.2)}),
    ('toy2d:8gaussians', {'method.temperatures': (0.1,)}),
    # no separated modes: a single narrow τ trains (sliced W2 as default)
    ('toy2d:checkerboard', {'method.temperatures': (0.05,)}),
    ('toy2d:8gaussians_torchcfm', {'method.temperatures': (0.05,)}),
    # images: single narrow τ is the paper's A.6 ablation (not refused)
    ('digits', {'method.temperatures': (0.02,)}),
    ('digits', {'data.conditional': True, 'model.guidance_embed': True,
                'evals.main.guidance': 2.0}),
])
def test_validate_config_accepts(dataset, overrides):
  _validate(dataset, **overrides)


@pytest.mark.parametrize('overrides,key,match', [
    ({'method.temperatures': (0.0,)}, 'method.temperatures', '> 0'),
    ({'method.temperatures': (-0.1, 0.2)}, 'method.temperatures', '> 0'),
    ({'method.temperatures': ()}, 'method.temperatures', 'non-empty'),
    ({'method.temperatures': (float('nan'),)}, 'method.temperatures',
     'finite'),
    ({'method.temperatures': (1e-4,)}, 'method.temperatures', '>= 0.01'),
    ({'method.temperatures': (1e-4, 0.2)}, 'method.temperatures', '>= 0.01'),
    ({'method.temperatures': (0.01,)}, 'method.temperatures', 'one-mode'),
    ({'method.temperatures': (0.05,)}, 'method.temperatures', 'one-mode'),
    ({'method.temperatures': (0.05,), 'method.drift_norm': False},
     'method.temperatures', 'one-mode'),
    ({'method.temperatures': (0.02, 0.05)}, 'method.temperatures',
     'one-mode'),
    ({'method.affinity_floor': 1e-6}, 'method.affinity_floor', 'swamps'),
    ({'method.affinity_floor': -1.0}, 'method.affinity_floor', '>= 0'),
    ({'method.num_gen': -1}, 'method.num_gen', '>= 0'),
    ({'method.features': 'bogus'}, 'method.features', 'one of'),
    ({'method.features': 'encoder'}, 'method.features', 'needs image data'),
    ({'method.encoder_max_locations': 0}, 'method.encoder_max_locations',
     '>= 1'),
    ({'method.num_unc': -1}, 'method.num_unc', '>= 0'),
    ({'method.cfg_alpha_max': 0.5}, 'method.cfg_alpha_max', '>= 1'),
    ({'method.cfg_p_one': 1.5}, 'method.cfg_p_one', '<= 1'),
    ({'evals.main.guidance': 2.0}, 'evals.main.guidance', 'without CFG'),
])
def test_validate_config_refuses(overrides, key, match):
  with pytest.raises(cc.ConfigError, match=match) as err:
    _validate(**overrides)
  assert err.value.key == key and err.value.fix


@pytest.mark.parametrize('overrides,key,match', [
    ({'data.conditional': True}, 'model.guidance_embed', 'feeds α'),
    ({'data.conditional': True, 'model.guidance_embed': True,
      'method.classes_per_step': 3}, 'method.classes_per_step', 'divide'),
    ({'data.conditional': True, 'model.guidance_embed': True,
      'evals.main.guidance': 0.5}, 'evals.main.guidance', '>= 1'),
])
def test_validate_config_refuses_images(overrides, key, match):
  with pytest.raises(cc.ConfigError, match=match) as err:
    _validate('digits', **overrides)
  assert err.value.key == key


@pytest.mark.parametrize('name', sorted(drifting.PRESETS))
def test_official_presets_validate(name):
  """Each official preset names get_config keys and passes validate_config.

  Image presets on a class-conditional digits smoke config with CFG (the
  official runs are), batch = classes_per_step x 64 positives; the toy
  demo's on toy2d:8gaussians (raw units: no τ floor applies).
  """
  preset = drifting.PRESETS[name]
  assert set(preset) <= set(drifting.get_config()), (
      set(preset) - set(drifting.get_config()))
  toy = name == 'toy'
  config = bench.get_config('method=drifting,smoke=True,dataset='
                            + ('toy2d:8gaussians' if toy else 'digits'))
  config.method.update(preset)
  if not toy:
    config.update_from_flattened_dict({
        'data.conditional': True, 'model.guidance_embed': True,
        'train.batch_size': preset['classes_per_step'] * 64})
  drifting.Method.validate_config(config)
  for k, v in preset.items():
    assert config.method[k] == v, k


def test_separated_modes():
  assert drifting.separated_modes('8gaussians')
  assert drifting.separated_modes('8gaussians_imbalanced')
  assert drifting.separated_modes('25gaussians')
  assert not drifting.separated_modes('8gaussians_torchcfm')
  assert not drifting.separated_modes('checkerboard')
  with pytest.raises(cc.ConfigError, match='separated modes'):
    _validate('toy2d:25gaussians', **{'method.temperatures': (0.05,)})


def test_toy_ablations_are_all_allowed():
  exp = drifting_toy_ablations
  sweeps = [getattr(exp, n) for n in dir(exp) if n.startswith('sweep_')]
  for sweep in sweeps:
    for overrides in sweep():
      _validate(**overrides)


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


def test_cfg_negatives_weight_and_layout():
  pos = jnp.arange(12.0)[:, None]  # G=3 blocks of P=4; N=5, N_unc=2
  alpha, unc, w = drifting.cfg_negatives(
      jax.random.key(0), jax.random.key(1), pos, 3, 5, num_unc=2,
      alpha_max=4.0, power=3.0, p_one=0.0)
  assert alpha.shape == (15,) and unc.shape == (6, 1) and w.shape == (3,)
  a_g = alpha[::5]  # one α per class group, repeated over its N samples
  np.testing.assert_array_equal(alpha, jnp.repeat(a_g, 5))
  np.testing.assert_allclose(w, (a_g - 1.0) * 4 / 2)  # (α-1)(N-1)/N_unc
  assert bool(jnp.all(jnp.isin(unc, pos)))


def test_feature_loss_sums_drift_loss_over_keys():
  kx, kp = jax.random.split(jax.random.key(4))
  fx = {'a': jax.random.normal(kx, (6, 2, 3)),
        'b': jax.random.normal(kx, (6, 1, 4))}
  fp = {'a': jax.random.normal(kp, (8, 2, 3)),
        'b': jax.random.normal(kp, (8, 1, 4))}
  total, metrics = drifting.feature_loss(fx, fp, 2, temperatures=(0.2,))
  parts = [drifting.drift_loss(drifting.regroup(fx[k], 2),
                               drifting.regroup(fp[k], 2),
                               temperatures=(0.2,)) for k in ('a', 'b')]
  np.testing.assert_allclose(total, parts[0][0] + parts[1][0], rtol=1e-6)
  assert float(metrics['num_feature_keys']) == 2
  assert {'field_rms/a', 'field_rms/b'} <= set(metrics)


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


@pytest.mark.slow  # fast twin: test_results_integrity's drifting CFG e2e
def test_images_pixels_conditional_cfg():
  config, ds, method = _image_method(**{
      'data.conditional': True, 'model.guidance_embed': True,
      'model.style_tokens': 4, 'model.style_vocab': 8,
      'method.features': 'pixels', 'method.classes_per_step': 4,
      'method.num_unc': 4})
  assert method.class_groups == 4 and method.cfg
  state, metrics = _two_steps(config, ds, method)
  assert {'field_rms/global', 'nn_dist', 'nn_dist_rev', 'coverage'} <= set(
      metrics)
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


@pytest.mark.slow  # fast twins: test_encoders + feature_loss tests here
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


@pytest.mark.parametrize('dataset,features,want', [
    ('digits', 'auto', 'features=pixels'),  # 'auto' resolves to pixels
    ('digits', 'pixels+encoder', 'features=pixels+encoder'),
    ('toy2d:8gaussians', 'pixels', ''),  # toy vectors: one raw key only
])
def test_row_variant_names_the_feature_set(dataset, features, want):
  config = bench.get_config(f'method=drifting,dataset={dataset},smoke=True')
  config.method.features = features
  spec = data.build(config.data).spec
  assert load_method(config, spec).row_variant() == want  # no prepare needed
