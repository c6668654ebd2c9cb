"""Latent samples -> images: the VAE decode before the feature networks.

Latent datasets (`config.data.name='latents:<dir>'`, `DataSpec.kind ==
'latent'`) are scored in image space, as DiT / SiT / REPA do (Peebles & Xie
2023, §5: samples decoded by the SD VAE, then the ADM evaluator): samples
are decoded with the VAE of `onestep_bench.vae` before Inception / DINOv2,
and so are the reference split's latents when the reference statistics come
from the dataset (`reference=''`).

Eval keys (`config.evals.<name>.<key>`):
  vae          the converted weights `.npz` ('' = $ONESTEP_VAE_WEIGHTS,
               else `<cache>/vae/<vae_config>.npz`; docs/vae.md).
  vae_config   the architecture: a preset name (default 'sd-vae-ft-ema',
               `onestep_bench.vae.PRESETS`) or 'file' (the weights file's
               own config, e.g. the tiny test VAE).

Scale: stored latents are in the VAE's scaled space, scaling_factor ·
(z − shift) (`prepare_latents`), and `ImageArrays` feeds the generator
stored · `data.latent_scale`; the decoder gets samples / latent_scale.
Images are quantised by DiT's rule (`vae.to_uint8`, the decoder's own);
the eval's `quantize` applies to image datasets only.

The VAE's identity (`LatentDecoder.row_fields()`: vae, vae_sha256,
latent_scale, latent_shift, plus data_latent_scale) joins the eval's
settings, so it is part of every row's feature space (`eval_settings`,
leaderboard.FEATURE_SPACE).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from onestep_bench.config_check import ConfigError

DEFAULT_VAE = 'sd-vae-ft-ema'
FILE_CONFIG = 'file'  # vae_config: the weights file's own architecture
DECODE_BATCH = 64

_DECODERS: dict[tuple[str, str], Any] = {}


def vae_options(ev: ml_collections.ConfigDict,
                name: str = '<name>') -> tuple[str, str | None]:
  """(resolved weights path, preset name or None) of `ev`, checked.

  Raises:
    ConfigError: an unknown preset, or no weights file (the message names
      the file and the conversion command).
  """
  from onestep_bench.vae import autoencoder_kl, weights  # pylint: disable=g-import-not-at-top
  cfg = ev.get('vae_config', DEFAULT_VAE) or DEFAULT_VAE
  if cfg != FILE_CONFIG and cfg not in autoencoder_kl.PRESETS:
    raise ConfigError(f'evals.{name}.vae_config', cfg,
                      f'must be one of {sorted(autoencoder_kl.PRESETS)} or '
                      f"'{FILE_CONFIG}' (the weights file's own config)",
                      f'e.g. --config.evals.{name}.vae_config={DEFAULT_VAE}')
  path = ev.get('vae', '') or None
  lookup = DEFAULT_VAE if cfg == FILE_CONFIG else cfg
  try:
    path = weights.resolve_path(path, lookup)
  except weights.WeightsNotFoundError as e:
    raise ConfigError(f'evals.{name}.vae', ev.get('vae', ''),
                      'latent samples go through the VAE decoder before '
                      f'the feature net, and its weights are missing: '
                      f'{str(e).rstrip(".")}',
                      f'convert the weights as above, or set --config.evals.'
                      f'{name}.vae=/path/to/converted.npz') from None
  return path, None if cfg == FILE_CONFIG else cfg


def get_decoder(ev: ml_collections.ConfigDict, name: str = '<name>'):
  """The `vae.LatentDecoder` of `ev` (memoised per file and config)."""
  path, cfg = vae_options(ev, name)
  key = (path, cfg or FILE_CONFIG)
  if key not in _DECODERS:
    from onestep_bench import vae  # pylint: disable=g-import-not-at-top
    _DECODERS[key] = vae.load_decoder(path, cfg, output='uint8',
                                      batch_size=DECODE_BATCH)
  return _DECODERS[key]


def row_fields(decoder: Any, dataset: Any) -> dict[str, Any]:
  """The VAE's provenance plus the data's latent multiplier."""
  return {**decoder.row_fields(),
          'data_latent_scale': float(getattr(dataset, 'scale', 1.0))}


def decode_samples(samples: np.ndarray, dataset: Any,
                   decoder: Any) -> np.ndarray:
  """Generated latents (data space) -> uint8 images [N, H, W, 3]."""
  scale = float(getattr(dataset, 'scale', 1.0))
  return decoder(np.asarray(samples, np.float32) / scale)


def decode_stored(latents: np.ndarray, decoder: Any) -> np.ndarray:
  """Stored latents (a dataset split, VAE-scaled) -> uint8 images."""
  return decoder(np.asarray(latents, np.float32))
