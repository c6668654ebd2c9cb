"""Test setup: 8 fake CPU devices (sharding tests) and shared fixtures."""

import os

# Tests compile hundreds of tiny programs and run each a few times, so XLA's
# LLVM optimisation passes cost more than they save: at level 0 a smoke
# U-Net's init compiles in 8.7 s instead of 40 s on one core, and
# test_backbones + test_images + test_inception took 27 % less CPU (464 s vs
# 638 s, measured side by side); the fast suite on a clean clone took 716 s
# of pytest time instead of 1111 s that day. It is a codegen setting: every
# tolerance and bitwise test runs under it unchanged; runs outside tests
# keep XLA's default.
TEST_XLA_OPT = '--xla_backend_optimization_level=0'


def xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS of a test process or CLI subprocess with `devices` fakes."""
  return f'--xla_force_host_platform_device_count={devices} {TEST_XLA_OPT}'


os.environ.setdefault('XLA_FLAGS', xla_flags(8))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Classifiers / reference statistics built by tests never touch the user's
# cache (~/.cache/onestep_bench); one temporary cache per test session.
if 'ONESTEP_CACHE' not in os.environ:
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ['ONESTEP_CACHE'] = tempfile.mkdtemp(prefix='onestep_cache_')
# One XLA compilation cache per test session, shared by the xdist workers
# and the CLI subprocesses: tests build the same programs (a smoke U-Net's
# init compiles for ~25 s on one core) from new module instances, which jit
# alone would compile again. A cache hit is the identical executable, so no
# result changes; only compile time goes.
_JAX_CACHE = {'JAX_COMPILATION_CACHE_DIR': os.path.join(
                  os.environ['ONESTEP_CACHE'], 'xla'),
              'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.5'}
for _k, _v in _JAX_CACHE.items():
  os.environ.setdefault(_k, _v)

import pytest  # noqa: E402

from experiments.bench import get_config  # noqa: E402
from onestep_bench.method import available_methods  # noqa: E402

METHODS = available_methods()


def smoke_config(method: str, dataset: str = 'toy2d:8gaussians', **kw):
  """The smoke protocol on one device (fast), with dotted overrides."""
  c = get_config(f'method={method},dataset={dataset},smoke=True')
  c.mesh.data = 1
  c.update_from_flattened_dict(kw)
  return c


def method_setup(method: str, dataset: str = 'toy2d:gaussian', **kw):
  """(config, dataset, method) of the smoke protocol."""
  from onestep_bench import data  # pylint: disable=g-import-not-at-top
  from onestep_bench.method import load_method  # pylint: disable=g-import-not-at-top
  config = smoke_config(method, dataset, **kw)
  ds = data.build(config.data)
  return config, ds, load_method(config, ds.spec)


def perturb(params, key, scale=0.3):
  """params + scale * N(0, 1) noise, one key per leaf (zero-init output
  layers make a fresh net's output constant, which hides bugs in maths
  tests)."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves, tdef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tdef, [
      a + scale * jax.random.normal(k, a.shape)
      for a, k in zip(leaves, keys, strict=True)])


def random_params(method, seed=0, scale=0.3):
  """Jitted init + `perturb` (eager init dispatches one op at a time)."""
  import jax  # pylint: disable=g-import-not-at-top

  def init(key):
    return perturb(method.net.init(key), jax.random.fold_in(key, 1), scale)
  return jax.jit(init)(jax.random.key(seed))


def final_state(config, workdir):
  """The newest checkpoint of a run (`runs.restore_state`), as numpy arrays.

  Unlike `runs.load_run` it needs no summary.json (interrupted runs) and
  returns the whole TrainState, not only the EMA params.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from onestep_bench import data, runs  # pylint: disable=g-import-not-at-top
  from onestep_bench.method import load_method  # pylint: disable=g-import-not-at-top
  ds = data.build(config.data)
  state = runs.restore_state(workdir, load_method(config, ds.spec),
                             ds.sample(jax.random.key(0), 2))
  return None if state is None else jax.tree.map(np.asarray, state)


@pytest.fixture(params=METHODS)
def method_name(request):
  return request.param


@pytest.fixture
def cheap_classifier(monkeypatch):
  """A 60-step classifier recipe without accuracy floors (smoke evals)."""
  from onestep_bench.evaluators import classifier  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(classifier.RECIPE, 'steps', 60)
  monkeypatch.setattr(classifier, 'MIN_ACCURACY', {})


def count_dots(jaxpr) -> int:
  """dot_general count, scans unrolled by their length."""
  total = 0
  for eqn in jaxpr.eqns:
    mult = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
    if eqn.primitive.name == 'dot_general':
      total += 1
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          total += mult * count_dots(inner)
  return total


def cli_env(devices: int = 1, **extra) -> dict[str, str]:
  """Environment of a CLI subprocess: CPU, `devices` fake devices, no JAX_*
  inherited from the test process but the session's compilation cache."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
  env.update({k: os.environ[k] for k in _JAX_CACHE})
  env.update(JAX_PLATFORMS='cpu', ONESTEP_TRACEBACK='1',
             XLA_FLAGS=xla_flags(devices),
             **extra)
  return env


def run_two_processes(cmd: list[str], cwd, timeout: int = 600
                      ) -> list[tuple[str, str]]:
  """Runs `cmd` as a 2-process jax.distributed job (2 devices each) on a
  free localhost port; asserts both exit 0; returns their (stdout, stderr).
  """
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      cmd, cwd=cwd,
      env=cli_env(2, JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
                  JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  return outs


def stub_digits_classifier(monkeypatch, extractor) -> None:
  """Memoises `extractor` as the digits classifier `get_extractor` returns."""
  import ml_collections as mlc  # pylint: disable=g-import-not-at-top

  from onestep_bench import data  # pylint: disable=g-import-not-at-top
  from onestep_bench.evaluators import image_eval  # pylint: disable=g-import-not-at-top
  ds = data.build(mlc.ConfigDict({'name': 'digits'}))
  key = image_eval.extractor_key(ds, mlc.ConfigDict({'feature_net': 'auto'}))
  monkeypatch.setitem(image_eval._EXTRACTORS, key, extractor)  # pylint: disable=protected-access
