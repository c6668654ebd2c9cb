"""The papers' own training settings, every value with its source.

Data only (read by `experiments/paper.py` and `onestep_bench/plan.py`). One
`Protocol` per (method, dataset); a method joins the table with one entry
per dataset (`PROTOCOLS[(method, dataset)]`). Every value is a `C(value,
cite)`: `cite` names the official file (`owner/repo@sha7:path key`, read for
this table from the snapshot at that commit), or the paper (`arXiv:<id>
<where>`; `[not re-read]` marks values recalled from the paper whose stored
copy could not be read here), or starts with `derived:` and says from what.

Keys are dotted config keys (`model.*`, `train.*`, `method.*`, `data.*`,
`evals.main.*`), applied by `experiments/paper.py`, plus `meta.*` keys that
only document (epochs, VAE, FID reference, the paper's NFE, its score).
Derived protocols (no published setting for that dataset) copy their
`derived_from` protocol and list what changed, each change `derived:`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Snapshots read for this table (owner/repo@commit).
MF = 'Gsunshine/meanflow@d70cb55'
PYMF = 'Gsunshine/py-meanflow@1f6d72d'
IMF = 'Lyy-iiis/imeanflow@bf60cd7'
TVM = 'lumalabs/tvm@82e8e5d'
DRIFT = 'lambertae/drifting@accd0cf'
FG = 'NVlabs/FastGen@34f30e8'
DIT = 'facebookresearch/DiT@ed81ce2'
SIT = 'willisma/SiT@947f95b'
SC = 'kvfrans/shortcut-models@6010043'
EDM = 'NVlabs/edm@008a4e5'

# Training-set sizes (for epochs -> steps).
IMAGENET_TRAIN = 1_281_167   # ILSVRC-2012 train images (TFDS imagenet2012)
CIFAR10_TRAIN = 50_000       # TFDS cifar10 train split
DATASETS = ('cifar10', 'imagenet64', 'imagenet256_latent')


@dataclasses.dataclass(frozen=True)
class C:
  """A cited value."""

  value: Any
  cite: str


@dataclasses.dataclass(frozen=True)
class Compute:
  """Compute a paper / repo states for its own run (for the plan's check)."""

  chip: str            # e.g. 'H200', 'A100', 'V100', 'TPU v6e'
  chips: int
  hours: float | None  # wall hours of the whole run; None = not stated
  cite: str


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One paper's setting for one dataset.

  Attributes:
    method: methods/<name>.py.
    dataset: one of DATASETS.
    status: 'published' (the paper / official config gives it) or 'derived'.
    values: dotted key -> C (model / train / method / data / evals / meta).
    sizes: DiT size ('B/2', 'XL/2', ...) -> extra values for that size.
    default_size: the size `paper.py` builds without `size=`.
    derived_from: '<method>/<dataset>' the derived values start from.
    compute: the compute the source states for its own run, if any.
    notes: where the harness cannot follow the paper (named deviations).
  """

  method: str
  dataset: str
  status: str
  values: Mapping[str, C]
  sizes: Mapping[str, Mapping[str, C]] = dataclasses.field(
      default_factory=dict)
  default_size: str = ''
  derived_from: str = ''
  compute: Compute | None = None
  notes: tuple[str, ...] = ()


def steps(epochs: float, n: int, batch: int) -> int:
  """Optimizer steps of `epochs` passes over n examples at `batch`."""
  return round(epochs * n / batch)


def _dit(size: str, patch: int, cite: str, **extra: C) -> dict[str, C]:
  return {'model.name': C('dit', cite), 'model.size': C(size, cite),
          'model.patch_size': C(patch, cite), **extra}


# ----------------------------------------------------- shared evaluation
_ADM_REF = C('ADM reference batch (openai/guided-diffusion evaluations, '
             'VIRTUAL_imagenet256_labeled.npz)',
             f'{DIT}:README.md L121-125 (ADM TensorFlow evaluation suite); '
             f'{MF}:README.md "FID stats followed the ADM" repository')
_FID50K = {'evals.main.n_samples': C(50_000, f'{MF}:configs/default.py '
                                     'fid.num_samples'),
           'meta.fid_reference': _ADM_REF}
_SD_VAE = {'meta.vae': C('stabilityai/sd-vae-ft-ema (DiT: ema or mse, '
                         "'doesn't affect training')",
                         f'{DIT}:train.py --vae; {TVM}:configs/im256_w2.yaml '
                         'encoder.vae_name'),
           'data.latent_scale': C(0.18215, f'{DIT}:train.py '
                                  'vae.encode(x)...mul_(0.18215)')}
_CIFAR_FID = {'evals.main.n_samples': C(50_000, f'{EDM}:README.md '
                                        '"generate 50,000 random images"'),
              'meta.fid_reference': C('EDM cifar10-32x32.npz (train split '
                                      'statistics)', f'{EDM}:README.md '
                                      'fid.py --ref=.../cifar10-32x32.npz')}
_IN64_FID = {'evals.main.n_samples': C(50_000, f'{EDM}:README.md '
                                       '"generate 50,000 random images"'),
             'meta.fid_reference': C('EDM imagenet-64x64.npz (train split '
                                     'statistics)', f'{EDM}:README.md '
                                     'fid.py ref --data=.../imagenet-64x64')}

# ------------------------------------------------ dataset anchor recipes
# EDM's DDPM++ (SongUNet) CIFAR-10 recipe: flow matching's nearest
# published CIFAR-10 setting and FastGen's f-distill / sCM teacher.
_E = f'{EDM}:train.py'
_EDM_CIFAR = {
    'model.name': C('unet', f'derived: nearest project backbone to {EDM}:'
                    'training/networks.py SongUNet (DDPM++)'),
    'model.channels': C(128, f'{_E} ddpmpp model_channels=128'),
    'model.channel_mult': C((2, 2, 2), f'{_E} ddpmpp channel_mult=[2,2,2]'),
    'model.num_res_blocks': C(4, f'{EDM}:training/networks.py SongUNet '
                              'num_blocks=4'),
    'model.attn_resolutions': C((16,), f'{EDM}:training/networks.py '
                                'SongUNet attn_resolutions=[16]'),
    'model.num_heads': C(1, f'{EDM}:training/networks.py SongUNet '
                         'num_heads=1'),
    'train.batch_size': C(512, f'{_E} --batch default 512'),
    'train.num_steps': C(steps(200e6 / CIFAR10_TRAIN, CIFAR10_TRAIN, 512),
                         f'{_E} --duration default 200 Mimg'),
    'train.lr': C(1e-3, f'{_E} --lr default 10e-4'),
    'train.b1': C(0.9, f'{_E} Adam betas=[0.9,0.999]'),
    'train.b2': C(0.999, f'{_E} Adam betas=[0.9,0.999]'),
    'train.weight_decay': C(0.0, f'{_E} torch.optim.Adam (no decay)'),
    'train.warmup_steps': C(steps(10e6 / CIFAR10_TRAIN, CIFAR10_TRAIN, 512),
                            f'{EDM}:training/training_loop.py '
                            'lr_rampup_kimg=10000'),
    'train.schedule': C('constant', f'{EDM}:training/training_loop.py lr '
                        'ramp-up, then constant'),
    # EMA half-life 0.5 Mimg at batch 512: decay 0.5 ** (512 / 500_000).
    'train.ema_decay': C(round(0.5 ** (512 / 500_000), 6),
                         f'{_E} --ema default 0.5 Mimg half-life'),
    'data.conditional': C(True, f'{EDM}:README.md cifar10-32x32-cond-vp '
                          '--cond=1 (FastGen f-distill teacher)'),
    'meta.dropout': C(0.13, f'{_E} --dropout 0.13 (project U-Net has none)'),
    **_CIFAR_FID,
}
_EDM_CIFAR_COMPUTE = Compute('V100', 8, 48.0, f'{EDM}:README.md '
                             'cifar10-32x32-cond-vp 8xV100 ~2 days')
_EDM_IN64 = {
    'model.name': C('unet', f'derived: nearest project backbone to {EDM}:'
                    'training/networks.py DhariwalUNet (ADM)'),
    'model.channels': C(192, f'{EDM}:training/networks.py DhariwalUNet '
                        'model_channels=192'),
    'model.channel_mult': C((1, 2, 3, 4), f'{EDM}:training/networks.py '
                            'DhariwalUNet channel_mult=[1,2,3,4]'),
    'model.num_res_blocks': C(3, f'{EDM}:training/networks.py DhariwalUNet '
                              'num_blocks=3'),
    'model.attn_resolutions': C((32, 16, 8), f'{EDM}:training/networks.py '
                                'DhariwalUNet attn_resolutions=[32,16,8]'),
    'model.num_heads': C(4, f'derived: {EDM}:training/networks.py '
                         'channels_per_head=64 varies per level; 4 heads'),
    'train.batch_size': C(4096, f'{EDM}:README.md imagenet-64x64-cond-adm '
                          '--batch=4096'),
    'train.num_steps': C(steps(2500e6 / IMAGENET_TRAIN, IMAGENET_TRAIN, 4096),
                         f'{EDM}:README.md --duration=2500 (Mimg)'),
    'train.lr': C(1e-4, f'{EDM}:README.md --lr=1e-4'),
    'train.b1': C(0.9, f'{_E} Adam betas=[0.9,0.999]'),
    'train.b2': C(0.999, f'{_E} Adam betas=[0.9,0.999]'),
    'train.weight_decay': C(0.0, f'{_E} torch.optim.Adam (no decay)'),
    'train.warmup_steps': C(steps(10e6 / IMAGENET_TRAIN, IMAGENET_TRAIN,
                                  4096), f'{EDM}:training/training_loop.py '
                            'lr_rampup_kimg=10000'),
    'train.schedule': C('constant', f'{EDM}:training/training_loop.py'),
    'train.ema_decay': C(round(0.5 ** (4096 / 50e6), 6),
                         f'{EDM}:README.md --ema=50 (Mimg half-life)'),
    'data.conditional': C(True, f'{EDM}:README.md --cond=1'),
    'meta.precision': C('fp16', f'{EDM}:README.md --fp16=1'),
    **_IN64_FID,
}
_EDM_IN64_COMPUTE = Compute('A100', 32, 13 * 24.0, f'{EDM}:README.md '
                            'imagenet-64x64-cond-adm 32xA100 ~13 days')

# ------------------------------------------------------------ flow matching
_S = f'{SIT}:train.py'
_FM_IN256 = {
    **_dit('XL', 2, f'{_S} --model default SiT-XL/2'),
    'train.batch_size': C(256, f'{_S} --global-batch-size 256'),
    'train.num_steps': C(steps(1400, IMAGENET_TRAIN, 256),
                         f'{_S} --epochs 1400'),
    'train.lr': C(1e-4, f'{_S} AdamW(lr=1e-4, weight_decay=0)'),
    'train.b1': C(0.9, f'{_S} torch AdamW default betas'),
    'train.b2': C(0.999, f'{_S} torch AdamW default betas'),
    'train.weight_decay': C(0.0, f'{_S} AdamW weight_decay=0'),
    'train.warmup_steps': C(0, f'{_S} no scheduler'),
    'train.schedule': C('constant', f'{_S} no scheduler'),
    'train.ema_decay': C(0.9999, f'{DIT}:train.py update_ema decay=0.9999'),
    'data.conditional': C(True, f'{_S} --num-classes 1000'),
    'method.time_dist': C('uniform', f'{SIT}:transport/transport.py sample '
                          't = th.rand(...)'),
    'meta.paper_nfe': C(250, f'{SIT}:sample_ddp.py --num-sampling-steps '
                        '250'),
    'meta.paper_fid': C(2.06, f'{SIT}:README.md SiT-XL/2 FID-50K 2.06 (SDE, '
                        'CFG)'),
    **_SD_VAE, **_FID50K,
}
_FM_SIZES = {'B/2': {}, 'L/2': {}, 'XL/2': {}}  # SiT models.py SiT_models

# ----------------------------------------------------------------- meanflow
_MFD = f'{MF}:configs/default.py'
_MF_IN256 = {
    **_dit('XL', 2, 'arXiv:2505.13447 Table 2 MF-XL/2 (1-NFE FID 3.43) '
           '[not re-read]'),
    'model.dtype': C('float32', f'{_MFD} training.half_precision=False'),
    'train.batch_size': C(256, f'{MF}:configs/run_b4.yml training.batch_size'),
    'train.num_steps': C(steps(240, IMAGENET_TRAIN, 256),
                         f'{MF}:configs/run_b4.yml training.num_epochs 240 '
                         '(paper: 240 for B/2-XL/2 [not re-read])'),
    'train.lr': C(1e-4, f'{MF}:configs/run_b4.yml training.learning_rate'),
    'train.b1': C(0.9, f'{MF}:train.py optax.adamw default b1'),
    'train.b2': C(0.95, f'{MF}:configs/run_b4.yml training.adam_b2'),
    'train.weight_decay': C(0.0, f'{MF}:train.py optax.adamw(weight_decay=0)'),
    'train.warmup_steps': C(0, f'{MF}:train.py constant lr_value'),
    'train.schedule': C('constant', f'{MF}:train.py constant lr_value'),
    'train.ema_decay': C(0.9999, f'{_MFD} training.ema_val (ema_type const)'),
    'data.conditional': C(True, f'{_MFD} dataset.num_classes=1000'),
    'method.time_dist': C('logit_normal', f'{_MFD} method.noise_dist'),
    'method.p_mean_t': C(-0.4, f'{_MFD} method.P_mean'),
    'method.p_std_t': C(1.0, f'{_MFD} method.P_std'),
    'method.p_mean_r': C(-0.4, f'{_MFD} method.P_mean'),
    'method.p_std_r': C(1.0, f'{_MFD} method.P_std'),
    'method.tr_rule': C('sort', f'{MF}:meanflow.py sample_tr'),
    'method.ratio_r_neq_t': C(0.25, f'{_MFD} method.data_proportion=0.75'),
    'method.mask_rule': C('prefix', f'{MF}:meanflow.py'),
    'method.adaptive_p': C(1.0, f'{_MFD} method.norm_p'),
    'method.adaptive_c': C(0.01, f'{_MFD} method.norm_eps'),
    'method.class_dropout': C(0.1, f'{_MFD} method.class_dropout_prob'),
    'method.cfg_omega': C(0.2, f'{FG}:fastgen/configs/experiments/DiT/'
                          'config_mf_xl.py guidance_scale'),
    'method.cfg_kappa': C(0.92, f'{FG}:fastgen/configs/experiments/DiT/'
                          'config_mf_xl.py guidance_mixture_ratio'),
    'method.cfg_t_start': C(0.0, f'{_MFD} method.t_start'),
    'method.cfg_t_end': C(0.75, f'{FG}:fastgen/configs/experiments/DiT/'
                          'config_mf_xl.py guidance_t_end'),
    'meta.paper_nfe': C(1, f'{_MFD} sampling.num_steps'),
    'meta.paper_fid': C(3.43, 'arXiv:2505.13447 Table 2 XL/2 1-NFE '
                        '[not re-read]'),
    **_SD_VAE, **_FID50K,
}
_MF_SIZES = {
    'XL/2': {},
    'B/2': {'method.cfg_omega': C(1.0, f'{_MFD} method.omega'),
            'method.cfg_kappa': C(0.5, f'{_MFD} method.kappa; '
                                  f'{FG}:.../DiT/config_mf_b.py '
                                  'guidance_mixture_ratio 0.5'),
            'method.cfg_t_end': C(1.0, f'{_MFD} method.t_end')},
}
_PM = f'{PYMF}:meanflow/scripts/cifar10_v1.sh'
_PMA = f'{PYMF}:meanflow/train_arg_parser.py'
_CIFAR_STEPS_PER_EPOCH = CIFAR10_TRAIN / 1024
_MF_CIFAR = {
    **{k: v for k, v in _EDM_CIFAR.items() if k.startswith('model.')},
    'model.name': C('unet', f'derived: nearest project backbone to {PYMF}:'
                    'meanflow/models/model_configs.py SongUNet'),
    'model.channel_mult': C((2, 2, 2), f'{PYMF}:meanflow/models/'
                            'model_configs.py channel_mult [2,2,2]'),
    'train.batch_size': C(1024, f'{_PM} --batch_size=128 x 8 GPUs'),
    'train.num_steps': C(steps(16000, CIFAR10_TRAIN, 1024),
                         f'{_PM} --epochs=16000 (README: 800k iterations)'),
    'train.lr': C(6e-4, f'{_PM} --lr=0.0006'),
    'train.b1': C(0.9, f'{_PMA} --optimizer_betas [0.9, 0.999]'),
    'train.b2': C(0.999, f'{_PMA} --optimizer_betas [0.9, 0.999]'),
    'train.weight_decay': C(0.0, f'{PYMF}:meanflow/train.py Adam'),
    'train.warmup_steps': C(round(200 * _CIFAR_STEPS_PER_EPOCH),
                            f'{_PM} --warmup_epochs 200'),
    'train.schedule': C('constant', f'{PYMF}:meanflow/train.py LinearLR '
                        'warm-up then ConstantLR'),
    'train.ema_decay': C(0.9999, f'{_PMA} --ema_decay 0.9999'),
    'data.conditional': C(False, f'{PYMF}:README.md unconditional CIFAR-10'),
    'method.tr_rule': C('min', f'{_PM} --tr_sampler=v1'),
    'method.time_dist': C('logit_normal', f'{PYMF}:meanflow/models/'
                          'time_sampler.py'),
    'method.p_mean_t': C(-0.6, f'{_PM} --P_mean_t -0.6'),
    'method.p_std_t': C(1.6, f'{_PM} --P_std_t 1.6'),
    'method.p_mean_r': C(-4.0, f'{_PM} --P_mean_r -4.0'),
    'method.p_std_r': C(1.6, f'{_PM} --P_std_r 1.6'),
    'method.ratio_r_neq_t': C(0.75, f'{_PM} --ratio 0.75'),
    'method.mask_rule': C('random', f'{PYMF}:meanflow/models/meanflow.py'),
    'method.adaptive_p': C(0.75, f'{_PM} --norm_p 0.75'),
    'method.adaptive_c': C(1e-3, f'{_PMA} --norm_eps 1e-3'),
    'meta.dropout': C(0.2, f'{_PM} --dropout 0.2 (project U-Net has none)'),
    'meta.augment': C('EDM augmentation', f'{_PM} --use_edm_aug '
                      '(not in the harness)'),
    'meta.paper_nfe': C(1, f'{PYMF}:README.md 1-step generation'),
    'meta.paper_fid': C(2.9, f'{PYMF}:README.md "~2.9 FID at 16000 '
                        'epochs"'),
    **_CIFAR_FID,
}
_MF_CIFAR_COMPUTE = Compute('H200', 8, 800_000 * 0.21 / 3600,
                            f'{PYMF}:README.md 0.21 s/iter on 8x H200, 800k '
                            'iterations')

# ---------------------------------------------------------------------- tvm
_TV = f'{TVM}:configs/im256_w2.yaml'
_TVM_IN256 = {
    **_dit('XL', 2, f'{_TV} network.model_type DiT_XL_2_18h'),
    'model.num_heads': C(18, f'{_TV} DiT_XL_2_18h'),
    'model.norm': C('rmsnorm', f'{_TV} model_kwargs.do_mod_norm (TVM '
                    'semi-Lipschitz DiT, methods/tvm.py OFFICIAL_IM256_MODEL)'),
    'model.qk_norm': C(True, f'{_TV} model_kwargs.qk_norm'),
    'model.modulation': C('rms_adaln', f'{_TV} model_kwargs.do_mod_norm'),
    'model.init': C('spectral', f'{_TV} model_kwargs.init_type spectral'),
    'model.time_spectral_init': C(True, f'{_TV} model_kwargs.time_specinit'),
    'model.guidance_embed': C(True, f'{_TV} model_kwargs.learn_guidance'),
    'model.dtype': C('bfloat16', f'{_TV} network.data_type bf16'),
    'train.batch_size': C(2048, f'{_TV} training.batch_size'),
    'train.num_steps': C(steps(240, IMAGENET_TRAIN, 2048),
                         f'derived: training length not in {_TV} (total_ticks'
                         ' is an upper bound) nor re-read from arXiv:'
                         '2511.19797; 240 epochs as MeanFlow XL/2'),
    'train.lr': C(1e-4, f'{_TV} optimizer.lr'),
    'train.b1': C(0.9, f'{_TV} optimizer.betas'),
    'train.b2': C(0.95, f'{_TV} optimizer.betas'),
    'train.weight_decay': C(0.0, f'{_TV} optimizer.weight_decay'),
    'train.warmup_steps': C(0, f'{_TV} no lr schedule'),
    'train.schedule': C('constant', f'{_TV} no lr schedule'),
    'train.ema_decay': C(0.9999, f'{_TV} training.ema_beta'),
    'data.conditional': C(True, f'{_TV} dataset.use_labels'),
    'method.time_dist': C('logit_normal', f'{_TV} loss.s_P_mean/s_P_std'),
    'method.s_p_mean': C(-0.4, f'{_TV} loss.s_P_mean'),
    'method.s_p_std': C(1.0, f'{_TV} loss.s_P_std'),
    'method.gap_dist': C('logit_normal', f'{_TV} loss.gap_P_mean'),
    'method.gap_p_mean': C(-0.8, f'{_TV} loss.gap_P_mean'),
    'method.gap_p_std': C(1.0, f'{_TV} loss.gap_P_std'),
    'method.teacher_ema': C(0.99, f'{_TV} training.ema_target_beta'),
    'method.cfg_scale': C(2.0, f'{_TV} loss.cfg'),
    'method.scale_param': C(True, f'{_TV} network.do_scale_param'),
    'method.detach_jvp': C(False, f'{_TV} network.detach_jvp'),
    'method.class_dropout': C(0.1, f'{_TV} loss.label_dropout'),
    'meta.latent_norm': C('per-channel raw_mean / raw_std',
                          f'{_TV} encoder.raw_mean, raw_std (the harness '
                          'scales by data.latent_scale only)'),
    'meta.paper_nfe': C(1, f'{_TV} sampling.1_step'),
    'meta.paper_fid': C(3.29, f'{TVM}:README.md ImageNet-256 CFG 2.0 NFE 1'),
    'meta.fid_reference': C('TVM img256.pkl (dataset statistics)',
                            f'{_TV} eval.ref_stats; {TVM}:README.md'),
    'evals.main.n_samples': C(50_000, f'{_TV} eval.metrics fid50k_full'),
    'meta.vae': C('stabilityai/sd-vae-ft-ema', f'{_TV} encoder.vae_name'),
    'data.latent_scale': C(0.18215, f'derived: {DIT}:train.py 0.18215 (TVM '
                           'normalises per channel instead)'),
}

# ----------------------------------------------------------------- drifting
_DB = f'{DRIFT}:configs/gen/latent_sota_B.yaml'
_DL = f'{DRIFT}:configs/gen/latent_sota_L.yaml'
_DRIFT_IN256 = {
    **_dit('B', 2, f'{_DB} model hidden 768 depth 12 patch 2'),
    'model.norm': C('rmsnorm', f'{_DB} model.use_rmsnorm'),
    'model.qk_norm': C(True, f'{_DB} model.use_qknorm'),
    'model.guidance_embed': C(True, f'{_DB} forward_dict cfg_min/cfg_max '
                              '(alpha is a generator input)'),
    'model.style_tokens': C(32, f'{_DB} model.noise_coords'),
    'model.style_vocab': C(64, f'{_DB} model.noise_classes'),
    'model.dtype': C('bfloat16', f'{_DB} model.use_bf16'),
    # batch = classes per step x positives per class.
    'train.batch_size': C(128 * 64, f'{_DB} train.train_batch_size 128 x '
                          'pos_per_sample 64'),
    'train.num_steps': C(200_000, f'{_DB} train.total_steps'),
    'train.lr': C(4e-4, f'{_DB} optimizer.lr_schedule.learning_rate'),
    'train.b1': C(0.9, f'{_DB} optimizer.adam_b1'),
    'train.b2': C(0.95, f'{_DB} optimizer.adam_b2'),
    'train.weight_decay': C(0.0, f'{_DB} optimizer.weight_decay'),
    'train.warmup_steps': C(10_000, f'{_DB} lr_schedule.warmup_steps'),
    'train.schedule': C('constant', f'{_DB} lr_schedule.lr_schedule const'),
    'train.ema_decay': C(0.999, f'{_DB} train.ema_decay'),
    'data.conditional': C(True, f'{_DB} dataset.num_classes'),
    'method.classes_per_step': C(128, f'{_DB} train.train_batch_size'),
    'method.num_gen': C(64, f'{_DB} forward_dict.gen_per_label'),
    'method.num_unc': C(32, f'{_DB} train.neg_per_sample'),
    'method.temperatures': C((0.02, 0.05, 0.2), f'{_DB} loss_kwargs.R_list'),
    'method.cfg_alpha_max': C(4.0, f'{_DB} forward_dict.cfg_max'),
    'method.cfg_alpha_power': C(5.0, f'{_DB} forward_dict.neg_cfg_pw'),
    'method.cfg_p_one': C(0.0, f'{_DB} forward_dict.no_cfg_frac'),
    'method.features': C('pixels', f'derived: {_DB} feature.use_mae '
                         '(MAE-640 features) needs a pre-trained encoder; '
                         'the harness trains its own from data'),
    'evals.main.guidance': C(1.1, f'{DRIFT}:README.md Drift-B latent CFG '
                             '1.1'),
    'meta.paper_nfe': C(1, f'{DRIFT}:README.md 1 NFE'),
    'meta.paper_fid': C(1.75, f'{DRIFT}:README.md Drift-B latent FID'),
    'meta.fid_reference': C('MeanFlow / ADM ImageNet-256 statistics',
                            f'{DRIFT}:README.md "(migrated from MeanFlow)"'),
    'evals.main.n_samples': C(50_000, f'{DRIFT}:README.md --num-samples '
                              '50000'),
    **{k: v for k, v in _SD_VAE.items()},
}
_DRIFT_SIZES = {
    'B/2': {},
    'L/2': {'model.size': C('L', f'{_DL} model.hidden_size 1024'),
            'method.cfg_alpha_power': C(3.0, f'{_DL} neg_cfg_pw'),
            'method.cfg_p_one': C(0.5, f'{_DL} no_cfg_frac'),
            'evals.main.guidance': C(1.0, f'{DRIFT}:README.md Drift-L CFG '
                                     '1.0'),
            'meta.paper_fid': C(1.54, f'{DRIFT}:README.md Drift-L latent')},
}
_DRIFT_COMPUTE = Compute('TPU v6e', 128, None, f'{DRIFT}:README.md "128 TPU '
                         'v6e for the SOTA runs" (no duration stated)')

# ------------------------------------------------------------- f-distill
_FD = f'{FG}:fastgen/configs/experiments/EDM'
_FG_OPT = f'{FG}:fastgen/configs/opt.py BaseOptimizerConfig'
_FD_COMMON = {
    'train.b1': C(0.9, f'{_FG_OPT} betas=(0.9, 0.999)'),
    'train.b2': C(0.999, f'{_FG_OPT} betas=(0.9, 0.999)'),
    'train.weight_decay': C(0.01, f'{_FG_OPT} weight_decay=0.01'),
    'train.warmup_steps': C(0, f'{FG}:fastgen/configs/methods/'
                            'config_f_distill.py warm_up_steps=[0]'),
    'train.schedule': C('constant', f'{FG}:fastgen/configs/config.py '
                        'LambdaLinearScheduler f_min=1 (no decay)'),
    'train.ema_decay': C(0.9999, f'{_FD}/config_f_distill_cifar10.py '
                         'use_ema ema_9999'),
    'method.student_update_freq': C(5, f'{FG}:fastgen/configs/methods/'
                                    'config_dmd2.py student_update_freq'),
    'meta.paper_nfe': C(1, f'{FG}:fastgen/configs/config.py '
                        'student_sample_steps = 1'),
}
_FD_CIFAR = {
    **{k: v for k, v in _EDM_CIFAR.items()
       if k.startswith(('model.', 'data.', 'evals.', 'meta.fid'))},
    **_FD_COMMON,
    'train.batch_size': C(2048, f'{_FD}/config_f_distill_cifar10.py '
                          'batch_size_global'),
    'train.num_steps': C(100_000, f'{_FD}/config_f_distill_cifar10.py '
                         'max_iter'),
    'train.lr': C(1e-4, f'{_FG_OPT} lr=1e-4'),
    'method.f_div': C('kl', f'{_FD}/config_f_distill_cifar10.py f_div'),
    'method.gan_weight': C(1e-3, f'{FG}:fastgen/configs/methods/'
                           'config_dmd2.py gan_loss_weight_gen'),
    'method.ratio_ema': C(0.0, f'{FG}:fastgen/configs/methods/'
                          'config_f_distill.py ratio_ema_rate'),
}
_FD_IN64 = {
    **{k: v for k, v in _EDM_IN64.items()
       if k.startswith(('model.', 'data.', 'evals.', 'meta.fid'))},
    **_FD_COMMON,
    'train.batch_size': C(512, f'{_FD}/config_f_distill_in64.py '
                          'batch_size_global'),
    'train.num_steps': C(600_000, f'{_FD}/config_f_distill_in64.py max_iter'),
    'train.lr': C(2e-6, f'{_FD}/config_f_distill_in64.py net_optimizer.lr'),
    'method.f_div': C('js', f'{FG}:fastgen/configs/methods/'
                      'config_f_distill.py f_div default'),
    'method.gan_weight': C(3e-3, f'{_FD}/config_f_distill_in64.py '
                           'gan_loss_weight_gen'),
    'method.ratio_ema': C(0.5, f'{_FD}/config_f_distill_in64.py '
                          'ratio_ema_rate'),
}

# --------------------------------------------------------------- shortcut
_SCT = f'{SC}:train.py model_config'
_SCR = f'{SC}:README.md Imagenet-256 command'
_SHORTCUT_IN256 = {
    **_dit('B', 2, f'{_SCR} hidden 768 depth 12 heads 12 patch 2'),
    'train.batch_size': C(256, f'{_SCR} --batch_size 256'),
    'train.num_steps': C(810_000, f'{_SCR} --max_steps 810_000'),
    'train.lr': C(1e-4, f'{_SCT} lr'),
    'train.b1': C(0.9, f'{_SCT} beta1'),
    'train.b2': C(0.999, f'{_SCT} beta2'),
    'train.weight_decay': C(0.1, f'{_SCT} weight_decay'),
    'train.warmup_steps': C(0, f'{_SCT} warmup 0'),
    'train.schedule': C('constant', f'{_SCT} use_cosine 0'),
    'train.ema_decay': C(0.999, f'{_SCT} target_update_rate'),
    'data.conditional': C(True, f'{_SCR} --model.class_dropout_prob 0.1'),
    'method.max_steps': C(128, f'{_SCT} denoise_timesteps'),
    'method.class_dropout': C(0.1, f'{_SCR} --model.class_dropout_prob 0.1'),
    'method.bootstrap_cfg': C(True, f'{_SCR} --model.bootstrap_cfg 1'),
    'method.cfg_scale': C(1.5, f'{_SCR} --model.cfg_scale 1.5'),
    'meta.paper_nfe': C(1, f'{SC}:README.md FID-50k 1-Step'),
    'meta.paper_fid': C(40.3, f'{SC}:README.md Imagenet-256 (DiT-B) 1-Step'),
    'meta.fid_reference': C('shortcut imagenet256_fidstats_ours.npz',
                            f'{_SCR} --fid_stats'),
    'evals.main.n_samples': C(50_000, f'{SC}:README.md FID-50k'),
    **_SD_VAE,
}
_SHORTCUT_SIZES = {
    'B/2': {},
    'XL/2': {'model.size': C('XL', f'{SC}:README.md DiT-XL command hidden '
                             '1152 depth 28'),
             'meta.paper_fid': C(10.6, f'{SC}:README.md DiT-XL 1-Step')},
}

# -------------------------------------------------------------- imeanflow
_IT = f'{IMF}:configs/train_config.yml'
_ID = f'{IMF}:configs/default.py'
_IMF_IN256 = {
    **_dit('B', 2, f'{_IT} model.model_str imfDiT_B_2'),
    'model.guidance_embed': C(True, f'{IMF}:models/imfDiT.py guidance as '
                              'conditioning (in-context tokens upstream)'),
    'train.batch_size': C(1024, f'{_IT} training.batch_size'),
    'train.num_steps': C(steps(640, IMAGENET_TRAIN, 1024),
                         f'{_IT} training.num_epochs 640'),
    'train.lr': C(1e-4, f'{_IT} training.learning_rate'),
    'train.b1': C(0.9, f'{IMF}:train.py optax adamw default b1'),
    'train.b2': C(0.95, f'{_IT} training.adam_b2'),
    'train.weight_decay': C(0.0, f'{IMF}:train.py weight_decay 0'),
    'train.warmup_steps': C(steps(10, IMAGENET_TRAIN, 1024),
                            f'{_IT} training.warmup_epochs 10'),
    'train.schedule': C('constant', f'{_ID} training.lr_schedule '
                        'warmup_const'),
    'train.ema_decay': C(0.9999, f'{_ID} training.ema_val'),
    'data.conditional': C(True, f'{_ID} dataset.num_classes'),
    'method.p_mean': C(-0.4, f'{_ID} model.P_mean'),
    'method.p_std': C(1.0, f'{_ID} model.P_std'),
    'method.data_proportion': C(0.5, f'{_ID} model.data_proportion'),
    'method.cfg_beta': C(1.0, f'{_IT} model.cfg_beta'),
    'method.class_dropout': C(0.1, f'{_ID} model.class_dropout_prob'),
    'method.norm_p': C(1.0, f'{_ID} model.norm_p'),
    'method.norm_eps': C(0.01, f'{_ID} model.norm_eps'),
    'evals.main.guidance': C(7.5, f'{_IT} sampling.omega'),
    'meta.paper_nfe': C(1, f'{_IT} sampling.num_steps'),
    'meta.paper_fid': C(3.39, f'{IMF}:README.md iMF-B/2 (paper 3.39)'),
    'meta.fid_reference': C('iMF imagenet_256_fid_stats.npz (JAX, TPU)',
                            f'{IMF}:README.md'),
    'evals.main.n_samples': C(50_000, f'{_IT} fid.num_samples'),
    **_SD_VAE,
}

# -------------------------------------------------------------------- scm
_SCM = f'{FG}:fastgen/configs/methods/config_scm.py'
_SCM_CIFAR = {
    **{k: v for k, v in _EDM_CIFAR.items()
       if k.startswith(('model.', 'evals.', 'meta.fid'))},
    'data.conditional': C(False, f'{_FD}/config_sct_cifar10.py '
                          f'edm-cifar10-32x32-uncond-vp; {_SCM} use_labels '
                          'False'),
    'train.batch_size': C(512, f'{_FD}/config_sct_cifar10.py '
                          'batch_size_global'),
    'train.num_steps': C(350_000, f'{_FD}/config_sct_cifar10.py max_iter'),
    'train.optimizer': C('radam', f'{_SCM} net_optimizer '
                         'RAdamOptimizerConfig (optim_type="radam")'),
    'train.lr': C(1e-4, f'{FG}:fastgen/configs/opt.py RAdamOptimizerConfig '
                  'lr'),
    'train.b1': C(0.9, f'{_SCM} net_optimizer.betas (0.9, 0.99)'),
    'train.b2': C(0.99, f'{_SCM} net_optimizer.betas (0.9, 0.99)'),
    'train.weight_decay': C(0.0, f'{_SCM} net_optimizer.weight_decay'),
    'train.warmup_steps': C(0, f'{_SCM} net_scheduler.warm_up_steps [0]'),
    'train.schedule': C('constant', f'{_SCM} no decay'),
    'train.ema_decay': C(0.9999, f'{_FD}/config_sct_cifar10.py ema_9999'),
    'method.p_mean': C(-1.0, f'{_SCM} train_p_mean'),
    'method.p_std': C(1.4, f'{_SCM} train_p_std'),
    'meta.dropout': C(0.2, f'{_SCM} net.dropout 0.2'),
    'meta.paper_nfe': C(1, f'{_FD}/config_sct_cifar10.py t_list [80, 0]'),
}
_SCM_IN64 = {
    **{k: v for k, v in _EDM_IN64.items()
       if k.startswith(('model.', 'data.', 'evals.', 'meta.fid'))},
    'train.batch_size': C(1024, f'{_FD}/config_scd_in64.py '
                          'batch_size_global'),
    'train.num_steps': C(600_000, f'{_FD}/config_scd_in64.py max_iter'),
    'train.optimizer': C('adamw', f'{_FD}/config_scd_in64.py net_optimizer.'
                         'optim_type = "adam" (weight_decay 0: AdamW is '
                         'Adam)'),
    'train.lr': C(7e-5, f'{_FD}/config_scd_in64.py net_optimizer.lr'),
    'train.b1': C(0.9, f'{_FD}/config_scd_in64.py betas (0.9, 0.99)'),
    'train.b2': C(0.99, f'{_FD}/config_scd_in64.py betas (0.9, 0.99)'),
    'train.weight_decay': C(0.0, f'{_FD}/config_scd_in64.py weight_decay'),
    'train.warmup_steps': C(0, f'{_FD}/config_scd_in64.py warm_up_steps=0'),
    'train.schedule': C('inv_sqrt', f'{_FD}/config_scd_in64.py net_scheduler'
                        ' LambdaInverseSquareRootScheduler'),
    'train.decay_steps': C(35_000, f'{_FD}/config_scd_in64.py net_scheduler '
                           'decay_steps=35000'),
    'train.grad_clip': C(10.0, f'{_FD}/config_scd_in64.py grad_norm = 10'),
    'train.ema_decay': C(0.9999, f'{_FD}/config_scd_in64.py ema_9999'),
    'method.p_mean': C(-1.0, f'{_FD}/config_scd_in64.py train_p_mean'),
    'method.p_std': C(1.6, f'{_FD}/config_scd_in64.py train_p_std'),
    'meta.paper_nfe': C(1, f'{_SCM} student_sample_steps default 1'),
}

# ------------------------------------------------------ derived protocols


def _derive(base: Protocol, dataset: str, note: str, changes: dict[str, C],
            drop: tuple[str, ...] = ()) -> Protocol:
  """`base` moved to `dataset` with `changes` (each cited `derived:`)."""
  values = {k: v for k, v in base.values.items()
            if k not in drop and not k.startswith('meta.paper_')}
  values.update(changes)
  return Protocol(method=base.method, dataset=dataset, status='derived',
                  values=values, sizes=base.sizes,
                  default_size=base.default_size,
                  derived_from=f'{base.method}/{base.dataset}',
                  notes=base.notes + (note,))


_PIXELS = ('data.latent_scale', 'meta.vae')


def _pixel_dit(base: Protocol, dataset: str) -> Protocol:
  """A DiT protocol on pixels with the patch that keeps 256 tokens."""
  patch = 2 if dataset == 'cifar10' else 4
  fid = _CIFAR_FID if dataset == 'cifar10' else _IN64_FID
  changes = {'model.patch_size': C(patch, 'derived: 256 tokens as the '
                                   f'{base.dataset} protocol'), **fid}
  return _derive(base, dataset, f'derived from {base.method}/{base.dataset}'
                 ': same DiT, batch, optimizer and steps on pixels',
                 changes, drop=_PIXELS)


def _on_anchor(method: str, anchor: dict[str, C], method_values: dict,
               dataset: str, source: str, **extra: C) -> Protocol:
  """A method's own keys on a dataset's anchor recipe (EDM / SiT)."""
  values = {**anchor, **method_values, **extra}
  return Protocol(method=method, dataset=dataset, status='derived',
                  values=values, derived_from=source,
                  notes=(f'derived: {source} recipe (backbone, batch, '
                         f'optimizer, steps) with the {method} keys',))


def _method_keys(values: Mapping[str, C]) -> dict[str, C]:
  return {k: v for k, v in values.items() if k.startswith('method.')}


_TM_KEYS = {  # DTM paper values (no official code; T2I only)
    'method.head_patch': C(2, 'arXiv:2506.23589 §2.3 2x2 head tokens (as '
                           'docs/methods/transition_matching.md)'),
    'method.head_width': C(1024, 'arXiv:2506.23589 §2.5 head width 1024 (as '
                           'docs/methods/transition_matching.md)'),
    'method.head_depth': C(6, 'arXiv:2506.23589 §2.5 6 head blocks (as '
                           'docs/methods/transition_matching.md)'),
    'method.head_steps': C(64, 'arXiv:2506.23589 main tables 64 head steps '
                           '(as docs/methods/transition_matching.md)'),
    'method.rep_dim': C(8, 'derived: methods/transition_matching.py '
                        'IMAGE_PRESET rep_dim (8 per pixel, 32 per token)'),
    'method.class_dropout': C(0.15, 'arXiv:2506.23589 label dropout 0.15 (as '
                              'docs/methods/transition_matching.md)'),
}


def _table() -> dict[tuple[str, str], Protocol]:
  p: dict[tuple[str, str], Protocol] = {}

  def add(proto: Protocol) -> None:
    p[(proto.method, proto.dataset)] = proto

  fm = Protocol('flow_matching', 'imagenet256_latent', 'published',
                _FM_IN256, _FM_SIZES, 'XL/2',
                notes=('SiT samples with a 250-step SDE/ODE solver and '
                       'CFG; the harness evaluates 1- and 4-NFE Euler',))
  add(fm)
  add(dataclasses.replace(
      _on_anchor('flow_matching', _EDM_CIFAR, {}, 'cifar10',
                 'NVlabs/edm cifar10-32x32-cond-vp'),
      compute=_EDM_CIFAR_COMPUTE))
  add(dataclasses.replace(
      _on_anchor('flow_matching', _EDM_IN64, {}, 'imagenet64',
                 'NVlabs/edm imagenet-64x64-cond-adm'),
      compute=_EDM_IN64_COMPUTE))

  mf = Protocol('meanflow', 'imagenet256_latent', 'published', _MF_IN256,
                _MF_SIZES, 'XL/2')
  add(mf)
  add(Protocol('meanflow', 'cifar10', 'published', _MF_CIFAR,
               compute=_MF_CIFAR_COMPUTE,
               notes=('py-meanflow dropout 0.2 and EDM augmentation are '
                      'not in the harness',)))
  add(_pixel_dit(mf, 'imagenet64'))

  tvm = Protocol('tvm', 'imagenet256_latent', 'published', _TVM_IN256,
                 {'XL/2': {}}, 'XL/2')
  add(tvm)
  for ds in ('cifar10', 'imagenet64'):
    add(_pixel_dit(tvm, ds))

  drift = Protocol('drifting', 'imagenet256_latent', 'published',
                   _DRIFT_IN256, _DRIFT_SIZES, 'B/2', compute=_DRIFT_COMPUTE,
                   notes=('official generator uses SwiGLU, RoPE and 16 class'
                          ' tokens, and MAE-640 features; the project DiT '
                          'has none of them (pixel-space field only)',))
  add(drift)
  add(_derive(drift, 'cifar10', 'derived from drifting/imagenet256_latent',
              {'model.patch_size': C(2, 'derived: 256 tokens'),
               'method.classes_per_step': C(10, 'derived: every CIFAR-10 '
                                            'class once per step'),
               'train.batch_size': C(10 * 64, 'derived: 10 classes x 64 '
                                     'positives (pos_per_sample)'),
               **_CIFAR_FID}, drop=_PIXELS))
  add(_pixel_dit(drift, 'imagenet64'))

  add(Protocol('f_distill', 'cifar10', 'published', _FD_CIFAR,
               notes=('teacher: the flow_matching/cifar10 protocol (FastGen: '
                      'EDM cond-vp); its FLOPs are upstream compute',)))
  fd64 = Protocol('f_distill', 'imagenet64', 'published', _FD_IN64,
                  notes=('teacher: the flow_matching/imagenet64 protocol '
                         '(FastGen: EDM ADM)',))
  add(fd64)
  add(_on_anchor('f_distill', {k: v for k, v in _FM_IN256.items()
                               if not k.startswith(('train.', 'method.'))},
                 {k: v for k, v in _FD_IN64.items()
                  if k.startswith(('train.', 'method.'))},
                 'imagenet256_latent', 'f_distill/imagenet64 on the '
                 'flow_matching/imagenet256_latent teacher backbone'))
  p[('f_distill', 'imagenet256_latent')] = dataclasses.replace(
      p[('f_distill', 'imagenet256_latent')], sizes=_FM_SIZES,
      default_size='XL/2')

  for ds, anchor, src in (
      ('imagenet256_latent', _FM_IN256, 'flow_matching/imagenet256_latent '
       '(SiT)'),
      ('cifar10', _EDM_CIFAR, 'NVlabs/edm cifar10 (flow_matching/cifar10)'),
      ('imagenet64', _EDM_IN64, 'NVlabs/edm imagenet64 '
       '(flow_matching/imagenet64)')):
    tm = _on_anchor('transition_matching',
                    {k: v for k, v in anchor.items()
                     if not k.startswith(('method.', 'meta.paper_'))},
                    _TM_KEYS, ds, src)
    if ds == 'imagenet256_latent':
      tm = dataclasses.replace(tm, sizes=_FM_SIZES, default_size='XL/2')
    add(tm)

  sc = Protocol('shortcut', 'imagenet256_latent', 'published',
                _SHORTCUT_IN256, _SHORTCUT_SIZES, 'B/2')
  add(sc)
  for ds in ('cifar10', 'imagenet64'):
    add(_pixel_dit(sc, ds))

  imf = Protocol('imeanflow', 'imagenet256_latent', 'published', _IMF_IN256,
                 {'B/2': {}}, 'B/2',
                 notes=('iMF-DiT uses in-context conditioning tokens and an '
                        'auxiliary v-head; the project DiT adds guidance to'
                        ' adaLN',))
  add(imf)
  for ds in ('cifar10', 'imagenet64'):
    add(_pixel_dit(imf, ds))

  # sCM: 'scm' is sCT (from scratch), 'scd' sCD (distils flow_matching).
  add(Protocol('scm', 'cifar10', 'published', _SCM_CIFAR))
  scd_cifar = {**{k: v for k, v in _SCM_CIFAR.items()
                  if k != 'method.variant'},
               'train.num_steps': C(500_000, f'{_FD}/config_scd_cifar10.py '
                                    'max_iter'),
               'meta.dropout': C(0.0, f'{_FD}/config_scd_cifar10.py '
                                 'net.dropout = 0.0')}
  add(Protocol('scd', 'cifar10', 'published', scd_cifar,
               notes=('teacher: flow_matching/cifar10 (FastGen: EDM '
                      'uncond-vp)',)))
  scd64 = Protocol('scd', 'imagenet64', 'published',
                   {k: v for k, v in _SCM_IN64.items()
                    if k != 'method.variant'},
                   notes=('teacher: flow_matching/imagenet64',
                          'FastGen Adam eps=1e-11 (config_scd_in64.py); the '
                          'harness runs optax eps=1e-8'))
  add(scd64)
  add(_derive(scd64, 'imagenet64', 'derived from scd/imagenet64: the sCT '
              'variant of the same recipe (FastGen has no sCT IN-64 config)',
              {}))
  p[('scm', 'imagenet64')] = dataclasses.replace(
      p.pop(('scd', 'imagenet64')), method='scm')
  add(scd64)
  for m in ('scm', 'scd'):
    add(dataclasses.replace(
        _on_anchor(m, {k: v for k, v in _FM_IN256.items()
                       if not k.startswith(('train.', 'method.'))},
                   {k: v for k, v in _SCM_IN64.items()
                    if k.startswith('train.') or k in ('method.p_mean',
                                                       'method.p_std')},
                   'imagenet256_latent', 'scd/imagenet64 on the '
                   'flow_matching/imagenet256_latent teacher backbone'),
        sizes=_FM_SIZES, default_size='XL/2'))
  return p


PROTOCOLS: dict[tuple[str, str], Protocol] = _table()

# ---------------------------------------------- the equal-budget protocol
# One backbone, batch, optimizer and budget for every method on ImageNet-256
# latents: DiT-B/2, batch 256, 400k steps (DiT's comparison point), AdamW
# 1e-4 constant as DiT / SiT; only the method keys (and the backbone inputs
# a method needs) come from its own protocol.
EQUAL_BUDGET: dict[str, C] = {
    **_dit('B', 2, f'{DIT}:models.py DiT-B/2 (DiT Table 1)'),
    'model.dtype': C('float32', f'{DIT}:README.md TF32 off (fp32)'),
    'train.batch_size': C(256, f'{DIT}:train.py --global-batch-size 256'),
    'train.num_steps': C(400_000, f'{DIT}:README.md "Train Steps 400K" '
                         'comparison table'),
    'train.lr': C(1e-4, f'{DIT}:train.py AdamW lr=1e-4'),
    'train.b1': C(0.9, f'{DIT}:train.py torch AdamW default betas'),
    'train.b2': C(0.999, f'{DIT}:train.py torch AdamW default betas'),
    'train.weight_decay': C(0.0, f'{DIT}:train.py weight_decay=0'),
    'train.warmup_steps': C(0, f'{DIT}:train.py no scheduler'),
    'train.schedule': C('constant', f'{DIT}:train.py no scheduler'),
    'train.ema_decay': C(0.9999, f'{DIT}:train.py update_ema 0.9999'),
    'data.conditional': C(True, f'{DIT}:train.py --num-classes 1000'),
    **_SD_VAE, **_FID50K,
}
# Model keys a method's own protocol may keep under the equal budget (inputs
# and options the method needs, not size or precision).
EQUAL_KEEP_MODEL = ('model.guidance_embed', 'model.style_tokens',
                    'model.style_vocab', 'model.norm', 'model.qk_norm',
                    'model.modulation', 'model.init',
                    'model.time_spectral_init')


def all_values() -> list[tuple[str, str, C]]:
  """(protocol name, key, value) for every cited value in the tables."""
  out = []
  for (m, ds), proto in PROTOCOLS.items():
    for k, v in proto.values.items():
      out.append((f'{m}/{ds}', k, v))
    for size, vals in proto.sizes.items():
      out += [(f'{m}/{ds}@{size}', k, v) for k, v in vals.items()]
  out += [('equal_budget', k, v) for k, v in EQUAL_BUDGET.items()]
  return out
