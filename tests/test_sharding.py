"""Sharded training and sampling: 8 devices == 1 device, FSDP == replicated.

Runs under 8 fake CPU devices (conftest sets XLA_FLAGS). Tolerances: float32
all-reduce order differs between meshes, so losses and params agree to
rtol = atol = 1e-5 after 4 AdamW steps (measured max |diff| ~1e-7), not
bitwise. A two-process jax.distributed run is in test_distributed.py (slow).
"""

import json

import jax
import ml_collections
import numpy as np
import pytest
from conftest import final_state, smoke_config
from jax.sharding import PartitionSpec as P

from onestep_bench import data, sharding, train
from onestep_bench.evaluators import runner
from onestep_bench.method import available_methods, load_method

TOL = dict(rtol=1e-5, atol=1e-5)


def _run(method, workdir, **mesh):
  """4 logged steps, no eval; returns (per-step losses, final state)."""
  config = smoke_config(method, **{'train.num_steps': 4,
                                   'train.steps_per_dispatch': 1,
                                   'train.log_every_steps': 1,
                                   **{f'mesh.{k}': v for k, v in mesh.items()}})
  config.evals = ml_collections.ConfigDict()
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary['device']['mesh'] == {
      'data': mesh.get('data', 1), 'fsdp': mesh.get('fsdp', 1)}
  with open(workdir / 'metrics.jsonl', encoding='utf-8') as f:
    losses = [r['loss'] for r in map(json.loads, f) if 'loss' in r]
  assert len(losses) == 4
  return np.asarray(losses), final_state(config, str(workdir))


def _assert_close(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)


# Every method in the slow suite; the fast suite keeps one single-network
# method and the two structural cases (a multi-net state with alternating
# phases: f_distill's fsdp case below; method extras: tvm).
_FAST_8DEV = ('flow_matching', 'tvm')


@pytest.mark.parametrize('method_name', [
    m if m in _FAST_8DEV else pytest.param(m, marks=pytest.mark.slow)
    for m in available_methods()])
def test_8_devices_match_1_device(method_name, tmp_path):
  assert jax.device_count() == 8
  loss1, s1 = _run(method_name, tmp_path / 'one', data=1)
  loss8, s8 = _run(method_name, tmp_path / 'eight', data=8)
  np.testing.assert_allclose(loss8, loss1, **TOL)
  _assert_close(s8.params, s1.params)
  _assert_close(s8.extras, s1.extras)


@pytest.mark.parametrize('name', [
    pytest.param('flow_matching', marks=pytest.mark.slow),
    pytest.param('tvm', marks=pytest.mark.slow),
    'f_distill'])  # fast: the multi-network state with alternating phases
def test_fsdp_matches_replicated(name, tmp_path):
  # fsdp_min_size=0: the smoke MLP is tiny, shard every divisible leaf.
  loss_r, s_r = _run(name, tmp_path / 'repl', data=8)
  loss_f, s_f = _run(name, tmp_path / 'fsdp', data=2, fsdp=4,
                     fsdp_min_size=0)
  np.testing.assert_allclose(loss_f, loss_r, **TOL)
  _assert_close(s_f, s_r)


def test_fsdp_shards_the_state():
  config = smoke_config('flow_matching', **{'mesh.data': 2, 'mesh.fsdp': 4})
  mesh = sharding.make_mesh(config.mesh)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}
  ds = data.build(config.data)
  method = load_method(config, ds.spec)
  abstract = jax.eval_shape(method.init, jax.random.key(0),
                            ds.sample(jax.random.key(0), 2))
  shard = sharding.state_shardings(mesh, abstract, min_size=0)
  specs = [s.spec for s in jax.tree.leaves(shard.params)]
  assert any('fsdp' in spec for spec in specs)
  # Every sharded axis divides evenly; scalars stay replicated.
  for s, leaf in zip(jax.tree.leaves(shard), jax.tree.leaves(abstract),
                     strict=True):
    for dim, ax in zip(leaf.shape, s.spec, strict=False):  # P() is short
      assert ax is None or dim % 4 == 0
    if leaf.ndim == 0:
      assert s.spec == P()
  # Above the default size threshold the tiny smoke MLP stays replicated.
  big_only = sharding.state_shardings(mesh, abstract)
  assert all(s.spec == P() for s in jax.tree.leaves(big_only.params))


def test_leaf_sharding_picks_largest_divisible_axis():
  config = ml_collections.ConfigDict({'data': 2, 'fsdp': 4})
  mesh = sharding.make_mesh(config)
  assert sharding.leaf_sharding(mesh, (6, 64, 3), 0).spec == P(
      None, 'fsdp', None)
  assert sharding.leaf_sharding(mesh, (3, 5), 0).spec == P()  # none divides
  assert sharding.leaf_sharding(mesh, (64, 64), 10 ** 6).spec == P()  # small


@pytest.mark.parametrize('mesh,match', [
    ({'data': 16, 'fsdp': 1}, 'visible devices'),
    ({'data': -1, 'fsdp': 3}, 'must be >= 1 and divide'),
    ({'data': 4, 'fsdp': 4}, 'visible devices'),
])
def test_bad_mesh_is_clear(mesh, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(ml_collections.ConfigDict(mesh))


def test_sharded_sampling_matches_one_device(method_name):
  config = smoke_config(method_name)
  ds = data.build(config.data)
  method = load_method(config, ds.spec)
  state = jax.jit(method.init)(jax.random.key(1), ds.sample(
      jax.random.key(0), 2))
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 8}))
  key = jax.random.key(3)
  one, _ = runner.draw_samples(method, state.ema_params, key, 64, 1, 32)
  eight, _ = runner.draw_samples(method, state.ema_params, key, 64, 1, 32,
                                 mesh=mesh)
  np.testing.assert_allclose(eight, one, **TOL)
