"""The Stable Diffusion VAE (kl-f8 `AutoencoderKL`) for latent ImageNet-256.

Modules, one job each:
  autoencoder_kl  the Flax nnx port and `VAEConfig` (presets SD_VAE_FT_EMA,
                  SD_VAE_FT_MSE; `tiny_config()` for tests)
  weights         the converted `.npz`: lookup, save / load, sha256
  convert         diffusers safetensors -> `.npz` (CLI
                  `python -m onestep_bench.vae.convert --src=... --out=...`)
  api             `VAE` (pure encode / decode with the latent scale),
                  `load_vae`, `load_decoder` (the evaluator's hook)
  records         the ArrayRecord latent format of
                  `onestep_bench.data.prepare_latents`

The evaluator's hook:

  decode = load_decoder(path_or_None, 'sd-vae-ft-ema')
  images = decode(latents)   # scaled NHWC latents -> uint8 [N, 256, 256, 3]
  row.update(decode.row_fields())
  # {'vae': 'sd-vae-ft-ema', 'vae_sha256': <16 hex>, 'latent_scale':
  #  0.18215, 'latent_shift': 0.0}

See docs/vae.md.
"""

from onestep_bench.vae.api import (
    VAE,
    LatentDecoder,
    load_decoder,
    load_vae,
    to_uint8,
)
from onestep_bench.vae.autoencoder_kl import (
    PRESETS,
    SD_VAE_FT_EMA,
    SD_VAE_FT_MSE,
    AutoencoderKL,
    VAEConfig,
    build,
    tiny_config,
)
from onestep_bench.vae.weights import WeightsError, WeightsNotFoundError

__all__ = [
    'PRESETS', 'SD_VAE_FT_EMA', 'SD_VAE_FT_MSE', 'VAE', 'AutoencoderKL',
    'LatentDecoder', 'VAEConfig', 'WeightsError', 'WeightsNotFoundError',
    'build', 'load_decoder', 'load_vae', 'tiny_config', 'to_uint8',
]
