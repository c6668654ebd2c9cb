"""train_and_evaluate: smoke run per method, bitwise resume, bad input."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import final_state, smoke_config

from onestep_bench import train


def test_smoke_run(method_name, tmp_path):
  config = smoke_config(method_name)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['steps'] == config.train.num_steps
  saved = json.load(open(tmp_path / 'summary.json'))
  assert saved['method'] == method_name
  assert saved['evals'], 'no evaluation ran'
  for rec in saved['evals']:
    assert np.isfinite(rec['metrics']['sliced_w2'])
    x = np.load(tmp_path / rec['samples_file'])['x']
    assert x.shape == (config.evals.main.n_samples, 2)
  assert (tmp_path / 'metrics.jsonl').exists()


@pytest.mark.parametrize('name', ['flow_matching', 'drifting'])
def test_lean_chunk_trains_bitwise_and_reports_the_last_step(name):
  """Metrics besides the loss only on a dispatch's last step (_scan_lean).

  The state after two 5-step chunks is bit-identical to the chunk that
  computes every metric at every step; `loss` is per step, the others are
  the last step's values.
  """
  config = smoke_config(name)
  out = []
  for every in (True, False):
    built = train.build_state(config, jax.random.key(0))
    chunk = train.make_train_chunk(
        built.method, built.dataset, built.mesh,
        int(config.train.batch_size), built.state_sharding,
        every_step_metrics=every)
    state = built.state
    for _ in range(2):
      state, metrics = chunk(state, jax.random.key(1), built.arrays, 5)
    out.append((jax.device_get(state), jax.device_get(metrics)))
  (s_all, m_all), (s_lean, m_lean) = out
  for x, y in zip(jax.tree.leaves(s_all), jax.tree.leaves(s_lean),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert set(m_all) == set(m_lean) and 'grad_norm' in m_lean
  np.testing.assert_array_equal(m_all['loss'], m_lean['loss'])
  assert m_lean['loss'].shape == (5,)
  for k in set(m_all) - {'loss'}:
    assert np.shape(m_lean[k]) == (1,), k
    np.testing.assert_array_equal(m_lean[k][0], m_all[k][-1])


@pytest.mark.parametrize('name', ['flow_matching'])
def test_resume_is_bitwise(name, tmp_path):
  config = smoke_config(name, **{'train.num_steps': 8,
                                 'train.checkpoint_every_steps': 4})
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  s_full = train.train_and_evaluate(config, full)
  # Simulate a crash after step 4: keep only the step-4 checkpoint.
  shutil.copytree(full, part)
  shutil.rmtree(os.path.join(part, 'checkpoints', '8'))
  s_part = train.train_and_evaluate(config, part)
  a, b = final_state(config, full), final_state(config, part)
  assert int(a.step) == int(b.step) == 8
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert s_full['evals'][0]['metrics'] == s_part['evals'][0]['metrics']


def test_nonfinite_loss_stops_with_step_range(tmp_path):
  config = smoke_config('flow_matching', **{'train.lr': 1e30,
                                            'train.num_steps': 40,
                                            'train.steps_per_dispatch': 8,
                                            'train.checkpoint_every_steps': 8})
  with pytest.raises(train.NonFiniteError, match='Non-finite loss at step'):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'summary.json').exists()


def test_unknown_method_is_clear():
  from experiments.bench import get_config
  with pytest.raises(ValueError, match='Unknown method .*Available'):
    get_config('method=nope')


def test_unknown_config_argument_is_clear():
  from experiments.bench import get_config
  with pytest.raises(ValueError, match='Bad config argument'):
    get_config('methd=flow_matching')


def test_unknown_dataset_is_clear(tmp_path):
  config = smoke_config('flow_matching', **{'data.name': 'toy2d:nope'})
  with pytest.raises(ValueError, match='Unknown toy dataset'):
    train.train_and_evaluate(config, str(tmp_path))


def test_unsupported_eval_nfe_fails_before_training(tmp_path):
  config = smoke_config('flow_matching', **{'evals.main.nfe': (0,)})
  with pytest.raises(ValueError, match='has no value supported'):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


def test_workdir_of_another_config_is_refused(tmp_path):
  config = smoke_config('flow_matching')
  train.train_and_evaluate(config, str(tmp_path))
  config.evals.main.nfe = (1,)  # re-evaluation only: allowed
  train.train_and_evaluate(config, str(tmp_path))
  config.train.lr = 0.5 * config.train.lr
  with pytest.raises(ValueError, match='another config'):
    train.train_and_evaluate(config, str(tmp_path))
