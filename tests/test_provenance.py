"""`provenance.config_hash`: seeds of one config share a hash, nothing else.

The leaderboard averages seeds that share `config_hash` and marks († on the
board) a group whose seeds hash apart. A distillation student names its
teacher by workdir, and the default one (`runs.default_workdir`) ends in the
student's own seed, so without normalisation every seed of sCD / f-distill
hashed apart and the board flagged identical configs as different.
"""

import pytest

from experiments import bench
from onestep_bench import provenance, train


def _cfg(method: str, seed: int, **extra: str):
  args = ','.join([f'method={method}', 'dataset=toy2d:8gaussians',
                   f'seed={seed}'] + [f'{k}={v}' for k, v in extra.items()])
  return bench.get_config(args)


@pytest.mark.parametrize('method', ['flow_matching', 'scd', 'f_distill'])
def test_seeds_of_one_config_share_the_hash(method):
  hashes = {provenance.config_hash(_cfg(method, s)) for s in (0, 1, 2)}
  assert len(hashes) == 1, hashes


def test_the_default_teacher_path_names_the_own_seed():
  c = _cfg('scd', 3)
  assert c.method.teacher_workdir.endswith('_seed3')  # what is normalised


def test_another_teacher_changes_the_hash():
  base = _cfg('scd', 1)
  other = _cfg('scd', 1)
  other.method.teacher_workdir = 'runs/flow_matching/toy2d_8gaussians/x'
  seed0_teacher = _cfg('scd', 1)  # seed 1's student, seed 0's teacher
  seed0_teacher.method.teacher_workdir = (
      seed0_teacher.method.teacher_workdir.replace('_seed1', '_seed0'))
  h = provenance.config_hash(base)
  assert provenance.config_hash(other) != h
  assert provenance.config_hash(seed0_teacher) != h


def test_maths_changes_the_hash_and_train_reexports_it():
  a, b = _cfg('flow_matching', 0), _cfg('flow_matching', 0)
  b.train.lr = b.train.lr * 2
  assert provenance.config_hash(a) != provenance.config_hash(b)
  assert train.config_hash is provenance.config_hash
  assert train.git_sha is provenance.git_sha
