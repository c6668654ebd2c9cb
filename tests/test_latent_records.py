"""Training on prepare_latents records (`onestep_latents/v1`).

A tiny split written with the format's own writer (records.encode_record /
write_shard / write_json, the sidecar keys of prepare_latents): 12 records
of 2 views x 32x32x4 (the smoke DiT's latent shape), shards of 5 (the last
one short), labels in [0, 1000).
"""

from __future__ import annotations

import os

import grain
import jax
import ml_collections
import numpy as np
import pytest

from onestep_bench import data
from onestep_bench.config_check import ConfigError
from onestep_bench.data import latent_records, pipeline
from onestep_bench.vae import records

pytest.importorskip('array_record')

N, PER_SHARD, SHAPE, SCALE = 12, 5, (32, 32, 4), 0.18215


def write_split(out, split='train', *, stat='mean', views=('x', 'hflip'),
                dtype='float32', seed=0, n=N, latent_scale=SCALE):
  """Writes a records split as prepare_latents does; returns (lat, labels)."""
  spec = records.LatentSpec(SHAPE, dtype, stat, views)
  rng = np.random.default_rng(seed)
  lat = rng.standard_normal((n, *spec.shape)).astype(spec.np_dtype)
  labels = rng.integers(0, 1000, n)
  bounds = records.shard_bounds(n, PER_SHARD)
  os.makedirs(out, exist_ok=True)
  records.write_json(records.sidecar_path(out, split), {
      **spec.to_sidecar(), 'split': split, 'count': n,
      'num_shards': len(bounds), 'records_per_shard': PER_SHARD,
      'latent_scale': latent_scale, 'latent_shift': 0.0,
      'vae': {'name': 'test', 'sha256': '0' * 64, 'config': {},
              'precision': 'highest'},
      'source': {'tfds': 'imagenet2012', 'split': split, 'num_classes': 1000},
      'preprocess': {'crop': 'adm_center_crop', 'size': 256,
                     'input': 'x / 127.5 - 1'},
      'options': records.OPTIONS})
  for s, (lo, hi) in enumerate(bounds):
    records.write_shard(
        records.shard_path(out, split, s, len(bounds)),
        [records.encode_record(lat[i], int(labels[i]), i, spec)
         for i in range(lo, hi)])
  return lat, labels


def _cfg(out, **kw):
  return ml_collections.ConfigDict({
      'name': f'latents:{out}', 'dir': '', 'conditional': True,
      'hflip': False, 'latent_scale': SCALE, 'pipeline': 'grain', **kw})


@pytest.fixture(scope='module')
def split(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('records'))
  return (out, *write_split(out))


def test_grain_batches_are_the_stored_latents_unscaled(split):
  out, lat, labels = split
  ds = data.build(_cfg(out))
  assert ds.host_fed and ds.scale == 1.0
  assert ds.spec.shape == SHAPE and ds.spec.kind == 'latent'
  assert ds.spec.num_classes == 1000
  src = ds.train_source
  assert isinstance(src, latent_records.LatentRecordSource)
  assert len(src) == 2 * N  # every view is an example
  # Example i = view i % 2 of record i // 2, values exactly as stored.
  got = src.read_batch(np.arange(2 * N))
  np.testing.assert_array_equal(got['x'], lat.reshape(2 * N, *SHAPE))
  np.testing.assert_array_equal(got['y'], np.repeat(labels, 2))
  assert src[7]['x'].dtype == np.float32 and src[7]['y'] == labels[3]
  np.testing.assert_array_equal(src[7]['x'], lat[3, 1])
  # The fed training batches: one epoch of the seeded shuffle covers both
  # views of every record once; `sample` does not scale them again.
  b = 8
  rows = pipeline.local_batches(src, global_batch=b, seed=0,
                                shard=grain.sharding.ShardOptions(0, 1))
  epoch = [rows[s] for s in range(2 * N // b)]
  xs = np.concatenate([e['x'] for e in epoch])
  ys = np.concatenate([e['y'] for e in epoch])
  flat = lat.reshape(2 * N, -1)
  hit = [int(np.flatnonzero((flat == x.reshape(-1)).all(1))[0]) for x in xs]
  assert sorted(hit) == list(range(2 * N))  # both views, once each
  np.testing.assert_array_equal(ys, np.repeat(labels, 2)[hit])
  fed = {'x': jax.numpy.asarray(epoch[0]['x']),
         'y': jax.numpy.asarray(epoch[0]['y'])}
  batch = ds.sample(jax.random.key(0), b, fed)
  np.testing.assert_array_equal(np.asarray(batch['x']), epoch[0]['x'])
  np.testing.assert_array_equal(np.asarray(batch['y']), epoch[0]['y'])
  # Evaluation-side reads see the same examples.
  x_all, y_all = ds.split_images('train')
  np.testing.assert_array_equal(x_all, lat.reshape(2 * N, *SHAPE))
  np.testing.assert_array_equal(y_all, np.repeat(labels, 2))


def test_float16_single_view_and_held_out_split(tmp_path):
  out = str(tmp_path)
  lat, _ = write_split(out, dtype='float16', views=('x',))
  val, _ = write_split(out, 'validation', dtype='float16', views=('x',),
                       seed=1, n=3)
  ds = data.build(_cfg(out))
  assert len(ds.train_source) == N and sorted(ds.splits) == ['train',
                                                             'validation']
  x, _ = ds.split_images('validation')
  assert x.dtype == np.float32
  np.testing.assert_array_equal(x, val[:, 0].astype(np.float32))
  np.testing.assert_array_equal(ds.train_source[5]['x'], lat[5, 0])


def test_wrong_latent_scale_and_hflip_fail_before_compute(split):
  out = split[0]
  unset = _cfg(out)
  del unset['latent_scale']
  for bad in (_cfg(out, latent_scale=1.0), _cfg(out, latent_scale=0.2),
              unset):
    with pytest.raises(ConfigError, match=r'config\.data\.latent_scale=.*'
                       r'0\.18215.*--config\.data\.latent_scale=0\.18215'):
      data.build(bad)
  data.build(_cfg(out, latent_scale=SCALE * (1 + 1e-7)))  # within rel 1e-6
  with pytest.raises(ConfigError, match=r'config\.data\.hflip=True'):
    data.build(_cfg(out, hflip=True))


def test_device_path_refuses_records(split):
  with pytest.raises(ConfigError, match=r"config\.data\.pipeline='device'.*"
                     r'onestep_latents/v1.*--config\.data\.pipeline=grain'):
    data.build(_cfg(split[0], pipeline='device'))


def test_moments_are_refused_naming_the_file_and_fix(tmp_path):
  out = str(tmp_path)
  write_split(out, stat='moments')
  with pytest.raises(latent_records.LatentRecordsError,
                     match=r'train\.json: stat=.moments.*--stat=mean'):
    data.build(_cfg(out))


def test_fingerprint_changes_with_a_record(tmp_path):
  out = str(tmp_path)
  lat, labels = write_split(out)
  first = latent_records.LatentRecordSource(out, 'train').fingerprint()
  assert first == latent_records.LatentRecordSource(out, 'train').fingerprint()
  spec = records.LatentSpec(SHAPE)
  lat[6, 1, 0, 0, 0] += 1.0  # record 6 lives in shard 1
  records.write_shard(records.shard_path(out, 'train', 1, 3),
                      [records.encode_record(lat[i], int(labels[i]), i, spec)
                       for i in range(5, 10)])
  assert latent_records.LatentRecordSource(out, 'train').fingerprint() != first


def test_damaged_splits_are_refused(tmp_path):
  out = str(tmp_path)
  write_split(out)
  os.remove(records.shard_path(out, 'train', 2, 3))
  with pytest.raises(records.IncompleteError, match='Re-run'):
    data.build(_cfg(out))


def test_smoke_trains_on_latent_records(split, tmp_path):
  from experiments import paper  # pylint: disable=g-import-not-at-top
  from onestep_bench import train  # pylint: disable=g-import-not-at-top
  c = paper.get_config('method=flow_matching,dataset=imagenet256_latent,'
                       'smoke=True')
  c.data.name = f'latents:{split[0]}'
  c.data.pipeline = 'grain'
  c.data.latent_scale = records.read_sidecar(split[0],
                                             'train')['latent_scale']
  c.mesh.data = 1
  s = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert s['steps'] == 2 and s['evals'] == []
