"""Two jax.distributed processes on localhost == one process, same devices.

Each process sees 2 fake CPU devices (4 global); cross-process collectives
use gloo (jax's CPU default). Only process 0 may write metrics, summary and
results rows; checkpoints are written collectively by orbax. 42 s measured on a
loaded 2-core box (three interpreter starts plus compiles): in `make test`.
"""

import csv
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import cli_env, final_state, run_two_processes, smoke_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ['--config=experiments/bench.py:method=flow_matching,'
        'dataset=toy2d:8gaussians,smoke=True',
        '--config.evals.main.nfe=(1,)']


def test_two_processes_match_one(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  cmd = [sys.executable, '-m', 'onestep_bench.main', *ARGS]
  ref = subprocess.run([*cmd, f'--workdir={one}',
                        f'--results_dir={one}/results'], cwd=ROOT,
                       env=cli_env(4), capture_output=True, text=True,
                       timeout=600, check=False)
  assert ref.returncode == 0, ref.stderr[-3000:]
  outs = run_two_processes(
      [*cmd, f'--workdir={two}', f'--results_dir={two}/results'], ROOT)
  # Process 0 recorded the run once; process 1 wrote nothing.
  with open(two / 'results' / 'runs.csv', encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  with open(one / 'results' / 'runs.csv', encoding='utf-8') as f:
    ref_rows = list(csv.DictReader(f))
  assert len(rows) == len(ref_rows) > 0
  assert {r['device'] for r in rows} == {'cpu:cpu:4'}
  assert 'RESULT' in outs[0][0] and 'RESULT' not in outs[1][0]
  config = smoke_config('flow_matching')
  a, b = final_state(config, str(one)), final_state(config, str(two))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                               atol=1e-5)
  ma = {r['metric']: float(r['value']) for r in ref_rows}
  mb = {r['metric']: float(r['value']) for r in rows}
  assert mb['sliced_w2'] == pytest.approx(ma['sliced_w2'], rel=1e-4)
