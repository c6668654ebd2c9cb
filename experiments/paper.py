"""Paper-scale protocols: each method's published setting, and one budget.

Usage (ml_collections config file, argument string as experiments/bench.py):

  python -m onestep_bench.main --config=experiments/paper.py:\
method=meanflow,dataset=imagenet256_latent,size=XL/2

Arguments: `method` (any of methods/), `dataset` (`cifar10`, `imagenet64`,
`imagenet256_latent`), `size` (DiT protocols: `B/2`, `L/2`, `XL/2`, ...;
empty = the paper's headline size), `protocol` (`paper`: the method's own
published setting, or `derived` from its nearest one where it has none for
that dataset; `equal_budget`: DiT-B/2, batch 256, 400k AdamW steps on
ImageNet-256 latents for every method, only the method keys differ),
`seed`, `smoke` (tiny sizes, same code path: tests).

Every value comes from `experiments/paper_settings.py`, where each one
cites its official config file or paper table. The base config (keys,
defaults, mesh, method config with its presets and teacher) is
`experiments/bench.py`'s, so the two stay one structure.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from experiments import bench
from experiments import paper_settings as ps
from onestep_bench import runs
from onestep_bench.config_check import ConfigError
from onestep_bench.method import method_module

KINDS = ('paper', 'equal_budget')
# Where the data live by default (override with --config.data.name / dir).
DATA_NAMES = {'cifar10': 'cifar10', 'imagenet64': 'imagenet64',
              'imagenet256_latent': 'latents:data/imagenet256_sdvae_latents'}
# The FID-50K reference of the latent protocols: the ADM evaluator's
# reference batch (openai/guided-diffusion evaluations/README.md), which
# DiT, SiT, MeanFlow, TVM and Drifting all score against. Declared here,
# checked before training starts (`reference.adm_path`: the file must
# exist); override with --config.evals.main.reference='adm:/path/...npz'.
ADM_REFERENCE = 'adm:data/VIRTUAL_imagenet256_labeled.npz'
# Latent samples are decoded to images by the SD-VAE before Inception
# (`meta.vae` of every latent protocol); the converted weights are found at
# `evals.main.vae`, else $ONESTEP_VAE_WEIGHTS, else the default path
# (`onestep_bench.vae.weights.resolve_path`; docs/vae.md).
LATENT_VAE = 'sd-vae-ft-ema'
_EXAMPLE = ('e.g. --config=experiments/paper.py:method=meanflow,'
            'dataset=imagenet256_latent,size=B/2')
_EVAL = dict(bench._IMAGE_EVAL, nfe=(1, 2, 4), n_samples=50_000,  # pylint: disable=protected-access
             batch_size=500, feature_net='inception_v3', fid_bootstrap=0)


def parse_args(arg_string: str) -> dict[str, str]:
  """'k=v,...' -> dict; `size` and the protocol kinds are paper.py's own.

  The rest (keys, seed, smoke) is checked by `bench.parse_args`.
  """
  items = [i for i in (arg_string or '').split(',') if i]
  own = {'size': '', 'protocol': 'paper', 'dataset': 'imagenet256_latent'}
  rest = []
  for item in items:
    key, _, value = item.partition('=')
    if key in own:
      own[key] = value
    else:
      rest.append(item)
  args = bench.parse_args(','.join(rest))
  args.update(own)
  if args['protocol'] not in KINDS:
    raise ConfigError('protocol', args['protocol'], f'must be one of {KINDS}',
                      _EXAMPLE)
  if args['dataset'] not in ps.DATASETS:
    raise ConfigError('dataset', args['dataset'], f'must be one of '
                      f'{ps.DATASETS}', _EXAMPLE)
  return args


def _size_values(proto: ps.Protocol, size: str) -> dict[str, ps.C]:
  """The values a `size=` argument sets ({} for the default size)."""
  if not size or size == proto.default_size:
    return dict(proto.sizes.get(proto.default_size, {}))
  if proto.values['model.name'].value != 'dit':
    raise ConfigError('size', size, f'{proto.method}/{proto.dataset} is a '
                      'U-Net protocol with one published size', 'leave size '
                      'unset')
  name, sep, patch = size.partition('/')
  from onestep_bench.models.dit import SIZES  # pylint: disable=g-import-not-at-top
  if name not in SIZES or not sep or not patch.isdigit():
    raise ConfigError('size', size, f'must be <{"|".join(SIZES)}>/<patch>',
                      _EXAMPLE)
  how = (f'{proto.method} paper size' if size in proto.sizes
         else f'derived: size {size} is not in the {proto.method} paper')
  out = {'model.size': ps.C(name, how),
         'model.patch_size': ps.C(int(patch), how)}
  out.update(proto.sizes.get(size, {}))
  if name != 'XL' and 'model.num_heads' in proto.values:
    out['model.num_heads'] = ps.C(None, 'derived: the DiT size\'s own heads')
  return out


def resolve(method: str, dataset: str, size: str = '',
            kind: str = 'paper') -> tuple[ps.Protocol, dict[str, ps.C]]:
  """The protocol entry and its cited values for one (method, dataset, size).

  Raises:
    ConfigError: no entry for the method / dataset, or a bad size.
  """
  base = ps.PROTOCOLS.get((method, dataset))
  if base is None:
    have = sorted(f'{m}/{d}' for m, d in ps.PROTOCOLS)
    raise ConfigError('method', method, f'has no paper protocol for '
                      f'{dataset}; have {have}', 'add an entry to '
                      'experiments/paper_settings.py')
  if kind == 'paper':
    return base, {**base.values, **_size_values(base, size)}
  if dataset != 'imagenet256_latent' or size not in ('', 'B/2'):
    raise ConfigError('dataset', f'{dataset}, size={size}', 'the equal-'
                      'budget protocol is ImageNet-256 latents at DiT-B/2',
                      'protocol=equal_budget,dataset=imagenet256_latent')
  values = dict(ps.EQUAL_BUDGET)
  values.update({k: v for k, v in base.values.items()
                 if k.startswith('method.') or k in ps.EQUAL_KEEP_MODEL
                 or k == 'evals.main.guidance'})
  if 'method.classes_per_step' in values:  # Drifting: 64 positives / class
    values['method.classes_per_step'] = ps.C(4, 'derived: batch 256 = 4 '
                                             'classes x 64 positives')
  return base, values


def _apply(c: ml_collections.ConfigDict, values: dict[str, ps.C]) -> None:
  """Sets every non-meta dotted key; unknown method keys are refused."""
  for key, cv in values.items():
    sect, _, name = key.partition('.')
    if sect == 'meta':
      continue
    if sect == 'evals':
      ev, _, name = name.partition('.')
      if ev in c.evals:
        c.evals[ev][name] = cv.value
      continue
    if sect == 'method' and name not in c.method:
      raise ConfigError(key, cv.value, f'is not a key of methods/'
                        f'{c.method.name}.py get_config()', 'fix experiments/'
                        'paper_settings.py')
    if cv.value is None:
      if name in c[sect]:
        del c[sect][name]
      continue
    c[sect][name] = tuple(cv.value) if isinstance(cv.value, list) else (
        cv.value)


def _smoke(c: ml_collections.ConfigDict) -> None:
  """Tiny sizes on the same code path (tests, CI).

  Latent protocols drop their eval: it needs the SD-VAE weights and the
  ADM batch, which tests do not have (tests/test_latent_eval.py runs that
  path on a tiny VAE and a mock reference batch).
  """
  if c.data.name.startswith('latents:'):
    c.evals = ml_collections.ConfigDict()
  if c.model.name == 'dit':
    c.model.update(size='tiny', dtype='float32', freq_dim=16)
    if 'num_heads' in c.model:
      del c.model['num_heads']
  else:
    c.model.update(channels=8, channel_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(), norm_groups=4, freq_dim=16,
                   num_heads=1)
  batch = 16
  if 'classes_per_step' in c.method:  # Drifting: 2 classes x 8 positives
    c.method.update(classes_per_step=2, num_gen=8, num_unc=4)
  if 'max_steps' in c.method:  # Shortcut: log2(M) bootstrap groups
    c.method.update(max_steps=4)
  if 'head_width' in c.method:
    c.method.update(head_width=16, head_depth=1, head_steps=2)
  c.train.update(num_steps=2, batch_size=batch, warmup_steps=1,
                 steps_per_dispatch=1, log_every_steps=1,
                 checkpoint_every_steps=2)
  for ev in c.evals.values():
    ev.update(nfe=(1,), n_samples=32, batch_size=16, pr_k=2)


def get_config(arg_string: str = '') -> ml_collections.ConfigDict:
  """The paper-scale config for 'method=…,dataset=…[,size=…][,smoke=…]'."""
  args = parse_args(arg_string)
  smoke = args['smoke'] == 'True'
  method, dataset, kind = args['method'], args['dataset'], args['protocol']
  _, values = resolve(method, dataset, args['size'], kind)
  c = bench.get_config(f'method={method},dataset=digits,seed={args["seed"]}')
  c.protocol = 'smoke' if smoke else kind
  latent = dataset == 'imagenet256_latent'
  c.data = ml_collections.ConfigDict({
      'name': DATA_NAMES[dataset], 'dir': '', 'conditional': False,
      'hflip': False, 'pipeline': 'device',
      **({'latent_scale': 1.0} if latent else {})})
  c.model = ml_collections.ConfigDict({**bench._METHOD_INPUTS,  # pylint: disable=protected-access
                                       'name': values['model.name'].value})
  c.train.update(steps_per_dispatch=1, log_every_steps=100,
                 checkpoint_every_steps=10_000, max_to_keep=2)
  # Micro-batches per optimizer step (gradient accumulation; 1 = off): a
  # protocol that does not fit a chip at its published global batch runs
  # with --config.train.grad_accum=k (`make plan` reports the smallest k).
  c.train.grad_accum = 1
  # Latents: FID-50K of the VAE-decoded samples against the ADM batch.
  main = dict(_EVAL, reference=ADM_REFERENCE, vae='',
              vae_config=LATENT_VAE) if latent else dict(_EVAL)
  c.evals = ml_collections.ConfigDict({'main': main})
  for ev in c.evals.values():
    ev.guidance = ml_collections.config_dict.placeholder(float)
  c.curve.update(fractions=())  # FID-50K curve points cost a run each
  _apply(c, values)
  if latent and 'classes_per_step' not in c.method:
    # ImageNet latents (prepare_latents records, 21-42 GB) are host-fed;
    # methods that draw class-grouped batches (Drifting) need the device
    # path, i.e. `.npy` latents that fit (docs/data_pipeline.md).
    c.data.pipeline = 'grain'
  if getattr(method_module(method), 'TEACHER_METHOD', None) and (
      'teacher_workdir' in c.method):
    teacher_kind = 'equal_budget' if kind == 'equal_budget' else 'paper'
    c.method.teacher_workdir = runs.default_workdir(
        'flow_matching', c.data.name, c.seed, teacher_kind)
    if smoke:
      c.method.update(allow_untrained_teacher=True, teacher_workdir='')
  if smoke:
    _smoke(c)
  return c


def summary(method: str, dataset: str, size: str = '',
            kind: str = 'paper') -> dict[str, Any]:
  """Provenance of one protocol: status, source, budget, every citation."""
  proto, values = resolve(method, dataset, size, kind)
  return {'method': method, 'dataset': dataset, 'kind': kind,
          'size': size or proto.default_size,
          'status': 'equal_budget' if kind == 'equal_budget' else proto.status,
          'derived_from': proto.derived_from, 'notes': list(proto.notes),
          'values': {k: (v.value, v.cite) for k, v in values.items()}}
