"""Feature nets split over devices and processes == the one-device nets.

8 fake CPU devices (conftest). Random-weight Inception at 16x16 inputs
(resized to 299 inside the net, so each image costs the full ~6 GFLOP: a
few images only), the tiny DINOv2 of test_dinov2 and the cheap digits
classifier. Two-process jobs (2 devices each) are tests/fid_mesh_job.py:
process 0's cache broadcast on resume (fast), and (slow) a streamed FID
eval as two processes and alone on 4 devices, then resumed from process
0's cache.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
import pytest
from conftest import cli_env, run_two_processes

from onestep_bench import sharding
from onestep_bench.data.images import ImageArrays
from onestep_bench.evaluators import image_eval
from onestep_bench.evaluators import inception as inc
from onestep_bench.evaluators import sharded_features as sf

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def inception_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('inception') / 'random_inception.npz')
  inc.save_params(inc.random_params(0), path)
  return path


@pytest.fixture(scope='module')
def dinov2_file(tmp_path_factory):
  from onestep_bench.evaluators import dinov2 as dv  # pylint: disable=g-import-not-at-top
  arch = dv.Arch(width=64, depth=2, num_heads=4, mlp=256, patch=14, grid=37)
  path = str(tmp_path_factory.mktemp('dinov2') / 'tiny.npz')
  dv.save_params(dv.random_params(arch, 0), path, arch, {'source': 'test'})
  return path


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3),
                                              np.uint8)


def _rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_batch_shape_pads_to_the_device_count():
  assert jax.device_count() == 8

  class Stub:  # a net with a program: the wrapper's arithmetic only
    batch_size = 4

  prog = sf.Program(lambda p, im: (im,), {}, (('features', np.float64),),
                    lambda im: None, 4)
  ext = sf.ShardedExtractor(Stub(), prog, jax.devices())
  assert [ext.batch_shape(n) for n in (1, 8, 11, 32, 33, 100)] == [
      8, 8, 16, 32, 32, 32]
  assert ext.batch_size == 4  # delegated to the wrapped net
  for n in (11, 100):  # 100: 4 batches of 32, more than IN_FLIGHT ahead
    x = _images(n)[..., :1]
    np.testing.assert_array_equal(ext(x)['features'], x)
    assert ext(x)['features'].dtype == np.float64


def test_unknown_nets_run_as_they_are():
  def net(images):
    return {'features': np.zeros((len(images), 2))}
  assert sf.shard(net, jax.devices()) is net
  assert sf.shard(None, jax.devices()) is None


def test_inception_on_8_devices_equals_one_device(inception_file):
  """11 images (not a multiple of 8): batches of 8, the last padded by 5."""
  ext = inc.InceptionExtractor(inception_file)
  images = _images(11)
  want = ext(images)
  sharded = sf.shard(ext, jax.devices(), per_device_batch=1)
  assert sharded.batch_shape(11) == 8 and sharded.mesh.size == 8
  assert sf.shard(ext, jax.devices(), per_device_batch=1) is sharded
  got = sharded(images)
  assert set(got) == set(want)
  for k, v in want.items():
    assert got[k].shape == v.shape and got[k].dtype == v.dtype, k
  assert _rel_err(got['features'], want['features']) < 1e-6
  assert _rel_err(got['logits'], want['logits']) < 1e-5
  assert _rel_err(got['spatial'], want['spatial']) < 1e-5
  assert sharded.feature_net == ext.feature_net  # attributes delegated
  assert sharded.weights_sha256 == ext.weights_sha256
  with pytest.raises(TypeError, match='uint8'):
    sharded(images.astype(np.float32))
  assert sf.shard(ext, []) is ext  # no device of the mesh here
  assert sf.shard(ext, jax.local_devices()[:1]) is ext  # its own device


def test_eval_nets_on_a_mesh_equal_one_device(inception_file, dinov2_file,
                                             tmp_path, monkeypatch):
  """`prepare(..., mesh)`: samples' and reference features as unsharded.

  (Features and statistics only: a 2048-d FID's sqrtm takes tens of
  seconds on a loaded 2-core host; the slow test scores whole evals.)
  """
  rng = np.random.default_rng(3)
  splits = {'train': (rng.integers(0, 256, (4, 16, 16, 3)).astype(np.uint8),
                      np.zeros(4, np.int32))}
  ds = ImageArrays('mock_rgb16', splits, 1)
  ev = mlc.ConfigDict(dict(feature_net='inception_v3', fid_bootstrap=0,
                           pr_k=2, inception_weights=inception_file,
                           fd_dinov2='on', dinov2_weights=dinov2_file))
  mesh = sharding.make_mesh(mlc.ConfigDict({'data': -1}))
  monkeypatch.setenv('ONESTEP_CACHE', str(tmp_path / 'one_device'))
  plain = image_eval.prepare(ds, ev)
  assert plain.sample_extractor is None
  monkeypatch.setenv('ONESTEP_CACHE', str(tmp_path / 'mesh'))  # recomputed
  ctx = image_eval.prepare(ds, ev, mesh)
  for net in (ctx.extractor, ctx.dinov2, ctx.sample_extractor,
              ctx.sample_dinov2):
    assert isinstance(net, sf.ShardedExtractor) and net.mesh.size == 8
  assert ctx.sample_extractor is ctx.extractor  # one process: same devices
  assert ctx.ref['path'] != plain.ref['path']
  for k in ('mu', 'mu_s'):
    assert _rel_err(ctx.ref[k], plain.ref[k]) < 1e-6, k
  images = _images(3, seed=4)
  want = image_eval.features(images, plain)
  got = image_eval.features(images, ctx)
  assert set(got) == {'features', 'logits', 'spatial', 'dinov2'} == set(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and _rel_err(got[k], v) < 1e-5, k


def _job(out: str) -> Any:
  line = next(x for x in out.splitlines() if x.startswith('FIDJOB '))
  return json.loads(line[len('FIDJOB '):])


def test_resume_is_broadcast_from_process_0(tmp_path):
  """Process 0's cached parts reach process 1 (no cache) byte for byte."""
  from onestep_bench.evaluators import streaming  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  key = {'params': 'p', 'n': 20}
  parts = [{'features': rng.normal(size=(4, 2048)),
            'spatial': rng.normal(size=(4, 7)).astype(np.float32)}
           for _ in range(2)]  # 64 KiB float64 arrays: 16 pieces each
  streaming._save_key(str(tmp_path), key)
  for i, part in enumerate(parts):
    streaming._save_part(str(tmp_path), i, i, part)
  outs = run_two_processes([sys.executable, str(ROOT / 'tests' /
                                                'fid_mesh_job.py'),
                            'resume', str(tmp_path)], ROOT, timeout=300)
  got = [_job(o) for o, _ in outs]
  h = hashlib.sha256()
  for part in parts:
    for k in sorted(part):
      h.update(f'{k}{part[k].dtype.str}{part[k].shape}'.encode())
      h.update(part[k].tobytes())
  assert got == [{'done': 2, 'sha256': h.hexdigest()}] * 2


@pytest.mark.slow
def test_two_processes_score_the_same_fid(inception_file, dinov2_file,
                                          tmp_path, monkeypatch):
  """FID of a streamed eval: the same on both processes and as one process.

  Then process 0's cache loses its last part: the rerun resumes chunk 0
  from process 0's cache (broadcast to process 1, whose workdir has none)
  and samples chunk 1 again, with the same metrics. 550-840 s on the loaded
  2-core dev host (~8 CPU min, mostly 2048-d sqrtms: FID and sFID in each
  of the 5 processes).
  """
  job = [sys.executable, str(ROOT / 'tests' / 'fid_mesh_job.py'), 'eval']
  cache = {'ONESTEP_CACHE': str(tmp_path / 'cache1')}
  one = subprocess.run([*job, str(tmp_path / 'one'), inception_file,
                        dinov2_file], cwd=ROOT, env=cli_env(4, **cache),
                       capture_output=True, text=True, timeout=900,
                       check=False)
  assert one.returncode == 0, one.stderr[-3000:]
  ref = _job(one.stdout)
  cmd = [*job, str(tmp_path / 'two'), inception_file, dinov2_file]
  monkeypatch.setenv('ONESTEP_CACHE', str(tmp_path / 'cache2'))  # cli_env
  outs = run_two_processes(cmd, ROOT, timeout=900)
  parts = tmp_path / 'two' / 'p0' / 'eval_cache' / 'fid_nfe1'
  assert sorted(os.listdir(parts)) == [
      'key.json', 'part_000000_000000.npz', 'part_000001_000001.npz']
  assert not (tmp_path / 'two' / 'p1' / 'eval_cache').exists()
  os.remove(parts / 'part_000001_000001.npz')
  resumed = run_two_processes(cmd, ROOT, timeout=900)
  runs = [_job(o) for o, _ in (*outs, *resumed)]
  assert [r['feature_net'] for r in ref] == [
      'inception_v3/legacy_tf/unverified', ref[1]['feature_net']]
  for recs in runs:  # identical on every process, before and after resume
    assert recs == runs[0]
  print('FID one process', ref[0]['metrics']['fid'], 'two',
        runs[0][0]['metrics']['fid'])
  for got, want in zip(runs[0], ref, strict=True):
    for k, v in want['metrics'].items():
      assert got['metrics'][k] == pytest.approx(v, rel=1e-5, abs=1e-9), k
  assert np.isfinite(ref[0]['metrics']['fid'])


def test_classifier_on_8_devices_equals_one_device(cheap_classifier):
  from onestep_bench import data  # pylint: disable=g-import-not-at-top
  from onestep_bench.evaluators import classifier  # pylint: disable=g-import-not-at-top
  ds = data.build(mlc.ConfigDict({'name': 'digits'}))
  ext = classifier.ClassifierExtractor(ds)
  x = ds.split_images('test')[0][:13]
  want = ext(x)
  got = sf.shard(ext, jax.devices())(x)  # one batch of 16, 3 padding
  for k, v in want.items():
    assert got[k].shape == v.shape and got[k].dtype == v.dtype, k
    assert _rel_err(got[k], v) < 1e-6, k
