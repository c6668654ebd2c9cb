"""Latent datasets: samples are VAE-decoded before the feature network.

The tiny VAE (`vae.tiny_config()`, f = 2) on random weights decodes 8x8x4
latents to 16x16 RGB images; a deterministic stand-in feature net (random
projections of the pixels) replaces the Inception, so the fast tests stay
cheap. The slow test is a mock latent-ImageNet run: train, sample, decode,
score against an ADM reference batch, record a row.
"""

import csv
import os

import ml_collections
import numpy as np
import pytest

from onestep_bench import vae
from onestep_bench.config_check import ConfigError
from onestep_bench.data.images import ImageArrays
from onestep_bench.evaluators import decode, image_eval, reference, runner
from onestep_bench.vae import weights

TINY = vae.tiny_config()
LATENT = (8, 8, 4)  # -> 16x16x3 images
INCEPTION_KEY = ('inception_v3/legacy_tf', None)  # no weights file found


class ProjFeatures:
  """uint8 images -> fixed random projections (features, spatial, logits)."""

  has_spatial = True
  weights_sha256 = 'proj'

  def __init__(self):
    self.seen = []

  def __call__(self, images):
    images = np.asarray(images)
    assert images.dtype == np.uint8 and images.shape[-1] == 3
    self.seen.append(images)
    x = images.reshape(len(images), -1) / 255.0
    rng = np.random.RandomState(0)
    d = x.shape[1]
    out = {k: x @ (rng.randn(d, n) / np.sqrt(d))
           for k, n in (('features', 16), ('spatial', 8), ('logits', 10))}
    out['spatial'] = out['spatial'].astype(np.float32)
    return out


@pytest.fixture(scope='module')
def vae_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('vae') / 'tiny.npz')
  weights.save(weights.flatten(weights.random_params(TINY, seed=1)), TINY,
               path)
  return path


@pytest.fixture
def stub(tmp_path, monkeypatch):
  monkeypatch.setenv('ONESTEP_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setenv('ONESTEP_INCEPTION_WEIGHTS', str(tmp_path / 'none.npz'))
  monkeypatch.delenv('ONESTEP_VAE_WEIGHTS', raising=False)
  ext = ProjFeatures()
  monkeypatch.setitem(image_eval._EXTRACTORS, INCEPTION_KEY, ext)
  return ext


def _latents(n, seed):
  return np.random.RandomState(seed).randn(n, *LATENT).astype(np.float32)


def _dataset(scale=0.5):
  splits = {'train': (_latents(24, 0), np.arange(24) % 3),
            'test': (_latents(16, 1), np.arange(16) % 3)}
  return ImageArrays('latents:mock', splits, 3, kind='latent', scale=scale)


def _ev(**kw):
  return ml_collections.ConfigDict({
      'feature_net': 'inception_v3', 'fid_bootstrap': 0, 'pr_k': 2,
      'fd_dinov2': 'off', **kw})


def test_samples_are_decoded_and_rows_name_the_vae(vae_file, stub):
  ds = _dataset(scale=0.5)
  ev = _ev(vae=vae_file, vae_config='file')
  samples = 0.5 * _latents(12, 2)
  m = image_eval.score_images(samples, ds, ev, seed=0)
  dec = decode.get_decoder(ev)
  want = dec(samples / 0.5)  # the data multiplier is undone first
  assert want.shape == (12, 16, 16, 3) and want.dtype == np.uint8
  assert any(im.shape == want.shape and np.array_equal(im, want)
             for im in stub.seen)
  # The reference split is decoded too (the dataset's own statistics).
  ref_images = dec(ds.split_images('train')[0])
  assert any(np.array_equal(im, ref_images) for im in stub.seen)
  sha = weights.file_sha256(vae_file)[:16]
  assert m['reference']['vae_sha256'] == sha
  for k, v in (('vae', 'tiny-vae'), ('vae_sha256', sha),
               ('latent_scale', TINY.scaling_factor), ('latent_shift', 0.0),
               ('data_latent_scale', 0.5)):
    assert m['settings'][k] == v, k
  assert np.isfinite(m['fid']) and np.isfinite(m['fid_floor'])
  prov = runner.provenance(dict(m), ds, ev)
  assert f'vae_sha256={sha}' in prov['eval_settings']
  assert 'vae=tiny-vae' in prov['eval_settings']


def test_missing_vae_fails_before_any_compute(tmp_path, stub):
  ds = _dataset()
  missing = str(tmp_path / 'sd-vae-ft-ema.npz')
  for ev in (_ev(vae=missing), _ev()):
    with pytest.raises(ConfigError, match='evals.main.vae') as e:
      image_eval.eval_settings(ev, 'main', latent=True)
    assert 'onestep_bench.vae.convert' in str(e.value)
    assert '.npz' in str(e.value)
  with pytest.raises(ConfigError, match=missing):
    image_eval.score_images(_latents(4, 3), ds, _ev(vae=missing), seed=0)
  with pytest.raises(ConfigError, match='vae_config'):
    image_eval.eval_settings(_ev(vae_config='sd-vae-xl'), 'main', latent=True)
  assert not stub.seen


@pytest.mark.slow
def test_mock_imagenet_latent_run(tmp_path, stub, vae_file):
  """Tiny DiT on mock latents: train, sample, decode, FID vs ADM, a row."""
  from experiments import paper  # pylint: disable=g-import-not-at-top
  from onestep_bench import results, train  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path / 'latents'
  os.makedirs(data_dir)
  lat = _latents(32, 4)
  np.save(data_dir / 'train_latents.npy', lat)
  np.save(data_dir / 'train_labels.npy', np.arange(32) % 4)
  # The reference batch: decoded training latents, stats of the same net.
  ev = _ev(vae=vae_file, vae_config='file')
  npz = str(tmp_path / 'VIRTUAL_mock256_labeled.npz')
  reference.write_adm_batch(npz, decode.get_decoder(ev)(lat), ProjFeatures())
  c = paper.get_config('method=flow_matching,protocol=equal_budget,'
                       'smoke=True')
  c.data.name = f'latents:{data_dir}'
  c.mesh.data = 1
  c.evals = ml_collections.ConfigDict({'main': dict(
      paper._EVAL, nfe=(1,), n_samples=16, batch_size=8, pr_k=2,  # pylint: disable=protected-access
      fd_dinov2='off', reference=f'adm:{npz}', vae=vae_file,
      vae_config='file', cache_every=1)})  # streamed: 2 cached parts
  c.evals.main.guidance = ml_collections.config_dict.placeholder(float)
  s = train.train_and_evaluate(c, str(tmp_path / 'run'))
  rec = s['evals'][0]
  sha = reference.file_sha256(npz)
  assert rec['ref_stats'] == f'VIRTUAL_mock256_labeled.npz@{sha[:12]}'
  assert np.isfinite(rec['metrics']['fid']) and rec['metrics']['fid'] > 0
  assert 'vae=tiny-vae' in rec['eval_settings']
  x = np.load(tmp_path / 'run' / rec['samples_file'])['x']
  assert x.shape == (8, *LATENT)  # streamed: the first chunk is kept
  parts = os.listdir(tmp_path / 'run' / 'eval_cache' / 'main_nfe1')
  assert sorted(parts) == ['key.json', 'part_000000_000000.npz',
                           'part_000001_000001.npz']
  _resume_through_the_runner(c, tmp_path, rec)
  results.record(s, str(tmp_path / 'results'))
  with open(tmp_path / 'results' / 'runs.csv') as f:
    rows = list(csv.DictReader(f))
  main = [r for r in rows if r['eval'] == 'main']
  assert any(r['metric'].startswith('fid') for r in main)
  assert all(r['ref_stats'] == rec['ref_stats'] for r in main)
  assert all('vae_sha256=' in r['eval_settings'] for r in main)


class _Interrupt(Exception):
  pass


def test_streamed_features_resume_bit_for_bit(tmp_path, stub):
  """Preempted after 3 chunks, the rerun reads 2 cached, samples the rest."""
  from onestep_bench.evaluators import streaming  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(5)
  splits = {'train': (rng.randint(0, 256, (24, 8, 8, 3)).astype(np.uint8),
                      np.zeros(24, np.int32))}
  ds = ImageArrays('mock_rgb', splits, 1)
  ctx = image_eval.prepare(ds, _ev())
  calls = []

  def sample_chunk(i):
    calls.append(i)
    return np.random.RandomState(100 + i).uniform(-1, 1, (4, 8, 8, 3))

  key = {'params': 'p', 'n': 18}
  run = dict(n=18, chunk=4, dataset=ds, ctx=ctx, key=key, cache_every=2)
  whole, first = streaming.stream_features(sample_chunk, cache=None, **run)
  assert whole['features'].shape == (18, 16) and first.shape == (4, 8, 8, 3)
  cache = str(tmp_path / 'eval_cache')

  def stop(i):
    if i == 2:
      raise _Interrupt

  calls.clear()
  with pytest.raises(_Interrupt):
    streaming.stream_features(sample_chunk, cache=cache, on_chunk=stop, **run)
  assert calls == [0, 1, 2]
  assert len(os.listdir(cache)) == 2  # key.json + part_000000_000001.npz
  calls.clear()
  resumed, first = streaming.stream_features(sample_chunk, cache=cache, **run)
  assert calls == [2, 3, 4] and first is None
  for k, v in whole.items():
    assert resumed[k].dtype == v.dtype and np.array_equal(resumed[k], v), k
  calls.clear()
  again, _ = streaming.stream_features(sample_chunk, cache=cache, **run)
  assert calls == [] and np.array_equal(again['features'],
                                        whole['features'])
  m = image_eval.score_features(again, ds, ctx, seed=0)
  assert m == image_eval.score_features(whole, ds, ctx, seed=0)
  with pytest.raises(ValueError, match='another evaluation'):
    streaming.stream_features(sample_chunk, cache=cache,
                              **{**run, 'key': {'params': 'q'}})


def _resume_through_the_runner(c, tmp_path, rec):
  """`runner.draw_and_score_streamed`: interrupted + resumed == whole."""
  import jax  # pylint: disable=g-import-not-at-top
  from conftest import final_state  # pylint: disable=g-import-not-at-top

  from onestep_bench import data  # pylint: disable=g-import-not-at-top
  from onestep_bench.method import load_method  # pylint: disable=g-import-not-at-top
  ds = data.build(c.data)
  method = load_method(c, ds.spec)
  params = final_state(c, str(tmp_path / 'run')).ema_params
  key, ev = jax.random.key(3), c.evals.main

  def go(workdir, on_chunk=None):
    return runner.draw_and_score_streamed(method, params, ds, ev, 'main', key,
                                          1, workdir, seed=0,
                                          on_chunk=on_chunk)

  whole = go(str(tmp_path / 'a'))[0]

  def stop(i):
    if i == 1:
      raise _Interrupt
  with pytest.raises(_Interrupt):
    go(str(tmp_path / 'b'), stop)
  resumed, _, first = go(str(tmp_path / 'b'))
  assert first is None  # chunk 0 came from the cache
  assert resumed['fid'] == whole['fid'] and np.isfinite(whole['fid'])
  assert resumed['precision'] == whole['precision']
  assert rec['metrics']['fid'] > 0
