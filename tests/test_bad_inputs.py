"""Bad input through the real CLI: one `error:` line, nothing written.

Every row of `BAD` is a command line a user could type. Each must exit != 0
before anything compiles, with exactly one stderr line starting `error:` that
names the offending key, and leave no workdir and no results dir behind.

Speed: one interpreter start costs ~2-5 s of imports on a loaded 2-core box,
so the table runs in ONE subprocess (`_DRIVER`): it calls absl's `app.run(
main.main, flags_parser=main.parse_or_exit)` -- exactly what `python -m
onestep_bench.main` runs -- once per row, with `sys.argv` set (config_flags
reads its overrides from it), the dynamically defined `--config.*` flags
removed between rows, stderr captured and `SystemExit` caught. One plain
`python -m onestep_bench.main` run proves the real entry point behaves the
same. Two rows plant a genuine bug (a TypeError / a ValueError raised inside
jax while training) and check that it keeps its traceback instead.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = ('--config=experiments/bench.py:method={m},dataset=toy2d:8gaussians,'
         'smoke=True')
FM = SMOKE.format(m='flow_matching')


def _m(method: str, *flags: str) -> list[str]:
  return [SMOKE.format(m=method), *flags]


def _fm(*flags: str) -> list[str]:
  return [FM, *flags]


# case: (command line, regex the single `error:` line must match)
BAD = {
    # --- the table of issue 18 §1
    'n_samples=0': (_fm('--config.evals.main.n_samples=0'),
                    r'config\.evals\.main\.n_samples=0: must be an int >= 2'),
    'n_samples=-3': (_fm('--config.evals.main.n_samples=-3'),
                     r'config\.evals\.main\.n_samples=-3'),
    'batch_size=-5': (_fm('--config.train.batch_size=-5'),
                      r'config\.train\.batch_size=-5: must be an int >= 1'),
    'num_steps=0': (_fm('--config.train.num_steps=0'),
                    r'config\.train\.num_steps=0'),
    'lr=-1': (_fm('--config.train.lr=-1'),
              r'config\.train\.lr=-1\.0: must be a finite number > 0'),
    'model.width=0': (_fm('--config.model.width=0'),
                      r'config\.model\.width=0: must be an int >= 1'),
    'seed=abc': ([FM + ',seed=abc'], r"config\.seed='abc'.*non-negative int"),
    'nfe=(1000000,)': (_fm('--config.evals.main.nfe=(1000000,)'),
                       r'config\.evals\.main\.nfe=\(1000000,\).*\[1, 1000\]'),
    'guidance input the method never feeds': (
        _fm('--config.model.guidance_embed=True'),
        r'config\.model\.guidance_embed=True: needs a method that feeds'),
    'guidance the method ignores': (
        _fm('--config.evals.main.guidance=2.0'),
        r'config\.evals\.main\.guidance=2\.0'),
    'guidance flow_matching ignores (labelled data)': (
        ['--config=experiments/bench.py:method=flow_matching,dataset=digits,'
         'smoke=True', '--config.data.conditional=True',
         '--config.evals.main.guidance=2.0'],
        r'config\.evals\.main\.guidance=2\.0: flow_matching samples without '
        'CFG'),
    'guidance a fixed-w tvm cannot honour': (
        ['--config=experiments/bench.py:method=tvm,dataset=digits,smoke=True',
         '--config.data.conditional=True', '--config.evals.main.guidance=3.0'],
        r'config\.evals\.main\.guidance=3\.0: this TVM model is trained at '
        'the fixed w'),
    'drifting temperatures=(0.0,)': (
        _m('drifting', '--config.method.temperatures=(0.0,)'),
        r'config\.method\.temperatures'),
    # --- harness keys
    'lr=nan': (_fm('--config.train.lr=nan'), r'config\.train\.lr=nan'),
    'b1=1': (_fm('--config.train.b1=1.0'), r'config\.train\.b1=1\.0.*< 1'),
    'b2<0': (_fm('--config.train.b2=-0.1'), r'config\.train\.b2'),
    'weight_decay<0': (_fm('--config.train.weight_decay=-1.0'),
                       r'config\.train\.weight_decay'),
    'warmup_steps<0': (_fm('--config.train.warmup_steps=-1'),
                       r'config\.train\.warmup_steps=-1'),
    'schedule': (_fm('--config.train.schedule=linear'),
                 r"config\.train\.schedule='linear'.*cosine"),
    'grad_clip<0': (_fm('--config.train.grad_clip=-1.0'),
                    r'config\.train\.grad_clip'),
    'ema_decay=1': (_fm('--config.train.ema_decay=1.0'),
                    r'config\.train\.ema_decay=1\.0'),
    'steps_per_dispatch=0': (_fm('--config.train.steps_per_dispatch=0'),
                             r'config\.train\.steps_per_dispatch=0'),
    'checkpoint_every_steps=0': (
        _fm('--config.train.checkpoint_every_steps=0'),
        r'config\.train\.checkpoint_every_steps=0'),
    'max_to_keep=0': (_fm('--config.train.max_to_keep=0'),
                      r'config\.train\.max_to_keep=0'),
    'model.depth<0': (_fm('--config.model.depth=-1'), r'config\.model\.depth'),
    'odd freq_dim': (_fm('--config.model.freq_dim=7'),
                     r'config\.model\.freq_dim=7: must be even'),
    'unknown backbone': (_fm('--config.model.name=transformer'),
                         r"config\.model\.name='transformer'"),
    'unknown toy set': (_fm('--config.data.name=toy2d:nope'),
                        r"config\.data\.name='toy2d:nope': Unknown toy"),
    'unknown dataset': (_fm('--config.data.name=imagenet128'),
                        r"config\.data\.name='imagenet128'"),
    'nfe=(0,)': (_fm('--config.evals.main.nfe=(0,)'),
                 r'config\.evals\.main\.nfe=\(0,\): has no value supported'),
    'n_samples=1': (_fm('--config.evals.main.n_samples=1'),
                    r'config\.evals\.main\.n_samples=1'),
    'guidance<0': (_fm('--config.evals.main.guidance=-1.0'),
                   r'config\.evals\.main\.guidance=-1\.0'),
    'seed<0': ([FM + ',seed=-1'], r"config\.seed='-1'"),
    'smoke=maybe': ([FM.replace('smoke=True', 'smoke=maybe')],
                    r"config\.smoke='maybe'"),
    'mesh.fsdp=0': (_fm('--config.mesh.fsdp=0'), r'config\.mesh\.fsdp=0'),
    'mesh.data=0': (_fm('--config.mesh.data=0'), r'config\.mesh\.data=0'),
    'unknown flag': (_fm('--nope=1'), r'nope'),
    'unknown config key': (_fm('--config.train.nope=1'),
                           r'unknown config key .*nope'),
    'unknown method': (['--config=experiments/bench.py:method=nope'],
                       r'Unknown method .*Available'),
    # --- the methods' own hooks
    'fm time_dist': (_fm('--config.method.time_dist=beta'),
                     r'config\.method\.time_dist'),
    'fm heun with even nfe': (_fm('--config.method.sampler=heun'),
                              r'config\.evals\.main\.nfe=\(1, 2\).*odd'),
    'meanflow ratio>1': (_m('meanflow', '--config.method.ratio_r_neq_t=1.5'),
                         r'config\.method\.ratio_r_neq_t=1\.5'),
    'meanflow guidance': (_m('meanflow', '--config.evals.main.guidance=1.0'),
                          r'config\.evals\.main\.guidance'),
    'tvm cfg_scale=0': (_m('tvm', '--config.method.cfg_scale=0.0'),
                        r'config\.method\.cfg_scale=0\.0'),
    'tvm gap_dist': (_m('tvm', '--config.method.gap_dist=gauss'),
                     r'config\.method\.gap_dist'),
    'tm head_steps=0': (_m('transition_matching',
                           '--config.method.head_steps=0'),
                        r'config\.method\.head_steps=0'),
    'tm nfe not dividing train_T': (
        _m('transition_matching', '--config.method.train_T=4',
           '--config.evals.main.nfe=(3,)'),
        r'config\.evals\.main\.nfe=\(3,\): has no value supported'),
    'f_distill f_div': (_m('f_distill', '--config.method.f_div=tv'),
                        r"config\.method\.f_div='tv'"),
    'f_distill no teacher': (
        _m('f_distill', '--config.method.allow_untrained_teacher=False'),
        r"config\.method\.teacher_workdir='': .*needs a teacher"),
}
# Genuine bugs planted inside training: they must keep their traceback.
BUGS = {
    'TypeError in training': 'TypeError',
    'ValueError raised inside jax': 'ValueError',
}


_DRIVER = r'''
import contextlib, io, json, sys, traceback
from absl import app, flags
import jax.numpy as jnp
from methods import flow_matching
from onestep_bench import main

def plant(kind):
  def loss(self, params, batch, key, state):
    if kind == 'TypeError':
      raise TypeError('broadcast_in_dim shape must be nonnegative (planted)')
    return jnp.split(batch['x'], 3)[0].sum(), {}  # ValueError inside jax
  flow_matching.Method.loss = loss

cases_path, out_path = sys.argv[1:3]
cases, out = json.load(open(cases_path)), {}
for name, case in cases.items():
  for f in [f for f in flags.FLAGS if f.startswith('config.')]:
    delattr(flags.FLAGS, f)
  flags.FLAGS.unparse_flags()
  if case.get('bug'):
    plant(case['bug'])
  sys.argv = ['onestep_bench/main.py', *case['argv']]
  err, rec = io.StringIO(), {'rc': 0}
  try:
    with contextlib.redirect_stderr(err):
      app.run(main.main, flags_parser=main.parse_or_exit)
  except SystemExit as e:
    rec['rc'] = 1 if isinstance(e.code, str) else (e.code or 0)
    if isinstance(e.code, str):
      err.write(e.code + '\n')
  except BaseException as e:  # what the interpreter would print
    rec.update(rc=1, exception=type(e).__name__)
    err.write(traceback.format_exc())
  rec['stderr'] = err.getvalue()
  out[name] = rec
json.dump(out, open(out_path, 'w'))
'''


def _env() -> dict[str, str]:
  return {**os.environ, 'XLA_FLAGS': xla_flags(1), 'JAX_PLATFORMS': 'cpu'}


def _dirs(base: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
  slug = ''.join(ch if ch.isalnum() else '_' for ch in name)
  return base / slug / 'run', base / slug / 'results'


@pytest.fixture(scope='module')
def table(tmp_path_factory):
  """{case: {'rc', 'stderr', 'exception'?}} from one driver subprocess."""
  base = tmp_path_factory.mktemp('bad_inputs')
  rows = dict(BAD)
  cases = {}
  for name, (argv, _) in rows.items():
    work, res = _dirs(base, name)
    cases[name] = {'argv': [*argv, f'--workdir={work}',
                            f'--results_dir={res}']}
  for name, kind in BUGS.items():  # last: they patch the method
    work, res = _dirs(base, name)
    cases[name] = {'bug': kind, 'argv': [
        FM, f'--workdir={work}', f'--results_dir={res}']}
  (base / 'cases.json').write_text(json.dumps(cases), encoding='utf-8')
  proc = subprocess.run(
      [sys.executable, '-c', _DRIVER, str(base / 'cases.json'),
       str(base / 'out.json')], cwd=ROOT, env=_env(), capture_output=True,
      text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return base, json.loads((base / 'out.json').read_text(encoding='utf-8'))


def _check_one_error_line(rc: int, stderr: str, pattern: str) -> str:
  assert rc != 0
  assert 'Traceback' not in stderr, stderr[-3000:]
  errors = [ln for ln in stderr.splitlines() if ln.startswith('error:')]
  assert len(errors) == 1, stderr[-3000:]
  import re  # pylint: disable=g-import-not-at-top
  assert re.search(pattern, errors[0]), errors[0]
  return errors[0]


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_input_one_error_line_nothing_written(case, table):
  base, out = table
  assert case in out, f'{case} was not run'
  _check_one_error_line(out[case]['rc'], out[case]['stderr'], BAD[case][1])
  work, res = _dirs(base, case)
  assert not work.exists(), 'a workdir was created for bad input'
  assert not res.exists(), 'results were recorded for bad input'


def test_table_covers_at_least_25_inputs():
  assert len(BAD) >= 25


@pytest.mark.parametrize('dataset', ['toy2d:8gaussians', 'digits',
                                     'fashion_mnist'])
def test_every_shipped_config_passes(dataset):
  """No false refusals: each method's bench / smoke config is valid."""
  from experiments.bench import get_config  # pylint: disable=g-import-not-at-top
  from onestep_bench import config_check  # pylint: disable=g-import-not-at-top
  from onestep_bench.method import available_methods, method_module  # pylint: disable=g-import-not-at-top
  for m in available_methods():
    for smoke in (True, False):
      c = get_config(f'method={m},dataset={dataset},smoke={smoke}')
      config_check.validate(c, method_module(m).Method)


def test_only_deliberate_value_errors_are_user_errors():
  """A ValueError counts as bad input only when this project raised it."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from onestep_bench import main, method  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError) as mine:
    method.method_module('nope')
  assert main.is_user_error(mine.value)
  with pytest.raises(ValueError) as numpy_bug:
    np.zeros(4).reshape(3, 5)
  assert not main.is_user_error(numpy_bug.value)
  assert not main.is_user_error(TypeError('deep in jax'))
  assert not main.is_user_error(KeyError('x'))


@pytest.mark.parametrize('case', sorted(BUGS))
def test_genuine_bug_keeps_its_traceback(case, table):
  _, out = table
  rec = out[case]
  assert rec['rc'] != 0
  assert rec.get('exception') == BUGS[case], rec['stderr'][-3000:]
  assert 'Traceback (most recent call last)' in rec['stderr']
  assert not any(ln.startswith('error:') for ln in rec['stderr'].splitlines())


def test_real_entry_point_subprocess(tmp_path):
  """`python -m onestep_bench.main` itself: same one line, nothing written."""
  work, res = tmp_path / 'run', tmp_path / 'results'
  proc = subprocess.run(
      [sys.executable, '-m', 'onestep_bench.main', FM,
       '--config.train.lr=-1', f'--workdir={work}', f'--results_dir={res}'],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
      check=False)
  line = _check_one_error_line(proc.returncode, proc.stderr,
                               r'config\.train\.lr=-1\.0')
  assert line.startswith('error: ConfigError: ')
  assert proc.returncode == 1
  assert not work.exists() and not res.exists()
