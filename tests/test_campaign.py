"""The campaign (experiments/campaign.py): the declared steps, done-ness
read from committed results only, claims, teachers, prerequisites."""

import csv
import json
import os

import pytest

from experiments import campaign
from experiments.campaign import Step

_COLS = ('method', 'dataset', 'seed', 'protocol', 'eval', 'git_sha',
         'train_wall_s')


def _write_rows(results, rows):
  path = results / 'runs.csv'
  new = not path.exists()
  with open(path, 'a', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, _COLS)
    if new:
      w.writeheader()
    w.writerows([dict(zip(_COLS, r, strict=True)) for r in rows])


def test_steps_cover_every_board_teachers_first_and_are_unique():
  all_steps = campaign.steps()
  n = len(campaign.available_methods())
  assert len({s.name for s in all_steps}) == len(all_steps)
  runs = [s for s in all_steps if s.kind == 'run']
  # toy: 3 sets x 3 seeds x 2 protocols; peer toy 2 x 3 x bench;
  # digits 3 x 2; fashion 3 x bench
  assert len(runs) == n * (3 * 3 * 2 + 2 * 3 + 3 * 2 + 3)
  assert [s.kind for s in all_steps[:n]] == ['tune'] * n
  for i, s in enumerate(runs):
    t = campaign.teacher_of(s.method)
    if t:  # the teacher's bench run of that dataset and seed comes first
      earlier = {(r.method, r.dataset, r.seed, r.protocol) for r in runs[:i]}
      assert (t, s.dataset, s.seed, 'bench') in earlier, s.name
  assert not [s for s in runs if s.dataset == 'fashion_mnist'
              and s.protocol == 'tuned']


def test_done_means_committed_rows_of_clean_code(tmp_path):
  res = tmp_path
  _write_rows(res, [
      ('flow_matching', 'digits', 0, 'bench', 'main', 'abc1234', '400'),
      ('flow_matching', 'digits', 1, 'bench', 'main', 'abc1234+dirty', '400'),
      ('flow_matching', 'digits', 2, 'bench', 'curve', 'abc1234', '')])
  todo = {s.name for s in campaign.missing(str(res), 'digits_bench',
                                           ['flow_matching'])}
  assert todo == {'flow_matching_digits_bench_seed1',
                  'flow_matching_digits_bench_seed2'}
  tuned = Step('run', 'flow_matching', 'digits', 0, 'tuned')
  assert not campaign.ready(tuned, str(res))  # needs the images winner
  assert campaign.ready(Step('run', 'flow_matching', 'toy2d:8gaussians', 0,
                             'tuned'), str(res))
  d = res / 'tuning' / 'images'
  d.mkdir(parents=True)
  (d / 'flow_matching.json').write_text(json.dumps({'overrides': {}}))
  assert campaign.ready(tuned, str(res))
  assert 'tune_flow_matching_images' not in {
      s.name for s in campaign.missing(str(res), methods=['flow_matching'])}
  # estimates: the method's own median, then FM-relative on a new dataset
  assert campaign.estimate_s(Step('run', 'flow_matching', 'digits'),
                             str(res)) == 400.0
  assert campaign.estimate_s(Step('tune', 'flow_matching', 'images'),
                             str(res)) == 8 * 400.0
  assert campaign.estimate_s(Step('run', 'flow_matching', 'fashion_mnist'),
                             str(res)) == campaign.DECLARED_S['fashion_mnist']
  assert 'missing' in campaign.status(str(res))


def test_a_winner_only_in_results_dir_waits_for_the_checkout(
    tmp_path, monkeypatch):
  # The tuned run reads ./results/tuning (the committed tree it runs in):
  # a winner written only to --results_dir must not start it (it would
  # fail after its start), and status says why it waits.
  res = tmp_path / 'res'
  d = res / 'tuning' / 'images'
  d.mkdir(parents=True)
  (d / 'flow_matching.json').write_text(json.dumps({'overrides': {}}))
  _write_rows(res, [])
  checkout = tmp_path / 'checkout'
  checkout.mkdir()
  monkeypatch.chdir(checkout)
  tuned = Step('run', 'flow_matching', 'digits', 0, 'tuned')
  assert not campaign.ready(tuned, str(res))
  todo = campaign.missing(str(res), 'flow_matching_digits')
  assert 'flow_matching_digits_tuned_seed0' in campaign.waiting_for_checkout(
      todo, str(res))
  assert 'wait for their winner in this checkout' in campaign.status(
      str(res), 'flow_matching_digits')
  (checkout / 'results' / 'tuning' / 'images').mkdir(parents=True)
  (checkout / 'results' / 'tuning' / 'images' / 'flow_matching.json'
   ).write_text(json.dumps({'overrides': {}}))
  assert campaign.ready(tuned, str(res))
  assert not campaign.waiting_for_checkout(todo, str(res))


def test_claims_are_exclusive_and_dead_owners_lose_them(tmp_path,
                                                        monkeypatch):
  monkeypatch.chdir(tmp_path)
  s = Step('run', 'flow_matching', 'digits', 0)
  assert campaign.claim(s)
  assert not campaign.claim(s)  # held by this live process
  path = os.path.join(campaign.CLAIMS, s.name)
  with open(path, 'w', encoding='utf-8') as f:
    f.write('999999999')  # an owner that no longer exists
  assert campaign.claim(s)
  campaign.release(s)
  assert not os.path.exists(path)


def test_run_retrains_a_lost_teacher_then_the_student(tmp_path, monkeypatch):
  """The teacher's rows are committed but its run dir is gone (new
  machine): the student's step retrains it first, once."""
  monkeypatch.chdir(tmp_path)
  res = tmp_path / 'results'
  res.mkdir()
  ms = ['flow_matching', 'f_distill']
  # everything done but f_distill digits bench seed 0; FM's dir is gone
  rows = [(s.method, s.dataset, s.seed, s.protocol, 'main', 'abc1234', '1')
          for s in campaign.steps(ms) if s.kind == 'run' and
          s.name != 'f_distill_digits_bench_seed0']
  _write_rows(res, rows)
  for m in ms:
    d = res / 'tuning' / 'images'
    d.mkdir(parents=True, exist_ok=True)
    (d / f'{m}.json').write_text('{}')
  calls = []

  def fake(step, results_dir):
    calls.append(step.name)
    assert os.path.exists(os.path.join(campaign.CLAIMS, step.name))
    if step.method == 'flow_matching':
      wd = tmp_path / 'runs' / 'flow_matching' / 'digits' / 'bench_seed0'
      wd.mkdir(parents=True)
      (wd / 'summary.json').write_text('{}')
    _write_rows(res, [(step.method, step.dataset, step.seed, step.protocol,
                       'main', 'abc1234', '1')])
    return 0
  ran = campaign.run(str(res), execute=fake, methods=ms, wait_s=0)
  assert ran == calls == ['flow_matching_digits_bench_seed0',
                          'f_distill_digits_bench_seed0']
  assert campaign.run(str(res), execute=fake, methods=ms) == []
  assert not os.listdir(campaign.CLAIMS)


def test_a_failed_step_is_reported_and_not_retried(tmp_path, monkeypatch,
                                                   capsys):
  monkeypatch.chdir(tmp_path)
  ran = campaign.run(str(tmp_path), only='tune_flow_matching',
                     execute=lambda s, r: 3, methods=['flow_matching'])
  assert ran == ['tune_flow_matching_images']
  assert 'failed (rc 3)' in capsys.readouterr().out


@pytest.mark.parametrize('step, argv', [
    (Step('tune', 'meanflow', 'images'),
     ['-m', 'onestep_bench.tuning', '--method=meanflow', '--family=images']),
    (Step('run', 'tvm', 'digits', 2, 'tuned'),
     ['-m', 'onestep_bench.main',
      '--config=experiments/bench.py:method=tvm,dataset=digits,seed=2,'
      'protocol=tuned'])])
def test_steps_call_the_normal_cli(step, argv):
  cmd = step.command('R')
  assert cmd[1:len(argv) + 1] == argv and cmd[-1] == '--results_dir=R'


def test_hours_starts_only_steps_that_fit(tmp_path, monkeypatch):
  """With 1 h left a 2 h run is not started; a 1 h tuning (8 short,
  durable trials) is."""
  monkeypatch.chdir(tmp_path)
  _write_rows(tmp_path, [
      ('flow_matching', 'fashion_mnist', 0, 'bench', 'main', 'a1', '7200'),
      ('flow_matching', 'digits', 0, 'bench', 'main', 'a1', '450')])
  ran = campaign.run(str(tmp_path), execute=lambda s, r: 0, hours=1.0,
                     methods=['flow_matching'], max_steps=1)
  assert ran == ['tune_flow_matching_images']
  ran = campaign.run(str(tmp_path), only='fashion_mnist', hours=1.0,
                     execute=lambda s, r: 0, methods=['flow_matching'])
  assert ran == []
  ran = campaign.run(str(tmp_path), only='fashion_mnist', hours=2.5,
                     execute=lambda s, r: 0, methods=['flow_matching'],
                     max_steps=1)
  assert ran == ['flow_matching_fashion_mnist_bench_seed1']
