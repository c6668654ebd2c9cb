"""The plug-in contract, parametrised over every module in methods/."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import smoke_config

from onestep_bench import data
from onestep_bench.method import (
  AnyNFE,
  TrainState,
  UnsupportedNFEError,
  load_method,
)


def _setup(name):
  config = smoke_config(name)
  ds = data.build(config.data)
  return config, ds, load_method(config, ds.spec)


def _nfes(method):
  if isinstance(method.supported_nfe, AnyNFE):
    return (1, 2, 4)
  return tuple(method.supported_nfe)


def test_module_api(method_name):
  from onestep_bench.method import method_module
  mod = method_module(method_name)
  assert mod.__doc__ and len(mod.__doc__) > 200, 'docstring with equations'
  cfg = mod.get_config()
  assert 'name' not in cfg or cfg.name == method_name


def test_two_steps_finite_and_params_change(method_name):
  config, ds, method = _setup(method_name)
  key = jax.random.key(0)
  state = method.init(key, ds.sample(key, config.train.batch_size))
  assert isinstance(state, TrainState)
  step = jax.jit(method.train_step)
  s1, m1 = step(state, ds.sample(jax.random.key(1), 64), jax.random.key(2))
  s2, m2 = step(s1, ds.sample(jax.random.key(3), 64), jax.random.key(4))
  for m in (m1, m2):
    assert np.isfinite(float(m['loss']))
    assert {'loss', 'grad_norm', 'param_norm'} <= set(m)
  assert int(s2.step) == 2
  delta = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       state.params, s2.params)
  assert max(jax.tree.leaves(delta)) > 0, 'params did not change'
  # No retrace: a second call with same shapes reuses the compiled step.
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_sample_shapes_finite_deterministic(method_name):
  config, ds, method = _setup(method_name)
  del config
  key = jax.random.key(0)
  params = method.init(key, ds.sample(key, 8)).ema_params
  for nfe in _nfes(method):
    fn = jax.jit(lambda p, k, nfe=nfe: method.sample(p, k, 16, nfe=nfe))
    a, b = fn(params, jax.random.key(5)), fn(params, jax.random.key(5))
    c = fn(params, jax.random.key(6))
    assert a.shape == (16, *ds.spec.shape)
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    assert fn._cache_size() == 1  # pylint: disable=protected-access
    del c


def test_unsupported_nfe_raises(method_name):
  _, ds, method = _setup(method_name)
  params = method.init(jax.random.key(0),
                       ds.sample(jax.random.key(0), 8)).params
  bad = 0 if isinstance(method.supported_nfe, AnyNFE) else max(
      _nfes(method)) + 1
  with pytest.raises(UnsupportedNFEError, match='supported'):
    method.sample(params, jax.random.key(0), 4, nfe=bad)


def test_sampling_flops_scale_with_nfe(method_name):
  """Effective NFE = sampling FLOPs / one forward of the protocol's reference
  backbone, counted through the sampler's loops (XLA's cost analysis counts a
  loop body once)."""
  from onestep_bench.evaluators import runner  # pylint: disable=g-import-not-at-top
  config = smoke_config(method_name)
  ds = data.build(config.data)
  method = load_method(config, ds.spec)
  params = method.init(jax.random.key(0),
                       ds.sample(jax.random.key(0), 8)).params
  fwd = runner.reference_forward(config.model, ds.spec).flops
  assert fwd > 0
  eff = {}
  for nfe in (1, 2, 4):
    if nfe in method.supported_nfe:
      _, cost = runner.draw_samples(method, params, jax.random.key(1), 16, nfe,
                                    16)
      eff[nfe] = cost['flops_per_sample'] / fwd
      # At least nfe backbone passes; more when a method adds work per step
      # (Transition Matching's head), and that must be counted, not hidden.
      assert eff[nfe] >= 0.95 * nfe, eff
  # Linear in nfe: every step costs the same (no loop counted once).
  for nfe in eff:
    assert eff[nfe] == pytest.approx(nfe * eff[1], rel=0.05), eff
  if not getattr(method, 'extra_sampling_flops', False):
    for nfe in eff:  # one backbone forward per step, exactly
      assert eff[nfe] == pytest.approx(nfe, rel=0.05), eff
