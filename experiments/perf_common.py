"""`make perf` helpers that define no flags: timing and backbone set-ups.

`interleaved` (median seconds per call, rounds A, B, A, B ...), the bench
config of a method on a backbone's dataset (`backbone_config`), `Setup` (a
method + dataset + state + the harness's jitted train chunk, built with
`train.build_state` as train.py does) and the minimal hand-written FM loop
(`hand_written_fm`). Imported by experiments/perf.py (flags, `Perf`, the
sections, `main`) and by the section modules it calls (e.g.
experiments/perf_evaluator.py); importing this module defines no absl flags.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from experiments.bench import get_config as bench_config
from onestep_bench import train


# ================================================================ timing
def _block(x: Any) -> Any:
  return jax.block_until_ready(x)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                inner: int = 1) -> dict[str, float]:
  """Median seconds per call of each fn, rounds interleaved A, B, A, B ...

  Each fn is called twice first (compile, plus the one re-compile a jitted
  function may do when its outputs come back with committed shardings).
  """
  for f in fns.values():
    _block(f())
    _block(f())
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t0 = time.perf_counter()
      for _ in range(inner):
        out = f()
      _block(out)
      times[k].append((time.perf_counter() - t0) / inner)
  return {k: statistics.median(v) for k, v in times.items()}


# ================================================================ setups
def backbone_config(backbone: str, method: str,
                    quick: bool) -> ml_collections.ConfigDict:
  """The bench protocol config of `method` on the backbone's dataset."""
  dataset = 'toy2d:8gaussians' if backbone == 'mlp' else 'fashion_mnist'
  c = bench_config(f'method={method},dataset={dataset},smoke={quick}')
  c.mesh.data = 1
  if backbone == 'dit':  # DiT-tiny/4 on 28x28 (49 tokens): CPU-sized
    c.model = ml_collections.ConfigDict(dict(
        name='dit', size='S' if _on_accelerator() and not quick else 'tiny',
        patch_size=4 if not _on_accelerator() else 2))
  if 'allow_untrained_teacher' in c.method:  # distillation: random teacher
    c.method.allow_untrained_teacher = True
    c.method.teacher_workdir = ''
  return c


def _on_accelerator() -> bool:
  return jax.default_backend() != 'cpu'


class Setup:
  """A method + dataset + initial state + the harness's jitted train chunk."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    built = train.build_state(config, jax.random.key(0))  # as train.py does
    self.dataset, self.method, self.mesh = (built.dataset, built.method,
                                            built.mesh)
    self.state, self.state_sharding = built.state, built.state_sharding
    self.arrays = built.arrays
    self.batch = int(config.train.batch_size)
    self.chunk = train.make_train_chunk(self.method, self.dataset, self.mesh,
                                        self.batch, self.state_sharding)
    self.key = jax.random.key(1)
    self.steps = 0

  def cond_step_fn(self) -> Callable[[], Any]:
    """One cycle with phase=None: the `lax.cond` path (before the fix)."""
    def run():
      for _ in range(self.method.step_cycle):
        self.state, m = self.chunk(self.state, self.key, self.arrays, 1, None)
        self.steps += 1
      return m
    return run

  def step_fn(self, n: int = 1) -> Callable[[], Any]:
    """Runs n harness train steps (state carried), as `train.py` does.

    Methods with a `step_cycle` alternate update types; their time per step
    is the mean over whole cycles, so each call runs one full cycle.
    """
    cycle = self.method.step_cycle

    def run():
      for _ in range(cycle if n == 1 else 1):
        phase = (self.method.step_phase(self.steps)
                 if n == 1 and cycle > 1 else None)
        self.state, m = self.chunk(self.state, self.key, self.arrays, n,
                                   phase)
        self.steps += n
      return m
    return run

  def memory(self) -> dict[str, float]:
    """Compiled one-step memory (the largest phase for cycling methods)."""
    cycle = self.method.step_cycle
    best: dict[str, float] = {}
    for phase in (range(min(cycle, 2)) if cycle > 1 else [None]):
      ma = self.chunk.lower(self.state, self.key, self.arrays, 1,
                            phase).compile().memory_analysis()
      if ma is None:
        return {}
      total = (ma.temp_size_in_bytes + ma.argument_size_in_bytes
               + ma.output_size_in_bytes - ma.alias_size_in_bytes)
      if total / 2 ** 20 > best.get('peak_mib', -1):
        best = {'temp_mib': ma.temp_size_in_bytes / 2 ** 20,
                'peak_mib': total / 2 ** 20}
    return best


def hand_written_fm(setup: Setup) -> Callable[[], Any]:
  """The minimal loop: backbone + FM loss + AdamW + EMA, nothing else.

  Same backbone, data sampling, loss (Lipman et al. 2023 eq. 23, uniform t)
  and optimizer as `methods/flow_matching.py` under the harness, written as
  one jitted function with donated buffers.
  """
  net, tx, ds = setup.method.net, setup.method.tx, setup.dataset
  decay, batch = setup.config.train.ema_decay, setup.batch

  def loss_fn(params, x, key):
    kt, ke = jax.random.split(key)
    t = jax.random.uniform(kt, (x.shape[0],))
    tb = t.reshape((-1,) + (1,) * (x.ndim - 1))
    e = jax.random.normal(ke, x.shape)
    v = net.apply(params, (1 - tb) * x + tb * e, t, jnp.zeros_like(t), None)
    return jnp.mean(jnp.square(v - (e - x)))

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, opt_state, ema, i, key, arrays):
    dk, mk = jax.random.split(jax.random.fold_in(key, i))
    x = ds.sample(dk, batch, arrays)['x']
    loss, g = jax.value_and_grad(loss_fn)(params, x, mk)
    updates, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    n = i.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    ema = optax.incremental_update(params, ema, 1.0 - d)
    return params, opt_state, ema, i + 1, loss

  s = setup.state
  carry = [jax.tree.map(jnp.copy, s.params), jax.tree.map(jnp.copy,
                                                          s.opt_state),
           jax.tree.map(jnp.copy, s.ema_params), jnp.zeros((), jnp.int32)]

  def run():
    *carry[:4], loss = step(*carry, setup.key, setup.arrays)
    return loss
  return run
