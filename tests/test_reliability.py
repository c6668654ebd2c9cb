"""Reliability through the real CLI: kill -9 + resume, corrupt checkpoints,
the bad-input table (one-line error, exit code != 0, nothing recorded), and
no pickles. Subprocesses run `python -m onestep_bench.main` exactly as a user
would; each costs one interpreter start (~5-10 s on 2 cores).
"""

import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import final_state, smoke_config, xla_flags

from onestep_bench import checkpoint, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = 'experiments/bench.py:method={m},dataset={d},smoke=True'


def _cli(args, *, env=None, timeout=300, wait=True, log=None):
  """Runs the CLI from the repo root on one CPU device.

  With wait=False the output goes to the file `log` (a pipe nobody reads
  would fill up and block the child).
  """
  full_env = {**os.environ, 'XLA_FLAGS': xla_flags(1), 'JAX_PLATFORMS': 'cpu',
              **(env or {})}
  cmd = [sys.executable, '-m', 'onestep_bench.main', *args]
  if not wait:
    with open(log, 'w', encoding='utf-8') as f:
      return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=f,
                              stderr=subprocess.STDOUT)
  return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True,
                        text=True, timeout=timeout, check=False)


# ------------------------------------------------------------ kill -9 resume
_RESUME_ARGS = ['--config.train.num_steps=400',
                '--config.train.steps_per_dispatch=1',
                '--config.train.log_every_steps=1',
                '--config.train.checkpoint_every_steps=10',
                '--config.evals.main.nfe=(1,)',
                '--config.evals.main.n_samples=64']


def _logged_steps(workdir: pathlib.Path) -> int:
  try:
    text = (workdir / 'metrics.jsonl').read_text(encoding='utf-8')
  except FileNotFoundError:
    return 0
  return len(re.findall(r'"loss"', text))


def test_kill_9_then_rerun_is_bitwise(tmp_path):
  config = ['--config=' + SMOKE.format(m='flow_matching',
                                       d='toy2d:8gaussians'),
            *_RESUME_ARGS, '--results_dir=']
  ref, run = tmp_path / 'ref', tmp_path / 'killed'
  done = _cli([*config, f'--workdir={ref}'])
  assert done.returncode == 0, done.stderr[-2000:]
  kill_at = random.Random().randint(25, 300)  # any step, printed on failure
  proc = _cli([*config, f'--workdir={run}'], wait=False,
              log=tmp_path / 'killed.log')
  deadline = time.monotonic() + 600
  while (proc.poll() is None and _logged_steps(run) < kill_at
         and time.monotonic() < deadline):
    time.sleep(0.05)
  ended, timed_out = proc.poll() is not None, time.monotonic() >= deadline
  if not ended:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  assert not ended, f'run ended before step {kill_at}'
  assert not timed_out, 'run made no progress in 600 s'
  killed_at = _logged_steps(run)
  saved = sorted(int(p.name) for p in (run / 'checkpoints').iterdir()
                 if p.name.isdigit())
  assert saved and saved[-1] < 400, (kill_at, saved)
  again = _cli([*config, f'--workdir={run}'])
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'Resumed from step' in again.stderr
  cfg = smoke_config('flow_matching')
  a, b = final_state(cfg, str(ref)), final_state(cfg, str(run))
  assert int(a.step) == int(b.step) == 400
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=f'killed at step {killed_at}')


# ------------------------------------------------------- corrupt checkpoints
def _corrupt(step_dir: pathlib.Path) -> None:
  """Truncates every data file of a checkpoint step to half its size."""
  for f in step_dir.rglob('*'):
    if f.is_file() and f.stat().st_size > 8:
      with open(f, 'r+b') as fh:
        fh.truncate(f.stat().st_size // 2)


def _snapshot(d: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(d)): p.read_bytes()
          for p in sorted(d.rglob('*')) if p.is_file()}


def test_corrupt_latest_falls_back_and_keeps_it(tmp_path, caplog):
  cfg = smoke_config('flow_matching', **{'train.num_steps': 8,
                                         'train.checkpoint_every_steps': 4})
  ref, run = tmp_path / 'ref', tmp_path / 'run'
  train.train_and_evaluate(cfg, str(ref))
  train.train_and_evaluate(cfg, str(run))
  _corrupt(run / 'checkpoints' / '8')
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(cfg, str(run))  # restores 4, retrains 5..8
  assert 'step 8' in caplog.text and 'unreadable' in caplog.text
  kept = list((run / 'checkpoints_unreadable').iterdir())
  assert [p.name.split('.')[0] for p in kept] == ['8']  # moved, not deleted
  a, b = final_state(cfg, str(ref)), final_state(cfg, str(run))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_no_usable_checkpoint_is_clear_and_deletes_nothing(tmp_path):
  cfg = smoke_config('flow_matching', **{'train.num_steps': 8,
                                         'train.checkpoint_every_steps': 4})
  train.train_and_evaluate(cfg, str(tmp_path))
  for step in ('4', '8'):
    _corrupt(tmp_path / 'checkpoints' / step)
  before = _snapshot(tmp_path)
  with pytest.raises(checkpoint.CheckpointError,
                     match='Nothing was deleted'):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert _snapshot(tmp_path) == before


def test_nonfinite_keeps_last_good_checkpoint(tmp_path):
  cfg = smoke_config('flow_matching', **{'train.lr': 1e30,
                                         'train.num_steps': 40,
                                         'train.steps_per_dispatch': 1,
                                         'train.checkpoint_every_steps': 1})
  with pytest.raises(train.NonFiniteError) as err:
    train.train_and_evaluate(cfg, str(tmp_path))
  msg = str(err.value)
  bad = int(re.search(r'at step (\d+)', msg).group(1))
  good = int(re.search(r'Last good checkpoint: (\d+)', msg).group(1))
  assert good == bad - 2  # params of step bad-1 produced the bad loss
  assert not (tmp_path / 'summary.json').exists()
  for p in (tmp_path / 'checkpoints').iterdir():  # restore exactly `good`
    if p.name.isdigit() and int(p.name) > good:
      shutil.rmtree(p)
  state = final_state(cfg, str(tmp_path))
  assert int(state.step) == good
  assert all(np.all(np.isfinite(np.asarray(x)))
             for x in jax.tree.leaves(state.params))


def test_out_of_memory_names_the_fix(tmp_path, monkeypatch):
  def oom(*a, **k):
    raise jax.errors.JaxRuntimeError(
        'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB.')
  monkeypatch.setattr(train, 'make_train_chunk', lambda *a, **k: oom)
  cfg = smoke_config('flow_matching')
  with pytest.raises(train.OutOfMemoryError,
                     match='Lower config.train.batch_size.*fsdp'):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert not (tmp_path / 'summary.json').exists()
  other = jax.errors.JaxRuntimeError('INTERNAL: something else')
  assert train.oom_hint(other, cfg) is None


# ----------------------------------------------------------- bad input table
_DIT_CONFIG = '''
import ml_collections
from experiments.bench import get_config as bench


def get_config():
  c = bench('method=flow_matching,dataset=digits,smoke=True')
  c.model = ml_collections.ConfigDict(dict(name='dit', size='tiny',
                                           patch_size=3))
  return c
'''

BAD_INPUT = {
    # case: (config args, extra env, regex the one-line error must match).
    # Config-value errors (unknown method / key, NFE, ...) are the table of
    # tests/test_bad_inputs.py; these need their own process or files.
    'wrong type': ([f'--config={SMOKE}', '--config.train.lr=fast'], {},
                   r'fast'),
    'missing dataset files': (
        ['--config=' + SMOKE.format(m='flow_matching', d='fashion_mnist'),
         '--config.data.dir=/nonexistent/fmnist'],
        {'ONESTEP_FASHION_MNIST_DIR': ''}, r'make data|dataset-fashion-mnist'),
    'teacher workdir missing': (
        ['--config=' + SMOKE.format(m='f_distill', d='toy2d:8gaussians'),
         '--config.method.teacher_workdir=/nonexistent/teacher'], {},
        r'TeacherError: .*/nonexistent/teacher'),
    'patch size does not divide image': (['--config={dit}'], {},
                                         r'not divisible by patch_size=3'),
    'batch not divisible by devices': (
        [f'--config={SMOKE}', '--config.train.batch_size=60'],
        {'XLA_FLAGS': xla_flags(8)},
        r'batch_size=60 is not divisible by the 8 devices'),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUT))
def test_bad_input_one_clear_line(case, tmp_path):
  args, env, pattern = BAD_INPUT[case]
  dit = tmp_path / 'dit_config.py'
  dit.write_text(_DIT_CONFIG, encoding='utf-8')
  args = [a.format(m='flow_matching', d='toy2d:8gaussians', dit=dit)
          for a in args]
  work, res = tmp_path / 'run', tmp_path / 'results'
  out = _cli([*args, f'--workdir={work}', f'--results_dir={res}'], env=env)
  assert out.returncode != 0
  err = out.stderr.strip().splitlines()
  assert err, 'no error message'
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert err[-1].startswith('error: '), err[-1]
  assert re.search(pattern, err[-1]), err[-1]
  assert not res.exists(), 'results were recorded for a failed run'
  assert not work.exists(), 'a workdir was created for bad input'


def test_no_code_path_unpickles_files():
  """np.load always with allow_pickle=False; no pickle; torch.load (the
  Inception converter) only with weights_only=True."""
  offenders = []
  for path in [*ROOT.glob('onestep_bench/**/*.py'), *ROOT.glob('methods/*.py')]:
    text = path.read_text(encoding='utf-8')
    for m in re.finditer(r'np\.load\(([^)]*)\)', text):
      if 'allow_pickle=False' not in m.group(1):
        offenders.append(f'{path}: {m.group(0)}')
    if re.search(r'^\s*import (c?pickle|dill)|pickle\.loads?\('
                 r'|torch\.load\((?![^)]*weights_only=True)', text, re.M):
      offenders.append(f'{path}: pickle / torch.load')
  assert not offenders, offenders


def test_metrics_log_survives_a_torn_line(tmp_path):
  from onestep_bench import writers  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo', encoding='utf-8')
  w = writers.JsonlWriter(str(path))
  w.write_scalars(2, {'loss': 0.5})
  import json  # pylint: disable=g-import-not-at-top
  lines = path.read_text(encoding='utf-8').splitlines()
  assert [json.loads(ln)['step'] for ln in lines] == [1, 2]  # readable now
  w.close()
