"""The method plug-in contract: `TrainState` and the `Method` base class.

Every method lives in `methods/<name>.py`, defines `Method(onestep_bench.method
.Method)` and `get_config()`. The harness never names a method; it loads one by
convention (`load_method`). All arrays a method needs live in one `TrainState`
pytree, so the harness can jit, shard and checkpoint any method the same way.
The method object itself is static: it holds configuration and the backbone
definition, never arrays that change during training.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Collection, Container, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from onestep_bench import models
from onestep_bench.data import DataSpec

PyTree = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree.

  Attributes:
    step: int32 scalar, number of optimizer steps taken.
    params: the generator (student) parameters.
    opt_state: optax state of `params`.
    ema_params: exponential moving average of `params`; evaluation samples
      from these.
    extras: method-owned arrays (frozen teacher, critic params and their
      optimizer state, slow EMA copies, memory banks, ...). Checkpointed and
      sharded like everything else.
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  ema_params: PyTree
  extras: dict[str, PyTree]


class AnyNFE(Container):
  """`supported_nfe` for samplers defined at every positive step count.

  Membership only: `nfe in AnyNFE()` for every int >= 1. It is not
  iterable (the set is infinite); code that needs concrete step counts
  tests its own candidates for membership (the contract test samples 1, 2
  and 4; experiments/perf.py times 1, 2, 4).
  """

  def __contains__(self, nfe: object) -> bool:
    return isinstance(nfe, int) and not isinstance(nfe, bool) and nfe >= 1

  def __repr__(self) -> str:
    return 'any NFE >= 1'


class UnsupportedNFEError(ValueError):
  """Raised when a sampler is asked for a step count it does not define."""


def make_optimizer(train: ml_collections.ConfigDict, *, lr: float = 0.0,
                   share: float = 1.0,
                   offset: int = 0) -> optax.GradientTransformation:
  """The shared optimizer: AdamW or RAdam + warm-up and a schedule.

  The defaults give the optimizer of `Method.tx`. Methods with several
  networks updated on alternate iterations build one per network with
  their own `lr`, `share` and `offset`.

  Optimizers (`train.optimizer`, absent = 'adamw'):
    'adamw': `optax.adamw(lr, b1, b2, weight_decay)` (decoupled decay).
    'radam': Rectified Adam (Liu et al. 2020, arXiv:1908.03265) with
      decoupled weight decay: `scale_by_radam(b1, b2)`, then
      `add_decayed_weights(weight_decay)` (left out at 0), then
      `scale_by_learning_rate(schedule)`; at weight_decay 0 this is exactly
      `optax.radam(schedule, b1, b2)`. PyTorch's `torch.optim.RAdam` (what
      FastGen's sCM configs run, with weight_decay=0) applies its decay as L2
      on the gradient unless `decoupled_weight_decay=True`, so the two agree
      at weight_decay 0 (every protocol here) and this one matches
      `decoupled_weight_decay=True` otherwise. Two small differences from
      PyTorch remain: optax adds eps to sqrt(v_hat) (PyTorch to sqrt(v)
      before the bias correction, i.e. eps / sqrt(1 - b2^t) on sqrt(v_hat)),
      and rectifies at rho_t >= 5 (PyTorch: > 5).

  Schedules (`train.schedule`; lr(n) at update count n + `offset`, with
  W = warm-up and D = decay lengths scaled by `share`, both at least 1):
    'constant': peak * min(1, n / W).
    'cosine': linear warm-up to peak, cosine decay to 0 at num_steps.
    'inv_sqrt': peak * min(1, n / W) / sqrt(max(n / D, 1)), D from
      `train.decay_steps`: the inverse square root decay of EDM2 (Karras et
      al. 2024, arXiv:2312.02696) used by sCM. Formula as NVlabs/FastGen@
      34f30e8:fastgen/utils/lr_scheduler.py
      LambdaInverseSquareRootScheduler.schedule (f = 1; if n > decay_steps:
      f /= sqrt(n / decay_steps); if n < warm_up_steps: f *= n /
      warm_up_steps), except that, as for 'constant', the warm-up is at
      least one update (lr 0 at n = 0), where FastGen's warm_up_steps=0
      gives the full lr on its first step.

  Args:
    train: `config.train` with `lr`, `b1`, `b2`, `weight_decay`,
      `warmup_steps`, `schedule` ('constant' | 'cosine' | 'inv_sqrt'),
      `num_steps`, `grad_clip` (0 disables clipping), optionally
      `optimizer` ('adamw' | 'radam'; default 'adamw') and `decay_steps`
      (int > 0; required by 'inv_sqrt').
    lr: peak learning rate; 0 means `train.lr`.
    share: fraction of the iterations on which this optimizer updates; the
      warm-up and decay lengths are scaled by it (counted in its updates).
    offset: the schedule is read at update count + `offset`. 1 for a net
      updated every K-th iteration: the warm-up starts at lr 0, which would
      waste its first update (the next one is K iterations later).

  Returns:
    An optax transformation.
  """
  lr = lr or train.lr
  warmup = max(round(train.warmup_steps * share), 1)
  if train.schedule == 'cosine':
    sched = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(round(train.num_steps * share), 2))
  elif train.schedule == 'constant':
    sched = optax.linear_schedule(0.0, lr, warmup)
  elif train.schedule == 'inv_sqrt':
    decay = max(round(train.decay_steps * share), 1)

    def sched(count):
      n = jnp.asarray(count, jnp.float32)
      return (lr * jnp.minimum(n / warmup, 1.0)
              / jnp.sqrt(jnp.maximum(n / decay, 1.0)))
  else:
    raise ValueError(f'config.train.schedule={train.schedule!r}: use '
                     "'constant', 'cosine' or 'inv_sqrt'.")
  schedule = (lambda c: sched(c + offset)) if offset else sched
  chain = ([optax.clip_by_global_norm(train.grad_clip)] if train.grad_clip
           else [])
  name = train.get('optimizer', 'adamw')
  if name == 'adamw':
    chain.append(optax.adamw(schedule, b1=train.b1, b2=train.b2,
                             weight_decay=train.weight_decay))
  elif name == 'radam':
    chain.append(optax.scale_by_radam(b1=train.b1, b2=train.b2))
    if train.weight_decay:
      chain.append(optax.add_decayed_weights(train.weight_decay))
    chain.append(optax.scale_by_learning_rate(schedule))
  else:
    raise ValueError(f'config.train.optimizer={name!r}: use '
                     "'adamw' or 'radam'.")
  return optax.chain(*chain)


class Method:
  """Base class of every method plug-in.

  Subclasses implement `loss` and `sample`, and set `supported_nfe`. The
  default `init`/`train_step` cover single-network methods: one backbone
  (`self.net`), one optimizer, an EMA of the parameters. Methods with several
  networks or optimizers override `init` and `train_step`.

  Backbone inputs (`apply`, `net.apply`): every method calls the same
  backbone as `model(x, t, h, y, g, s)`. `t` [B] is the current time (t = 0
  data, t = 1 noise) and `h` [B] is a second time input whose meaning is
  the method's: MeanFlow feeds the interval t - r, TVM the gap t - s to its
  target time s; methods without one pass a constant (flow matching 0, the
  default of `apply`; Drifting 1). `y` are labels (the null label when
  None), `g` a guidance input, `s` style tokens (see `apply`; the table per
  method is docs/contract.md §6).

  Attributes:
    supported_nfe: the step counts `sample` honours exactly, checked with
      `nfe in supported_nfe` (`check_nfe`, config validation, the
      evaluator). It must be either a finite Collection (an iterable
      Container) of ints >= 1, e.g. `(1,)` or `(1, 2, 4)`, which the
      contract test iterates to sample at each value; or `AnyNFE()`, the
      one non-iterable value, for samplers defined at every positive step
      count (see `AnyNFE`). Set it on the class or, when it depends on the
      config, in `__init__` (docs/contract.md §3).
    config: the full run config (read-only); `config.method` holds the
      method's own keys.
    spec: shape / label information of the data.
    net: the shared backbone, `net.apply(params, x, t, h, y)`.
    tx: the optimizer of `params`.
  """

  supported_nfe: Collection[int] | AnyNFE = (1,)
  # G > 0: training batches come as G one-class blocks (labelled data only;
  # see `Dataset.sample(groups=...)`).
  class_groups: int = 0
  # True when sampling costs more than `nfe` backbone passes (e.g. a head
  # with its own inner steps); the evaluator reports the measured effective
  # NFE either way, and the contract test then only requires >= nfe.
  extra_sampling_flops: bool = False
  # C > 1: `train_step` alternates update types over a cycle of C steps
  # (e.g. generator / critic updates). When the harness dispatches a single
  # step (image protocols on CPU) it passes `step_phase(step)` as a static
  # Python int, so the method branches in Python instead of `lax.cond`:
  # XLA:CPU runs convolutions inside control flow (cond / while) ~10-35x
  # slower than at top level. Inside a scan the phase is None.
  step_cycle: int = 1
  # Non-empty: why this method's loss couples the samples of a batch (a
  # whole-batch statistic, a field over all samples), so that the mean of
  # micro-batch gradients is not the gradient of the global-batch loss;
  # `config_check` then refuses `train.grad_accum` > 1 before any compute.
  grad_accum_refused: str = ''
  # True when the method passes the backbone's guidance input g (`apply`'s
  # `g`: Drifting's α, TVM's 1/w, iMF's ω). Otherwise `config_check`
  # refuses `model.guidance_embed=True` before any compute: the backbone
  # would be built needing a g the method never passes.
  guidance_input: bool = False

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    """Checks the method's own keys (`config.method`) before any compute.

    Called by the harness (`config_check.validate`) before `__init__`,
    `prepare` or any compile. Raise `onestep_bench.config_check.ConfigError(
    key, value, allowed, fix)` for a value the method cannot use. Default:
    nothing to check.
    """
    del config

  def __init__(self, config: ml_collections.ConfigDict, spec: DataSpec):
    self.config = config
    self.mcfg = config.method
    self.spec = spec
    self.net = models.build(config.model, spec)
    self.tx = make_optimizer(config.train)

  # ----------------------------------------------------------------- training
  def prepare(self, dataset: Any) -> None:
    """Host-side set-up that needs the training data, before `init`.

    Called once by the harness (outside jit) with the built dataset: load
    or train frozen auxiliary networks (a feature encoder, a teacher) whose
    arrays `init_extras` then places in `TrainState.extras`. Default: none.
    """
    del dataset

  def row_variant(self) -> str:
    """What a result row must say beyond the method's name; '' for nothing.

    For a config choice that changes what the method *is* on this data
    (e.g. which feature set a field is computed on), as `key=value` pairs
    joined by ';'. The harness records it in `summary.json` and runs.csv's
    `method_variant` column, and LEADERBOARD.md shows it beside the method
    (docs/contract.md). Rows of one fixed protocol share a config, so the
    variant labels them and never splits them. Default: ''.
    """
    return ''

  def upstream_compute(self) -> dict[str, float | None]:
    """Training FLOPs of the runs this method's result depends on.

    Called after `prepare`. E.g. a distilled student's teacher run, a frozen
    feature encoder's pre-training: {name: FLOPs, or None if unknown}. The
    harness adds them to this run's own train FLOPs (`total_train_flops`),
    so "best at what cost" counts the whole pipeline. Default: none.
    """
    return {}

  def init(self, key: jax.Array, example_batch: Batch) -> TrainState:
    """Initial state: fresh backbone params, optimizer state, EMA = params."""
    del example_batch
    params = self.net.init(key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=self.tx.init(params),
        ema_params=params,
        extras=self.init_extras(key, params))

  def init_extras(self, key: jax.Array, params: PyTree) -> dict[str, PyTree]:
    """Method-owned state; override to add slow EMAs, memory banks, ..."""
    del key, params
    return {}

  def loss(self, params: PyTree, batch: Batch, key: jax.Array,
           state: TrainState) -> tuple[jax.Array, Metrics]:
    """Scalar training loss and metrics for one batch (pure, jit-able)."""
    raise NotImplementedError

  def step_phase(self, step: int) -> int:
    """The static update type of `step` (one compiled program per value)."""
    return step % self.step_cycle

  @property
  def grad_accum(self) -> int:
    """Micro-batches per optimizer step: `config.train.grad_accum` (1)."""
    return int(self.config.train.get('grad_accum', 1))

  def loss_and_grads(self, params: PyTree, batch: Batch, key: jax.Array,
                     state: TrainState | None,
                     loss_fn: Callable[..., tuple[jax.Array, Metrics]]
                     | None = None) -> tuple[tuple[jax.Array, Metrics],
                                             PyTree]:
    """((loss, metrics), grads) of `loss_fn` on the global batch.

    `loss_fn(params, batch, key, state)` defaults to `self.loss`; `params`
    may be any pytree (e.g. a tuple of two networks' params).

    k = `grad_accum` == 1: exactly `jax.value_and_grad(loss_fn,
    has_aux=True)(params, batch, key, state)`. k > 1 (gradient
    accumulation): the batch's leading axis is split into k micro-batches
    of B / k rows, micro-batch i holding rows i, i + k, i + 2k, ... (a
    strided split, so each keeps the data sharding of the global batch:
    every device holds B / (k * devices) rows of each); a `lax.scan` takes
    value_and_grad on micro-batch i with key `fold_in(key, i)`, sums the
    grads in (at least) float32 and returns their mean, with loss and
    metrics averaged over the micro-batches. One optimizer update then
    uses the global-batch gradient: step counts, schedules and the EMA are
    unchanged, and for a loss that is a mean of per-sample terms the
    result equals the k = 1 gradient up to the randomness the per-micro-
    batch keys draw (and float summation order). Methods whose loss couples
    samples across the batch set `grad_accum_refused` instead.
    """
    loss_fn = self.loss if loss_fn is None else loss_fn
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    k = self.grad_accum
    if k == 1:
      return grad_fn(params, batch, key, state)
    micro = split_microbatches(batch, k)
    acc0 = jax.tree.map(
        lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
        params)

    def body(acc, xs):
      i, mb = xs
      (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(key, i),
                                       state)
      acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads)
      return acc, (loss, jax.tree.map(jnp.asarray, metrics))

    acc, (losses, metrics) = jax.lax.scan(
        body, acc0, (jnp.arange(k, dtype=jnp.uint32), micro))
    grads = jax.tree.map(lambda a, p: (a / k).astype(p.dtype), acc, params)
    mean = lambda m: jnp.mean(m.astype(jnp.promote_types(m.dtype,
                                                         jnp.float32)), 0)
    return (mean(losses), jax.tree.map(mean, metrics)), grads

  def train_step(self, state: TrainState, batch: Batch, key: jax.Array,
                 phase: int | None = None) -> tuple[TrainState, Metrics]:
    """One optimizer step: grad(loss) -> optax -> EMA.

    Metrics always include `loss`, `grad_norm`, `param_norm` plus whatever
    `loss` returns. `phase` is `step_phase(step)` as a static int when the
    harness knows it, else None (see `step_cycle`); unused here. The
    gradient is `loss_and_grads` (accumulated over `train.grad_accum`
    micro-batches when > 1).
    """
    del phase
    (loss, metrics), grads = self.loss_and_grads(state.params, batch, key,
                                                 state)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = self.update_ema(state.ema_params, params, state.step)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(params))
    new = state.replace(step=state.step + 1, params=params,
                        opt_state=opt_state, ema_params=ema)
    return new, metrics

  def update_ema(self, ema: PyTree, params: PyTree, step: jax.Array) -> PyTree:
    """EMA with decay `config.train.ema_decay` warmed up: min(d, (1+n)/(10+n)).

    The warm-up keeps short (smoke / toy) runs from evaluating an EMA that is
    still dominated by the random init.
    """
    decay = self.config.train.ema_decay
    n = step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    return optax.incremental_update(params, ema, 1.0 - d)

  # ----------------------------------------------------------------- sampling
  def sample(self, params: PyTree, key: jax.Array, n: int, *, nfe: int,
             labels: jax.Array | None = None,
             guidance: float | None = None) -> jax.Array:
    """Draws `n` samples with exactly `nfe` backbone evaluations.

    Args:
      params: generator params (the harness passes `ema_params`).
      key: PRNG key; same key -> same samples.
      n: number of samples (static).
      nfe: number of function evaluations (static); must be supported.
      labels: [n] int32 class labels, or None (unconditional).
      guidance: CFG scale for methods that take it as an input.

    Returns:
      [n, *spec.shape] float32 samples in data space.
    """
    raise NotImplementedError

  def check_nfe(self, nfe: int) -> None:
    """Raises `UnsupportedNFEError` naming the supported values."""
    if nfe not in self.supported_nfe:
      raise UnsupportedNFEError(
          f'{type(self).__module__} does not define sampling with nfe={nfe}; '
          f'supported: {self.supported_nfe!r}. Pick one of those in '
          f'config.evals.<name>.nfe.')

  # ------------------------------------------------------------------ helpers
  def apply(self, params: PyTree, x: jax.Array, t: jax.Array,
            h: jax.Array | None = None, y: jax.Array | None = None,
            g: jax.Array | None = None,
            s: jax.Array | None = None) -> jax.Array:
    """Backbone call with per-sample times (and guidance g) broadcast to [B].

    Args:
      params: backbone params (`net.init`).
      x: [B, *spec.shape] input.
      t: current time, scalar or [B] (t = 0 data, t = 1 noise).
      h: second time input, scalar or [B]; None means 0. Its meaning is the
        method's: MeanFlow's interval t - r, TVM's gap t - s to the target
        time s, 0 for flow matching (class docstring).
      y: [B] int labels, or None (the null label).
      g: guidance-scale conditioning input (TVM's 1/w, Drifting's CFG
        strength); the backbone must be built with `guidance_embed=True`.
      s: [B, K] int style input of backbones built with `style_tokens=K`.

    Returns:
      [B, *spec.shape] backbone output.
    """
    b = x.shape[0]
    as_b = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.float32), (b,))
    h = jnp.zeros((b,), jnp.float32) if h is None else as_b(h)
    if g is None and s is None:
      return self.net.apply(params, x, as_b(t), h, y)
    g = None if g is None else as_b(g)
    if s is None:
      return self.net.apply(params, x, as_b(t), h, y, g)
    return self.net.apply(params, x, as_b(t), h, y, g, s)

  def noise(self, key: jax.Array, n: int) -> jax.Array:
    """Standard-normal prior sample, [n, *spec.shape]."""
    return jax.random.normal(key, (n, *self.spec.shape), jnp.float32)


def split_microbatches(batch: Batch, k: int) -> Batch:
  """[B, ...] leaves -> [k, B / k, ...]: micro-batch i = rows i, i + k, ...

  The strided split (reshape to [B / k, k, ...], swap the two axes) keeps
  the data sharding: when the batch's leading axis is split over the
  devices in contiguous blocks of B / n rows (n | B / k), each device's
  block holds B / (k n) rows of every micro-batch, so the split moves no
  data between devices and every micro-batch is still spread over all of
  them (tests/test_grad_accum.py checks the compiled step has no
  collective on the batch).
  """
  def split(a):
    b = a.shape[0]
    if b % k:
      raise ValueError(f'batch of {b} rows does not split into '
                       f'config.train.grad_accum={k} micro-batches.')
    return jnp.swapaxes(a.reshape(b // k, k, *a.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


# -------------------------------------------------------------------- loading
def available_methods() -> list[str]:
  """Names of all modules in `methods/` (the plug-in registry)."""
  import methods  # pylint: disable=g-import-not-at-top
  return sorted(m.name for m in pkgutil.iter_modules(methods.__path__)
                if not m.name.startswith('_'))


def method_module(name: str):
  """Imports `methods.<name>`, with a clear error for unknown names."""
  if name not in available_methods():
    raise ValueError(f'Unknown method {name!r}. Available: '
                     f'{", ".join(available_methods())}. Add a method by '
                     'creating methods/<name>.py (see methods/README.md).')
  return importlib.import_module(f'methods.{name}')


def load_method(config: ml_collections.ConfigDict, spec: DataSpec) -> Method:
  """Instantiates `methods.<config.method.name>.Method(config, spec)`."""
  module = method_module(config.method.name)
  cls: Callable[..., Method] = module.Method
  return cls(config, spec)
