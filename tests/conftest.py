"""Test setup: 8 fake CPU devices (sharding tests) and shared fixtures."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

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


@pytest.fixture(params=METHODS)
def method_name(request):
  return request.param
