r"""Encodes a TFDS image split to SD-VAE latents, as ArrayRecord shards.

  python -m onestep_bench.data.prepare_latents --tfds=imagenet2012 \
      --split=train --size=256 --out=DIR [--data_dir=...] \
      [--vae=PATH.npz] [--vae_name=sd-vae-ft-ema] [--dtype=float32] \
      [--stat=mean|moments] [--no_hflip] [--records_per_shard=1024] \
      [--batch_size=64] [--workers=16] [--precision=highest] \
      [--process_index=I --process_count=P]

The latent ImageNet-256 recipe of DiT (Peebles & Xie 2023, §3.1, §5) that
SiT, MeanFlow, TVM and Drifting follow:

1. ADM center crop (Dhariwal & Nichol 2021; guided-diffusion
   `image_datasets.center_crop_arr`): while the short side is ≥ 2·size,
   halve the image with a BOX filter; BICUBIC-resize so the short side is
   `size` (the long side round()ed); crop the central size×size.
   Grayscale sources are converted to RGB first, as ADM's loader does.
2. x / 127.5 − 1, and its horizontal flip (the papers' flip augmentation,
   precomputed: latents of x and flip(x), `--no_hflip` to skip).
3. The VAE's posterior, scaled into the diffusion model's space:
   mean · 0.18215 (`--stat=mean`), or (mean, std) · 0.18215
   (`--stat=moments`, for sampling z = mean + std · ε at train time as
   DiT's `latent_dist.sample()`).

Output (format: `onestep_bench.vae.records`, which the reader imports):
`DIR/<split>.json` (shape, dtype, count, latent scale, VAE name + weights
sha256, source, preprocessing) and `DIR/<split>-SSSSS-of-NNNNN.array_record`
shards of `records_per_shard` records in index order; a record is int64
label, int64 index, then the latent bytes (NHWC).

Parallelism: each process writes a contiguous run of shards
(`records.process_shards`); process index / count come from the flags,
else JAX_PROCESS_ID / JAX_NUM_PROCESSES, else jax.distributed. Within a
process the jitted encoder runs on batches split over its local devices (a
data mesh); images are decoded and cropped by grain's read threads.
Resumable: a shard is written to a temporary file and renamed when whole;
a re-run with the same settings skips existing shards (any process count),
and refuses to mix settings in one DIR. The same settings give the same
bytes (each shard is encoded in the same batches).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from onestep_bench.config_check import ConfigError
from onestep_bench.data import sources
from onestep_bench.data.sources import DatasetNotFoundError
from onestep_bench.vae import records, weights
from onestep_bench.vae.api import VAE, Batched, load_vae
from onestep_bench.vae.autoencoder_kl import PRECISIONS


class PrepareError(ValueError):
  """A flag the run cannot use; the message names the flag and the fix."""

  def __init__(self, flag: str, value: Any, allowed: str, fix: str):
    super().__init__(f'--{flag}={value!r}: {allowed}. Fix: {fix}')


# ------------------------------------------------------------- preprocess
def center_crop_arr(image: np.ndarray, size: int) -> np.ndarray:
  """ADM's center crop of a uint8 [H, W, C] image to [size, size, 3]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  pil = Image.fromarray(image)
  if pil.mode != 'RGB':
    pil = pil.convert('RGB')
  while min(*pil.size) >= 2 * size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = size / min(*pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size),
                   resample=Image.BICUBIC)
  arr = np.asarray(pil)
  y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return np.ascontiguousarray(arr[y:y + size, x:x + size])


def _example(start: int, size: int, i: int, ex: dict[str, Any]
             ) -> dict[str, np.ndarray]:
  """A source example -> {'image' [size, size, 3], 'label', 'index'}."""
  return {'image': center_crop_arr(ex['image'], size),
          'label': np.int64(ex.get('label', 0)),
          'index': np.int64(start + i)}


@functools.lru_cache(maxsize=8)
def encode_fn(config: Any, precision: str, hflip: bool, stat: str,
              dtype: str):
  """`(params, uint8 [B, H, W, 3]) -> [B, *spec.shape]` (jit-able, cached)."""
  vae = VAE(config, None, precision=precision)

  def fn(params: Any, images: jax.Array) -> jax.Array:
    b = images.shape[0]
    views = [images, images[:, :, ::-1]] if hflip else [images]
    mean, std = vae.encode(params, jnp.concatenate(views))
    out = jnp.stack([mean, std], axis=1) if stat == 'moments' else mean
    out = out.reshape(len(views), b, *out.shape[1:])
    return jnp.swapaxes(out, 0, 1).astype(dtype)
  return fn


# ------------------------------------------------------------------- setup
def _open_source(name: str, split: str, data_dir: str | None) -> Any:
  return sources.tfds_data_source(name, split, data_dir,
                                  'pass --data_dir=DIR')


def _num_classes(source: Any) -> int | None:
  try:
    return int(source.dataset_info.features['label'].num_classes)
  except Exception:  # pylint: disable=broad-except  # no label feature
    return None


def _check_args(size: int, batch_size: int, records_per_shard: int,
                dtype: str, stat: str, precision: str) -> None:
  for flag, v in (('size', size), ('batch_size', batch_size),
                  ('records_per_shard', records_per_shard)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise PrepareError(flag, v, 'must be an int >= 1',
                         f'e.g. --{flag}=256' if flag == 'size'
                         else f'e.g. --{flag}=64')
  if dtype not in records.DTYPES:
    raise PrepareError('dtype', dtype, f'must be one of {records.DTYPES}',
                       '--dtype=float32 (or float16: half the disk)')
  if stat not in records.STATS:
    raise PrepareError('stat', stat, f'must be one of {records.STATS}',
                       '--stat=mean (DiT-style sampling needs moments)')
  if precision not in PRECISIONS:
    raise PrepareError('precision', precision, f'must be one of '
                       f'{PRECISIONS}', '--precision=highest (fp32)')


def _process(index: int | None, count: int | None) -> tuple[int, int]:
  env = os.environ
  if count is None:
    count = int(env.get('JAX_NUM_PROCESSES', 0)) or jax.process_count()
  if index is None:
    index = (int(env['JAX_PROCESS_ID']) if 'JAX_PROCESS_ID' in env
             else jax.process_index())
  if count < 1 or not 0 <= index < count:
    raise PrepareError('process_index', index, f'must be in [0, '
                       f'{count}) for --process_count={count}',
                       'pass 0 <= --process_index < --process_count')
  return index, count


def _sidecar(vae: VAE, spec: records.LatentSpec, *, tfds_name: str,
             split: str, count: int, records_per_shard: int,
             num_classes: int | None, size: int) -> dict[str, Any]:
  return {**spec.to_sidecar(), 'split': split, 'count': count,
          'num_shards': len(records.shard_bounds(count, records_per_shard)),
          'records_per_shard': records_per_shard,
          'latent_scale': vae.config.scaling_factor,
          'latent_shift': vae.shift,
          'vae': {'name': vae.config.name, 'sha256': vae.sha256,
                  'config': vae.config.to_dict(),
                  'precision': vae.precision},
          'source': {'tfds': tfds_name, 'split': split,
                     'num_classes': num_classes},
          'preprocess': {'crop': 'adm_center_crop', 'size': size,
                         'input': 'x / 127.5 - 1'},
          'options': records.OPTIONS}


def _claim_sidecar(out: str, split: str, meta: dict[str, Any]) -> None:
  """Writes the sidecar, or checks that an existing one matches."""
  path = records.sidecar_path(out, split)
  if os.path.isfile(path):
    old = records.read_sidecar(out, split)
    diff = sorted(k for k in set(old) | set(meta)
                  if old.get(k) != meta.get(k))
    if diff:
      k = diff[0]
      raise PrepareError(
          'out', out, f'already holds latents of split {split!r} made with '
          f'other settings ({k}: {old.get(k)!r} there, {meta.get(k)!r} '
          f'now; differing keys {diff})', 'use another --out, or the '
          'settings of the first run to resume it')
    return
  os.makedirs(out, exist_ok=True)
  records.write_json(path, meta)


# --------------------------------------------------------------------- run
def prepare(*, tfds_name: str, split: str, size: int, out: str,
            data_dir: str | None = None, vae_path: str | None = None,
            vae_name: str = 'sd-vae-ft-ema', dtype: str = 'float32',
            stat: str = 'mean', hflip: bool = True,
            records_per_shard: int = 1024, batch_size: int = 64,
            workers: int = 16, precision: str = 'highest',
            process_index: int | None = None,
            process_count: int | None = None,
            progress: bool = True) -> dict[str, Any]:
  """Writes this process's shards of `split` (see the module docstring).

  Every argument is checked, the VAE weights and the TFDS source opened,
  and the sidecar claimed before any image is encoded.

  Returns:
    {'sidecar': path, 'count': N, 'shards': this process's shard ids,
     'written': ids encoded now, 'skipped': ids already complete}.
  """
  _check_args(size, batch_size, records_per_shard, dtype, stat, precision)
  pi, pc = _process(process_index, process_count)
  vae = load_vae(vae_path, None if vae_path else vae_name,
                 precision=precision)
  f = vae.config.downsample_factor
  if size % f:
    raise PrepareError('size', size, f'must be a multiple of the VAE\'s '
                       f'downsampling factor {f}', f'e.g. --size={32 * f}')
  source = _open_source(tfds_name, split, data_dir)
  count = len(source)
  spec = records.LatentSpec(vae.config.latent_shape(size), dtype, stat,
                            ('x', 'hflip') if hflip else ('x',))
  meta = _sidecar(vae, spec, tfds_name=tfds_name, split=split, count=count,
                  records_per_shard=records_per_shard,
                  num_classes=_num_classes(source), size=size)
  _claim_sidecar(out, split, meta)

  bounds = records.shard_bounds(count, records_per_shard)
  mine = records.process_shards(len(bounds), pi, pc)
  todo, skipped = [], []
  for s in mine:
    path = records.shard_path(out, split, s, len(bounds))
    done = (os.path.isfile(path) and
            records.num_records(path) == bounds[s][1] - bounds[s][0])
    (skipped if done else todo).append(s)
  if todo:
    encoder = Batched(encode_fn(vae.config, precision, hflip, stat, dtype),
                      vae.params, batch_size)
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    for s in tqdm(todo, desc=f'latents {split} (process {pi}/{pc})',
                  unit='shard', disable=not progress):
      _write_shard(source, out, split, s, len(bounds), bounds[s], size,
                   spec, encoder, workers)
  return {'sidecar': records.sidecar_path(out, split), 'count': count,
          'shards': list(mine), 'written': todo, 'skipped': skipped}


def _write_shard(source: Any, out: str, split: str, shard: int,
                 num_shards: int, bounds: tuple[int, int], size: int,
                 spec: records.LatentSpec, encoder: Batched,
                 workers: int) -> None:
  """Encodes indices [start, stop) and writes them as shard `shard`."""
  import grain  # pylint: disable=g-import-not-at-top
  path = records.shard_path(out, split, shard, num_shards)
  directory, base = os.path.split(path)
  for name in os.listdir(directory):  # a killed run's partial file
    if name.startswith(f'{base}.tmp-'):
      os.remove(os.path.join(directory, name))
  start, stop = bounds
  ds = grain.MapDataset.source(source)[start:stop].map_with_index(
      functools.partial(_example, start, size)).batch(encoder.batch_size)
  if workers > 0:
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=workers, prefetch_buffer_size=2 * encoder.batch_size))
  data = []
  for batch in ds:
    latents = encoder.run_batch(batch['image'])
    data += [records.encode_record(z, lab, idx, spec) for z, lab, idx in
             zip(latents, batch['label'], batch['index'], strict=True)]
  records.write_shard(path, data)


# --------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; bad input -> one `error:` line, exit status 2."""
  p = argparse.ArgumentParser(prog='python -m onestep_bench.data.'
                              'prepare_latents',
                              description=__doc__.split('\n', 1)[0])
  p.add_argument('--tfds', required=True, help='TFDS name, e.g. imagenet2012')
  p.add_argument('--split', default='train', help="e.g. train, 'train[:1%]'")
  p.add_argument('--size', type=int, default=256, help='crop size')
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--data_dir', default=None, help='TFDS data dir')
  p.add_argument('--vae', default=None, help='converted VAE .npz (default: '
                 f'${weights.WEIGHTS_ENV}, else <cache>/vae/<vae_name>.npz)')
  p.add_argument('--vae_name', default='sd-vae-ft-ema',
                 help='sd-vae-ft-ema or sd-vae-ft-mse')
  p.add_argument('--dtype', default='float32', help='float32 or float16')
  p.add_argument('--stat', default='mean', help='mean or moments')
  p.add_argument('--no_hflip', action='store_true',
                 help='skip the flipped copy')
  p.add_argument('--records_per_shard', type=int, default=1024)
  p.add_argument('--batch_size', type=int, default=64,
                 help='images per encoder call (per process)')
  p.add_argument('--workers', type=int, default=16,
                 help='grain read threads (decode + crop)')
  p.add_argument('--precision', default='highest', help='highest or default')
  p.add_argument('--process_index', type=int, default=None)
  p.add_argument('--process_count', type=int, default=None)
  args = p.parse_args(argv)
  if args.process_count is None and args.process_index is None:
    from onestep_bench import sharding  # pylint: disable=g-import-not-at-top
    sharding.maybe_initialize_distributed()
  try:
    summary = prepare(
        tfds_name=args.tfds, split=args.split, size=args.size,
        out=os.path.expanduser(args.out), data_dir=args.data_dir,
        vae_path=args.vae, vae_name=args.vae_name, dtype=args.dtype,
        stat=args.stat, hflip=not args.no_hflip,
        records_per_shard=args.records_per_shard,
        batch_size=args.batch_size, workers=args.workers,
        precision=args.precision, process_index=args.process_index,
        process_count=args.process_count)
  except (PrepareError, ConfigError, weights.WeightsNotFoundError,
          weights.WeightsError, DatasetNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{summary["sidecar"]}: {summary["count"]} examples; this process: '
        f'shards {summary["shards"][:1]}..{summary["shards"][-1:]} '
        f'({len(summary["written"])} written, {len(summary["skipped"])} '
        'already complete).')
  return 0


if __name__ == '__main__':
  sys.exit(main())
