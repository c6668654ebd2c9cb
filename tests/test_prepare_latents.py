"""prepare_latents: ADM crop, records, end to end on TFDS mock data, resume,
process sharding, bad input.

A tiny random VAE (`vae.tiny_config()`, f = 2) on `tfds.testing.mock_data`
(random 10×25 RGB images; labels in [0, 1000)) at --size=16; 10 examples in
shards of 4 (3 shards, the last one short), encoder batches of 8 split over
the 8 test devices.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from onestep_bench import vae
from onestep_bench.data import prepare_latents as pl
from onestep_bench.data.sources import DatasetNotFoundError
from onestep_bench.vae import records, weights

tfds = pytest.importorskip('tensorflow_datasets')
pytest.importorskip('array_record')

N, SIZE, PER_SHARD = 10, 16, 4
TINY = vae.tiny_config()


def _run(vae_file, out, **kw):
  args = dict(tfds_name='imagenet2012', split='train', size=SIZE, out=out,
              vae_path=vae_file, records_per_shard=PER_SHARD, batch_size=8,
              workers=2, progress=False)
  with tfds.testing.mock_data(num_examples=N):
    return pl.prepare(**{**args, **kw})


def _source():
  """The mock examples (deterministic per index)."""
  with tfds.testing.mock_data(num_examples=N):
    src = tfds.data_source('imagenet2012', split='train')
    return [src[i] for i in range(N)]


def _read_all(out):
  meta = records.read_sidecar(out, 'train')
  spec = records.LatentSpec.from_sidecar(meta)
  recs = [r for p in records.shard_paths(out, 'train')
          for r in records.read_shard(p)]
  return meta, records.decode_records(recs, spec)


def _shard_bytes(out):
  return [open(p, 'rb').read() for p in records.shard_paths(out, 'train')]


@pytest.fixture(scope='module')
def vae_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('vae') / 'tiny.npz')
  weights.save(weights.flatten(weights.random_params(TINY, seed=2)), TINY,
               path)
  return path


@pytest.fixture(scope='module')
def reference(vae_file, tmp_path_factory):
  """One uninterrupted single-process run: (out dir, summary)."""
  out = str(tmp_path_factory.mktemp('latents'))
  return out, _run(vae_file, out)


# ------------------------------------------------------------------ pieces


def test_center_crop_arr_is_adms():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  im = rng.integers(0, 256, (700, 1030, 3), np.uint8)
  # ADM by hand: 700 >= 2·256 -> BOX-halve to 515×350; BICUBIC to short
  # side 256 (long side round(515 · 256 / 350) = 377); central crop.
  p = Image.fromarray(im).resize((515, 350), resample=Image.BOX)
  p = np.asarray(p.resize((377, 256), resample=Image.BICUBIC))
  np.testing.assert_array_equal(pl.center_crop_arr(im, 256),
                                p[:, 60:316])
  small = pl.center_crop_arr(rng.integers(0, 256, (10, 25, 1), np.uint8), 16)
  assert small.shape == (16, 16, 3)  # upscaled, grayscale -> RGB


def test_record_format_roundtrip_and_process_split():
  spec = records.LatentSpec((4, 4, 4), 'float16', 'moments')
  assert spec.shape == (2, 2, 4, 4, 4) and spec.record_bytes == 16 + 256 * 2
  z = np.random.default_rng(0).standard_normal(spec.shape)
  rec = records.encode_record(z, 7, 42, spec)
  lat, label, index = records.decode_record(rec, spec)
  assert (label, index) == (7, 42) and lat.dtype == np.float16
  np.testing.assert_array_equal(lat, z.astype(np.float16))
  assert records.LatentSpec.from_sidecar(spec.to_sidecar()) == spec
  runs = [records.process_shards(10, p, 3) for p in range(3)]
  assert [list(r) for r in runs] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
  assert list(records.process_shards(2, 2, 3)) == []


# -------------------------------------------------------------- end to end


def test_prepare_end_to_end_on_mock_imagenet(reference, vae_file):
  out, summary = reference
  assert summary['written'] == [0, 1, 2] and summary['count'] == N
  meta, (lat, labels, index) = _read_all(out)
  assert meta['shape'] == [2, SIZE // 2, SIZE // 2, 4]
  assert meta['dtype'] == '<f4' and meta['axes'] == ['view', 'h', 'w', 'c']
  assert meta['latent_scale'] == 0.18215 and meta['count'] == N
  assert meta['vae']['sha256'] == weights.file_sha256(vae_file)
  assert meta['source']['num_classes'] == 1000
  src = _source()
  np.testing.assert_array_equal(index, np.arange(N))
  np.testing.assert_array_equal(labels, [ex['label'] for ex in src])
  # Records hold the scaled posterior mean of crop(x) and of hflip(crop(x)).
  v = vae.load_vae(vae_file)
  enc = vae.api.Batched(pl.encode_fn(TINY, 'highest', True, 'mean',
                                     'float32'), v.params, 8)
  crops = np.stack([pl.center_crop_arr(ex['image'], SIZE) for ex in src])
  direct = enc(crops[:8])
  flipped = enc(crops[:8, :, ::-1])
  np.testing.assert_allclose(lat[:8], direct, rtol=0, atol=1e-6)
  np.testing.assert_allclose(lat[:8, 1], flipped[:, 0], rtol=0, atol=1e-6)
  assert not np.allclose(lat[:, 0], lat[:, 1])  # the views differ
  # A grain reader over the shards sees the same records.
  source = records.data_source(out, 'train')
  assert len(source) == N
  assert records.decode_record(source[9], records.LatentSpec.from_sidecar(
      meta))[2] == 9


def test_resume_after_kill_gives_the_same_bytes(reference, vae_file,
                                                tmp_path, monkeypatch):
  out = str(tmp_path / 'resumed')
  real_write = records.write_shard

  class Killed(Exception):
    pass

  def dies_on_second_shard(path, data):
    if os.listdir(out) != [os.path.basename(records.sidecar_path(out,
                                                                 'train'))]:
      with open(f'{path}.tmp-99999', 'wb') as f:  # a half-written shard
        f.write(b'partial')
      raise Killed()
    real_write(path, data)

  monkeypatch.setattr(records, 'write_shard', dies_on_second_shard)
  with pytest.raises(Killed):
    _run(vae_file, out)
  monkeypatch.setattr(records, 'write_shard', real_write)
  with pytest.raises(records.IncompleteError, match='Re-run'):
    records.shard_paths(out, 'train')
  summary = _run(vae_file, out)
  assert summary['skipped'] == [0] and summary['written'] == [1, 2]
  assert _shard_bytes(out) == _shard_bytes(reference[0])
  assert not [f for f in os.listdir(out) if '.tmp-' in f]
  assert _run(vae_file, out)['written'] == []  # complete: nothing to do


def test_two_processes_cover_every_index_once(reference, vae_file, tmp_path):
  """Processes 0 and 1 of 2 write disjoint shards; together the same bytes."""
  out = str(tmp_path / 'two')
  s1 = _run(vae_file, out, process_index=1, process_count=2)
  with pytest.raises(records.IncompleteError):
    records.shard_paths(out, 'train')
  s0 = _run(vae_file, out, process_index=0, process_count=2)
  assert (s0['shards'], s1['shards']) == ([0, 1], [2])
  _, (_, _, index) = _read_all(out)
  assert sorted(index.tolist()) == list(range(N))  # each index once
  assert _shard_bytes(out) == _shard_bytes(reference[0])


@pytest.mark.slow
def test_moments_float16_layout(reference, vae_file, tmp_path):
  """stat=moments, float16: mean part == the float32 means, std > 0."""
  out = str(tmp_path / 'moments')
  _run(vae_file, out, stat='moments', dtype='float16')
  meta, (lat, labels, _) = _read_all(out)
  assert meta['shape'] == [2, 2, SIZE // 2, SIZE // 2, 4]
  assert meta['axes'] == ['view', 'stat', 'h', 'w', 'c']
  _, (ref, ref_labels, _) = _read_all(reference[0])
  np.testing.assert_array_equal(labels, ref_labels)
  np.testing.assert_allclose(lat[:, :, 0], ref, rtol=2e-3, atol=2e-3)
  assert lat.dtype == np.float16 and np.all(lat[:, :, 1] > 0)


# --------------------------------------------------------------- bad input


def test_bad_inputs_fail_before_any_compute(vae_file, reference, tmp_path,
                                            capsys):
  with pytest.raises(pl.PrepareError, match=r'--size=15.*factor 2'):
    _run(vae_file, str(tmp_path / 'a'), size=15)
  with pytest.raises(pl.PrepareError, match='--dtype'):
    _run(vae_file, str(tmp_path / 'a'), dtype='int8')
  with pytest.raises(pl.PrepareError, match=r'other settings \(dtype'):
    _run(vae_file, reference[0], dtype='float16')  # would mix layouts
  with pytest.raises(weights.WeightsNotFoundError,
                     match='onestep_bench.vae.convert'):
    _run(str(tmp_path / 'missing.npz'), str(tmp_path / 'a'))
  with pytest.raises(DatasetNotFoundError, match='--data_dir'):
    pl.prepare(tfds_name='imagenet2012', split='train', size=SIZE,
               out=str(tmp_path / 'a'), vae_path=vae_file,
               data_dir=str(tmp_path / 'no_tfds'))
  assert not os.path.exists(tmp_path / 'a')
  assert pl.main(['--tfds=imagenet2012', f'--out={tmp_path}/a',
                  f'--vae={vae_file}', '--size=15']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: --size=15')
