"""Backbones `unet` and `dit` (and `mlp`'s guidance input): tiny sizes."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from onestep_bench import models
from onestep_bench.data import DataSpec
from onestep_bench.models import layers

TINY_UNET = {'channels': 16, 'channel_mult': (1, 2), 'num_res_blocks': 1}


def _spec(shape, num_classes=10):
  return DataSpec(name='test', shape=tuple(shape), num_classes=num_classes,
                  kind='image' if len(shape) == 3 else 'toy2d')


def _build(name, shape, num_classes=10, **kw):
  cfg = ml_collections.ConfigDict({'name': name, **kw})
  return models.build(cfg, _spec(shape, num_classes))


def _inputs(shape, b=2, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (b, *shape))
  t = jax.random.uniform(k2, (b,))
  return x, t, 0.5 * t


def _init(net, seed=0):
  # Jitted as in train.py (eager init dispatches one op at a time: slow).
  return jax.jit(net.init)(jax.random.key(seed))


@jax.jit
def _perturb(params, scale=0.05, seed=1):
  """Noise on every leaf, so zero-init layers stop hiding the inputs."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      p + scale * jax.random.normal(k, p.shape, p.dtype)
      for p, k in zip(leaves, keys, strict=True)])


CASES = [
    ('unet', (8, 8, 1), TINY_UNET),
    # 28 -> 14 -> 7 -> 7: the last downsample is skipped (odd size). Larger
    # U-Nets compile for ~40 s on 2 cores: `make test-slow`.
    pytest.param('unet', (28, 28, 1), {'channels': 16,
                                       'channel_mult': (1, 2, 2, 2),
                                       'num_res_blocks': 1},
                 marks=pytest.mark.slow),
    pytest.param('unet', (32, 32, 3), {'channels': 16,
                                       'channel_mult': (1, 2, 2),
                                       'num_res_blocks': 1,
                                       'attn_resolutions': (16,)},
                 marks=pytest.mark.slow),
    ('dit', (8, 8, 1), {'size': 'tiny', 'patch_size': 2}),
    ('dit', (28, 28, 1), {'size': 'tiny', 'patch_size': 4}),
    ('dit', (28, 28, 1), {'size': 'tiny', 'patch_size': 2}),
    ('dit', (32, 32, 3), {'size': 'tiny', 'patch_size': 2}),
]


@pytest.mark.parametrize('name,shape,kw', CASES)
def test_shape_and_zero_init(name, shape, kw):
  net = _build(name, shape, **kw)
  params = _init(net)
  assert net.num_params() == sum(p.size for p in jax.tree.leaves(params))
  x, t, h = _inputs(shape)
  out = jax.jit(net.apply)(params, x, t, h, None)
  assert out.shape == x.shape and out.dtype == jnp.float32
  # Both backbones zero-init their output layer: exactly 0 at init.
  assert np.all(np.asarray(out) == 0.0)
  out = jax.jit(net.apply)(_perturb(params), x, t, h, None)
  assert np.all(np.isfinite(out)) and np.abs(out).max() > 0


@pytest.mark.parametrize('name,shape,kw', [
    ('unet', (8, 8, 1), TINY_UNET),
    ('dit', (8, 8, 1), {'size': 'tiny', 'patch_size': 2}),
    ('mlp', (2,), {'width': 32, 'depth': 2, 'freq_dim': 16}),
])
def test_conditioning_matters(name, shape, kw):
  net = _build(name, shape, num_classes=3, guidance_embed=True, **kw)
  params = _perturb(_init(net))
  x, t, h = _inputs(shape, b=3)
  y = jnp.array([0, 1, 2])
  g = jnp.array([0.5, 1.0, 0.25])
  f = jax.jit(net.apply)
  base = f(params, x, t, h, y, g)
  for changed in (f(params, x, t + 0.1, h, y, g),
                  f(params, x, t, h + 0.1, y, g),
                  f(params, x, t, h, (y + 1) % 3, g),
                  f(params, x, t, h, y, g + 0.3)):
    diff = np.abs(np.asarray(changed - base)).reshape(3, -1).max(-1)
    assert np.all(diff > 1e-6), diff
  null = jnp.full((3,), 3, jnp.int32)
  np.testing.assert_array_equal(f(params, x, t, h, None, g),
                                f(params, x, t, h, null, g))


@pytest.mark.parametrize('name,shape,kw', [
    ('unet', (8, 8, 1), TINY_UNET),
    ('dit', (8, 8, 1), {'size': 'tiny', 'patch_size': 2}),
    ('mlp', (2,), {'width': 32, 'depth': 2, 'freq_dim': 16}),
])
def test_guidance_input_errors(name, shape, kw):
  x, t, h = _inputs(shape)
  net = _build(name, shape, **kw)
  params = _init(net)
  with pytest.raises(ValueError, match='guidance_embed=True'):
    net.apply(params, x, t, h, None, jnp.ones(2))
  net = _build(name, shape, guidance_embed=True, **kw)
  params = _init(net)
  with pytest.raises(ValueError, match='needs the guidance input g'):
    net.apply(params, x, t, h, None)


def test_mlp_params_unchanged_by_guidance_option():
  plain = _build('mlp', (2,), width=32, depth=2, freq_dim=16)
  guided = _build('mlp', (2,), width=32, depth=2, freq_dim=16,
                  guidance_embed=True)
  p0, p1 = _init(plain), _init(guided)
  assert set(p1) - set(p0) == {'g_embed'}
  for k in p0:
    jax.tree.map(np.testing.assert_array_equal, p0[k], p1[k])


COMBOS = list(itertools.product(layers.NORMS, (False, True),
                                layers.MODULATIONS, layers.INITS))
# DiT's defaults and TVM's combination run in `make test`; all 16 in
# `make test-slow` (each combination is a separate compile).
_FAST_COMBOS = {('layernorm', False, 'adaln', 'dit'),
                ('rmsnorm', True, 'rms_adaln', 'spectral')}


@pytest.mark.parametrize('norm,qk_norm,modulation,init', [
    c if c in _FAST_COMBOS else pytest.param(*c, marks=pytest.mark.slow)
    for c in COMBOS])
def test_dit_option_combos(norm, qk_norm, modulation, init):
  net = _build('dit', (8, 8, 1), size='tiny', patch_size=2, norm=norm,
               qk_norm=qk_norm, modulation=modulation, init=init)
  params = _init(net)
  x, t, h = _inputs((8, 8, 1))
  f = jax.jit(net.apply)
  assert np.all(np.asarray(f(params, x, t, h)) == 0.0)
  out = f(_perturb(params), x, t, h)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  assert ('q_norm' in params['blocks']['0']['attn']) == qk_norm
  if init == 'spectral':
    for w in (params['patch']['kernel'],
              params['blocks']['0']['attn']['qkv']['kernel'],
              params['blocks']['1']['fc2']['kernel']):
      np.testing.assert_allclose(layers.top_singular_value(w), 1.0,
                                 rtol=1e-4)


def _jvp_and_fd(f, s, eps):
  out, dout = jax.jit(lambda s: jax.jvp(f, (s,), (jnp.ones_like(s),)))(s)
  fd = (jax.jit(f)(s + eps) - jax.jit(f)(s - eps)) / (2 * eps)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(dout))
  assert np.abs(np.asarray(dout)).max() > 1e-4
  return np.asarray(dout), np.asarray(fd)


TVM_DIT = {'norm': 'rmsnorm', 'qk_norm': True, 'modulation': 'rms_adaln',
           'init': 'spectral'}


@pytest.mark.parametrize('kw', [{}, TVM_DIT])
def test_dit_jvp_matches_finite_difference_float64(kw):
  # Tangent on t only. Everything (params, inputs, norms, softmax) runs in
  # float64 under enable_x64, so the central difference is accurate.
  net = _build('dit', (8, 8, 1), size='tiny', patch_size=2, **kw)
  params = _perturb(_init(net), scale=0.2)
  x, t, h = _inputs((8, 8, 1))
  y = jnp.array([1, 2])
  with jax.enable_x64(True):
    f64 = lambda a: np.asarray(a, np.float64)
    p64 = jax.tree.map(f64, params)
    f = lambda s: net.apply(p64, f64(x), s, f64(h), y)
    assert jax.jit(f)(f64(t)).dtype == jnp.float64
    dout, fd = _jvp_and_fd(f, f64(t), 1e-5)
  np.testing.assert_allclose(dout, fd, rtol=1e-5,
                             atol=1e-6 * np.abs(dout).max())


def test_dit_jvp_matches_finite_difference_float32():
  net = _build('dit', (8, 8, 1), size='tiny', patch_size=2, **TVM_DIT)
  params = _perturb(_init(net), scale=0.05)
  x, t, h = _inputs((8, 8, 1))
  dout, fd = _jvp_and_fd(lambda s: net.apply(params, x, s, h), t, 1e-2)
  np.testing.assert_allclose(dout, fd, rtol=0,
                             atol=2e-2 * np.abs(dout).max())


def test_unet_jvp_matches_finite_difference():
  net = _build('unet', (8, 8, 1), **TINY_UNET)
  params = _perturb(_init(net), scale=0.1)
  x, t, h = _inputs((8, 8, 1))
  # Tangent on h this time.
  dout, fd = _jvp_and_fd(lambda s: net.apply(params, x, t, s), h, 1e-2)
  np.testing.assert_allclose(dout, fd, rtol=0,
                             atol=2e-2 * np.abs(dout).max())


def test_dit_bfloat16_compute_and_learned_pos_emb():
  net = _build('dit', (8, 8, 1), size='tiny', patch_size=2,
               dtype='bfloat16', pos_emb='learned', qk_norm=True)
  params = _init(net)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert params['pos'].shape == (16, 64)
  x, t, h = _inputs((8, 8, 1))
  p = _perturb(params)
  out = jax.jit(net.apply)(p, x, t, h)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  ref = _build('dit', (8, 8, 1), size='tiny', patch_size=2,
               pos_emb='learned', qk_norm=True)
  out32 = jax.jit(ref.apply)(p, x, t, h)
  np.testing.assert_allclose(out, out32, atol=0.05 * np.abs(out32).max())


def test_bad_patch_size_names_both_numbers():
  with pytest.raises(ValueError, match=r'28x28.*patch_size=3'):
    _build('dit', (28, 28, 1), size='tiny', patch_size=3)


@pytest.mark.parametrize('name', ['mlp', 'unet', 'dit'])
def test_unknown_option_is_a_clear_error(name):
  shape = (2,) if name == 'mlp' else (8, 8, 1)
  with pytest.raises(
      ValueError, match=r'config\.model\.widht.*Valid keys:.*guidance_embed'):
    _build(name, shape, widht=3)


def test_bad_option_values():
  with pytest.raises(ValueError, match='size'):
    _build('dit', (8, 8, 1), size='M')
  with pytest.raises(ValueError, match="norm='batchnorm'"):
    _build('dit', (8, 8, 1), size='tiny', norm='batchnorm')
  with pytest.raises(ValueError, match=r'\(H, W, C\)'):
    _build('unet', (2,))


def test_options_lists_defaults():
  assert models.options('dit')['patch_size'] == 2
  assert models.options('unet')['channel_mult'] == (1, 2, 2)
  assert 'rngs' not in models.options('mlp')


@pytest.mark.parametrize('size,published', [('S', 33e6), ('B', 130e6),
                                            ('XL', 675e6)])
def test_dit_param_count_matches_paper(size, published):
  # Abstract (eval_shape): nothing is allocated. DiT's count is at 256 px
  # (32x32x4 latents, 1000 classes, learned sigma, one time embedder); ours
  # at 32x32x3 with 10 classes and a second (h) time embedder.
  net = _build('dit', (32, 32, 3), size=size, patch_size=2)
  assert abs(net.num_params() / published - 1) < 0.05, net.num_params()


@pytest.mark.parametrize('name', ['mlp', 'unet'])
def test_style_input_changes_output_and_is_required(name):
  spec = DataSpec(name='digits', shape=(8, 8, 1), kind='image')
  cfg = dict(name=name, style_tokens=3, style_vocab=5)
  if name == 'unet':
    cfg.update(channels=8, channel_mult=(1,), norm_groups=4, freq_dim=16)
  net = models.build(ml_collections.ConfigDict(cfg), spec)
  params = net.init(jax.random.key(0))
  # Break the zero-init output layer so the conditioning reaches the output.
  params = jax.tree.map(lambda a: a + 0.01, params)
  x = jnp.ones((2, 8, 8, 1))
  t = jnp.ones((2,))
  s1 = jnp.array([[0, 1, 2], [0, 1, 2]])
  s2 = jnp.array([[4, 1, 2], [0, 3, 2]])
  o1 = net.apply(params, x, t, t, None, None, s1)
  o2 = net.apply(params, x, t, t, None, None, s2)
  assert float(jnp.max(jnp.abs(o1 - o2))) > 0
  with pytest.raises(ValueError, match='style'):
    net.apply(params, x, t, t)
