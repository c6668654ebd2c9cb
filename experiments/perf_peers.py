"""`make perf` section `peers`: the harness against its peers, like for like.

From experiments/perf.py, `peers_section(perf)` adds its rows to the `Perf`
instance; alone, `python -m experiments.perf_peers [--repeats=5] [--quick]
[--out_dir=results]` writes <out_dir>/peers/perf.{csv,md}.

Training loops on one plain MLP (`mlp_plain`, models/mlp_plain.py:
torchcfm's / the Drifting demo's network, PyTorch init; same width, depth,
batch and law everywhere), timed in interleaved rounds (A, B, C, A, B, C,
...) in one process, warm-up (compiles) excluded, medians over rounds:
flow matching 3 x `perf.repeats` rounds of ~0.1 s calls, drifting
`perf.repeats` rounds of `drift_steps` steps for every loop (`interleaved`):

  torchcfm   the `ConditionalFlowMatcher(sigma=0)` loop of torchcfm's 2-D
             tutorial, re-written here in PyTorch (torchcfm is not a
             dependency: `pip install torchcfm` pulls ~45 packages, incl.
             pytorch-lightning and jupyter): x0 ~ N(0, I), x1 ~ law,
             t ~ U(0, 1), eps drawn as torchcfm does, x_t = t x1 + (1 - t)
             x0 + sigma eps, u_t = x1 - x0, MSE, Adam (lr 1e-3). Law:
             torchcfm `sample_8gaussians`, its rows indexed at once instead
             of its per-row Python loop (faster for the peer; the target is
             judged on this one).
  torchcfm_verbatim  the same loop with torchcfm's own per-row sampler
             (the tutorial as published; an informational row).
  demo       the official Drifting toy demo's `train_toy` step
             (`sample_checkerboard`, `compute_drift`, `drifting_loss`,
             Adam lr 1e-3, temp 0.05, `loss.item()`), SiLU MLP.
  harness    this project's `train.make_train_chunk` (what `train.py` runs:
             batch drawn inside the program, AdamW at weight decay 0 = Adam,
             EMA, grad / param norms, drifting's collapse metrics) on the
             peer law (`toy2d:8gaussians_torchcfm`,
             `toy2d:checkerboard_drifting`), `fm_steps` / `drift_steps` steps
             per dispatch (train.steps_per_dispatch).
  hand_jax   a minimal hand-written JAX loop: one jitted step per call
             (donated buffers, optax.adam), the same MLP in plain jnp, the
             same in-program sampler and FM loss.
  harness_every_step_metrics  the harness computing every metric at every
             step (before `train._scan_lean`; the same training bit for bit).
  matmul_floor  the FM net's matmuls alone (`matmul_floor_fm`): the most
             any JAX step of this net reaches on this CPU.

Threads: torch runs at JAX's thread count (`torch.set_num_threads`, the
cores XLA:CPU's pool uses) and, when that is > 1, also at 1 thread; the
ratios use the faster torch setting (its libgomp threads spin-wait, which
collapses on a loaded machine: 2 threads were 50x slower than 1 there).

Rows (section `peers`, backbone `mlp_plain`): `<loop>_steps_per_s`, the
ratios `harness_over_torchcfm` (target >= 2), `harness_over_hand_jax`
(>= 0.9), `harness_over_torchcfm_verbatim` and `floor_over_torchcfm` for
flow matching, `harness_over_official_demo` (>= 2.5) for drifting,
`lean_over_every_step_metrics` for both (before / after of metrics on a
dispatch's last step only) and `field_share_of_harness_step` (the jitted
drift loss alone over the harness step: where drifting's time goes).
docs/perf_peers.md has the layer-by-layer correspondence and the
measurements.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from experiments.bench import get_config as bench_config
from onestep_bench import models, train
from onestep_bench.data import toy2d

TORCHCFM = 'atong01/conditional-flow-matching'
DEMO = toy2d.DRIFTING_DEMO
FM_LAW, DRIFT_LAW = '8gaussians_torchcfm', 'checkerboard_drifting'
LR = 1e-3  # torch.optim.Adam's default (torchcfm tutorial) and the demo's
DEMO_TEMP = 0.05
# Untimed pause before every timed call: torch's OpenMP workers spin-wait
# after a call, and without it the loop timed next ran ~10 % slower
# (measured: the harness FM loop at 574 steps/s right after torch, 643 one
# place later).
SETTLE_S = 0.2
# A loop: run(k) runs k training steps and returns something to block on.
Loop = Callable[[int], Any]


def jax_threads() -> int:
  """Intra-op threads XLA:CPU uses: the cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def interleaved(loops: dict[str, tuple[Loop, int]], repeats: int,
                call_s: float = 0.25,
                settle_s: float = SETTLE_S) -> dict[str, float]:
  """Median seconds per step of each loop, rounds interleaved A, B, A, B.

  Unlike experiments/perf_common.interleaved (fixed calls, no pause), the
  calls here are sized to ~`call_s` per loop and each is preceded by an
  untimed `settle_s` pause: torch and XLA loops alternate, and the one timed
  right after a torch call ran ~10 % slow without it (docs/perf_peers.md).

  Args:
    loops: name -> (run, unit): run(k) takes k steps, k a multiple of
      `unit` (the harness: its steps per dispatch; else 1). Each call runs
      as many units as take ~`call_s` (timed after the warm-up), so a
      preemption on a loaded machine is a small part of any call.
    repeats: timed rounds (the median is taken over them).
    call_s: target duration of one call.

  Returns:
    name -> median seconds per step. Warm-up: two calls of one unit each
    (compiles, as experiments/perf.py's rule), not timed. `call_s=0`: every
    call is one unit (no calibration).
  """
  ks = {}
  for name, (run, unit) in loops.items():
    jax.block_until_ready(run(unit))
    t0 = time.perf_counter()
    jax.block_until_ready(run(unit))
    dt = time.perf_counter() - t0
    ks[name] = unit * max(1, min(1000, round(call_s / max(dt, 1e-6))))
  times: dict[str, list[float]] = {name: [] for name in loops}
  for _ in range(repeats):
    for name, (run, _) in loops.items():
      time.sleep(settle_s)
      t0 = time.perf_counter()
      jax.block_until_ready(run(ks[name]))
      times[name].append((time.perf_counter() - t0) / ks[name])
  return {name: statistics.median(v) for name, v in times.items()}


# ================================================================= PyTorch
def torch_mlp(torch, in_dim: int, width: int, out_dim: int, act: str,
              depth: int = 3):
  """The torchcfm `models.MLP` / the demo's `MLP`: `self.net` = Sequential."""
  nn = torch.nn
  act_cls = {'selu': nn.SELU, 'silu': nn.SiLU}[act]
  sizes = [in_dim] + [width] * depth + [out_dim]
  layers = []
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    layers.append(nn.Linear(a, b))
    if i < depth:
      layers.append(act_cls())

  class MLP(nn.Module):
    def __init__(self):
      super().__init__()
      self.net = nn.Sequential(*layers)

    def forward(self, x):
      return self.net(x)
  return MLP()


class TorchCFM:
  """torchcfm `ConditionalFlowMatcher(sigma)`: the methods its loop calls."""

  def __init__(self, torch, sigma: float = 0.0):
    self.torch, self.sigma = torch, sigma

  def sample_location_and_conditional_flow(self, x0, x1):
    """Draws t ~ U, eps ~ N (even at sigma 0); returns t, x_t, u_t."""
    torch = self.torch
    t = torch.rand(x0.shape[0]).type_as(x0)
    eps = torch.randn_like(x0)  # sample_noise_like
    tp = t.reshape(-1, *([1] * (x0.dim() - 1)))  # pad_t_like_x
    xt = tp * x1 + (1 - tp) * x0 + self.sigma * eps  # sample_xt
    return t, xt, x1 - x0  # compute_conditional_flow


def _torch_8gaussians_draws(torch, n: int):
  """The draws of torchcfm's `eight_normal_sample(n, 2, scale=5, var=0.1)`.

  Returns (centers [8, 2], noise [n, 2] from `MultivariateNormal(0,
  sqrt(var) I)`, modes [n] from `multinomial`), drawn in torchcfm's order.
  """
  s = 1.0 / math.sqrt(2.0)
  centers = 5.0 * torch.tensor([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s),
                                (s, -s), (-s, s), (-s, -s)])
  m = torch.distributions.MultivariateNormal(
      torch.zeros(2), math.sqrt(0.1) * torch.eye(2))
  noise = m.sample((n,))
  multi = torch.multinomial(torch.ones(8), n, replacement=True)
  return centers, noise, multi


def torch_8gaussians(torch, n: int):
  """The torchcfm `sample_8gaussians(n)` (= toy2d:8gaussians_torchcfm).

  torchcfm stacks the rows in a Python loop; here they are indexed at once
  (same law, faster for the peer).
  """
  centers, noise, multi = _torch_8gaussians_draws(torch, n)
  return (centers[multi] + noise).float()


def torch_8gaussians_verbatim(torch, n: int):
  """The published torchcfm `sample_8gaussians(n)`, its per-row loop kept.

  torchcfm/utils.py `eight_normal_sample`: `data.append(centers[multi[i]] +
  noise[i])` for every row, the cost its tutorial pays every step.
  """
  centers, noise, multi = _torch_8gaussians_draws(torch, n)
  return torch.stack([centers[multi[i]] + noise[i] for i in range(n)]).float()


def torchcfm_loop(torch, batch: int, width: int, threads: int,
                  verbatim: bool = False) -> Loop:
  """The torchcfm 2-D training loop (sigma = 0) at `threads` torch threads.

  `verbatim`: draw x1 with torchcfm's own per-row sampler
  (`torch_8gaussians_verbatim`) instead of the vectorised one.
  """
  sampler = torch_8gaussians_verbatim if verbatim else torch_8gaussians
  torch.manual_seed(0)
  model = torch_mlp(torch, 3, width, 2, 'selu')  # MLP(dim=2, time_varying)
  optimizer = torch.optim.Adam(model.parameters(), lr=LR)
  fm = TorchCFM(torch, sigma=0.0)

  def run(k):
    torch.set_num_threads(threads)
    for _ in range(k):
      optimizer.zero_grad()
      x0 = torch.randn(batch, 2)
      x1 = sampler(torch, batch)
      t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
      vt = model(torch.cat([xt, t[:, None]], dim=-1))
      loss = torch.mean((vt - ut) ** 2)
      loss.backward()
      optimizer.step()
    return loss.item()
  return run


def demo_compute_drift(torch, gen, pos, temp: float = DEMO_TEMP):
  """The demo's `compute_drift` (from its toy_mean_drift.py), verbatim."""
  targets = torch.cat([gen, pos], dim=0)
  g = gen.shape[0]
  dist = torch.cdist(gen, targets)
  dist[:, :g].fill_diagonal_(1e6)  # mask self
  kernel = (-dist / temp).exp()
  normalizer = (kernel.sum(dim=-1, keepdim=True)
                * kernel.sum(dim=-2, keepdim=True))
  normalizer = normalizer.clamp_min(1e-12).sqrt()
  normalized_kernel = kernel / normalizer
  pos_coeff = (normalized_kernel[:, g:]
               * normalized_kernel[:, :g].sum(dim=-1, keepdim=True))
  pos_v = pos_coeff @ targets[g:]
  neg_coeff = (normalized_kernel[:, :g]
               * normalized_kernel[:, g:].sum(dim=-1, keepdim=True))
  neg_v = neg_coeff @ targets[:g]
  return pos_v - neg_v


def demo_drifting_loss(torch, gen, pos, temp: float = DEMO_TEMP):
  """The demo's `drifting_loss`: MSE(gen, stopgrad(gen + V))."""
  with torch.no_grad():
    v = demo_compute_drift(torch, gen, pos, temp)
    target = (gen + v).detach()
  return torch.nn.functional.mse_loss(gen, target)


def demo_checkerboard(torch, n: int, noise: float = 0.05):
  """The demo's `sample_checkerboard(n)` (= toy2d:checkerboard_drifting)."""
  b = torch.randint(0, 2, (n,))
  i = torch.randint(0, 2, (n,)) * 2 + b
  j = torch.randint(0, 2, (n,)) * 2 + b
  u, v = torch.rand(n), torch.rand(n)
  pts = (torch.stack([i + u, j + v], dim=1) - 2.0) / 2.0
  return pts + noise * torch.randn(pts.shape)


def demo_loop(torch, batch: int, width: int, threads: int,
              in_dim: int = 2) -> Loop:
  """The demo's `train_toy` loop body at `threads` torch threads.

  `in_dim` is `train_toy`'s noise dim (demo default 32); 2 = the data dim,
  the harness generator's input, so both nets have the same layers.
  """
  torch.manual_seed(42)
  model = torch_mlp(torch, in_dim, width, 2, 'silu')
  opt = torch.optim.Adam(model.parameters(), lr=LR)
  history = []

  def run(k):
    torch.set_num_threads(threads)
    for _ in range(k):
      pos = demo_checkerboard(torch, batch)
      gen = model(torch.randn(batch, in_dim))
      loss = demo_drifting_loss(torch, gen, pos)
      opt.zero_grad()
      loss.backward()
      opt.step()
      history.append(loss.item())
    return history[-1]
  return run


# ================================================================= JAX
def plain_forward(params: dict[str, Any], z: jax.Array, act: str) -> jax.Array:
  """The plain MLP in jnp on `mlp_plain` params (no framework)."""
  f = {'selu': jax.nn.selu, 'silu': jax.nn.silu}[act]
  layers = [params['layers'][k] for k in sorted(params['layers'], key=int)]
  for layer in layers[:-1]:
    z = f(z @ layer['kernel'] + layer['bias'])
  return z @ layers[-1]['kernel'] + layers[-1]['bias']


def hand_jax_fm(batch: int, width: int) -> Loop:
  """A minimal jitted FM loop: one dispatch per step, optax.adam, donated.

  Same law (sampled in the program), loss (flow_matching.py: z_t = (1 - t)
  x + t e, target e - x) and network as the harness run.
  """
  net = models.build(ml_collections.ConfigDict(dict(
      name='mlp_plain', width=width, depth=3)), toy2d.Toy2D(FM_LAW).spec)
  sample = toy2d.SAMPLERS[FM_LAW]
  tx = optax.adam(LR)

  def loss_fn(params, x, key):
    kt, ke = jax.random.split(key)
    t = jax.random.uniform(kt, (x.shape[0],))
    e = jax.random.normal(ke, x.shape)
    z = (1 - t[:, None]) * x + t[:, None] * e
    v = plain_forward(params, jnp.concatenate([z, t[:, None]], -1), 'selu')
    return jnp.mean(jnp.square(v - (e - x)))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, i, key):
    dk, mk = jax.random.split(jax.random.fold_in(key, i))
    loss, g = jax.value_and_grad(loss_fn)(params, sample(dk, batch), mk)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = net.init(jax.random.key(0))
  box = {'p': params, 'o': tx.init(params), 'i': 0}
  key = jax.random.key(1)

  def run(k):
    for _ in range(k):
      box['p'], box['o'], loss = step(box['p'], box['o'], box['i'], key)
      box['i'] += 1
    return loss
  return run


def matmul_floor_fm(batch: int, width: int, n: int = 50) -> Loop:
  """The FM net's matmuls alone: fwd + bwd of its Dense layers, no SELU.

  A lower bound on any JAX training step of this network on this CPU: one
  fixed batch (no sampling), the activations dropped (a linear net of the
  same layer shapes), plain SGD (no Adam, EMA or metrics), `n` steps per
  jit call (no dispatch). `floor_over_torchcfm` says how fast a step could
  be at best; the harness's ratio is judged against it.
  """
  net = models.build(ml_collections.ConfigDict(dict(
      name='mlp_plain', width=width, depth=3)), toy2d.Toy2D(FM_LAW).spec)
  kx, ky = jax.random.split(jax.random.key(1))
  x, y = jax.random.normal(kx, (batch, 3)), jax.random.normal(ky, (batch, 2))

  def loss_fn(params):
    layers = [params['layers'][k] for k in sorted(params['layers'], key=int)]
    z = x
    for layer in layers:
      z = z @ layer['kernel'] + layer['bias']
    return jnp.mean(jnp.square(z - y))

  def body(params, _):
    g = jax.grad(loss_fn)(params)
    return jax.tree.map(lambda p, d: p - LR * d, params, g), None

  steps = jax.jit(lambda p: jax.lax.scan(body, p, None, length=n)[0],
                  donate_argnums=0)
  box = {'p': net.init(jax.random.key(0))}

  def run(k):
    for _ in range(k // n):
      box['p'] = steps(box['p'])
    return box['p']
  return run


def harness_config(method: str, batch: int, width: int,
                   steps_per_dispatch: int) -> ml_collections.ConfigDict:
  """The bench config of `method` on its peer law with the peer's net.

  Optimizer as the peers' Adam: constant lr 1e-3, weight decay 0 (the
  bench's), one warm-up step (the schedule's minimum), no clipping.
  Drifting: the demo's field (one τ = 0.05 in data units, no feature or
  drift normalisation); its generator gets the data-dim noise.
  """
  law = FM_LAW if method == 'flow_matching' else DRIFT_LAW
  c = bench_config(f'method={method},dataset=toy2d:{law}')
  c.mesh.data = 1
  act, time_input = (('selu', 't') if method == 'flow_matching'
                     else ('silu', 'none'))
  c.model = ml_collections.ConfigDict(dict(
      name='mlp_plain', width=width, depth=3, activation=act,
      time_input=time_input, guidance_embed=False, style_tokens=0,
      style_vocab=64))
  c.train.update(batch_size=batch, lr=LR, schedule='constant',
                 warmup_steps=1, weight_decay=0.0, grad_clip=0.0,
                 steps_per_dispatch=steps_per_dispatch)
  if method == 'drifting':
    c.method.update(temperatures=(DEMO_TEMP,), feature_norm=False,
                    drift_norm=False, affinity_floor=0.0, num_gen=0)
  return c


def harness_loop(config: ml_collections.ConfigDict,
                 every_step_metrics: bool = False) -> tuple[Loop, Any]:
  """(run, built): `train.build_state` + `train.make_train_chunk`.

  What `train.py`'s loop runs: run(k) dispatches k / n chunks of n =
  `train.steps_per_dispatch` steps, the state donated and carried, and
  fetches each chunk's metrics to the host (`jax.device_get`) as it does.
  `every_step_metrics`: the chunk computes every metric at every step (the
  harness before metrics moved to the chunk's last step; same training).
  """
  built = train.build_state(config, jax.random.key(0))
  chunk = train.make_train_chunk(built.method, built.dataset, built.mesh,
                                 int(config.train.batch_size),
                                 built.state_sharding,
                                 every_step_metrics=every_step_metrics)
  n = int(config.train.steps_per_dispatch)
  box = {'state': built.state}
  key = jax.random.key(1)

  def run(k):
    for _ in range(k // n):
      box['state'], metrics = chunk(box['state'], key, built.arrays, n)
      metrics = jax.device_get(metrics)
    return metrics
  return run, built


# ================================================================= section
def peers_section(perf: Any, *, fm_batch: int | None = None,
                  drift_batch: int | None = None, width: int | None = None,
                  fm_steps: int | None = None,
                  drift_steps: int | None = None) -> None:
  """Adds the `peers` rows to `perf` (an `experiments.perf.Perf`).

  Args:
    perf: collects the rows (`repeats`, `quick`, `add`).
    fm_batch: flow-matching batch (default 256, torchcfm's tutorial).
    drift_batch: drifting batch, generated = positives (default 2048, the
      demo's `data_batch_size` = `gen_batch_size`).
    width: hidden width of the 3-hidden-layer MLP (default 256).
    fm_steps: harness FM steps per dispatch (default 50, the toy bench's).
    drift_steps: drifting steps per call of every loop and per harness
      dispatch (default 3; a step is ~0.2-2 s here, so the dispatch
      overhead is nil).
  """
  q = perf.quick
  fm_batch = fm_batch or (64 if q else 256)
  drift_batch = drift_batch or (128 if q else 2048)
  width = width or (32 if q else 256)
  fm_steps = fm_steps or (4 if q else 50)
  drift_steps = drift_steps or (2 if q else 3)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    perf.add('peers', 'mlp_plain', '', 'error', None, '',
             detail='torch not installed (make install-parity)')
    return
  threads = jax_threads()
  old = torch.get_num_threads()
  try:
    _flow_matching(perf, torch, fm_batch, width, fm_steps, threads)
    _drifting(perf, torch, drift_batch, width, drift_steps, threads)
  finally:
    torch.set_num_threads(old)


def _torch_variants(make: Callable[[int], Loop], threads: int, name: str,
                    unit: int = 1) -> dict[str, tuple[Loop, int]]:
  """{name: at JAX's thread count, name_1t: at 1 thread (if different)}."""
  out = {name: (make(threads), unit)}
  if threads > 1:
    out[f'{name}_1t'] = (make(1), unit)
  return out


def _best_torch(sps: dict[str, float], name: str) -> tuple[float, str]:
  best = max((k for k in sps if k.startswith(name)), key=sps.get)
  return sps[best], best


def _flow_matching(perf, torch, batch, width, steps, threads) -> None:
  harness, built = harness_loop(
      harness_config('flow_matching', batch, width, steps))
  every, _ = harness_loop(
      harness_config('flow_matching', batch, width, steps), True)
  loops = {**_torch_variants(
      lambda n: torchcfm_loop(torch, batch, width, n), threads, 'torchcfm'),
           **_torch_variants(
               lambda n: torchcfm_loop(torch, batch, width, n, True),
               threads, 'torchcfm_verbatim'),
           'harness': (harness, steps),
           'harness_every_step_metrics': (every, steps),
           'hand_jax': (hand_jax_fm(batch, width), 1),
           'matmul_floor': (matmul_floor_fm(batch, width, steps), steps)}
  # Short calls, 3x the rounds: a ~13 ms harness step chunk and ~3 ms
  # steps are at the mercy of other jobs' bursts; finer interleaving and
  # more rounds make the medians see the same load.
  rounds = 3 * perf.repeats
  sps = {k: 1.0 / v for k, v in interleaved(loops, rounds,
                                            call_s=0.1).items()}
  detail = (f'batch {batch}, MLP 3x{width} SELU on [x, t] '
            f'({built.method.net.num_params()} params), toy2d:{FM_LAW}, '
            f'{threads} JAX threads, torch {torch.__version__}, median '
            f'of {rounds} rounds')
  for k, v in sps.items():
    perf.add('peers', 'mlp_plain', 'flow_matching', f'{k}_steps_per_s', v,
             'steps/s', detail=detail if k == 'harness' else '')
  verb, which_v = _best_torch(sps, 'torchcfm_verbatim')
  perf.add('peers', 'mlp_plain', 'flow_matching',
           'harness_over_torchcfm_verbatim', sps['harness'] / verb, 'ratio',
           higher_is_better=True,
           detail=f'vs {which_v}: torchcfm\'s loop with its own per-row '
                  'sample_8gaussians (the tutorial as published); the target '
                  'is judged on the vectorised peer below')
  best, which = _best_torch({k: v for k, v in sps.items()
                             if not k.startswith('torchcfm_verbatim')},
                            'torchcfm')
  perf.add('peers', 'mlp_plain', 'flow_matching', 'harness_over_torchcfm',
           sps['harness'] / best, 'ratio', target=2.0, higher_is_better=True,
           detail=f'vs {which} (the faster torch threads), {TORCHCFM} loop')
  perf.add('peers', 'mlp_plain', 'flow_matching', 'harness_over_hand_jax',
           sps['harness'] / sps['hand_jax'], 'ratio', target=0.9,
           higher_is_better=True,
           detail=f'harness {steps} steps/dispatch, hand 1 jit call/step')
  perf.add('peers', 'mlp_plain', 'flow_matching', 'floor_over_torchcfm',
           sps['matmul_floor'] / best, 'ratio', higher_is_better=True,
           detail='the net\'s matmuls alone (matmul_floor_fm: linear, fixed '
                  'batch, SGD): the most any JAX step of this net reaches '
                  'here; a harness_over_torchcfm target above it is out of '
                  'reach on this CPU')
  _lean_metrics_row(perf, 'flow_matching', sps)


def _lean_metrics_row(perf, method: str, sps: dict[str, float]) -> None:
  """Before / after of metrics on the chunk's last step only."""
  perf.add('peers', 'mlp_plain', method, 'lean_over_every_step_metrics',
           sps['harness'] / sps['harness_every_step_metrics'], 'ratio',
           higher_is_better=True,
           detail='harness steps/s, metrics besides the loss on the last '
                  'step of a dispatch (train._scan_lean) over on every step '
                  '(before); training bit-identical')


def _drifting(perf, torch, batch, width, steps, threads) -> None:
  """Drifting rows. Every loop runs `steps` steps per call (no calibration).

  The field's cost depends on where the samples are (measured: the
  project's field at one τ took 590 / 300 / 210 ms for generated spreads
  0.05 / 0.5 / data-like), so the loops advance through training in step:
  after each round all have taken the same number of steps.
  """
  from methods import drifting  # pylint: disable=g-import-not-at-top
  config = harness_config('drifting', batch, width, steps)
  harness, built = harness_loop(config)
  every, _ = harness_loop(config, True)
  method = built.method
  # The field alone, on the first step's inputs (fetched before the state
  # is donated): what share of a harness step it takes.
  x = jax.jit(lambda p, k: method.generate(p, method.noise(k, batch)))(
      built.state.params, jax.random.key(2))[None]
  pos = built.dataset.sample(jax.random.key(3), batch)['x'][None]
  kw = method._field_kwargs()  # pylint: disable=protected-access
  # The loss alone, as a scanned (lean) harness step needs it.
  field = jax.jit(lambda x, p: drifting.drift_loss(x, p, **kw)[0])
  loops = {**_torch_variants(
      lambda n: demo_loop(torch, batch, width, n), threads, 'official_demo',
      unit=steps),
           'harness': (harness, steps),
           'harness_every_step_metrics': (every, steps),
           'harness_field': (lambda k: [field(x, pos) for _ in range(k)],
                             steps)}
  tm = interleaved(loops, perf.repeats, call_s=0.0)
  sps = {k: 1.0 / v for k, v in tm.items() if k != 'harness_field'}
  detail = (f'{batch} generated + {batch} data, MLP 3x{width} SiLU '
            f'({method.net.num_params()} params), temp {DEMO_TEMP}, '
            f'toy2d:{DRIFT_LAW}, {steps} steps/call, {threads} JAX threads, '
            f'torch {torch.__version__}')
  for k, v in sps.items():
    perf.add('peers', 'mlp_plain', 'drifting', f'{k}_steps_per_s', v,
             'steps/s', detail=detail if k == 'harness' else '')
  best, which = _best_torch(sps, 'official_demo')
  perf.add('peers', 'mlp_plain', 'drifting', 'harness_over_official_demo',
           sps['harness'] / best, 'ratio', target=2.5, higher_is_better=True,
           detail=f'vs {which} (the faster torch threads)')
  _lean_metrics_row(perf, 'drifting', sps)
  perf.add('peers', 'mlp_plain', 'drifting', 'field_share_of_harness_step',
           tm['harness_field'] / tm['harness'], 'ratio',
           detail=f'jitted drift_loss alone on the first step\'s inputs: '
                  f'{1e3 * tm["harness_field"]:.1f} ms; harness '
                  f'{1e3 * tm["harness"]:.1f} ms/step')


def main(argv):
  """Runs only this section; rows go to <out_dir>/peers/perf.{csv,md}."""
  del argv
  perf_mod = sys.modules['experiments.perf']
  flags = perf_mod.flags.FLAGS
  perf = perf_mod.Perf(flags.repeats, flags.quick)
  t0 = time.perf_counter()
  peers_section(perf)
  out = os.path.join(flags.out_dir, 'peers')
  perf.write(out)
  print(f'wrote {os.path.join(out, "perf.csv")} ({len(perf.rows)} rows) '
        f'in {time.perf_counter() - t0:.0f} s')


if __name__ == '__main__':
  # experiments.perf defines the flags (--repeats, --quick, --out_dir) and
  # `Perf`; it is imported only here, so `python -m experiments.perf` can
  # import this module without defining its flags twice.
  from absl import app  # pylint: disable=g-import-not-at-top

  import experiments.perf  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  app.run(main)
