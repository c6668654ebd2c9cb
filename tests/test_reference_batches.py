"""ADM reference batches (`reference='adm:<npz>'`) as an eval's reference.

Fast tests use a deterministic stand-in feature net (random projections of
the pixels, with 'spatial' outputs like the Inception's); the slow one
writes the batch with the project's own `InceptionExtractor` on random
weights.
"""

import os

import ml_collections
import numpy as np
import pytest

from onestep_bench.config_check import ConfigError
from onestep_bench.data.images import ImageArrays
from onestep_bench.evaluators import image_eval, reference, runner

SIZE = 8  # 8x8 RGB images
INCEPTION_KEY = ('inception_v3/legacy_tf', None)  # no weights file found


class ProjFeatures:
  """uint8 images -> fixed random projections (features, spatial, logits)."""

  has_spatial = True
  weights_sha256 = 'proj'

  def __init__(self):
    rng = np.random.RandomState(0)
    d = SIZE * SIZE * 3
    self.w = {k: rng.randn(d, n) / np.sqrt(d)
              for k, n in (('features', 24), ('spatial', 12), ('logits', 10))}
    self.calls = 0

  def __call__(self, images):
    self.calls += 1
    x = np.asarray(images).reshape(len(images), -1) / 255.0
    out = {k: x @ w for k, w in self.w.items()}
    out['spatial'] = out['spatial'].astype(np.float32)
    return out


def _dataset(n_train=48, n_test=32):
  rng = np.random.RandomState(1)
  splits = {s: (rng.randint(0, 256, (n, SIZE, SIZE, 3)).astype(np.uint8),
                np.zeros(n, np.int32))
            for s, n in (('train', n_train), ('test', n_test))}
  return ImageArrays('mock_rgb', splits, 1)


def _ev(**kw):
  return ml_collections.ConfigDict({
      'feature_net': 'inception_v3', 'fid_bootstrap': 0, 'pr_k': 2,
      'fd_dinov2': 'off', **kw})


@pytest.fixture
def stub(tmp_path, monkeypatch):
  monkeypatch.setenv('ONESTEP_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setenv('ONESTEP_INCEPTION_WEIGHTS', str(tmp_path / 'none.npz'))
  ext = ProjFeatures()
  monkeypatch.setitem(image_eval._EXTRACTORS, INCEPTION_KEY, ext)
  return ext


def test_fid_against_batch_equals_fid_against_same_images(tmp_path, stub):
  ds = _dataset()
  path = str(tmp_path / 'VIRTUAL_mock.npz')
  reference.write_adm_batch(path, ds.split_images('train')[0], stub)
  x = ds.split_images('test')[0].astype(np.float64) / 127.5 - 1
  own = image_eval.score_images(x, ds, _ev(), seed=0)
  adm = image_eval.score_images(x, ds, _ev(reference=f'adm:{path}'), seed=0)
  for k in ('fid', 'sfid', 'precision', 'recall', 'kid', 'inception_score'):
    assert adm[k] == pytest.approx(own[k], rel=1e-12, abs=1e-12), k
  assert 'fid_floor' in own and 'fid_floor' not in adm
  noise = image_eval.score_images(
      np.random.RandomState(2).uniform(-1, 1, x.shape), ds,
      _ev(reference=f'adm:{path}'), seed=0)
  assert noise['fid'] > adm['fid']  # the file's stats are really used
  # Rows name the file; the dataset's statistics get another id.
  p_adm = runner.provenance(dict(adm), ds, _ev())
  p_own = runner.provenance(dict(own), ds, _ev())
  sha = reference.file_sha256(path)
  assert p_adm['ref_stats'] == f'VIRTUAL_mock.npz@{sha[:12]}'
  assert p_own['ref_stats'] != p_adm['ref_stats']
  assert p_adm['reference']['file_sha256'] == sha[:16]


def test_file_stats_are_used_as_stored(tmp_path, stub):
  """FID takes mu / sigma from the file, not from features of arr_0."""
  ds = _dataset()
  path = str(tmp_path / 'ref.npz')
  images = ds.split_images('train')[0]
  feats = stub(images)
  shift = np.full(24, 0.5)
  np.savez(path, arr_0=images, mu=feats['features'].mean(0) + shift,
           sigma=np.cov(feats['features'], rowvar=False))
  ref = reference.adm_reference(path, stub, 'inception_v3/legacy_tf')
  np.testing.assert_allclose(ref['mu'], feats['features'].mean(0) + shift)
  assert 'mu_s' not in ref  # no spatial stats in the file: no sFID
  x = images.astype(np.float64) / 127.5 - 1
  m = image_eval.score_images(x, ds, _ev(reference=f'adm:{path}'), seed=0)
  assert m['fid'] == pytest.approx(float(shift @ shift), rel=1e-6)
  assert 'sfid' not in m
  calls = stub.calls
  reference.adm_reference(path, stub, 'inception_v3/legacy_tf')
  assert stub.calls == calls  # features of arr_0 come from the cache


def test_bad_reference_fails_before_any_compute(tmp_path, stub):
  ds = _dataset()
  x = np.zeros((4, SIZE, SIZE, 3))
  missing = str(tmp_path / 'VIRTUAL_imagenet256_labeled.npz')
  with pytest.raises(ConfigError, match='evals.main.reference') as e:
    image_eval.eval_settings(_ev(reference=f'adm:{missing}'), 'main')
  assert missing in str(e.value) and 'Fix:' in str(e.value)
  with pytest.raises(ConfigError, match='reference'):
    image_eval.score_images(x, ds, _ev(reference=f'adm:{missing}'), seed=0)
  with pytest.raises(ConfigError, match="'adm:"):
    image_eval.eval_settings(_ev(reference=missing), 'main')
  np.savez(tmp_path / 'bad.npz', arr_0=np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(ConfigError, match=r"\['mu', 'sigma'\]"):
    image_eval.eval_settings(_ev(reference=f'adm:{tmp_path}/bad.npz'), 'e')
  assert stub.calls == 0
  # An ADM batch holds Inception statistics: a classifier net is refused.
  np.savez(tmp_path / 'ok.npz', arr_0=np.zeros((2, 4, 4, 3), np.uint8),
           mu=np.zeros(3), sigma=np.eye(3))
  with pytest.raises(ConfigError, match='feature net'):
    image_eval.score_images(
        x, ds, _ev(reference=f'adm:{tmp_path}/ok.npz',
                   feature_net='classifier:mock_rgb'), seed=0)
  assert stub.calls == 0


@pytest.mark.slow
def test_batch_written_by_the_inception_extractor(tmp_path, monkeypatch):
  """The project's own extractor (random weights) writes and reads back."""
  from onestep_bench.evaluators import inception  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('ONESTEP_CACHE', str(tmp_path / 'cache'))
  weights = str(tmp_path / 'inception.npz')
  inception.save_params(inception.random_params(0), weights)
  ext = inception.InceptionExtractor(weights)
  ds = _dataset(n_train=12, n_test=8)
  path = str(tmp_path / 'ref.npz')
  reference.write_adm_batch(path, ds.split_images('train')[0], ext)
  with np.load(path, allow_pickle=False) as z:
    assert z['mu'].shape == (2048,) and z['mu_s'].shape == (2023,)
  ev = _ev(inception_weights=weights)
  x = ds.split_images('test')[0].astype(np.float64) / 127.5 - 1
  own = image_eval.score_images(x, ds, ev, seed=0)
  ev.reference = f'adm:{path}'
  adm = image_eval.score_images(x, ds, ev, seed=0)
  assert os.path.exists(adm['reference']['cache'])
  for k in ('fid', 'sfid', 'precision', 'recall'):
    assert adm[k] == pytest.approx(own[k], rel=1e-9), k
