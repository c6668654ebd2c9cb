"""`mlp_plain`: torchcfm's / the Drifting demo's MLP, and the peers section.

One harness state (torchcfm's exact net: dim 2, w 256) serves the init, the
count and the training tests; forward tests use random numpy weights, so
the file compiles two programs of note (the state's init and one step).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from onestep_bench import models
from onestep_bench.config_check import ConfigError
from onestep_bench.data import DataSpec
from onestep_bench.models import mlp_plain


def _spec(dim=2, num_classes=0):
  return DataSpec(name='toy2d:test', shape=(dim,), num_classes=num_classes,
                  kind='toy2d')


def _net(dim=2, num_classes=0, **kw):
  return models.build(ml_collections.ConfigDict(dict(name='mlp_plain', **kw)),
                      _spec(dim, num_classes))


def _linear_params(sizes):
  """Parameters of nn.Linear layers of these sizes: weights + biases."""
  return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def _random_params(net, seed=0):
  """Random numpy weights in the params layout (forward tests: no init)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: (rng.normal(size=a.shape) / np.sqrt(a.shape[0])).astype(
          np.float32), net.abstract())


@pytest.fixture(scope='module')
def harness():
  """(run, initial params) of the peers section's FM harness, torchcfm size.

  The params are fetched before any step: `run` donates the state.
  """
  from experiments import perf_peers  # pylint: disable=g-import-not-at-top
  config = perf_peers.harness_config('flow_matching', batch=64, width=256,
                                     steps_per_dispatch=1)
  run, built = perf_peers.harness_loop(config)  # build_state + train chunk
  return run, jax.device_get(built.state.params)


def test_param_count_equals_the_peers(harness):
  # torchcfm MLP(dim=2, w=256, time_varying=True): Linear(3, 256),
  # 2 x Linear(256, 256), Linear(256, 2) = 133,122 parameters.
  assert _linear_params([3, 256, 256, 256, 2]) == 133_122
  assert sum(a.size for a in jax.tree.leaves(harness[1])) == 133_122
  assert _net(width=256).num_params() == 133_122
  # The Drifting demo's MLP(in_dim=2, hidden=256): no time input.
  assert _net(width=256, activation='silu',
              time_input='none').num_params() == 132_866
  assert _net(width=256, time_input='th').num_params() == 133_378
  assert _net(dim=5, width=64, depth=2).num_params() == _linear_params(
      [6, 64, 64, 5])


def test_init_is_pytorch_linear_default(harness):
  layers = harness[1]['layers']  # the harness's own init
  for i, fan_in in zip(('0', '1', '2', '3'), (3, 256, 256, 256), strict=True):
    bound = 1 / np.sqrt(fan_in)
    for leaf in ('kernel', 'bias'):
      a = np.asarray(layers[i][leaf])
      assert np.all(np.abs(a) <= bound)
      if a.size >= 256:  # U(-b, b) reaches near b; a normal init overshoots
        assert np.max(np.abs(a)) > 0.95 * bound
  w = np.asarray(layers['1']['kernel'])  # U(-b, b): std b / sqrt(3)
  assert abs(w.std() - 1 / np.sqrt(3 * 256)) < 0.02 / np.sqrt(3 * 256)
  assert abs(w.mean()) < 1e-3


def test_forward_concatenates_time_and_ignores_h_with_t():
  x = np.random.default_rng(1).normal(size=(4, 2)).astype(np.float32)
  t, zero, one = (np.linspace(0.1, 0.9, 4, dtype=np.float32),
                  np.zeros(4, np.float32), np.ones(4, np.float32))
  outs = {}
  for time_input in ('t', 'th'):
    net = _net(width=16, time_input=time_input)
    outs[time_input] = jax.jit(lambda p, net=net: [
        net.apply(p, x, tt, h) for tt, h in
        ((t, zero), (t, one), (1 - t, zero))])(_random_params(net))
  a, b, c = outs['t']
  assert a.shape == (4, 2) and a.dtype == jnp.float32
  assert np.array_equal(a, b) and not np.allclose(a, c)  # t used, h not
  a, b, _ = outs['th']
  assert not np.allclose(a, b)  # 'th' reads h


def test_refuses_labels_guidance_style_and_bad_options():
  with pytest.raises(ConfigError, match='data.conditional'):
    _net(num_classes=10)
  with pytest.raises(ConfigError, match='model.activation'):
    _net(activation='relu')
  with pytest.raises(ConfigError, match='model.time_input'):
    _net(time_input='tt')
  with pytest.raises(ConfigError, match='model.depth'):
    _net(depth=0)
  with pytest.raises(ConfigError, match='model.guidance_embed'):
    _net(guidance_embed=True)
  with pytest.raises(ConfigError, match='model.style_tokens'):
    _net(style_tokens=2)
  net = _net(width=8)
  x, t = jnp.zeros((2, 2)), jnp.zeros(2)
  with pytest.raises(ValueError, match='labels'):  # at trace time
    jax.eval_shape(net.apply, net.abstract(), x, t, t,
                   jnp.zeros(2, jnp.int32))


@pytest.mark.parity
def test_forward_equals_pytorch_with_copied_weights():
  torch = pytest.importorskip('torch')
  dim, width = 2, 64
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, dim)).astype(np.float32)
  t = rng.uniform(size=16).astype(np.float32)
  h = rng.uniform(size=16).astype(np.float32)
  for act, time_input in (('selu', 't'), ('silu', 'none'), ('selu', 'th')):
    net = _net(dim, width=width, activation=act, time_input=time_input)
    params = _random_params(net, seed=3)
    got = np.asarray(jax.jit(net.apply)(params, x, t, h))
    extra = len(mlp_plain.TIME_INPUTS[time_input])
    a = {'selu': torch.nn.SELU, 'silu': torch.nn.SiLU}[act]

    class TorchMLP(torch.nn.Module):  # torchcfm models.MLP, written out
      def __init__(self, a=a, extra=extra):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + extra, width), a(),
            torch.nn.Linear(width, width), a(),
            torch.nn.Linear(width, width), a(),
            torch.nn.Linear(width, dim))

      def forward(self, z):
        return self.net(z)

    ref = TorchMLP()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in
                         mlp_plain.torch_state_dict(params).items()})
    z = torch.from_numpy(np.concatenate([x, t[:, None], h[:, None]][
        :1 + extra], -1))
    with torch.no_grad():
      want = ref(z).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_harness_trains_flow_matching_with_it(harness):
  run, _ = harness  # train.make_train_chunk, one step per dispatch
  losses = [float(run(1)['loss'][0]) for _ in range(60)]
  assert np.all(np.isfinite(losses))
  # toy2d:8gaussians_torchcfm (radius 5): E|e - x|^2 / 2 ~ 14 at the start.
  assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses


@pytest.mark.slow
def test_peers_section_quick_rows():
  pytest.importorskip('torch')
  import torch  # pylint: disable=g-import-not-at-top

  from experiments import perf_peers  # pylint: disable=g-import-not-at-top

  # The PyTorch loops' network has torchcfm's layout (net.0 ... net.6).
  peer = perf_peers.torch_mlp(torch, 3, 8, 2, 'selu')
  assert list(peer.state_dict()) == [
      f'net.{i}.{w}' for i in (0, 2, 4, 6) for w in ('weight', 'bias')]

  class Rows:
    repeats, quick = 1, True

    def __init__(self):
      self.rows = {}

    def add(self, section, backbone, method, metric, value, unit, **kw):
      del unit, kw
      assert section == 'peers' and backbone == 'mlp_plain'
      self.rows[(method, metric)] = value

  perf = Rows()
  perf_peers.peers_section(perf)
  for key in [('flow_matching', 'harness_over_torchcfm'),
              ('flow_matching', 'harness_over_hand_jax'),
              ('flow_matching', 'floor_over_torchcfm'),
              ('flow_matching', 'harness_over_torchcfm_verbatim'),
              ('flow_matching', 'lean_over_every_step_metrics'),
              ('drifting', 'harness_over_official_demo'),
              ('drifting', 'lean_over_every_step_metrics'),
              ('drifting', 'field_share_of_harness_step')]:
    assert perf.rows[key] > 0
