"""A loaded VAE: encode / decode in the latent scale, the data / eval hooks.

Encode (images -> scaled latents) and decode (scaled latents -> images),
jitted and split over devices.

Scaling (LDM, Rombach et al. 2022, §4.3.2 / App. D.1; diffusers'
`scaling_factor` / `shift_factor`): the diffusion model sees
z_scaled = scaling_factor · (z − shift_factor), z the unscaled VAE latent;
decoding undoes it, z = z_scaled / scaling_factor + shift_factor (SD VAE:
0.18215, no shift).

Images: the encoder takes uint8 NHWC in [0, 255] and feeds x / 127.5 − 1
(DiT's ToTensor + Normalize(0.5, 0.5)); the decoder's float output is
nominally [-1, 1]. `to_uint8` is DiT's `sample_ddp.py` rule,
clamp(127.5 x + 128, 0, 255) then truncation to uint8.

Batches are split over the process's local devices (a 1-D data mesh of
`jax.local_devices()`; params replicated): every process encodes / decodes
its own samples, no cross-process collectives.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from onestep_bench import sharding
from onestep_bench.vae import weights
from onestep_bench.vae.autoencoder_kl import VAEConfig, build

OUTPUTS = ('uint8', 'float')


def local_mesh() -> Mesh:
  """A ('data', 'fsdp') mesh of this process's devices, fsdp = 1."""
  return Mesh(np.asarray(jax.local_devices()).reshape(-1, 1),
              sharding.BATCH_AXES)


def to_uint8(x: jax.Array) -> jax.Array:
  """[-1, 1] floats -> uint8 (DiT: clamp(127.5 x + 128, 0, 255), floor)."""
  return jnp.clip(127.5 * x + 128.0, 0.0, 255.0).astype(jnp.uint8)


def images_to_input(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 in [-1, 1]; 1 channel is tiled to 3."""
  x = images.astype(jnp.float32) / 127.5 - 1.0
  return jnp.tile(x, (1, 1, 1, 3)) if x.shape[-1] == 1 else x


@dataclasses.dataclass(frozen=True)
class VAE:
  """A VAE with its weights: pure `encode` / `decode` + provenance.

  Attributes:
    config: the architecture (with scaling_factor / shift_factor).
    params: nested float32 params (numpy or device arrays).
    path: the weights file ('' for in-memory params).
    sha256: the weights file's full sha256 ('' for in-memory params).
    precision: matmul / conv precision ('highest' = fp32 parity).
  """

  config: VAEConfig
  params: Any
  path: str = ''
  sha256: str = ''
  precision: str = 'highest'

  @functools.cached_property
  def net(self):
    """The `models.Functional` of the architecture."""
    return build(self.config, self.precision)

  @property
  def shift(self) -> float:
    """shift_factor as a float (0 when None)."""
    return float(self.config.shift_factor or 0.0)

  def scale_latents(self, z: jax.Array) -> jax.Array:
    """Unscaled VAE latent -> the diffusion model's latent."""
    return self.config.scaling_factor * (z - self.shift)

  def unscale_latents(self, z: jax.Array) -> jax.Array:
    """The diffusion model's latent -> the VAE's (decoder input)."""
    return z / self.config.scaling_factor + self.shift

  def encode(self, params: Any, images: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
    """uint8 images [B, H, W, C] -> scaled posterior (mean, std), NHWC.

    std = exp(logvar / 2) · scaling_factor, so a posterior sample in the
    model's space is mean + std · ε (DiT's `latent_dist.sample() · 0.18215`).
    Pure: call inside jit.
    """
    mean, logvar = self.net.bind(params).encode(images_to_input(images))
    return (self.scale_latents(mean),
            jnp.exp(0.5 * logvar) * self.config.scaling_factor)

  def decode(self, params: Any, latents: jax.Array) -> jax.Array:
    """Scaled latents [B, h, w, c] -> float images [B, H, W, 3], ~[-1, 1]."""
    return self.net.bind(params).decode(self.unscale_latents(latents))

  def row_fields(self) -> dict[str, Any]:
    """What a result row / sidecar records about this VAE."""
    return {'vae': self.config.name, 'vae_sha256': self.sha256[:16],
            'latent_scale': self.config.scaling_factor,
            'latent_shift': self.shift}


def load_vae(path: str | None = None, config: VAEConfig | str | None = None,
             *, precision: str = 'highest') -> VAE:
  """A converted weights file as a `VAE`.

  Args:
    path: the `.npz`; None: $ONESTEP_VAE_WEIGHTS, else
      `<cache>/vae/<config name>.npz`.
    config: the expected architecture, a preset name, or None (the file's
      own; the default-path lookup then uses 'sd-vae-ft-ema').
    precision: 'highest' (fp32, parity with PyTorch) or 'default' (faster
      TF32 / bf16 passes on accelerators).

  Raises:
    weights.WeightsNotFoundError: no such file (names the conversion
      command).
    weights.WeightsError: the file does not match `config`.
  """
  if isinstance(config, str):
    config = weights.preset(config)
  name = config.name if config is not None else 'sd-vae-ft-ema'
  path = weights.resolve_path(path, name)
  params, file_config = weights.load(path, config)
  if config is not None:  # keep the caller's name, the file's numbers
    file_config = dataclasses.replace(file_config, name=config.name)
  return VAE(file_config, params, path, weights.file_sha256(path), precision)


class Batched:
  """A jitted `fn(params, x)` over fixed-size batches split on a mesh.

  `batched(x)` (numpy or jax, leading axis N) runs `fn` on batches of
  `batch_size` (rounded up to a multiple of the local device count), the
  last one zero-padded and the padding dropped; returns numpy pytrees.
  """

  def __init__(self, fn: Callable[[Any, jax.Array], Any], params: Any,
               batch_size: int, mesh: Mesh | None = None):
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
    self.mesh = mesh or local_mesh()
    n_dev = self.mesh.devices.size
    self.batch_size = -(-batch_size // n_dev) * n_dev
    rep = sharding.replicated(self.mesh)
    self._data = sharding.batch_sharded(self.mesh)
    self.params = jax.device_put(params, rep)
    self._fn = jax.jit(fn, in_shardings=(rep, self._data),
                       out_shardings=self._data)

  def run_batch(self, x: np.ndarray) -> Any:
    """One padded batch (len <= batch_size) -> numpy outputs of len(x)."""
    n = x.shape[0]
    if n < self.batch_size:
      pad = np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)
      x = np.concatenate([x, pad])
    out = self._fn(self.params, jax.device_put(x, self._data))
    return jax.tree.map(lambda a: np.asarray(a)[:n], out)

  def __call__(self, x: Any) -> Any:
    """`fn(params, x)` over all of x in batches (numpy outputs)."""
    x = np.asarray(x)
    outs = [self.run_batch(x[i:i + self.batch_size])
            for i in range(0, x.shape[0], self.batch_size)]
    if not outs:
      outs = [self.run_batch(x[:0])]
    return jax.tree.map(lambda *a: np.concatenate(a), *outs)


class LatentDecoder(Batched):
  """Scaled NHWC latents -> images; what the evaluator calls.

  `decoder(latents)` with latents [N, h, w, c] (float, the diffusion
  model's scaled space) returns uint8 [N, f·h, f·w, 3] (output='uint8') or
  float32 in [-1, 1] (output='float'), as numpy. `decoder.apply(params, z)`
  is the pure, jit-able version; `decoder.row_fields()` the provenance a
  result row records.
  """

  def __init__(self, vae: VAE, output: str = 'uint8', batch_size: int = 64,
               mesh: Mesh | None = None):
    if output not in OUTPUTS:
      raise ValueError(f'output={output!r}: must be one of {OUTPUTS}.')
    self.vae, self.output = vae, output
    super().__init__(self.apply, vae.params, batch_size, mesh)

  def apply(self, params: Any, latents: jax.Array) -> jax.Array:
    """Pure decode of scaled latents to `output` images (jit-able)."""
    x = self.vae.decode(params, latents.astype(jnp.float32))
    return to_uint8(x) if self.output == 'uint8' else jnp.clip(x, -1, 1)

  def row_fields(self) -> dict[str, Any]:
    """{'vae', 'vae_sha256' (16 hex), 'latent_scale', 'latent_shift'}."""
    return self.vae.row_fields()


def load_decoder(path: str | None = None,
                 config: VAEConfig | str | None = None, *,
                 output: str = 'uint8', batch_size: int = 64,
                 precision: str = 'highest',
                 mesh: Mesh | None = None) -> LatentDecoder:
  """The decode hook: `load_vae(path, config)` as a `LatentDecoder`.

  `mesh`: the ('data', 'fsdp') mesh batches are split over (default: this
  process's devices, `local_mesh()`).
  """
  return LatentDecoder(load_vae(path, config, precision=precision), output,
                       batch_size, mesh)
