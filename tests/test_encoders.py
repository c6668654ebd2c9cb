"""The frozen ResNet-MAE feature encoder (onestep_bench/encoders/).

Fast tests use a tiny recipe (width 8, 80 steps) on a temporary cache; the
full-recipe quality check is `slow`.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from onestep_bench import data, encoders
from onestep_bench.data import sources

TINY = dict(width=8, blocks=(1, 1), steps=80, batch=32, warmup=5)


def _frozen(shape, abstract=True, **recipe):
  """An untrained FrozenEncoder: abstract params (shapes) or init weights."""
  r = dict(encoders.RECIPE, **recipe)
  enc = encoders.encoder_fn(shape[-1], r['width'], r['blocks'],
                            encoders.group_rule(r))
  params = enc.abstract() if abstract else encoders.init_numpy(enc, 0)
  return encoders.FrozenEncoder(shape, params, {'recipe': r})


def _digits(**kw):
  return data.build(mlc.ConfigDict(dict(name='digits', **kw)))


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True)))


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('ONESTEP_CACHE', str(tmp_path_factory.mktemp('enc_cache')))
    yield


@pytest.fixture(scope='module')
def tiny(cache):
  """(dataset, encoder) trained once with the tiny recipe."""
  ds = _digits()
  return ds, encoders.load_or_train(ds, TINY)


# ------------------------------------------------------------ architecture
def test_num_groups():
  assert encoders.num_groups(16) == 16
  assert encoders.num_groups(64) == 32
  assert encoders.num_groups(48) == 24
  assert encoders.num_groups(12, 8) == 6
  assert encoders.num_groups(7) == 7
  assert encoders.num_groups(256, 32, 8) == 32  # the paper's 8 per group
  assert encoders.num_groups(16, 32, 8) == 2
  assert encoders.num_groups(48, 32, 8) == 6
  assert encoders.num_groups(4, 32, 8) == 1


def _expected(h, c, *, stages, locs=196):
  """Hand-derived key -> (L, C) for a square input with 1 block/stage."""
  out = {'norm_x': (1, 1)}
  maps = [('stem', h, c)] + [(f'stage{s + 1}', -(-h // 2**s), c * 2**s)
                             for s in range(stages)]
  for name, hh, cc in maps:
    out[f'{name}/mean'] = out[f'{name}/std'] = (1, cc)
    if hh * hh <= locs:
      out[f'{name}/loc'] = (hh * hh, cc)
    for p in (2, 4):
      n = (hh // p)**2
      if hh % p == 0 and 1 < n <= locs:
        out[f'{name}/mean_{p}x{p}'] = out[f'{name}/std_{p}x{p}'] = (n, cc)
  return out


@pytest.mark.parametrize('shape', [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_feature_shapes(shape):
  enc = _frozen(shape, width=16, blocks=(1, 1, 1))
  got = enc.feature_shapes()
  assert got == _expected(shape[0], 16, stages=3) | {
      'norm_x': (1, shape[-1])}
  if shape[0] == 28:  # the per-key cost bound of the brief, spelled out
    assert 'stem/loc' not in got and got['stem/mean_2x2'] == (196, 16)
    assert got['stage2/loc'] == (196, 32) and got['stage3/loc'] == (49, 64)
    assert 'stage2/mean_4x4' not in got  # 14 is not divisible by 4


def test_odd_resolution_and_block_features():
  enc = _frozen((7, 7, 1), width=8, blocks=(3, 1))
  got = enc.feature_shapes()
  # stride 2 with SAME padding: 7x7 -> 4x4; stage1's 2nd of 3 blocks is kept.
  assert got['stage2/loc'] == (16, 16) and got['stage2/mean_2x2'] == (4, 16)
  assert got['stage1.block2/loc'] == (49, 8)
  assert not any('2x2' in k for k in got if k.startswith('stage1'))
  enc.block_features = False
  assert 'stage1.block2/loc' not in enc.feature_shapes()
  enc.max_locations = 16
  assert 'stage1/loc' not in enc.feature_shapes()
  # The MAE decoder maps back to the input size.
  mae = encoders.MAE((7, 7, 1), encoders.resolve_recipe(_digits(), dict(
      width=8, blocks=(3, 1))))
  p = mae.init(0)
  x = jax.ShapeDtypeStruct((2, 7, 7, 1), jnp.float32)
  out = jax.eval_shape(mae.reconstruct, p, p['encoder'], x, x)
  assert out.shape == (2, 7, 7, 1)


def test_feature_values_and_gradient():
  enc = _frozen((8, 8, 1), abstract=False, width=8, blocks=(1, 1))
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1, maxval=1)
  f = jax.jit(enc.features)(enc.params, x)
  np.testing.assert_allclose(f['norm_x'][:, 0],
                             np.sqrt((np.asarray(x)**2).mean((1, 2)) + 1e-6),
                             rtol=1e-5)
  loc = np.asarray(f['stem/loc']).reshape(4, 8, 8, 8)
  np.testing.assert_allclose(f['stem/mean'][:, 0], loc.mean((1, 2)),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(f['stem/std'][:, 0],
                             np.sqrt(loc.var((1, 2)) + 1e-6), rtol=1e-4)
  win = loc.reshape(4, 4, 2, 4, 2, 8)
  np.testing.assert_allclose(f['stem/mean_2x2'],
                             win.mean((2, 4)).reshape(4, 16, 8), atol=1e-5)
  np.testing.assert_allclose(f['stem/std_2x2'], np.sqrt(
      win.var((2, 4)) + 1e-6).reshape(4, 16, 8), rtol=1e-4, atol=1e-6)
  # GN with 1 channel per group would pin every stage mean / std to its
  # bias / scale; `min_group_channels` keeps them informative.
  for key in ('stage1/mean', 'stage1/std', 'stage2/mean', 'stage2/std'):
    assert np.std(np.asarray(f[key]), 0).max() > 1e-3, key

  # The generator's output goes through the frozen encoder: every key has a
  # gradient path to x; none reaches the (frozen) params.
  keys = sorted(f)

  def losses(params, x):  # one scalar per key
    feats = enc.features(params, x)
    return jnp.stack([jnp.sum(feats[k]**2) for k in keys])

  gp, gx = jax.jit(jax.jacrev(losses, argnums=(0, 1)))(enc.params, x)
  assert gx.shape == (len(keys), *x.shape)
  gx = np.asarray(gx).reshape(len(keys), -1)
  assert np.all(np.isfinite(gx))
  assert np.all(np.abs(gx).sum(1) > 0), [k for k, g in zip(
      keys, gx, strict=True) if not np.abs(g).sum()]
  assert all(np.all(g == 0) for g in jax.tree.leaves(gp))


def test_patch_mask():
  mask = jax.jit(encoders.patch_mask, static_argnums=(1, 2, 3))
  m = mask(jax.random.key(0), (256, 28, 28, 1), 2, 0.5)
  assert m.shape == (256, 28, 28, 1)
  assert abs(float(m.mean()) - 0.5) < 0.01
  blocks = np.asarray(m).reshape(256, 14, 2, 14, 2)
  assert np.all(blocks.min((2, 4)) == blocks.max((2, 4)))  # whole patches
  odd = mask(jax.random.key(1), (64, 7, 7, 3), 2, 0.5)
  assert odd.shape == (64, 7, 7, 1) and abs(float(odd.mean()) - 0.5) < 0.05
  px = mask(jax.random.key(2), (512, 8, 8), 1, 0.5)
  assert abs(float(px.mean()) - 0.5) < 0.01


def test_recipe_resolution():
  r = encoders.resolve_recipe(_digits())
  assert (r['patch'], r['shift'], r['hflip']) == (1, 1, False)
  assert encoders.resolve_recipe(_digits(hflip=True))['hflip'] is True
  with pytest.raises(ValueError, match='Unknown encoder recipe'):
    encoders.resolve_recipe(_digits(), dict(widht=8))
  ds = _digits()
  base = encoders.cache_key(ds, encoders.resolve_recipe(ds, TINY))
  assert base.startswith('digits-')
  for other in (dict(TINY, steps=81), dict(TINY, seed=1)):
    assert encoders.cache_key(ds, encoders.resolve_recipe(ds, other)) != base
  flipped = _digits(hflip=True)
  assert encoders.cache_key(flipped, encoders.resolve_recipe(
      flipped, TINY)) != base


# ---------------------------------------------------------- train + cache
def test_training_reduces_masked_mse(tiny):
  _, enc = tiny
  info = enc.info
  assert info['test_masked_mse'] < 0.5 * info['test_masked_mse_init']
  assert info['test_masked_mse'] < 0.5 * info['test_masked_mse_zero_fill']
  assert {'gap', 'last'} <= set(info['knn_accuracy'])
  side = encoders.encoder_path(info['cache_key'])[:-4] + '.json'
  meta = json.loads(pathlib.Path(side).read_text())
  assert meta['params_sha256'] == info['params_sha256']


def test_cache_hit_and_miss(tiny, monkeypatch):
  ds, enc = tiny
  calls = []

  def fake_train(dataset, recipe):
    calls.append(recipe)
    return enc.params, dict(enc.info)

  # load_or_train looks `train` up in encoders/cache.py: patch it there.
  monkeypatch.setattr(encoders.cache, 'train', fake_train)
  hit = encoders.load_or_train(ds, TINY)
  assert not calls and _leaves_equal(hit.params, enc.params)
  assert hit.info == enc.info
  encoders.load_or_train(ds, dict(TINY, lr=1e-3))  # another recipe: a miss
  assert len(calls) == 1 and calls[0]['lr'] == 1e-3


def test_corrupt_cache(tiny, caplog):
  ds, enc = tiny
  r = encoders.resolve_recipe(ds, TINY)
  key = encoders.cache_key(ds, r)
  path = encoders.encoder_path(key)
  abstract = encoders.encoder_fn(1, r['width'], r['blocks'],
                                 encoders.group_rule(r)).abstract()
  good = pathlib.Path(path).read_bytes()
  try:
    # A changed value under the old checksum (silent damage) is caught.
    with np.load(path) as z:
      arrays = dict(z)
    arrays['stem/conv/kernel'] = arrays['stem/conv/kernel'] + 1e-3
    np.savez(path, **arrays)
    with pytest.raises(encoders.CacheError, match='checksum'):
      encoders.load(path, abstract, key)
    # Wrong key, missing parameters, a truncated file: CacheError each.
    with pytest.raises(encoders.CacheError, match='cache_key'):
      encoders.load(path, abstract, 'digits-0000')
    with pytest.raises(encoders.CacheError, match='parameter names'):
      encoders.load(path, encoders.encoder_fn(1, 8, (1, 1, 1)).abstract(),
                    key)
    pathlib.Path(path).write_bytes(good[:len(good) // 2])
    with pytest.raises(encoders.CacheError, match='unreadable'):
      encoders.load(path, abstract, key)
    # load_or_train says so, retrains (deterministically), rewrites the file.
    again = encoders.load_or_train(ds, TINY)
    assert 'damaged, retraining' in caplog.text and path in caplog.text
    assert _leaves_equal(again.params, enc.params)
    encoders.load(path, abstract, key)  # the rewritten file is sound
  finally:
    pathlib.Path(path).write_bytes(good)


# ------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize('name', ['digits', 'fashion_mnist'])
def test_full_recipe_quality(name, cache):
  try:
    ds = data.build(mlc.ConfigDict({'name': name}))
  except sources.DatasetNotFoundError as e:
    pytest.skip(str(e))
  enc = encoders.load_or_train(ds)
  info = enc.info
  assert info['test_masked_mse'] < 0.35 * info['test_masked_mse_zero_fill']
  assert info['knn_accuracy']['gap'] > info['knn_accuracy_init']['gap']
  x = jnp.asarray(ds.split_images('test')[0][:8], jnp.float32) / 127.5 - 1
  f = enc(x)
  assert all(np.all(np.isfinite(v)) for v in f.values())
