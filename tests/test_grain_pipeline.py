"""The host-fed grain pipeline: sources, order, shards, resume, training.

Fast tests drive the pipeline directly (no compile) plus one in-process
bit-exact resume of a tiny training on the grain path; the CLI kill -9 and
two-process runs are @slow (interpreter starts + compiles).
"""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import ml_collections
import numpy as np
import pytest
from conftest import cli_env, final_state, run_two_processes, smoke_config

from onestep_bench import checkpoint, sharding, train
from onestep_bench.config_check import ConfigError
from onestep_bench.data import arrayrecord, pipeline, sources, streamed

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 37  # examples: no batch size below divides it, batches straddle epochs


def _one_device_mesh():
  return sharding.make_mesh(ml_collections.ConfigDict({'data': 1}))


def _id_source(n=N):
  """Example i has label i (and pixels i): identity is readable."""
  x = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                      (n, 2, 2, 1)).copy()
  return sources.ArraySource(x, np.arange(n), 'ids', 'train')


def _order(source, *, batch, seed, steps, shard=None):
  """Labels of `steps` local batches of one shard, [steps, batch / P]."""
  shard = shard or grain.sharding.NoSharding()
  ds = pipeline.local_batches(source, global_batch=batch, seed=seed,
                              shard=shard)
  return np.stack([ds[s]['y'] for s in range(steps)])


# ----------------------------------------------------------------- sources
def test_arrayrecord_round_trip_and_checks(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8)
  y = rng.integers(0, 5, N)
  meta = arrayrecord.write_split(str(tmp_path), 'train', x, y, name='toyset',
                                 num_classes=5)
  assert meta['count'] == N and meta['shape'] == [4, 4, 3]
  assert meta['class_counts'] == np.bincount(y, minlength=5).tolist()
  src = arrayrecord.ArrayRecordSource(str(tmp_path), 'train')
  assert len(src) == N
  for i in (0, 17, N - 1):
    np.testing.assert_array_equal(src[i]['x'], x[i])
    assert src[i]['y'] == y[i]
  got = src.read_batch([5, 2, 5])
  np.testing.assert_array_equal(got['x'], x[[5, 2, 5]])
  np.testing.assert_array_equal(got['y'], y[[5, 2, 5]])
  with pytest.raises(IndexError):
    src.read_batch([N])
  lat = rng.standard_normal((6, 2, 2, 4)).astype(np.float32)
  arrayrecord.write_split(str(tmp_path / 'lat'), 'train', lat, np.zeros(6),
                          name='latents', num_classes=0)
  splits, k, kind = arrayrecord.load_splits(str(tmp_path / 'lat'))
  np.testing.assert_array_equal(splits['train'][0], lat)  # bit-exact floats
  assert (k, kind) == (0, 'latent')
  with pytest.raises(arrayrecord.ArrayRecordFormatError, match='toyset'):
    arrayrecord.open_splits(str(tmp_path), expect_name='cifar10')
  x2 = x.copy()
  x2[3, 0, 0, 0] ^= 1  # one bit of one pixel: another fingerprint
  arrayrecord.write_split(str(tmp_path / 'b'), 'train', x2, y, name='toyset',
                          num_classes=5)
  other = arrayrecord.ArrayRecordSource(str(tmp_path / 'b'), 'train')
  assert other.fingerprint() != src.fingerprint()
  meta['count'] = N + 1  # a sidecar that does not match its records
  (tmp_path / 'b' / 'train.json').write_text(json.dumps(meta))
  with pytest.raises(arrayrecord.ArrayRecordFormatError, match='records'):
    arrayrecord.ArrayRecordSource(str(tmp_path / 'b'), 'train')


def test_tfds_mock_source_through_the_pipeline():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=20):
    config = ml_collections.ConfigDict({'name': 'mnist', 'dir': '',
                                        'pipeline': 'grain',
                                        'conditional': True})
    ds = streamed.build(config)
    assert ds.spec.shape == (28, 28, 1) and ds.spec.num_classes == 10
    assert sorted(ds.splits) == ['test', 'train']
    src = ds.train_source
    assert src.fingerprint().startswith('tfds:mnist/')
    b = pipeline.local_batches(src, global_batch=8, seed=3,
                               shard=grain.sharding.NoSharding())
    first = b[0]
    assert first['x'].shape == (8, 28, 28, 1) and first['x'].dtype == np.uint8
    # Five batches = 2 epochs of 20: each epoch's images are the source's.
    rows = np.concatenate([b[s]['x'] for s in range(5)])
    want = np.stack([src[i]['x'] for i in range(20)]).reshape(20, -1)
    for e in range(2):
      got = rows[20 * e:20 * (e + 1)].reshape(20, -1)
      assert sorted(map(bytes, got)) == sorted(map(bytes, want))


# ------------------------------------------------------------------- order
def test_shuffle_is_a_seeded_permutation_per_epoch():
  src = _id_source()
  flat = _order(src, batch=4, seed=0, steps=28).reshape(-1)  # > 3 epochs
  epochs = [flat[N * e:N * (e + 1)] for e in range(3)]
  for ep in epochs:
    assert sorted(ep) == list(range(N))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
  np.testing.assert_array_equal(flat, _order(src, batch=4, seed=0,
                                             steps=28).reshape(-1))
  other = _order(src, batch=4, seed=1, steps=28).reshape(-1)
  assert not np.array_equal(flat[:N], other[:N])
  # Seeds are hashed: seed 1's epoch 0 is not seed 0's epoch 1.
  assert not np.array_equal(other[:N], epochs[1])
  assert pipeline.shuffle_seed(0) != pipeline.shuffle_seed(1)


def test_two_shards_see_each_example_once_per_epoch_and_make_the_batch():
  src, batch, steps = _id_source(), 8, 14  # 112 positions: 3 epochs + 1
  whole = _order(src, batch=batch, seed=5, steps=steps)
  parts = [_order(src, batch=batch, seed=5, steps=steps,
                  shard=grain.sharding.ShardOptions(q, 2, True))
           for q in range(2)]
  assert parts[0].shape == (steps, batch // 2)
  # Shard q holds rows [4q, 4q + 4) of every global batch: together they are
  # the one-process batch, so the run does not depend on the process count.
  np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)
  flat = whole.reshape(-1)
  for e in range(3):
    seen = [int(i) for i in flat[N * e:N * (e + 1)]]
    assert sorted(seen) == list(range(N)), f'epoch {e}'
  assert not set(parts[0].reshape(-1)[:12]) & set(parts[1].reshape(-1)[:12])


# ------------------------------------------------------------------ resume
def _feed(src, **kw):
  kw = {'global_batch': 8, 'seed': 2, 'mesh': _one_device_mesh(),
        'threads': 2, 'prefetch': 2, **kw}
  return pipeline.Feed(src, **kw)


def test_resumed_feed_continues_with_the_uninterrupted_batches():
  src, chunks = _id_source(), (1, 2, 3, 1, 2, 4)
  ref = _feed(src)
  ref.start(0)
  seen = []
  for n in chunks:
    ref.prepare(n)  # as the train loop does while a chunk runs
    seen.append(np.asarray(ref.take(n)['y']))
  full = np.concatenate(seen)  # [13, 8]: step s = row s
  saved = json.loads(json.dumps(ref.state(6)))  # through orbax's JSON item
  assert saved['grain_iterator'] == {'next_index': 6}
  assert saved['epoch'] == 48 // N and saved['position_in_epoch'] == 48 % N
  again = _feed(src)
  again.start(6, saved)
  again.prepare(3)  # a chunk length the loop then does not ask for
  got = np.concatenate([np.asarray(again.take(n)['y']) for n in (2, 5)])
  np.testing.assert_array_equal(got, full[6:13])
  x = again.take(1)['x']
  assert x.shape == (1, 8, 2, 2, 1) and x.dtype == np.uint8
  for bad in ({'seed': 3}, {'global_batch': 16}):
    with pytest.raises(pipeline.DataStateError, match='does not fit'):
      _feed(src, **bad).start(6, saved)
  with pytest.raises(pipeline.DataStateError, match='source'):
    _feed(_id_source(N + 1)).start(6, saved)
  with pytest.raises(pipeline.DataStateError, match='step'):
    _feed(src).start(7, saved)
  for f in (ref, again):
    f.close()


def test_checkpointer_saves_the_data_state_with_the_train_state(tmp_path):
  state = {'w': jax.numpy.arange(3.0)}
  ck = checkpoint.Checkpointer(str(tmp_path), data_item=True)
  ck.save(1, state, force=True, data={'step': 1, 'x': [1, 2]})
  ck.close()
  ck = checkpoint.Checkpointer(str(tmp_path), data_item=True)
  got, data_state = ck.restore_latest_with_data(state)
  ck.close()
  assert data_state == {'step': 1, 'x': [1, 2]}
  np.testing.assert_array_equal(got['w'], state['w'])
  plain = checkpoint.Checkpointer(str(tmp_path))  # runs.restore_state's view
  np.testing.assert_array_equal(plain.restore_latest(state)['w'], state['w'])
  plain.close()


# ------------------------------------------------------------------ config
class _Grouped:
  class_groups = 4


@pytest.mark.parametrize('change, match', [
    ({'data.pipeline': 'gpu'}, r"data.pipeline='gpu'.*one of"),
    ({'data.pipeline': 'grain', 'data.grain_threads': -1},
     r'grain_threads=-1'),
    ({'data.pipeline': 'grain', 'data.grain_prefetch': 0},
     r'grain_prefetch=0'),
])
def test_bad_pipeline_config_names_key_and_fix(change, match):
  config = smoke_config('flow_matching', 'digits')
  for k, v in change.items():
    config.data[k.split('.')[1]] = v
  with pytest.raises(ConfigError, match=match) as err:
    pipeline.check_config(config)
  assert 'Fix:' in str(err.value)


def test_grain_is_refused_where_it_cannot_feed():
  toy = smoke_config('flow_matching')
  toy.data.pipeline = 'grain'
  with pytest.raises(ConfigError, match='exact sampler.*pipeline=device'):
    pipeline.check_config(toy)
  img = smoke_config('flow_matching', 'digits')
  img.data.update(pipeline='grain', conditional=True)
  with pytest.raises(ConfigError, match='class-grouped'):
    pipeline.check_config(img, _Grouped())
  img.data.conditional = False  # groups are ignored on unlabelled data
  pipeline.check_config(img, _Grouped())
  img.data.pipeline = 'device'
  pipeline.check_config(img, _Grouped())


def test_device_default_keeps_the_config_hash():
  config = smoke_config('flow_matching', 'digits')
  before = train.config_hash(config)
  config.data.pipeline = 'device'
  assert train.config_hash(config) == before
  config.data.grain_threads = 8  # placement only
  assert train.config_hash(config) == before
  config.data.pipeline = 'grain'  # other batches: another run
  assert train.config_hash(config) != before


# ---------------------------------------------------------------- training
def _grain_config(**kw):
  """Digits, a tiny MLP, the grain path, no evals: seconds to train."""
  config = smoke_config('flow_matching', 'digits')
  config.model = ml_collections.ConfigDict(
      {'name': 'mlp', 'width': 16, 'depth': 1, 'freq_dim': 8})
  config.evals = ml_collections.ConfigDict()
  config.data.update(pipeline='grain', grain_threads=2, grain_prefetch=2)
  config.train.update(num_steps=4, checkpoint_every_steps=2,
                      steps_per_dispatch=2, log_every_steps=1)
  config.update_from_flattened_dict(kw)
  return config


def _assert_same_state(config, a_dir, b_dir):
  a, b = final_state(config, str(a_dir)), final_state(config, str(b_dir))
  assert int(a.step) == int(b.step) == config.train.num_steps
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_grain_training_resume_is_bitwise(tmp_path, monkeypatch):
  config = _grain_config()
  full, part = tmp_path / 'full', tmp_path / 'part'
  # Both runs use one compiled chunk (same config, so the same pure function
  # of state, key and fed batches): the resumed run skips a compile.
  chunks = {}
  make = train.make_train_chunk
  monkeypatch.setattr(train, 'make_train_chunk',
                      lambda *a, **k: chunks.setdefault('c', make(*a, **k)))
  train.train_and_evaluate(config, str(full))
  saved = json.loads((full / 'checkpoints' / '2' / 'data' / 'metadata')
                     .read_text())
  assert saved['step'] == 2 and saved['examples_seen'] == 2 * 64
  shutil.copytree(full, part)  # a crash after step 2
  shutil.rmtree(part / 'checkpoints' / '4')
  train.train_and_evaluate(config, str(part))
  _assert_same_state(config, full, part)
  losses = [[json.loads(ln)['loss'] for ln in (d / 'metrics.jsonl')
             .read_text().splitlines() if '"loss"' in ln] for d in (full, part)]
  # Chunks of 2 log at steps 2 and 4; the resumed run re-logs step 4.
  assert len(losses[0]) == 2 and losses[1] == losses[0] + losses[0][1:]


@pytest.mark.slow
def test_arrayrecord_training_equals_the_in_memory_source(tmp_path):
  """digits written to ArrayRecord by the converter trains bit-identically."""
  arrayrecord.main(['--dataset=digits', f'--out={tmp_path / "ar"}'])
  mem, disk = tmp_path / 'mem', tmp_path / 'disk'
  train.train_and_evaluate(_grain_config(), str(mem))
  config = _grain_config(**{'data.dir': str(tmp_path / 'ar')})
  train.train_and_evaluate(config, str(disk))
  _assert_same_state(config, mem, disk)


# ------------------------------------------------ through the CLI (@slow)
_CLI_CONFIG = '''
import ml_collections
from experiments.bench import get_config as bench


def get_config():
  c = bench('method=flow_matching,dataset=digits,smoke=True')
  c.model = ml_collections.ConfigDict(dict(name='mlp', width=16, depth=1,
                                           freq_dim=8))
  c.data.update(pipeline='grain', dir={dir!r}, grain_threads=2)
  c.evals = ml_collections.ConfigDict()
  c.train.update(num_steps={steps}, steps_per_dispatch=1, log_every_steps=1,
                 checkpoint_every_steps=10)
  return c
'''


def _cli_config(tmp_path, steps, data_dir=''):
  path = tmp_path / 'grain_config.py'
  path.write_text(_CLI_CONFIG.format(dir=data_dir, steps=steps),
                  encoding='utf-8')
  return [sys.executable, '-m', 'onestep_bench.main', f'--config={path}',
          '--results_dir=']


def _logged(workdir):
  try:
    return (workdir / 'metrics.jsonl').read_text().count('"loss"')
  except FileNotFoundError:
    return 0


@pytest.mark.slow
def test_kill_9_then_rerun_on_grain_is_bitwise(tmp_path):
  arrayrecord.main(['--dataset=digits', f'--out={tmp_path / "ar"}'])
  cmd = _cli_config(tmp_path, 400, str(tmp_path / 'ar'))
  ref, run = tmp_path / 'ref', tmp_path / 'killed'
  done = subprocess.run([*cmd, f'--workdir={ref}'], cwd=ROOT, env=cli_env(),
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  kill_at = random.Random().randint(15, 300)
  with open(tmp_path / 'killed.log', 'w', encoding='utf-8') as log:
    proc = subprocess.Popen([*cmd, f'--workdir={run}'], cwd=ROOT, env=cli_env(),
                            stdout=log, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 600
  while (proc.poll() is None and _logged(run) < kill_at
         and time.monotonic() < deadline):
    time.sleep(0.05)
  assert proc.poll() is None, f'run ended before step {kill_at}'
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = _logged(run)
  again = subprocess.run([*cmd, f'--workdir={run}'], cwd=ROOT, env=cli_env(),
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'Resumed from step' in again.stderr, f'killed at {killed_at}'
  config = _grain_config(**{'train.num_steps': 400,
                            'data.dir': str(tmp_path / 'ar')})
  _assert_same_state(config, ref, run)


@pytest.mark.slow
def test_two_processes_on_grain_match_one(tmp_path):
  cmd = _cli_config(tmp_path, 6)
  one, two = tmp_path / 'one', tmp_path / 'two'
  ref = subprocess.run([*cmd, f'--workdir={one}'], cwd=ROOT, env=cli_env(4),
                       capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  run_two_processes([*cmd, f'--workdir={two}'], ROOT)
  # The same batches: the saved data positions agree, and so do the params.
  for step in ('6',):
    a = json.loads((one / 'checkpoints' / step / 'data' / 'metadata')
                   .read_text())
    b = json.loads((two / 'checkpoints' / step / 'data' / 'metadata')
                   .read_text())
    assert a == b
  config = _grain_config(**{'train.num_steps': 6})
  a, b = final_state(config, str(one)), final_state(config, str(two))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                               atol=1e-6)
