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
from flax import nnx

from onestep_bench import data, encoders
from onestep_bench.data import sources
from onestep_bench.models import Functional

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


def test_stride2_conv_is_centred_like_official():
  """3×3 convs pad 1 px on every side (official mae_model.py `padding=1`).

  With 'SAME' a stride-2 3×3 conv on an even size pads bottom / right only,
  so output (i, j) is centred on input (2i+1, 2j+1) while the 1×1 stride-2
  shortcut reads (2i, 2j): the residual sum is misaligned by one pixel.
  """
  x = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)
  for k in (3, 1):  # main path (identity kernel) and shortcut
    fn = Functional(lambda rngs, k=k: encoders.network.ConvGN(
        1, 1, k, stride=2, rngs=rngs))
    params = jax.tree.map(lambda a: jnp.zeros(a.shape), fn.abstract())
    params['conv']['kernel'] = params['conv']['kernel'].at[
        k // 2, k // 2].set(1.0)
    np.testing.assert_array_equal(fn.bind(params).conv(x), x[:, ::2, ::2])


# ------------------------------------------- official feature dictionary
def _official_dict(acts, x, *, pools=(2, 4)):
  """The official feature dictionary, re-derived for parity checks.

  lambertae/drifting `models/mae_model.py` `get_activations`: `norm_x` and,
  per map, every location (`<map>`), `_mean`, `_std` and `_mean_<s>` /
  `_std_<s>` whenever s divides the map (also s = map size: L = 1). `acts`
  are the maps its `_ResNetEncoder` keeps (`_official_maps`). Float64,
  under this package's key names (`<map>` -> `<map>/loc`, `_mean_<s>` ->
  `/mean_<s>x<s>`).
  """

  def stats(a, axes):
    var = ((a - a.mean(axes, keepdims=True))**2).mean(axes)
    return a.mean(axes), np.sqrt(np.maximum(var, 0.0) + 1e-6)

  x64 = np.asarray(x, np.float64)
  out = {'norm_x': np.sqrt((x64**2).mean((1, 2)) + 1e-6)[:, None]}
  for name, a in acts.items():
    a = np.asarray(a, np.float64)
    b, h, w, c = a.shape
    out[f'{name}/loc'] = a.reshape(b, h * w, c)
    m, s = stats(a, (1, 2))
    out[f'{name}/mean'], out[f'{name}/std'] = m[:, None], s[:, None]
    for p in pools:
      if h % p == 0 and w % p == 0:
        win = a.reshape(b, h // p, p, w // p, p, c).transpose(
            0, 1, 3, 2, 4, 5).reshape(b, h * w // p**2, p * p, c)
        out[f'{name}/mean_{p}x{p}'], out[f'{name}/std_{p}x{p}'] = stats(
            win, (2,))
  return out


def _official_maps(enc, params, x, every_k=2):
  """The maps official `_ResNetEncoder.__call__` keeps, on our weights.

  conv1 (our `stem`), each layer<i> after its GroupNorm (`stage<i>`) and
  the block outputs whose 1-based index is divisible by `every_k_block`
  (a stage's last block included), named `stage<i>.block<j>` (official
  `layer<i>_blk<j>`).
  """
  net = enc._net.bind(params)  # pylint: disable=protected-access
  h = nnx.relu(net.stem(x))
  maps, blocks = {'stem': h}, {}
  for s, (stage, norm) in enumerate(zip(net.stages, net.stage_norms,
                                        strict=True)):
    for j, block in enumerate(stage, start=1):
      h = block(h)
      if j % every_k == 0:
        blocks[f'stage{s + 1}.block{j}'] = h
    h = norm(h)
    maps[f'stage{s + 1}'] = h
  return {**maps, **blocks}


@pytest.fixture(scope='module')
def official():
  """One jitted pass on an init encoder (8×8, width 8, blocks (3, 2)).

  Returns (enc, x, {'ref': official dict, 'got': ours (all locations),
  'got_a': ours at 0.1·x}).
  """
  enc = _frozen((8, 8, 1), abstract=False, width=8, blocks=(3, 2))
  enc.max_locations = 10**6
  x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (3, 8, 8, 1)),
                  jnp.float32)

  def run(p, x):  # ours on [x; 0.1·x] in one batch (features are per image)
    return _official_maps(enc, p, x), enc.features(
        p, jnp.concatenate([x, 0.1 * x]))

  maps, both = jax.device_get(jax.jit(run)(enc.params, x))
  out = dict(got={k: v[:3] for k, v in both.items()},
             got_a={k: v[3:] for k, v in both.items()})
  out['ref'] = _official_dict(maps, x)
  return enc, x, out


def test_feature_dict_matches_official_logic(official):
  """Same weights, same input: our keys are official ones, values equal.

  The official keys we leave out are exactly (a) per-location / pooled maps
  with L > max_locations, (b) pooled maps with L = 1 (duplicates of the
  global mean / std, which the official sum counts twice) and (c) the last
  block of a stage (its pre-GN output beside the stage output).
  """
  enc, _, out = official
  ref, got = out['ref'], out['got']
  for k, v in got.items():
    np.testing.assert_allclose(v, ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
  dupes = {k for k, v in ref.items() if '/' in k and '_' in k.split('/')[1]
           and v.shape[1] == 1}
  last = {k for k in ref if k.startswith('stage2.block2/')}
  assert dupes and last
  assert set(ref) - set(got) == dupes | last
  for k in dupes:  # (b) really are duplicates
    name, stat = k.split('/')
    np.testing.assert_allclose(ref[k], ref[f'{name}/{stat.split("_")[0]}'])
  enc.max_locations = 16  # (a): the 8×8 maps' per-location keys go
  assert set(ref) - set(enc.feature_shapes()) == dupes | last | {
      'stem/loc', 'stage1/loc', 'stage1.block2/loc'}


def test_encoder_keys_are_blind_to_contrast(official):
  """Every key but norm_x is invariant to x -> a·x (a > 0); so is official.

  GroupNorm after every bias-free conv (official mae_model.py too) makes
  the encoder scale-invariant, f(a·x) = f(x), hence ∇f(a·x) = ∇f(x) / a
  and ∇f(x) ⟂ x: at low contrast a the encoder keys' gradient grows as 1/a
  and has no radial part. This traps a zero-initialised generator at low
  contrast (docs/methods/drifting.md §1.13); only `global` and `norm_x`
  see the scale.
  """
  _, _, out = official
  f1, fa = out['got'], out['got_a']
  for k in f1:
    a, b = np.asarray(f1[k]), np.asarray(fa[k])
    rel = np.linalg.norm(b - a) / np.linalg.norm(a)
    assert (rel > 0.5) if k == 'norm_x' else (rel < 1e-3), (k, rel)


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
