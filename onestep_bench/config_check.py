"""One validation pass over a run config, before anything compiles.

`validate(config, method)` checks the harness keys (seed, train, model, data,
every eval, mesh) and then calls the method's own `Method.validate_config`
hook. Every problem raises `ConfigError`, whose message names the key, the
value, the allowed range and the fix, so the CLI can print it as one
`error:` line. Nothing is loaded or built: data sets are checked by name,
backbones by their constructor signature.

The `require_*` helpers are for the methods' hooks, e.g.
`require_prob(config.method, 'method', 'class_dropout')`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Container, Iterable
from typing import Any

import ml_collections

# Largest sampler step count an eval may ask for. Every method here is a
# one- or few-step generator and the multi-step baseline's NFE sweeps stop at
# 100; 1000 steps already costs 1000 backbone passes per sample, so anything
# above it is a typo (e.g. nfe=(1000000,)), not a protocol.
MAX_NFE = 1000
# Eval / feature-net settings the evaluators accept (image_eval, inception).
FEATURE_NETS = ('auto', 'inception_v3', 'classifier:<data.name>')
PREPROCESS = ('legacy_tf', 'pytorch_fid')
REF_SPLITS = ('train', 'test', 'validation')
# Integer backbone options where 0 is a valid (shallower) network: the MLP
# without hidden blocks, the U-Net without residual blocks per level.
_ZERO_OK = frozenset({'depth', 'num_res_blocks'})
class ConfigError(ValueError):
  """A config value the run cannot use; the message says how to fix it.

  Attributes:
    key: dotted config key, e.g. 'train.lr' (shown as `config.train.lr`).
    value: the offending value.
    allowed: the allowed range / set, in words.
    fix: what to do instead.
  """

  def __init__(self, key: str, value: Any, allowed: str, fix: str = ''):
    self.key, self.value, self.allowed, self.fix = key, value, allowed, fix
    msg = f'config.{key}={value!r}: {allowed}.'
    if fix:
      msg += f' Fix: {fix}'
    super().__init__(msg)


# ================================================================== helpers
def is_int(v: Any) -> bool:
  """A Python / numpy integer, not a bool."""
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
  """A finite int or float, not a bool."""
  return (isinstance(v, numbers.Real) and not isinstance(v, bool)
          and math.isfinite(float(v)))


def _flag(key: str, example: Any) -> str:
  return f'e.g. --config.{key}={example}'


def require_int(cfg: Any, prefix: str, name: str, lo: int = 1,
                hi: int | None = None, example: Any = None) -> int:
  """`cfg[name]` as an int in [lo, hi]; ConfigError naming `prefix.name`."""
  key, v = f'{prefix}.{name}', cfg.get(name)
  rng = f'>= {lo}' if hi is None else f'in [{lo}, {hi}]'
  if not is_int(v) or v < lo or (hi is not None and v > hi):
    raise ConfigError(key, v, f'must be an int {rng}',
                      _flag(key, lo if example is None else example))
  return int(v)


def require_real(cfg: Any, prefix: str, name: str, lo: float | None = None,
                 hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False, example: Any = None) -> float:
  """`cfg[name]` as a finite number in the given (half-)open interval."""
  key, v = f'{prefix}.{name}', cfg.get(name)
  parts = []
  if lo is not None:
    parts.append(f'{">" if lo_open else ">="} {lo}')
  if hi is not None:
    parts.append(f'{"<" if hi_open else "<="} {hi}')
  ok = is_real(v)
  if ok and lo is not None:
    ok = v > lo if lo_open else v >= lo
  if ok and hi is not None:
    ok = v < hi if hi_open else v <= hi
  if not ok:
    rng = ' and '.join(parts)
    if example is None:
      example = lo if lo is not None and not lo_open else 1.0
    raise ConfigError(key, v, 'must be a finite number'
                      + (f' {rng}' if rng else ''), _flag(key, example))
  return float(v)


def require_prob(cfg: Any, prefix: str, name: str) -> float:
  """`cfg[name]` as a probability in [0, 1]."""
  return require_real(cfg, prefix, name, 0.0, 1.0, example=0.1)


def require_choice(cfg: Any, prefix: str, name: str,
                   choices: Iterable[Any]) -> Any:
  """`cfg[name]` as one of `choices`."""
  key, v, choices = f'{prefix}.{name}', cfg.get(name), tuple(choices)
  if isinstance(v, bool) or v not in choices:
    raise ConfigError(key, v, f'must be one of {choices!r}',
                      _flag(key, choices[0]))
  return v


def require_bool(cfg: Any, prefix: str, name: str) -> bool:
  """`cfg[name]` as a bool."""
  key, v = f'{prefix}.{name}', cfg.get(name)
  if not isinstance(v, bool):
    raise ConfigError(key, v, 'must be True or False', _flag(key, True))
  return v


def require_keys(cfg: Any, prefix: str, names: Iterable[str]) -> None:
  """Each of `names` is present in `cfg` (a missing key names itself)."""
  for name in names:
    if name not in cfg:
      raise ConfigError(f'{prefix}.{name}', None, 'is required',
                        'start from experiments/bench.py or add the key')


def labelled(config: ml_collections.ConfigDict) -> bool:
  """Whether training / sampling sees class labels (toy sets have none)."""
  family = str(config.data.name).partition(':')[0]
  return family != 'toy2d' and bool(config.data.get('conditional', False))


def guidance_evals(config: ml_collections.ConfigDict
                   ) -> list[tuple[str, float]]:
  """(eval name, guidance) for every eval with a guidance that is not None."""
  return [(name, ev.guidance) for name, ev in config.evals.items()
          if ev.get('guidance') is not None]


def refuse_guidance(config: ml_collections.ConfigDict, why: str) -> None:
  """For methods whose sampler ignores `guidance`: any set value is an error.

  Args:
    config: the run config.
    why: e.g. 'flow_matching samples without CFG'.
  """
  for name, g in guidance_evals(config):
    raise ConfigError(f'evals.{name}.guidance', g, f'{why}, so guidance '
                      'would be ignored but recorded in the result row',
                      f'leave config.evals.{name}.guidance unset (None)')


def check_supported_nfe(config: ml_collections.ConfigDict,
                        supported: Container[int], owner: str) -> None:
  """Every eval's `nfe` meets `supported` (as `runner.eval_nfes` requires).

  Args:
    config: the run config.
    supported: the step counts the sampler honours (`Method.supported_nfe`).
    owner: who supports them, e.g. 'methods.<name>'.
  """
  for name, ev in config.evals.items():
    if not any(is_int(k) and k in supported for k in ev.nfe):
      raise ConfigError(
          f'evals.{name}.nfe', tuple(ev.nfe), f'has no value supported by '
          f'{owner} (supported: {supported!r})', 'set it to one of those, '
          f'e.g. --config.evals.{name}.nfe="(1,)"')


# ============================================================ harness keys
def validate(config: ml_collections.ConfigDict, method: Any) -> None:
  """Checks the whole config, then `method.validate_config(config)`.

  Args:
    config: a full run config (see experiments/bench.py).
    method: the method's class (`methods.<name>.Method`, before anything is
      built) or its instance. Only an instance's `supported_nfe` is checked
      against the evals: some methods set it in `__init__` from their
      config (f_distill's student steps, transition_matching's train_T);
      their hooks check those themselves.

  Raises:
    ConfigError: the first bad value found.
  """
  for top in ('seed', 'data', 'model', 'train', 'evals', 'method'):
    if top not in config:
      raise ConfigError(top, None, 'is required',
                        'start from experiments/bench.py')
  seed = config.seed
  if not is_int(seed) or not 0 <= seed < 2**32:
    raise ConfigError('seed', seed, 'must be an int in [0, 2**32 - 1]',
                      'e.g. --config.seed=0 (or seed=0 in the --config '
                      'argument string)')
  check_train(config.train)
  check_model(config.model)
  check_data(config.data)
  from onestep_bench.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.check_config(config, method)
  for name, ev in config.evals.items():
    check_eval(config, name, ev)
  if not isinstance(method, type):
    check_supported_nfe(config, method.supported_nfe,
                        type(method).__module__)
  if config.get('mesh') is not None:
    check_mesh(config.mesh)
  from onestep_bench import curve  # pylint: disable=g-import-not-at-top
  curve.validate(config, None if isinstance(method, type)
                 else method.supported_nfe)
  check_guidance_input(config, method)
  method.validate_config(config)
  check_grad_accum(config, method)


def check_guidance_input(config: ml_collections.ConfigDict,
                         method: Any) -> None:
  """`model.guidance_embed=True` only for methods that pass g to it."""
  if (config.model.get('guidance_embed', False)
      and not getattr(method, 'guidance_input', False)):
    raise ConfigError(
        'model.guidance_embed', True,
        f'needs a method that feeds the guidance input g; '
        f'{config.method.name} never passes one (Method.guidance_input), so '
        'the backbone built with it could not run (its CFG, if any, needs no '
        'input)', '--config.model.guidance_embed=False')


_TRAIN_REQUIRED = ('num_steps', 'batch_size', 'lr', 'b1', 'b2',
                   'weight_decay', 'warmup_steps', 'schedule', 'grad_clip',
                   'ema_decay', 'steps_per_dispatch', 'log_every_steps',
                   'checkpoint_every_steps', 'max_to_keep')


def check_train(tc: ml_collections.ConfigDict) -> None:
  """Optimizer, schedule and loop keys of `config.train`."""
  require_keys(tc, 'train', _TRAIN_REQUIRED)
  require_int(tc, 'train', 'num_steps', example=1000)
  require_int(tc, 'train', 'batch_size', example=256)
  require_real(tc, 'train', 'lr', 0.0, lo_open=True, example=1e-3)
  for b in ('b1', 'b2'):
    require_real(tc, 'train', b, 0.0, 1.0, hi_open=True, example=0.9)
  require_real(tc, 'train', 'weight_decay', 0.0)
  require_int(tc, 'train', 'warmup_steps', 0, example=100)
  require_choice(tc, 'train', 'schedule', ('constant', 'cosine', 'inv_sqrt'))
  if 'optimizer' in tc:  # absent = 'adamw' (method.make_optimizer)
    require_choice(tc, 'train', 'optimizer', ('adamw', 'radam'))
  if tc.schedule == 'inv_sqrt':
    if 'decay_steps' not in tc:
      raise ConfigError('train.decay_steps', None, "is required by train."
                        "schedule='inv_sqrt' (lr / sqrt(max(step / "
                        'decay_steps, 1)))', 'set config.train.decay_steps '
                        'to an int > 0 (e.g. 35000) in the config, or use '
                        "train.schedule='constant' / 'cosine'")
    require_int(tc, 'train', 'decay_steps', example=35000)
  require_real(tc, 'train', 'grad_clip', 0.0, example=1.0)
  require_real(tc, 'train', 'ema_decay', 0.0, 1.0, hi_open=True,
               example=0.999)
  for k in ('steps_per_dispatch', 'log_every_steps', 'checkpoint_every_steps',
            'max_to_keep'):
    require_int(tc, 'train', k)
  if 'max_nonfinite_steps' in tc:
    require_int(tc, 'train', 'max_nonfinite_steps', 0)
  if 'grad_accum' in tc:
    k = require_int(tc, 'train', 'grad_accum', example=2)
    b = tc.batch_size
    if b % k:
      ok = [d for d in (2, 4, 8, 16, 32) if b % d == 0]
      raise ConfigError('train.grad_accum', k, f'must divide train.batch_'
                        f'size={b} (k equal micro-batches of the global '
                        'batch)', f'use a divisor, e.g. --config.train.'
                        f'grad_accum={ok[0] if ok else 1}')


def _mesh_devices(mc: Any) -> int | None:
  """Devices `sharding.make_mesh(mc)` would use (None: it would refuse)."""
  import jax  # pylint: disable=g-import-not-at-top
  fsdp, data = int(mc.get('fsdp', 1)), mc.get('data', -1)
  total = jax.device_count()
  if fsdp < 1 or total % fsdp:
    return None
  return (total // fsdp if data == -1 else int(data)) * fsdp


def check_grad_accum(config: ml_collections.ConfigDict, method: Any) -> None:
  """`train.grad_accum` = k > 1 fits the method, the mesh and the loss.

  Refused when the method's loss couples the samples of a batch
  (`Method.grad_accum_refused`), when the
  batch comes as one-class blocks (`class_groups`: the strided micro-batch
  split would cut them), when a micro-batch of B / k rows does not divide
  over the mesh's devices, or when the method's own checks refuse the
  micro-batch its loss sees (e.g. too few rows for a fixed row split):
  `method.validate_config` is rerun with train.batch_size = B / k.
  """
  k = config.train.get('grad_accum', 1)
  if k == 1:
    return
  b = config.train.batch_size
  owner = getattr(method, '__module__', '') or 'the method'
  why = getattr(method, 'grad_accum_refused', '')
  fix = ('use --config.train.grad_accum=1, and fit memory with '
         'config.mesh.fsdp or a smaller train.batch_size instead')
  if why:
    raise ConfigError('train.grad_accum', k, f'{owner} refuses gradient '
                      f'accumulation: {why}', fix)
  groups = getattr(method, 'class_groups', 0) or 0
  if groups and labelled(config):
    raise ConfigError('train.grad_accum', k, f'{owner} trains on batches of '
                      f'{groups} one-class blocks (class_groups), which the '
                      'strided micro-batch split would cut', fix)
  micro = b // k
  if config.get('mesh') is not None:
    n = _mesh_devices(config.mesh)
    if n and micro % n:
      raise ConfigError('train.grad_accum', k, f'gives micro-batches of '
                        f'{micro} rows (train.batch_size={b} / {k}), not '
                        f'divisible by the {n} devices of the mesh (each '
                        'micro-batch is split over all of them)',
                        f'use a k with batch_size / k divisible by {n}, or '
                        'change train.batch_size / config.mesh')
  mc = ml_collections.ConfigDict(config.to_dict())
  mc.train.update(batch_size=micro, grad_accum=1)
  try:
    method.validate_config(mc)
  except ConfigError as e:
    raise ConfigError('train.grad_accum', k, f'gives micro-batches of '
                      f'{micro} rows (train.batch_size={b} / {k}), the batch '
                      f'the loss sees, and {owner} refuses that batch '
                      f'({e})', 'lower config.train.grad_accum or raise '
                      'train.batch_size') from None


def _enums() -> dict[str, tuple[str, ...]]:
  """String backbone options with a fixed set of values."""
  from onestep_bench.models import dit, layers  # pylint: disable=g-import-not-at-top
  return {'size': tuple(dit.SIZES), 'norm': layers.NORMS,
          'modulation': layers.MODULATIONS, 'init': layers.INITS,
          'pos_emb': dit.POS_EMBS, 'dtype': ('float32', 'bfloat16')}


def _positive_ints(v: Any, allow_empty: bool) -> bool:
  return (isinstance(v, (tuple, list)) and (allow_empty or len(v) > 0)
          and all(is_int(a) and a >= 1 for a in v))


def check_model(mc: ml_collections.ConfigDict) -> None:
  """Backbone name and options, typed by the constructor's defaults.

  An int option whose default is >= 1 (width, channels, heads, patch size,
  freq_dim, ...) must be >= 1 (`depth`, `num_res_blocks`: >= 0); one whose
  default is 0 must be >= 0; `freq_dim` is even (sin / cos pairs); bools are
  bools; tuples (channel_mult) hold ints >= 1; floats are finite > 0.
  """
  from onestep_bench import models  # pylint: disable=g-import-not-at-top
  name = mc.get('name')
  try:
    valid = models.options(name)
  except ValueError:
    raise ConfigError('model.name', name, "must be one of 'mlp', "
                      "'mlp_plain', 'unet', 'dit'",
                      'e.g. --config.model.name=mlp') from None
  enums = _enums()
  for k, v in mc.items():
    if k == 'name':
      continue
    key = f'model.{k}'
    if k not in valid:
      raise ConfigError(key, v, f'is not an option of backbone {name!r} '
                        f'(valid: {", ".join(sorted(valid))})',
                        'remove it or fix its spelling')
    d = valid[k]
    if isinstance(d, bool):
      require_bool(mc, 'model', k)
    elif is_int(d):
      lo = 0 if d == 0 or k in _ZERO_OK else 1
      require_int(mc, 'model', k, lo, example=d)
      if k.endswith('freq_dim') and v % 2:
        raise ConfigError(key, v, 'must be even (sinusoidal features come '
                          'in sin / cos pairs)', _flag(key, v + 1))
    elif isinstance(d, float):
      require_real(mc, 'model', k, 0.0, lo_open=True, example=d)
    elif isinstance(d, tuple):
      if not _positive_ints(v, allow_empty=False):
        raise ConfigError(key, v, 'must be a non-empty tuple of ints >= 1',
                          f'e.g. --config.{key}="{d}"')
    elif isinstance(d, str):
      if k in enums:
        require_choice(mc, 'model', k, enums[k])
      elif not isinstance(v, str):
        raise ConfigError(key, v, 'must be a string', _flag(key, d))
    elif d is None and v is not None:  # int | None or tuple | None
      if not ((is_int(v) and v >= 1) or _positive_ints(v, allow_empty=True)):
        raise ConfigError(key, v, 'must be None, an int >= 1 or a tuple of '
                          'ints >= 1', f'leave config.{key} unset (None)')


def check_data(dc: ml_collections.ConfigDict) -> None:
  """The dataset name is known (nothing is loaded) and its options typed."""
  from onestep_bench.data import IMAGE_SETS, toy2d  # pylint: disable=g-import-not-at-top
  name = dc.get('name')
  family, _, sub = str(name).partition(':')
  toys = sorted(toy2d.SAMPLERS)
  everything = ', '.join([f'toy2d:{n}' for n in toys] + list(IMAGE_SETS)
                         + ['latents:<dir>'])
  if not isinstance(name, str):
    raise ConfigError('data.name', name, f'must be one of {everything}',
                      'e.g. --config.data.name=toy2d:8gaussians')
  if family == 'toy2d':
    if sub not in toys:
      raise ConfigError('data.name', name, 'Unknown toy dataset; available: '
                        + ', '.join(f'toy2d:{n}' for n in toys),
                        'e.g. --config.data.name=toy2d:8gaussians')
  elif family == 'latents':
    if not sub:
      raise ConfigError('data.name', name, 'needs the latent directory',
                        "use config.data.name='latents:<directory>'")
  elif family not in IMAGE_SETS or sub:
    raise ConfigError('data.name', name, f'Unknown dataset; available: '
                      f'{everything}', 'e.g. --config.data.name=digits')
  for k in ('conditional', 'hflip'):
    if k in dc:
      require_bool(dc, 'data', k)
  if dc.get('dir') is not None and not isinstance(dc.dir, str):
    raise ConfigError('data.dir', dc.dir, 'must be a directory path (a '
                      'string)', "e.g. --config.data.dir=''")
  if dc.get('latent_scale') is not None:
    require_real(dc, 'data', 'latent_scale', 0.0, lo_open=True, example=1.0)


def check_eval(config: ml_collections.ConfigDict, name: str,
               ev: ml_collections.ConfigDict) -> None:
  """One eval: sample count, NFEs, guidance and the image-metric options."""
  p = f'evals.{name}'
  require_keys(ev, p, ('nfe', 'n_samples'))
  nfe = ev.nfe
  if (not isinstance(nfe, (tuple, list)) or not nfe
      or not all(is_int(k) for k in nfe)):
    raise ConfigError(f'{p}.nfe', nfe, 'must be a non-empty tuple of ints',
                      f'e.g. --config.{p}.nfe="(1, 2)"')
  bad = [k for k in nfe if not 1 <= k <= MAX_NFE]
  if bad:
    what = ('has no value supported by any sampler' if len(bad) == len(nfe)
            else f'holds {bad}')
    raise ConfigError(f'{p}.nfe', tuple(nfe), f'{what}: each nfe must be an '
                      f'int in [1, {MAX_NFE}] (config_check.MAX_NFE)',
                      f'e.g. --config.{p}.nfe="(1, 2)"')
  # Two samples at least: every metric needs a spread (toy stats, FID).
  n = require_int(ev, p, 'n_samples', 2, example=10_000)
  if ev.get('batch_size') is not None:
    require_int(ev, p, 'batch_size', example=1000)
  g = ev.get('guidance')
  if g is not None:
    require_real(ev, p, 'guidance', 0.0, example=1.0)
    if not labelled(config):
      raise ConfigError(f'{p}.guidance', g, 'needs class labels (CFG), but '
                        f'the data ({config.data.name}) is unconditional',
                        f'leave config.{p}.guidance unset (None), or train '
                        'on labelled data with config.data.conditional=True')
  fn = ev.get('feature_net')
  if fn is not None and fn not in ('auto', 'inception_v3',
                                   f'classifier:{config.data.name}'):
    raise ConfigError(f'{p}.feature_net', fn, f'must be one of '
                      f'{FEATURE_NETS!r} (a classifier evaluates only the '
                      'data set it was trained on)',
                      f'e.g. --config.{p}.feature_net=auto')
  if ev.get('preprocess') is not None:
    require_choice(ev, p, 'preprocess', PREPROCESS)
  if ev.get('ref_split') is not None:
    require_choice(ev, p, 'ref_split', REF_SPLITS)
  for k in ('ref_n', 'fid_bootstrap'):
    if ev.get(k) is not None:
      require_int(ev, p, k, 0)
  if not str(config.data.name).startswith('toy2d:'):
    from onestep_bench.evaluators import image_eval  # pylint: disable=g-import-not-at-top
    image_eval.eval_settings(  # quantize, IS split size, VAE, reference
        ev, name, latent=str(config.data.name).startswith('latents:'))
  if ev.get('pr_k') is not None:
    k = require_int(ev, p, 'pr_k', example=3)
    if k >= n:
      raise ConfigError(f'{p}.pr_k', k, f'must be < n_samples ({n}): the '
                        'k-NN radii need k + 1 samples', _flag(f'{p}.pr_k',
                                                               3))


def check_mesh(mc: ml_collections.ConfigDict) -> None:
  """Placement keys (their fit to the visible devices: sharding.make_mesh)."""
  d = mc.get('data', -1)
  if not is_int(d) or (d != -1 and d < 1):
    raise ConfigError('mesh.data', d, 'must be -1 (all devices left after '
                      'fsdp) or an int >= 1', 'e.g. --config.mesh.data=-1')
  if 'fsdp' in mc:
    require_int(mc, 'mesh', 'fsdp')
  if mc.get('fsdp_min_size') is not None:
    require_int(mc, 'mesh', 'fsdp_min_size', 0, example=4096)
