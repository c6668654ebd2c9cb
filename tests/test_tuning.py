"""The declared tuning procedure: same K for every method, defaults first,
validation measure independent of the reported one, table + winner."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments import tuning as spec
from onestep_bench import data, tuning
from onestep_bench.method import available_methods


def test_every_method_has_a_space_with_the_shared_axis_and_same_k():
  assert set(spec.SPACES) == set(available_methods())
  for family in spec.DEV_SETS:
    for name in spec.SPACES:
      space = spec.space(name, family)
      assert set(space) == set(spec.SPACES[name]), (family, name)  # same axes
      assert space['train.lr'] == spec._LR['train.lr'], name
      assert len(space) <= 4, name  # lr + at most three own axes
      trials = tuning.trial_overrides(space, spec.K_TRIALS)
      assert trials[0] == {} and len(trials) == spec.K_TRIALS, name
      assert len({json.dumps(t, sort_keys=True) for t in trials}) == len(
          trials)
  assert tuning.trial_overrides(spec.SPACES['tvm'], 8) == \
      tuning.trial_overrides(spec.SPACES['tvm'], 8)  # deterministic


def test_dev_sets_are_never_ranked_or_scored_on_train_data():
  from experiments.bench import get_config  # pylint: disable=g-import-not-at-top
  for family, dev in spec.DEV_SETS.items():
    get_config(f'dataset={dev}')  # a bench protocol exists for it
    assert spec.family_of(dev) == family
    if family == 'toy2d':  # an unranked law
      assert dev not in ('toy2d:8gaussians', 'toy2d:8gaussians_imbalanced',
                         'toy2d:checkerboard')
    else:  # a ranked set: tuned only through a split carved from train
      assert 0 < spec.HOLDOUT[family] < 1


def test_families_cover_the_bench_datasets():
  from experiments import bench  # pylint: disable=g-import-not-at-top
  assert spec.family_of('toy2d:checkerboard') == 'toy2d'
  for name in bench._IMAGES:
    assert spec.family_of(name) == 'images'
  with pytest.raises(ValueError, match='no tuning family'):
    spec.family_of('cifar10')


def _digits(**kw):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return data.build(ml_collections.ConfigDict(
      {'name': 'digits', 'dir': '', 'conditional': False, 'hflip': False,
       'pipeline': 'device', **kw}))


def test_holdout_is_disjoint_deterministic_and_never_trained_on():
  from onestep_bench.data import images  # pylint: disable=g-import-not-at-top
  # Index level: labels are the example ids.
  n = 1000
  splits = {'train': (np.zeros((n, 2, 2, 1), np.uint8), np.arange(n)),
            'test': (np.zeros((5, 2, 2, 1), np.uint8), np.arange(5))}
  a, info = images.carve_holdout(splits, 0.2, 7)
  b, _ = images.carve_holdout(splits, 0.2, 7)
  c, _ = images.carve_holdout(splits, 0.2, 8)
  tr, va = set(a['train'][1]), set(a['validation'][1])
  assert not tr & va and tr | va == set(range(n)) and len(va) == 200
  assert set(a) == {'train', 'validation'}  # the test split is dropped
  assert info['dropped_splits'] == ['test']
  assert np.array_equal(a['validation'][1], b['validation'][1])
  assert not np.array_equal(a['validation'][1], c['validation'][1])
  assert len(images.carve_holdout(splits, 300, 7)[0]['validation'][1]) == 300
  # Digits through data.build: the training arrays exclude the held-out
  # images (count), and train + validation is the original train split.
  full = _digits()
  dev = _digits(holdout=spec.HOLDOUT['images'],
                holdout_seed=spec.HOLDOUT_SEED)
  n_full = len(full.split_images('train')[0])
  h = dev.holdout['n_holdout']
  assert h == round(spec.HOLDOUT['images'] * n_full)
  assert sorted(dev.splits) == ['train', 'validation']
  assert dev.arrays['x'].shape[0] == n_full - h
  assert dev.label_frequencies().sum() == pytest.approx(1.0)
  rows = lambda x: sorted(r.tobytes() for r in x)
  both = np.concatenate([dev.split_images('train')[0],
                         dev.split_images('validation')[0]])
  assert rows(both) == rows(full.split_images('train')[0])
  again = _digits(holdout=spec.HOLDOUT['images'],
                  holdout_seed=spec.HOLDOUT_SEED)
  assert np.array_equal(again.split_images('validation')[0],
                        dev.split_images('validation')[0])


@pytest.mark.parametrize('kw,match', [
    (dict(holdout=1.5), 'fraction in'),
    (dict(holdout=-3), 'fraction in'),
    (dict(holdout='a'), 'fraction in'),
    (dict(holdout=1437), 'leave at least one'),
    (dict(holdout=1e-6), 'take at least one'),
    (dict(holdout=0.2, holdout_seed=-1), 'holdout_seed'),
    (dict(holdout=0.2, pipeline='grain'), 'host-fed'),
    (dict(holdout=0.2, name='toy2d:8gaussians'), 'image / latent'),
])
def test_bad_holdout_is_one_config_error(kw, match):
  from onestep_bench.config_check import ConfigError  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match=match) as e:
    _digits(**kw)
  assert 'config.data.holdout' in str(e.value) and 'Fix:' in str(e.value)


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
  with pytest.raises(ValueError, match="family 'images'"):
    tuning.tune('flow_matching', 'digits', k=1, smoke=True)


def _fake_trainer(calls):
  """train_and_evaluate stand-in: samples a pure function of the seed."""
  from onestep_bench import train  # pylint: disable=g-import-not-at-top

  def fake(c, wd, **kw):
    del kw
    calls.append(os.path.basename(wd))
    if wd.endswith('trial1') and 'die' in calls:
      raise KeyboardInterrupt  # the machine goes away mid-procedure
    os.makedirs(wd, exist_ok=True)
    evals = []
    for n in c.evals.main.nfe:
      x = np.random.default_rng(c.seed * 10 + n).normal(size=(256, 2))
      np.savez(os.path.join(wd, f'samples_nfe{n}.npz'), x=x)
      evals.append({'nfe': n, 'samples_file': f'samples_nfe{n}.npz'})
    return {'evals': evals, 'total_train_flops': 1e9,
            'git_sha': train.git_sha()}
  return fake


def test_tune_resumes_from_the_partial_table_after_losing_the_machine(
    tmp_path, monkeypatch):
  """A trial recorded in <method>.partial.csv is never retrained, even with
  its run dir gone; a row whose config hash differs from the plan is."""
  from onestep_bench import train  # pylint: disable=g-import-not-at-top
  res, runs = str(tmp_path / 'res'), tmp_path / 'runs'
  calls = ['die']
  monkeypatch.setattr(train, 'train_and_evaluate', _fake_trainer(calls))
  kw = dict(k=3, smoke=True, results_dir=res, runs_dir=str(runs))
  with pytest.raises(KeyboardInterrupt):
    tuning.tune('flow_matching', 'toy2d', **kw)
  d = tmp_path / 'res' / 'tuning' / 'toy2d'
  partial = d / 'flow_matching.partial.csv'
  assert not (d / 'flow_matching.csv').exists()
  kept = partial.read_text().splitlines()
  assert len(kept) == 2 and 'config_hash' in kept[0]  # trial 0 only
  shutil.rmtree(runs)  # run dirs and checkpoints lost with the machine
  calls[:] = []
  out = tuning.tune('flow_matching', 'toy2d', **kw)
  assert calls == ['trial1', 'trial2'] and not partial.exists()
  final = (d / 'flow_matching.csv').read_text().splitlines()
  assert len(final) == 4 and final[1] == kept[1]  # trial 0 reused verbatim
  assert out['budget'] == {'trials': 3, 'train_flops': 3e9}
  # A recorded row of another config (its hash differs) is run again.
  col = final[0].split(',').index('config_hash')
  stale = final[1].split(',')
  stale[col] = '000000000000'
  partial.write_text('\n'.join([final[0], ','.join(stale)] + final[2:]))
  calls[:] = []
  again = tuning.tune('flow_matching', 'toy2d', **kw)
  assert calls == ['trial0'] and again == out
  assert (d / 'flow_matching.csv').read_text().splitlines() == final


def test_student_tuning_trains_its_lost_teacher_before_building_trials(
    tmp_path, monkeypatch):
  """A distillation student's Method loads its teacher when built, so a
  teacher run dir lost with the machine is retrained first (the images
  campaign failed here once). The teacher trains for real (smoke); the
  student's trials are faked."""
  from onestep_bench import train  # pylint: disable=g-import-not-at-top
  real, calls = train.train_and_evaluate, []
  fake = _fake_trainer(calls)

  def trainer(c, wd, **kw):
    if wd.endswith('teacher'):
      calls.append('teacher')
      return real(c, wd, **kw)
    return fake(c, wd, **kw)
  monkeypatch.setattr(train, 'train_and_evaluate', trainer)
  out = tuning.tune('f_distill', 'toy2d', k=1, smoke=True,
                    results_dir=str(tmp_path / 'res'),
                    runs_dir=str(tmp_path / 'runs'))
  assert calls == ['teacher', 'trial0'] and out['budget']['trials'] == 1
  twd = tmp_path / 'runs' / 'flow_matching'
  assert list(twd.glob('*/teacher/summary.json'))


def _holdout_only(monkeypatch) -> list[str]:
  """Reference builders refuse any split but 'validation'; returns the log
  of every split read through `ImageArrays.split_images`. Also gives the
  test a fresh extractor memo: the dev-train classifier must not leak into
  later tests' evaluations of the full digits set (same name)."""
  from onestep_bench.data import images  # pylint: disable=g-import-not-at-top
  from onestep_bench.evaluators import dataset_reference, image_eval  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(image_eval, '_EXTRACTORS', {})
  read = []
  split_images = images.ImageArrays.split_images

  def spy(self, split):
    read.append(split)
    return split_images(self, split)
  monkeypatch.setattr(images.ImageArrays, 'split_images', spy)
  for mod in (image_eval, dataset_reference):  # every reference builder
    real = mod.reference_stats

    def guarded(ds, ext, net, split, *a, _real=real, **kw):
      if split != 'validation':
        raise AssertionError(f'reference statistics of split {split!r}')
      return _real(ds, ext, net, split, *a, **kw)
    monkeypatch.setattr(mod, 'reference_stats', guarded)
  return read


def test_image_validation_is_fid_against_the_holdout(monkeypatch,
                                                      cheap_classifier):
  del cheap_classifier
  from onestep_bench.data.images import to_float  # pylint: disable=g-import-not-at-top
  from onestep_bench.evaluators import dataset_reference  # pylint: disable=g-import-not-at-top
  read = _holdout_only(monkeypatch)
  holdout = tuning._holdout(spec, 'images')
  c = tuning._config('flow_matching', spec.DEV_SETS['images'], 0, {},
                     spec.VAL_NFE, True, holdout)
  assert (c.data.holdout, c.data.holdout_seed) == (spec.HOLDOUT['images'],
                                                   spec.HOLDOUT_SEED)
  assert c.evals.main.ref_split == 'validation'
  dev = data.build(c.data)
  score = tuning.ImageValidation(dev, c.evals.main)
  assert score.ref['key']['split'] == 'validation'
  assert score.ref['key']['n'] == dev.holdout['n_holdout']
  as_float = lambda x: np.asarray(to_float(x))
  val = score(as_float(dev.split_images('validation')[0]))
  train = score(as_float(dev.split_images('train')[0]))
  noise = score(np.random.RandomState(0).uniform(-1, 1, (500, 8, 8, 1)))
  assert abs(val) < 1e-3 < train < noise  # the held-out set is the floor
  assert score(np.full((4, 8, 8, 1), np.nan)) == np.inf
  assert 'test' not in read
  with pytest.raises(ValueError, match='data.holdout'):  # not a dev set
    dataset_reference.validation_reference_stats(
        _digits(), score.extractor, score.feature_net)


@pytest.mark.slow  # ~100 s of CPU; fast twin: the test above
def test_image_tuning_scores_on_the_holdout_never_test(
    tmp_path, monkeypatch, cheap_classifier):
  """digits, k=2 at the smoke budget: FID vs the held-out split only."""
  del cheap_classifier
  read = _holdout_only(monkeypatch)
  out = tuning.tune('flow_matching', 'images', k=2, smoke=True,
                    results_dir=str(tmp_path / 'results'),
                    runs_dir=str(tmp_path / 'runs'))
  assert 'test' not in read and 'validation' in read
  d = tmp_path / 'results' / 'tuning' / 'images'
  lines = (d / 'flow_matching.csv').read_text().splitlines()
  assert len(lines) == 3 and 'val_fid_nfe1' in lines[0]
  assert 'val_fid_nfe4' in lines[0]
  assert out['budget']['trials'] == 2 and np.isfinite(out['val_score'])
  saved = json.loads((d / 'flow_matching.json').read_text())
  ref = saved['validation_measure']['reference']
  assert ref['split'] == 'validation' and ref['dataset'] == 'digits'
  assert saved['validation_measure']['feature_net'] == 'classifier:digits'
  assert saved['validation_measure']['holdout']['n_holdout'] == 287
  assert saved['dev_set'] == 'digits' and saved['family'] == 'images'
  # protocol=tuned on the other image sets reads this family's winner
  from experiments.bench import get_config  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  for ds in ('digits', 'fashion_mnist'):
    c = get_config(f'method=flow_matching,dataset={ds},protocol=tuned')
    assert c.protocol == 'tuned'
    for key, v in out['overrides'].items():
      assert c[key.split('.')[0]][key.split('.')[1]] == v


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
  # fashion_mnist (and digits) read the image family's winner
  d = tmp_path / 'results' / 'tuning' / 'images'
  d.mkdir(parents=True)
  (d / 'meanflow.json').write_text(json.dumps(
      {'overrides': {'train.lr': 3e-3, 'method.adaptive_p': 0.5}}))
  for ds in ('fashion_mnist', 'digits'):
    c = get_config(f'method=meanflow,dataset={ds},protocol=tuned')
    assert c.train.lr == 3e-3 and c.method.adaptive_p == 0.5, ds
  with pytest.raises(ValueError, match='images'):
    get_config('method=tvm,dataset=fashion_mnist,protocol=tuned')
