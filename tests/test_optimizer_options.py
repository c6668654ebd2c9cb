"""`train.optimizer` ('adamw' | 'radam') and `train.schedule='inv_sqrt'`.

Fast (a few seconds): RAdam against `optax.radam` and a NumPy transcription
of `torch.optim.RAdam`'s update; the inverse-sqrt schedule read off the real
optimizer (Adam with b1 = b2 = 0 steps by lr * g / (|g| + eps), so unit
gradients give the learning rate back) against its formula and FastGen's
`LambdaInverseSquareRootScheduler.schedule`; bad values fail in
`config_check.validate` (nothing built); the new keys leave existing config
hashes alone; the sCM / sCD paper protocols build with them.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments import bench, paper
from methods import flow_matching
from methods import scm as scm_method
from onestep_bench import config_check
from onestep_bench.config_check import ConfigError
from onestep_bench.method import make_optimizer
from onestep_bench.train import config_hash


def _train(**kw) -> ml_collections.ConfigDict:
  tc = dict(num_steps=100, lr=1e-2, b1=0.9, b2=0.99, weight_decay=0.0,
            warmup_steps=0, schedule='constant', grad_clip=0.0)
  tc.update(kw)
  return ml_collections.ConfigDict(tc)


# ------------------------------------------------------------------ RAdam
_A = np.array([1.0, 3.0, 0.5, 2.0])    # f(x) = 0.5 * sum(A * x**2)
_X0 = np.array([1.0, -2.0, 0.7, 0.3])


def _run(tx, steps):
  x = jnp.asarray(_X0, jnp.float32)
  state = tx.init(x)
  out = []
  for _ in range(steps):
    g = jnp.asarray(_A, jnp.float32) * x
    u, state = tx.update(g, state, x)
    x = optax.apply_updates(x, u)
    out.append(np.asarray(x))
  return np.stack(out)


def _torch_radam(lrs, b1, b2, wd, eps=1e-8):
  """torch.optim.RAdam's update (decoupled_weight_decay=True), in NumPy."""
  x, m, v = _X0.copy(), np.zeros(4), np.zeros(4)
  rho_inf = 2 / (1 - b2) - 1
  out, rhos = [], []
  for t, lr in enumerate(lrs, start=1):
    g = _A * x
    x = x * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1**t)
    rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
    rhos.append(rho)
    if rho > 5:
      rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf
                       / ((rho_inf - 4) * (rho_inf - 2) * rho))
      x = x - lr * m_hat * rect * math.sqrt(1 - b2**t) / (np.sqrt(v) + eps)
    else:
      x = x - lr * m_hat
    out.append(x.copy())
  return np.stack(out), rhos


def test_radam_is_optax_radam():
  tc = _train(optimizer='radam', warmup_steps=3)
  sched = optax.linear_schedule(0.0, tc.lr, 3)
  np.testing.assert_array_equal(
      _run(make_optimizer(tc), 12),
      _run(optax.radam(sched, b1=tc.b1, b2=tc.b2), 12))


@pytest.mark.parametrize('wd', [0.0, 0.1])
def test_radam_matches_torch_update(wd):
  steps, lr = 12, 1e-2
  # warmup_steps=0: lr 0 on the first update (warm-up of one), then lr.
  got = _run(make_optimizer(_train(optimizer='radam', weight_decay=wd,
                                   lr=lr)), steps)
  want, rhos = _torch_radam([0.0] + [lr] * (steps - 1), 0.9, 0.99, wd)
  # Both branches run (SGD-momentum steps, then rectified ones), and no
  # rho_t sits on the threshold where `>` (torch) and `>=` (optax) differ.
  assert min(rhos) < 5 < max(rhos)
  assert min(abs(r - 5) for r in rhos) > 1e-2
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  assert not np.allclose(got[-1], _X0)


def test_adamw_path_unchanged():
  tc = _train(weight_decay=0.1, warmup_steps=3, grad_clip=1.0)
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.linear_schedule(0.0, tc.lr, 3), b1=tc.b1, b2=tc.b2,
      weight_decay=0.1))
  for t in (tc, _train(optimizer='adamw', weight_decay=0.1, warmup_steps=3,
                       grad_clip=1.0)):
    np.testing.assert_array_equal(_run(make_optimizer(t), 6), _run(ref, 6))


# --------------------------------------------------------------- inv_sqrt
def _lrs(tx, steps):
  """lr(n) for n < steps: Adam with b1 = b2 = 0 on unit gradients."""
  p = jnp.zeros((1,), jnp.float32)
  state = tx.init(p)
  upd = jax.jit(tx.update)
  out = []
  for _ in range(steps):
    u, state = upd(jnp.ones((1,), jnp.float32), state, p)
    out.append(-float(u[0]) * (1 + 1e-8))
  return np.array(out)


def _fastgen(n, warm_up_steps, decay_steps):
  """NVlabs/FastGen fastgen/utils/lr_scheduler.py
  LambdaInverseSquareRootScheduler.schedule, transcribed."""
  f = 1.0
  if n > decay_steps and decay_steps > 0:
    f /= np.sqrt(n / decay_steps)
  if n < warm_up_steps:
    f *= n / warm_up_steps
  return f


@pytest.mark.parametrize('warmup, decay, share, offset, w, d', [
    (4, 10, 1.0, 0, 4, 10),     # warm-up, then decay from step 10
    (0, 7, 1.0, 0, 1, 7),       # no warm-up: a warm-up of one (lr 0 at 0)
    (8, 20, 0.5, 1, 4, 10),     # share halves both lengths; offset 1
])
def test_inv_sqrt_schedule(warmup, decay, share, offset, w, d):
  peak, steps = 3e-3, 40
  tc = _train(b1=0.0, b2=0.0, lr=peak, warmup_steps=warmup,
              schedule='inv_sqrt', decay_steps=decay)
  got = _lrs(make_optimizer(tc, share=share, offset=offset), steps)
  n = np.arange(steps) + offset
  want = peak * np.minimum(1, n / w) / np.sqrt(np.maximum(n / d, 1))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
  # FastGen's scheduler at the same (scaled) lengths; it differs only at
  # warm-up 0 (its full lr on step 0, the harness's warm-up of one).
  fg = peak * np.array([_fastgen(k, w, d) for k in n])
  k0 = 0 if warmup else 1
  np.testing.assert_allclose(got[k0:], fg[k0:], rtol=1e-6, atol=1e-12)
  assert got[-1] < peak  # decayed


def test_inv_sqrt_with_radam_and_lr_override():
  tc = _train(optimizer='radam', schedule='inv_sqrt', decay_steps=5)
  a = _run(make_optimizer(tc, lr=1e-3), 10)
  sched = lambda c: 1e-3 * jnp.minimum(c / 1, 1.0) / jnp.sqrt(  # noqa: E731
      jnp.maximum(c / 5, 1.0))
  np.testing.assert_allclose(
      a, _run(optax.radam(sched, b1=0.9, b2=0.99), 10), rtol=1e-6)


# ------------------------------------------------------------- validation
def _bench(**kw):
  c = bench.get_config('method=flow_matching,dataset=toy2d:8gaussians,'
                       'smoke=True')
  c.train.update(kw)
  return c


@pytest.mark.parametrize('kw, key, pattern', [
    (dict(optimizer='sgd'), 'train.optimizer', r"'sgd'.*'adamw', 'radam'"),
    (dict(optimizer=True), 'train.optimizer', r'True'),
    (dict(schedule='inv_sqrt'), 'train.decay_steps',
     r"None: is required by train\.schedule='inv_sqrt'"),
    (dict(schedule='inv_sqrt', decay_steps=0), 'train.decay_steps',
     r'decay_steps=0: must be an int >= 1'),
    (dict(schedule='inv_sqrt', decay_steps=1.5), 'train.decay_steps',
     r'1\.5: must be an int'),
    (dict(schedule='inv_sqrt', decay_steps=-3), 'train.decay_steps', r'-3'),
    (dict(schedule='linear'), 'train.schedule', r"'inv_sqrt'"),
])
def test_bad_values_fail_in_validation(kw, key, pattern):
  with pytest.raises(ConfigError, match=pattern) as e:
    config_check.validate(_bench(**kw), flow_matching.Method)
  assert e.value.key == key and e.value.fix


def test_good_values_validate():
  for kw in (dict(optimizer='radam'), dict(optimizer='adamw'),
             dict(schedule='inv_sqrt', decay_steps=100),
             dict(schedule='constant', decay_steps=0)):  # unread: ignored
    config_check.validate(_bench(**kw), flow_matching.Method)


# ------------------------------------------------------------ config_hash
def test_config_hash_unchanged_by_default_keys():
  base = config_hash(_bench())
  assert config_hash(_bench(optimizer='adamw')) == base
  assert config_hash(_bench(decay_steps=35_000)) == base  # unread
  assert config_hash(_bench(optimizer='adamw', decay_steps=7)) == base
  assert config_hash(_bench(optimizer='radam')) != base
  inv = config_hash(_bench(schedule='inv_sqrt', decay_steps=10))
  assert inv not in (base, config_hash(_bench(schedule='inv_sqrt',
                                              decay_steps=20)))
  assert 'optimizer' not in bench.get_config(
      'method=flow_matching,dataset=toy2d:8gaussians').train


# ------------------------------------------------------- paper protocols
def test_scm_paper_protocols_use_the_fastgen_optimizer():
  tree = {'w': jnp.ones((3,))}
  for args, opt, sched in (
      ('method=scm,dataset=cifar10', 'radam', 'constant'),
      ('method=scd,dataset=cifar10', 'radam', 'constant'),
      ('method=scd,dataset=imagenet64', 'adamw', 'inv_sqrt'),
      ('method=scm,dataset=imagenet64', 'adamw', 'inv_sqrt')):
    c = paper.get_config(args)
    assert (c.train.optimizer, c.train.schedule) == (opt, sched), args
    assert c.train.get('decay_steps') == (
        35_000 if sched == 'inv_sqrt' else None), args
    config_check.check_train(c.train)
    make_optimizer(c.train).init(tree)
  config_check.validate(paper.get_config('method=scm,dataset=cifar10'),
                        scm_method.Method)
  # Other protocols are untouched: AdamW, no decay length.
  fm = paper.get_config('method=flow_matching,dataset=cifar10')
  assert 'optimizer' not in fm.train and 'decay_steps' not in fm.train
