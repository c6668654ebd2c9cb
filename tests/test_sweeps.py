"""Sweeps: dotted overrides, products, the ablation table."""

import csv
import sys
import types

import pytest

from experiments.bench import get_config
from onestep_bench import sweeps


def test_unknown_override_key_is_clear():
  c = get_config('method=flow_matching,smoke=True')
  with pytest.raises(KeyError, match="Unknown config key 'train.nope'"):
    sweeps.apply_overrides(c, {'train.nope': 1})
  sweeps.apply_overrides(c, {'train.lr': 0.5})
  assert c.train.lr == 0.5


def test_product_of_sweeps():
  exp = types.SimpleNamespace(
      __name__='x', sweep_a=lambda: iter([{'k': 1}, {'k': 2}]),
      sweep_b=lambda: iter([{'j': 'u'}, {'j': 'v'}, {'j': 'w'}]))
  pts = list(sweeps.sweep_points(exp, ['a', 'b']))
  assert len(pts) == 6 and {'k': 2, 'j': 'w'} in pts
  with pytest.raises(ValueError, match='no sweep_c'):
    list(sweeps.sweep_points(exp, ['c']))


def test_sweep_writes_table_with_commands(tmp_path, monkeypatch):
  mod = types.ModuleType('experiments._tiny_exp')
  mod.BASE = 'method=flow_matching,dataset=toy2d:moons'
  mod.get_config = lambda arg: _one_device(get_config(arg))

  def sweep_lr():
    yield {'train.lr': 1e-3}
    yield {'train.lr': 1e-2}
  mod.sweep_lr = sweep_lr
  monkeypatch.setitem(sys.modules, 'experiments._tiny_exp', mod)
  monkeypatch.chdir(tmp_path)
  path = sweeps.run('_tiny_exp', ['lr'], [0], str(tmp_path / 'res'),
                    smoke=True)
  rows = list(csv.DictReader(open(path)))
  assert len(rows) == 4  # 2 points x NFE {1, 2}
  assert {r['train.lr'] for r in rows} == {'0.001', '0.01'}
  assert all('--config.train.lr=' in r['command'] for r in rows)
  assert all(float(r['sliced_w2']) > 0 for r in rows)


def _one_device(c):
  c.mesh.data = 1
  return c
