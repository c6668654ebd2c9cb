"""The declared tuning procedure: same K for every method, defaults first,
validation measure independent of the reported one, table + winner."""

import json

import jax
import numpy as np
import pytest

from experiments import tuning as spec
from onestep_bench import data, tuning
from onestep_bench.method import available_methods


def test_every_method_has_a_space_with_the_shared_axis_and_same_k():
  assert set(spec.SPACES) == set(available_methods())
  for name, space in spec.SPACES.items():
    assert space['train.lr'] == spec._LR['train.lr'], name
    assert len(space) <= 4, name  # lr + at most three own axes
    trials = tuning.trial_overrides(space, spec.K_TRIALS)
    assert trials[0] == {} and len(trials) == spec.K_TRIALS, name
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == len(trials)
  assert tuning.trial_overrides(spec.SPACES['tvm'], 8) == \
      tuning.trial_overrides(spec.SPACES['tvm'], 8)  # deterministic


def test_dev_sets_are_never_ranked():
  from experiments.bench import get_config  # pylint: disable=g-import-not-at-top
  for dev in spec.DEV_SETS.values():
    assert dev not in ('toy2d:8gaussians', 'toy2d:8gaussians_imbalanced',
                       'toy2d:checkerboard')
    get_config(f'dataset={dev}')  # a bench protocol exists for it


def test_validation_reference_is_independent_of_the_scored_one():
  from onestep_bench.evaluators import sample_stats  # pylint: disable=g-import-not-at-top
  c = {'name': spec.DEV_SETS['toy2d'], 'dir': '', 'conditional': False,
       'hflip': False}
  import ml_collections  # pylint: disable=g-import-not-at-top
  ds = data.build(ml_collections.ConfigDict(c))
  x = np.asarray(ds.reference(jax.random.key(5), 5000))
  val = tuning.validation_score(x, ds)
  test = sample_stats.sample_stats(x, ds, seed=0)['sliced_w2']
  assert val != test and val < 0.1 and test < 0.1  # exact samples: floor
  assert tuning.validation_score(x + 1.0, ds) > 0.5


def test_tune_writes_table_and_winner(tmp_path):
  out = tuning.tune('flow_matching', 'toy2d', k=1, smoke=True,
                    results_dir=str(tmp_path / 'res'),
                    runs_dir=str(tmp_path / 'runs'))
  table = (tmp_path / 'res' / 'tuning' / 'toy2d' / 'flow_matching.csv')
  lines = table.read_text().splitlines()
  assert len(lines) == 2 and lines[0].startswith('trial,seed,overrides,')
  assert out['budget']['trials'] == 1 and out['budget']['train_flops'] > 0
  assert out['trial'] == 0 and out['overrides'] == {}  # trial 0: defaults
  got = tuning.tuned_overrides('flow_matching', 'toy2d', str(tmp_path / 'res'))
  assert got == out['overrides']
  with pytest.raises(ValueError, match='No tuned config'):
    tuning.tuned_overrides('meanflow', 'toy2d', str(tmp_path / 'res'))
  with pytest.raises(ValueError, match='validation split'):
    tuning.tune('flow_matching', 'digits', k=1, smoke=True)


def test_tuned_protocol_applies_the_committed_winner(tmp_path, monkeypatch):
  from experiments.bench import get_config  # pylint: disable=g-import-not-at-top
  d = tmp_path / 'results' / 'tuning' / 'toy2d'
  d.mkdir(parents=True)
  (d / 'meanflow.json').write_text(json.dumps(
      {'overrides': {'train.lr': 3e-4, 'method.ratio_r_neq_t': 0.5}}))
  monkeypatch.chdir(tmp_path)
  c = get_config('method=meanflow,protocol=tuned')
  assert c.protocol == 'tuned' and c.train.lr == 3e-4
  assert c.method.ratio_r_neq_t == 0.5
  with pytest.raises(ValueError, match='No tuned config'):
    get_config('method=tvm,protocol=tuned')
  with pytest.raises(ValueError, match='protocol'):
    get_config('method=tvm,protocol=best')
