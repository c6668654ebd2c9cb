"""SD VAE port: config, weights files, converter, parity, round trip.

Parity tests build diffusers' own `AutoencoderKL` on random weights (norm
scales and all biases perturbed, so swapped or dropped tensors show),
save its state_dict as a safetensors file and go through the converter's
CLI, as the published file would. The fast one uses the tiny config
(widths (32, 64)); the real SD-VAE config at 256×256 is @slow.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest

from onestep_bench import vae
from onestep_bench.config_check import ConfigError
from onestep_bench.evaluators import torch_compat
from onestep_bench.vae import api, convert, weights

TINY = vae.tiny_config()
SIZE = 64  # tiny tests: 64×64 images -> 32×32×4 latents (f = 2)
_TINY_VAE = api.VAE(TINY, None)


@jax.jit
def _roundtrip(params, images):
  """Scaled posterior (mean, std) and VAE.decode(mean), the hooks' code.

  One jitted function for the tiny tests (one compile, shared).
  """
  mean, std = _TINY_VAE.encode(params, images)
  return mean, std, _TINY_VAE.decode(params, mean)


@pytest.fixture(scope='module')
def tiny_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('vae') / 'tiny.npz')
  weights.save(weights.flatten(weights.random_params(TINY, seed=1)), TINY,
               path)
  return path


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  d = np.abs(a - b).max()
  return float(d), float(d / np.abs(b).max())


def _digits(n, size):
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  im = np.rint(load_digits().images[:n] * (255 / 16)).astype(np.uint8)
  k = size // 8
  return np.repeat(np.repeat(im, k, 1), k, 2)[..., None]  # [n, s, s, 1]


# ---------------------------------------------------------------- no torch


@pytest.mark.slow  # ~1 s CPU to build the full abstract model
def test_sd_vae_param_count_and_latent_shape():
  shapes = weights.param_shapes(vae.SD_VAE_FT_EMA)
  # diffusers' AutoencoderKL in the sd-vae-ft-ema config: 248 tensors,
  # 83,653,863 parameters (counted on the torch module).
  assert len(shapes) == 248
  assert sum(int(np.prod(s)) for s in shapes.values()) == 83_653_863
  assert shapes['encoder.conv_in.kernel'] == (3, 3, 3, 128)
  assert shapes['encoder.down_blocks.1.resnets.0.conv_shortcut.kernel'] == (
      1, 1, 128, 256)
  assert shapes['decoder.mid_block.attentions.0.to_out.0.kernel'] == (512,
                                                                      512)
  assert shapes['quant_conv.kernel'] == (1, 1, 8, 8)
  assert vae.SD_VAE_FT_EMA.latent_shape(256) == (32, 32, 4)
  assert vae.SD_VAE_FT_MSE.scaling_factor == 0.18215


def test_config_errors_name_the_key():
  with pytest.raises(ConfigError, match=r'vae\.norm_num_groups=8'):
    dataclasses.replace(TINY, block_out_channels=(36, 64)).validate()
  with pytest.raises(ConfigError, match=r'vae\.act_fn'):
    vae.VAEConfig.from_diffusers({'act_fn': 'gelu'}, 'x')
  with pytest.raises(ConfigError, match='unknown keys'):
    vae.VAEConfig.from_dict({'blocks': 3})
  with pytest.raises(ConfigError, match='vae.precision'):
    vae.build(TINY, precision='fp64')


def test_missing_weights_error_names_file_and_command(tmp_path, monkeypatch):
  missing = str(tmp_path / 'nope.npz')
  with pytest.raises(vae.WeightsNotFoundError) as e:
    vae.load_decoder(missing, 'sd-vae-ft-mse')
  msg = str(e.value)
  assert missing in msg and 'python -m onestep_bench.vae.convert' in msg
  assert 'stabilityai/sd-vae-ft-mse' in msg
  monkeypatch.delenv(weights.WEIGHTS_ENV, raising=False)
  monkeypatch.setenv('ONESTEP_CACHE', str(tmp_path))
  with pytest.raises(vae.WeightsNotFoundError, match='vae/sd-vae-ft-ema.npz'):
    vae.load_vae()


def test_weights_file_roundtrip_deterministic_and_checked(tiny_file,
                                                          tmp_path):
  v = vae.load_vae(tiny_file)
  assert v.config == TINY and len(v.sha256) == 64
  again = str(tmp_path / 'again.npz')
  flat = weights.flatten(v.params)
  assert weights.save(flat, TINY, again) == v.sha256  # same bytes
  with pytest.raises(weights.WeightsError, match='layers_per_block'):
    vae.load_vae(tiny_file, dataclasses.replace(TINY, layers_per_block=2))
  del flat['decoder.conv_out.bias']
  with pytest.raises(weights.WeightsError, match='decoder.conv_out.bias'):
    weights.save(flat, TINY, again)


def test_digits_roundtrip_tiny_end_to_end(tiny_file):
  """Digits at 64×64 -> latents -> uint8 images through the decode hook."""
  images = np.repeat(_digits(2, SIZE), 3, axis=-1)
  v = vae.load_vae(tiny_file)
  mean, std, decoded = _roundtrip(v.params, images)
  assert mean.shape == std.shape == (2, *TINY.latent_shape(SIZE))
  assert np.all(np.isfinite(mean)) and np.all(np.asarray(std) > 0)
  decode = vae.load_decoder(tiny_file, batch_size=2)  # 8 devices: 1 batch
  out = decode(mean)
  assert out.dtype == np.uint8 and out.shape == (2, SIZE, SIZE, 3)
  assert len(np.unique(out)) > 100  # not a constant / saturated image
  # The hook (sharded, padded batch) == VAE.decode then DiT's rounding.
  diff = np.abs(out.astype(int) - np.asarray(api.to_uint8(decoded)))
  assert diff.max() <= 1 and diff.mean() < 1e-3
  assert decode.row_fields() == {'vae': 'tiny-vae',
                                 'vae_sha256': v.sha256[:16],
                                 'latent_scale': 0.18215,
                                 'latent_shift': 0.0}


def test_gray_images_are_tiled_to_rgb():
  gray = np.arange(6, dtype=np.uint8).reshape(1, 2, 3, 1) * 50
  x = np.asarray(api.images_to_input(gray))
  assert x.shape == (1, 2, 3, 3) and np.all(x == x[..., :1])
  np.testing.assert_allclose(x[0, 0, :, 0], [-1, 50 / 127.5 - 1,
                                             100 / 127.5 - 1], rtol=1e-6)


def test_to_uint8_is_dits_rule():
  x = np.asarray([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0], np.float32)
  # DiT sample_ddp.py: clamp(127.5 x + 128, 0, 255).to(uint8) (truncation).
  np.testing.assert_array_equal(np.asarray(api.to_uint8(x)),
                                [0, 0, 64, 128, 255, 255, 255])


# ------------------------------------------------------- parity (diffusers)


def _diffusers():
  pytest.importorskip('torch')
  pytest.importorskip('diffusers')
  pytest.importorskip('safetensors')
  try:
    torch_compat.import_torchvision()  # diffusers imports torchvision
  except ImportError:
    pytest.skip('torchvision is not installed')
  from diffusers.models import AutoencoderKL  # pylint: disable=g-import-not-at-top
  return AutoencoderKL


def _torch_vae(config, seed=0):
  import torch  # pylint: disable=g-import-not-at-top
  n = len(config.block_out_channels)
  torch.manual_seed(seed)
  m = _diffusers()(
      block_out_channels=config.block_out_channels,
      down_block_types=('DownEncoderBlock2D',) * n,
      up_block_types=('UpDecoderBlock2D',) * n,
      layers_per_block=config.layers_per_block,
      norm_num_groups=config.norm_num_groups,
      latent_channels=config.latent_channels).eval()
  with torch.no_grad():
    for p in m.parameters():
      if p.ndim == 1:  # norm scales (around 1) and biases (around 0)
        p.add_(0.1 * torch.randn_like(p))
  return m


def _check_parity(config, images, tmp_path, tol=1e-4):
  """Converts a random diffusers VAE via the CLI; compares moments + decode.

  Our side runs the hooks' own code: `VAE.encode` (uint8 in, scaled
  moments out) and `VAE.decode` on the scaled mean (the scale undone
  inside), i.e. what `LatentDecoder` clips / rounds.
  """
  import json  # pylint: disable=g-import-not-at-top

  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  m = _torch_vae(config)
  assert sum(int(np.prod(s)) for s in weights.param_shapes(config).values()
             ) == sum(p.numel() for p in m.parameters())
  src, out = str(tmp_path / 'vae.safetensors'), str(tmp_path / 'vae.npz')
  save_file(m.state_dict(), src)
  cfg_json = str(tmp_path / 'config.json')
  with open(cfg_json, 'w') as f:
    json.dump(dict(m.config), f)
  assert convert.main([f'--src={src}', f'--out={out}', f'--config={cfg_json}',
                       f'--name={config.name}']) == 0
  assert open(f'{out}.sha256').read().split()[0] == weights.file_sha256(out)
  x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1).permute(
      0, 3, 1, 2)
  with torch.no_grad():
    post = m.encode(x).latent_dist
    ref_mean = post.mean.permute(0, 2, 3, 1).numpy()
    ref_std = post.std.permute(0, 2, 3, 1).numpy()
    ref_img = m.decode(post.mean).sample.permute(0, 2, 3, 1).numpy()

  v = vae.load_vae(out, config)
  assert v.config == config
  if config == TINY:
    mean, std, img = _roundtrip(v.params, images)
  else:
    def ours(params, images):
      mean, std = v.encode(params, images)
      return mean, std, v.decode(params, mean)
    mean, std, img = jax.jit(ours)(v.params, images)
  s = config.scaling_factor
  figures = {'mean': _rel(np.asarray(mean) / s, ref_mean),
             'std': _rel(np.asarray(std) / s, ref_std),
             'decoded': _rel(img, ref_img)}
  print({k: f'max abs {a:.2e}, rel {r:.2e}' for k, (a, r) in
         figures.items()})
  assert all(r <= tol for _, r in figures.values()), figures
  return m


@pytest.mark.parity
def test_parity_with_diffusers_tiny(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3),
                                             np.uint8)
  m = _check_parity(TINY, images, tmp_path)
  # The 2022 uploads' attention names convert to the same params.
  legacy = {}
  for k, t in m.state_dict().items():
    for new, old in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'),
                     ('to_out.0', 'proj_attn')):
      k = k.replace(f'attentions.0.{new}.', f'attentions.0.{old}.')
    legacy[k] = t.numpy()
  a = convert.convert_state_dict(legacy, TINY)
  b = convert.convert_state_dict(
      {k: t.numpy() for k, t in m.state_dict().items()}, TINY)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parity
def test_parity_with_diffusers_sd_vae_256(tmp_path):
  """The real sd-vae-ft-ema architecture at 256×256 (1 image: CPU time)."""
  images = np.random.default_rng(1).integers(0, 256, (1, 256, 256, 3),
                                             np.uint8)
  _check_parity(vae.SD_VAE_FT_EMA, images, tmp_path)


@pytest.mark.slow
def test_digits_roundtrip_sd_vae_256(tmp_path):
  """Full SD-VAE config (random weights), 2 digits at 256×256, end to end."""
  path = str(tmp_path / 'sd.npz')
  cfg = vae.SD_VAE_FT_EMA
  weights.save(weights.flatten(weights.random_params(cfg)), cfg, path)
  v = vae.load_vae(path)
  mean, _ = jax.jit(v.encode)(v.params, _digits(2, 256))
  assert mean.shape == (2, 32, 32, 4)
  one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1),
                          ('data', 'fsdp'))  # no padding to 8 devices
  out = vae.load_decoder(path, batch_size=2, mesh=one)(mean)
  assert out.shape == (2, 256, 256, 3) and out.dtype == np.uint8
  assert os.path.getsize(path) > 4 * 83_000_000
