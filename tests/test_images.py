"""Image data loaders, the classifier feature net and the image evaluator."""

import gzip
import os

import jax
import ml_collections as mlc
import numpy as np
import pytest
from conftest import smoke_config, stub_digits_classifier

from onestep_bench import data, train
from onestep_bench.config_check import ConfigError
from onestep_bench.data import idx, sources
from onestep_bench.data.images import ImageArrays, to_uint8
from onestep_bench.evaluators import image_eval, runner


def _cfg(**kw):
  return mlc.ConfigDict(kw)


# ---------------------------------------------------------------- loaders
def test_digits_real_data():
  ds = data.build(_cfg(name='digits'))
  x, y = ds.split_images('train')
  xt, _ = ds.split_images('test')
  assert x.shape == (1437, 8, 8, 1) and xt.shape == (360, 8, 8, 1)
  assert x.dtype == np.uint8 and x.max() == 255 and x.min() == 0
  assert set(np.unique(y)) == set(range(10))
  assert ds.spec.num_classes == 0  # unconditional by default
  b = jax.jit(lambda k: ds.sample(k, 16, ds.arrays))(jax.random.key(0))
  assert b['x'].shape == (16, 8, 8, 1) and 'y' not in b
  assert -1.0 <= float(b['x'].min()) and float(b['x'].max()) <= 1.0
  again = data.build(_cfg(name='digits')).split_images('test')[0]
  np.testing.assert_array_equal(xt, again)  # deterministic split


def test_conditional_batches_carry_labels():
  ds = data.build(_cfg(name='digits', conditional=True))
  assert ds.spec.num_classes == 10
  b = ds.sample(jax.random.key(1), 32)
  assert b['y'].shape == (32,) and b['y'].dtype == np.int32
  # The label belongs to the image that was drawn.
  x, y = ds.split_images('train')
  xb = to_uint8(np.asarray(b['x']))
  for i in range(4):
    j = np.flatnonzero((x == xb[i]).all(axis=(1, 2, 3)))
    assert b['y'][i] in y[j]


def test_uint8_round_trip_is_exact():
  x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  ds = ImageArrays('t', {'train': (x, np.zeros(1, np.int32))}, 1)
  np.testing.assert_array_equal(to_uint8(ds.sample(jax.random.key(0), 1)['x']),
                                x)


def test_quantize_modes_follow_edm_and_adm():
  # EDM generate.py: (x * 127.5 + 128).clip(0, 255) -> uint8 (truncation);
  # ADM image_sample.py: ((x + 1) * 127.5).clamp(0, 255) -> uint8.
  x = np.random.default_rng(0).uniform(-1.2, 1.2, (4000,)).astype(np.float32)
  x = np.r_[x, -1, 1, 0, np.float32(1 / 255)].astype(np.float32)
  edm = np.clip(x * np.float32(127.5) + np.float32(128), 0, 255)
  adm = np.clip((x + np.float32(1)) * np.float32(127.5), 0, 255)
  np.testing.assert_array_equal(to_uint8(x), np.trunc(edm).astype(np.uint8))
  np.testing.assert_array_equal(to_uint8(x, 'truncate'),
                                np.trunc(adm).astype(np.uint8))
  # Rounding keeps the mean of a continuous output; truncation drops ~0.5.
  u = np.random.default_rng(1).uniform(-1, 1, 100_000)
  level = (u + 1) * 127.5
  assert abs(to_uint8(u).mean() - level.mean()) < 0.01
  assert abs(to_uint8(u, 'truncate').mean() - level.mean() + 0.5) < 0.01
  # Pixels from to_float come back exactly only with 'round'.
  pix = np.arange(256, dtype=np.uint8)
  back = np.asarray((pix.astype(np.float32) - 127.5) / 127.5)
  np.testing.assert_array_equal(to_uint8(back), pix)
  assert (to_uint8(back, 'truncate') != pix).any()
  with pytest.raises(ValueError, match='quantize'):
    to_uint8(x, 'floor')


def _write_fashion(tmp_path, n=12, corrupt=None):
  rng = np.random.RandomState(0)
  for img, lab in sources.FASHION_MNIST_FILES.values():
    idx.write_idx(str(tmp_path / (img + '.gz')),
                  rng.randint(0, 256, (n, 28, 28)).astype(np.uint8))
    idx.write_idx(str(tmp_path / (lab + '.gz')),
                  rng.randint(0, 10, (n,)).astype(np.uint8))
  if corrupt:
    path = tmp_path / (corrupt + '.gz')
    raw = gzip.open(path).read()
    with gzip.open(path, 'wb') as f:
      f.write(raw[:-100])  # truncated payload, valid gzip


def test_idx_round_trip_and_dtypes(tmp_path):
  for arr in (np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
              np.linspace(-1, 1, 6, dtype=np.float32),
              np.arange(5, dtype=np.int32)):
    for suffix in ('', '.gz'):
      p = str(tmp_path / f'a{arr.dtype}{suffix}')
      idx.write_idx(p, arr)
      np.testing.assert_array_equal(idx.read_idx(p), arr)


def test_fashion_mnist_from_idx_dir(tmp_path):
  _write_fashion(tmp_path)
  ds = data.build(_cfg(name='fashion_mnist', dir=str(tmp_path)))
  assert ds.spec.shape == (28, 28, 1)
  assert ds.split_images('test')[0].shape == (12, 28, 28, 1)


def test_fashion_mnist_corrupt_and_missing(tmp_path):
  _write_fashion(tmp_path, corrupt='train-images-idx3-ubyte')
  with pytest.raises(idx.IdxError, match='truncated or corrupt'):
    data.build(_cfg(name='fashion_mnist', dir=str(tmp_path)))
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'x').write_bytes(b'\x08\x03garbage')
  with pytest.raises(idx.IdxError, match='not an IDX file'):
    idx.read_idx(str(tmp_path / 'bad' / 'x'))
  with pytest.raises(sources.DatasetNotFoundError, match='apt-get install'):
    data.build(_cfg(name='fashion_mnist', dir=str(tmp_path / 'empty')))


def test_tfds_sources_with_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    for name, shape in (('mnist', (28, 28, 1)), ('cifar10', (32, 32, 3))):
      ds = data.build(_cfg(name=name, conditional=True))
      assert ds.spec.shape == shape and ds.spec.num_classes == 10
      assert ds.split_images('train')[0].shape == (6, *shape)
      assert ds.sample(jax.random.key(0), 4)['y'].shape == (4,)


def test_tfds_not_prepared(tmp_path):
  with pytest.raises(sources.DatasetNotFoundError, match='tfds build'):
    data.build(_cfg(name='cifar10', dir=str(tmp_path)))


def test_latents_and_unknown_dataset(tmp_path):
  np.save(tmp_path / 'train_latents.npy',
          np.random.randn(10, 4, 4, 4).astype(np.float32))
  np.save(tmp_path / 'train_labels.npy', np.arange(10) % 3)
  ds = data.build(_cfg(name=f'latents:{tmp_path}', latent_scale=0.5,
                       conditional=True))
  assert ds.spec.kind == 'latent' and ds.spec.num_classes == 3
  b = ds.sample(jax.random.key(0), 5)
  assert b['x'].shape == (5, 4, 4, 4) and b['x'].dtype == np.float32
  with pytest.raises(ValueError, match='decoder'):
    image_eval.get_extractor(ds, _cfg(feature_net='auto'))
  with pytest.raises(sources.DatasetNotFoundError):
    data.build(_cfg(name=f'latents:{tmp_path}/none'))
  with pytest.raises(ValueError, match='fashion_mnist'):
    data.build(_cfg(name='fashoin_mnist'))


# --------------------------------------------------------------- evaluator
class _PixelFeatures:
  """A deterministic stand-in feature net: pixels as features."""

  weights_sha256 = 'pixels'

  def __call__(self, images):
    f = images.reshape(len(images), -1).astype(np.float64) / 255.0
    probs = np.full((len(images), 10), 0.1)
    return {'features': f, 'probs': probs}


def test_reference_cache_key(tmp_path, monkeypatch):
  monkeypatch.setenv('ONESTEP_CACHE', str(tmp_path))
  ds = data.build(_cfg(name='digits'))
  ref = image_eval.reference_stats(ds, _PixelFeatures(), 'pix', 'train', 500)
  again = image_eval.reference_stats(ds, _PixelFeatures(), 'pix', 'train', 500)
  assert again['path'] == ref['path']
  np.testing.assert_array_equal(again['sigma'], ref['sigma'])
  other = image_eval.reference_stats(ds, _PixelFeatures(), 'pix', 'test', 500)
  assert other['path'] != ref['path'] and other['key']['n'] == 360
  # A tampered entry is refused, never silently reused.
  with np.load(ref['path']) as z:
    items = dict(z)
  items['key'] = np.frombuffer(b'{"n": 1}', np.uint8)
  np.savez(ref['path'], **items)
  with pytest.raises(ValueError, match='delete it'):
    image_eval.reference_stats(ds, _PixelFeatures(), 'pix', 'train', 500)


def test_fid_of_real_data_is_small(tmp_path, monkeypatch):
  monkeypatch.setenv('ONESTEP_CACHE', str(tmp_path))
  stub_digits_classifier(monkeypatch, _PixelFeatures())
  ds = data.build(_cfg(name='digits'))
  ev = _cfg(feature_net='auto', ref_split='train', ref_n=0, fid_bootstrap=3)
  x_test = ds.split_images('test')[0].astype(np.float64) / 127.5 - 1
  real = image_eval.score_images(x_test, ds, ev, seed=0)
  noise = image_eval.score_images(
      np.random.RandomState(0).uniform(-1, 1, x_test.shape), ds, ev, seed=0)
  assert real['fid'] < 0.1 * noise['fid']
  assert real['fid_ci_lo'] <= real['fid_ci_hi']
  assert real['precision'] > noise['precision']
  assert abs(real['inception_score'] - 1.0) < 1e-6  # uniform stand-in probs
  assert real['settings'] == {
      'quantize': 'round', 'is_split_size': 5000, 'is_num_splits': 1,
      'pr_k': 3, 'fid_bootstrap': 3, 'ref_split': 'train', 'ref_n': 0,
      'max_ref_features': 10_000, 'kid_num_subsets': 100,
      'kid_subset_size': 1000}
  assert all(isinstance(v, (str, int, float, bool))
             for v in real['settings'].values())


def test_score_images_options_are_used_and_checked(tmp_path, monkeypatch):
  monkeypatch.setenv('ONESTEP_CACHE', str(tmp_path))
  seen = []

  class Spy(_PixelFeatures):
    def __call__(self, images):
      seen.append(images)
      return super().__call__(images)

  stub_digits_classifier(monkeypatch, Spy())
  ds = data.build(_cfg(name='digits'))
  x = ds.split_images('test')[0][:300].astype(np.float32) / 127.5 - 1
  ev = _cfg(feature_net='auto', ref_n=200, fid_bootstrap=0, quantize='truncate',
            is_split_size=128, pr_k=4)
  out = image_eval.score_images(x, ds, ev, seed=0)
  fed = [im for im in seen if im.shape == x.shape]  # not reference / floor
  assert any(np.array_equal(im, to_uint8(x, 'truncate')) for im in fed)
  assert not any(np.array_equal(im, to_uint8(x)) for im in fed)
  assert 'fid_ci_lo' not in out and out['reference']['n'] == 200
  assert out['settings'] == dict(
      quantize='truncate', is_split_size=128, is_num_splits=3, pr_k=4,
      fid_bootstrap=0, ref_split='train', ref_n=200, max_ref_features=10_000,
      kid_num_subsets=100, kid_subset_size=1000)
  for key, bad in (('quantize', 'floor'), ('is_split_size', 0),
                   ('pr_k', 2.5), ('fid_bootstrap', -1), ('ref_n', True)):
    with pytest.raises(ConfigError, match=f'evals.main.{key}'):
      image_eval.eval_settings(_cfg(**{key: bad}), 'main')


def test_image_smoke_run(tmp_path, cheap_classifier):
  config = smoke_config('flow_matching', 'digits')
  summary = train.train_and_evaluate(config, str(tmp_path))
  rec = summary['evals'][0]
  assert rec['feature_net'] == 'classifier:digits'
  assert rec['reference']['dataset'] == 'digits'
  for k in ('fid', 'fid_floor', 'inception_score', 'precision', 'recall',
            'kid'):
    assert np.isfinite(rec["metrics"][k]), k
  assert os.path.exists(tmp_path / 'samples_nfe1.png')
  x = np.load(tmp_path / rec['samples_file'])['x']
  assert x.shape == (config.evals.main.n_samples, 8, 8, 1)


def test_conditional_sampling_uses_balanced_labels():
  labels = np.asarray(runner.sample_labels(jax.random.key(0), 100, 10))
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 10))
  assert not np.array_equal(labels, np.arange(100) % 10)


def test_grouped_batches_are_one_class_per_block():
  ds = data.build(mlc.ConfigDict(dict(
      name='digits', dir='', conditional=True, hflip=False)))
  arrays = ds.arrays  # device arrays, built outside jit
  batch = jax.jit(lambda k: ds.sample(k, 40, arrays, groups=4))(
      jax.random.key(0))
  y = np.asarray(batch['y']).reshape(4, 10)
  assert (y == y[:, :1]).all(), y
  # Classes drawn at data frequency: over many draws every class appears.
  seen = set()
  for i in range(20):
    seen |= set(np.asarray(ds.sample(jax.random.key(i), 40, groups=4)['y']))
  assert seen == set(range(10))
  with pytest.raises(ValueError, match='not divisible'):
    ds.sample(jax.random.key(0), 42, groups=4)
  # Unconditional data ignores the request (one group: the plain batch).
  unc = data.build(mlc.ConfigDict(dict(
      name='digits', dir='', conditional=False, hflip=False)))
  assert 'y' not in unc.sample(jax.random.key(0), 8, groups=4)
