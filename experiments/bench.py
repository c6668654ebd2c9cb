"""The benchmark protocol: one config per (method, dataset, seed).

Usage (ml_collections config file with a comma-separated argument string):

  python -m onestep_bench.main \
    --config=experiments/bench.py:method=drifting,dataset=toy2d:8gaussians,seed=0

Override any key with `--config.<dotted.key>=value`; unknown keys fail before
anything compiles. In a `bench` run every method gets the same backbone
config, batch size, optimizer and step budget for a dataset; only
`config.method` (from `methods/<name>.py:get_config()`) differs. A method may
build a larger network from that config (transition matching's head:
toy 112,836 vs the reference 91,650 params): rows record `params` beside
the reference backbone's `reference_params` and the leaderboard flags the
excess.
"""

from __future__ import annotations

import ml_collections

from onestep_bench import runs
from onestep_bench.method import method_module

DEFAULTS = {'method': 'flow_matching', 'dataset': 'toy2d:8gaussians',
            'seed': '0', 'smoke': 'False', 'protocol': 'bench'}
# 'bench': every method's paper / official defaults. 'tuned': the winner of
# the one declared tuning procedure (experiments/tuning.py), committed in
# results/tuning/<family>/<method>.json (family: `tuning.family_of(dataset)`,
# toy2d or images), applied on top.
PROTOCOLS = ('bench', 'tuned')

# Per-dataset-family budget: (backbone, train, evals). Toy 2D: 3x128 residual
# MLP, batch 1024 exact samples per step, 4000 AdamW steps (a run of any
# method takes ~1-2 min on 2 CPU cores), scored on 10k samples.
# Method-specific backbone inputs, declared off so a run can switch them on
# (`--config.model.guidance_embed=True` for a CFG-trained generator). The
# effective-NFE reference forward always has them off (runner.py).
_METHOD_INPUTS = dict(guidance_embed=False, style_tokens=0, style_vocab=64)
# In-training evaluations (onestep_bench/curve.py): quality vs training
# FLOPs at these fractions of the budget, on a small sample count; the last
# point (1.0) is the final params, so a late collapse is flagged `regressed`.
_CURVE = dict(fractions=(0.125, 0.25, 0.5, 1.0), nfe=(1, 4), n_samples=2000,
              regress_factor=2.0)
_TOY = dict(
    model=dict(name='mlp', width=128, depth=3, freq_dim=32),
    train=dict(num_steps=4000, batch_size=1024, lr=1e-3, warmup_steps=100,
               schedule='cosine'),
    evals=dict(main=dict(nfe=(1, 2, 4, 100), n_samples=10_000)),
    curve=_CURVE,
)


# Small image sets (digits 8x8x1, Fashion-MNIST / MNIST 28x28x1): one ADM-
# style U-Net for every method, sized for a 2-core CPU (measured, flow
# matching, jax 0.10.2 XLA:CPU: digits 189k params, batch 128: 127 ms/step;
# Fashion-MNIST 298k params, batch 64: 0.67 s/step). These are small CPU
# budgets (digits 3000 steps ~7 min, Fashion-MNIST 1200 steps ~15 min per
# method); on an accelerator raise num_steps and the U-Net width. Scored by the
# evaluator's `auto` feature net: classifier FID for 1-channel sets (NOT
# Inception FID; every row says `feature_net=classifier:<dataset>`).
_UNET_SMALL = dict(name='unet', channels=16, channel_mult=(1, 2),
                   num_res_blocks=1, attn_resolutions=(), num_heads=2,
                   norm_groups=8, freq_dim=64)
_IMAGE_EVAL = dict(nfe=(1, 2, 4), n_samples=10_000, batch_size=1000,
                   feature_net='auto', preprocess='legacy_tf',
                   ref_split='train', ref_n=0, fid_bootstrap=10, pr_k=3,
                   # uint8 rounding as EDM (ADM truncates: 'truncate'); IS
                   # over 5000-sample splits as the ADM evaluator.
                   quantize='round', is_split_size=5000,
                   # FD_DINOv2 beside FID when the converted weights exist
                   # ('auto'; docs/evaluation.md §8), hub pos-embed resize.
                   fd_dinov2='auto', dinov2_pos='hub')
# Quality vs NFE on one sample count (FID-2K is its own metric, never ranked
# with the main eval's FID-10K / FID-5K).
_NFE_SWEEP = dict(_IMAGE_EVAL, nfe=(1, 2, 4, 8, 16, 32, 100), n_samples=2000,
                  fid_bootstrap=0)
_IMAGE_TRAIN = dict(lr=1e-3, schedule='cosine', ema_decay=0.999,
                    steps_per_dispatch=1,  # XLA:CPU: convs in loops are slow
                    log_every_steps=100)
_IMAGES = {
    'digits': dict(
        model=_UNET_SMALL,
        train=dict(_IMAGE_TRAIN, num_steps=3000, batch_size=128,
                   warmup_steps=100, checkpoint_every_steps=1000),
        evals=dict(main=_IMAGE_EVAL, nfe_sweep=_NFE_SWEEP),
        curve=dict(_CURVE, n_samples=1000)),
    'fashion_mnist': dict(
        model=dict(_UNET_SMALL, channel_mult=(1, 2, 2)),
        train=dict(_IMAGE_TRAIN, num_steps=1200, batch_size=64,
                   warmup_steps=100, checkpoint_every_steps=400),
        # 28x28 sampling costs ~12x digits: a 1k-sample NFE sweep to 32.
        evals=dict(main=dict(_IMAGE_EVAL, n_samples=5000),
                   nfe_sweep=dict(_NFE_SWEEP, nfe=(1, 2, 4, 8, 16, 32),
                                  n_samples=1000)),
        curve=dict(_CURVE, n_samples=1000)),
}
_IMAGES['mnist'] = _IMAGES['fashion_mnist']
# Method options that differ on images come from the method module by
# convention: `IMAGE_PRESET` (a dict of config.method overrides, e.g.
# meanflow's py-meanflow CIFAR-10 recipe), applied on every image dataset.


def parse_args(arg_string: str) -> dict[str, str]:
  """'k=v,k=v' -> dict, with defaults; unknown keys raise.

  `seed` must be a non-negative int and `smoke` a bool (true/false, 1/0,
  yes/no, any case; returned as 'True' / 'False'), else a ConfigError.
  """
  from onestep_bench.config_check import ConfigError  # pylint: disable=g-import-not-at-top
  args = dict(DEFAULTS)
  for item in filter(None, (arg_string or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in DEFAULTS:
      raise ValueError(f'Bad config argument {item!r}: expected k=v with k in '
                       f'{sorted(DEFAULTS)}.')
    args[key] = value
  example = 'e.g. --config=experiments/bench.py:method=...,'
  try:
    seed = int(args['seed'])
  except ValueError:
    seed = -1
  if seed < 0:
    raise ConfigError('seed', args['seed'], 'must be a non-negative int',
                      example + 'seed=0')
  args['seed'] = str(seed)
  smoke = args['smoke'].strip().lower()
  if smoke not in ('1', 'true', 'yes', '0', 'false', 'no'):
    raise ConfigError('smoke', args['smoke'], 'must be a bool (True / False, '
                      '1 / 0, yes / no)', example + 'smoke=True')
  args['smoke'] = str(smoke in ('1', 'true', 'yes'))
  return args


def get_config(arg_string: str = '') -> ml_collections.ConfigDict:
  """The benchmark config for 'method=…,dataset=…,seed=…,smoke=…'."""
  args = parse_args(arg_string)
  smoke = args['smoke'].lower() in ('1', 'true', 'yes')
  family = args['dataset'].partition(':')[0]
  if family == 'toy2d':
    proto = _TOY
  elif family in _IMAGES:
    proto = _IMAGES[family]
  else:
    raise ValueError(f'No bench protocol for dataset {args["dataset"]!r}; '
                     'available: toy2d:<name>, ' + ', '.join(_IMAGES)
                     + '. Other datasets run with your own config.')

  c = ml_collections.ConfigDict()
  c.seed = int(args['seed'])
  c.protocol = 'smoke' if smoke else 'bench'
  # pipeline: 'device' (the split on every device; small sets) or 'grain'
  # (host-fed from disk: docs/data_pipeline.md).
  c.data = ml_collections.ConfigDict({'name': args['dataset'], 'dir': '',
                                      'conditional': False, 'hflip': False,
                                      'pipeline': 'device'})
  c.model = ml_collections.ConfigDict({**_METHOD_INPUTS, **proto['model']})
  c.train = ml_collections.ConfigDict(dict(
      num_steps=0, batch_size=0, lr=0.0, b1=0.9, b2=0.999, weight_decay=0.0,
      warmup_steps=0, schedule='constant', grad_clip=0.0,
      ema_decay=0.999,          # toy runs are short: 0.999 ~ last 1k steps
      steps_per_dispatch=50,    # lax.scan steps per jit call (dispatch-bound)
      grad_accum=1,             # k micro-batches per step (method.py; memory)
      log_every_steps=100, checkpoint_every_steps=1000, max_to_keep=2,
      max_nonfinite_steps=0))   # stop at the first non-finite loss
  c.train.update(proto['train'])
  c.evals = ml_collections.ConfigDict(proto['evals'])
  c.curve = ml_collections.ConfigDict(proto['curve'])
  for ev in c.evals.values():  # CFG scale (a result column); None = no CFG
    if 'guidance' not in ev:
      ev.guidance = ml_collections.config_dict.placeholder(float)
  # Placement only (not in config_hash): data-parallel x FSDP devices;
  # data=-1 takes all devices left after fsdp (onestep_bench/sharding.py).
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1,
                                      'fsdp_min_size': 4096})

  module = method_module(args['method'])
  method_cfg = module.get_config()
  method_cfg.name = args['method']
  preset = getattr(module, 'IMAGE_PRESET', None)
  if family != 'toy2d' and preset:
    method_cfg.update(preset)
  c.method = method_cfg
  if args['protocol'] not in PROTOCOLS:
    from onestep_bench.config_check import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError('protocol', args['protocol'], f'must be one of '
                      f'{PROTOCOLS}', 'e.g. --config=experiments/bench.py:'
                      'method=...,protocol=tuned')
  if args['protocol'] == 'tuned' and not smoke:
    from experiments import tuning as tuning_spec  # pylint: disable=g-import-not-at-top
    from onestep_bench import tuning  # pylint: disable=g-import-not-at-top
    # The family's winner (toy2d:* -> toy2d; digits, fashion_mnist, mnist
    # -> images: experiments/tuning.py FAMILY_DATASETS).
    for key, v in tuning.tuned_overrides(
        args['method'], tuning_spec.family_of(args['dataset'])).items():
      sect, name = key.split('.', 1)
      c[sect][name] = tuple(v) if isinstance(v, list) else v
    c.protocol = 'tuned'
  if getattr(module, 'TEACHER_METHOD', None):  # distillation methods
    if smoke:  # tests: a freshly initialised teacher, no teacher run needed
      c.method.allow_untrained_teacher = True
    elif not c.method.teacher_workdir:  # runs/<teacher>/<ds>/bench_seed<k>
      c.method.teacher_workdir = runs.default_workdir(
          module.TEACHER_METHOD, args['dataset'], c.seed)

  if smoke:  # tiny and fast: tests and CI
    if family == 'toy2d':
      c.model.update(width=32, depth=2, freq_dim=16)
    else:
      c.model.update(channels=8, channel_mult=(1, 2), norm_groups=4,
                     freq_dim=16)
    c.train.update(num_steps=8, batch_size=64, steps_per_dispatch=4,
                   log_every_steps=4, checkpoint_every_steps=4, warmup_steps=2)
    c.curve.update(fractions=(), nfe=(1,), n_samples=256)  # tests opt in
    for ev in c.evals.values():
      ev.update(nfe=(1, 2), n_samples=512)
      if family != 'toy2d':
        ev.update(n_samples=256, batch_size=128, fid_bootstrap=2)
  return c
