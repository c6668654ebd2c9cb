"""DINOv2 port: resize matrices, converter, weights files, parity, FD wiring.

Parity tests (`-m parity`) compare with transformers' `Dinov2Model` on
identical random weights: a 2-block, width-64, patch-14 net pretrained at
518 px (a 37 x 37 position grid, interpolated to 16 x 16 at 224 px) in the
fast suite, the real ViT-L/14 config under `slow`. Nothing is downloaded.
"""

from __future__ import annotations

import json

import jax
import ml_collections as mlc
import numpy as np
import pytest
from conftest import stub_digits_classifier

from onestep_bench import data
from onestep_bench.config_check import ConfigError
from onestep_bench.evaluators import (
  convert_dinov2,
  image_eval,
  resize,
  torch_compat,
)
from onestep_bench.evaluators import dinov2 as dv

TINY = dv.Arch(width=64, depth=2, num_heads=4, mlp=256, patch=14, grid=37)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _images(n, h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), np.uint8)


@pytest.fixture(scope='module')
def tiny_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('dinov2') / 'tiny.npz')
  dv.save_params(dv.random_params(TINY, 0), path, TINY, {'source': 'test'})
  return path


@pytest.fixture(scope='module')
def tiny_ext(tiny_file):
  """One extractor (one compile: batches of 4 uint8 8x8 images)."""
  return dv.DinoV2Extractor(tiny_file, batch_size=4)


# ---------------------------------------------------------------------------
# No torch.


def test_vitl14_shapes_and_names():
  shapes = dv.param_shapes(dv.VITL14)
  # 304.37M: the published ViT-L/14 size (transformers also counts the
  # 1024-d mask token, used only in training).
  assert sum(int(np.prod(s)) for s in shapes.values()) == 304_367_616
  assert shapes['pos_embed'] == (1 + 37 * 37, 1024)
  assert shapes['patch_embed.kernel'] == (14 * 14 * 3, 1024)
  assert dv.arch_name(dv.VITL14) == 'dinov2_vitl14'
  assert dv.arch_name(TINY) != 'dinov2_vitl14'


def test_resize_matrices_properties():
  for n_in, n_out in ((32, 224), (256, 224), (37, 16)):
    for m in (resize.bicubic_aa_matrix(n_in, n_out),
              resize.bicubic_matrix(n_in, n_out),
              resize.bicubic_matrix(n_in, n_out, scale_factor=16.1 / 37)):
      assert m.shape == (n_out, n_in)
      np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(resize.bicubic_aa_matrix(224, 224),
                                np.eye(224, dtype=np.float32))
  g = np.random.default_rng(0).standard_normal((1 + 37 * 37, 8))
  assert _rel_err(dv.interpolate_pos_embed(g, 16, 'hub'),
                  dv.interpolate_pos_embed(g, 16, 'transformers')) > 1e-3
  np.testing.assert_array_equal(dv.interpolate_pos_embed(g, 37), g.astype(
      np.float32))


def test_weights_files_and_missing_message(tiny_file, tiny_ext, tmp_path,
                                          monkeypatch):
  params, arch = dv.load_params(tiny_file)
  assert arch == TINY and params.keys() == dv.param_shapes(TINY).keys()
  ext = tiny_ext
  assert ext.feature_net == f'{dv.arch_name(TINY)}/hub/unverified'
  monkeypatch.setattr(dv, 'OFFICIAL_NPZ_SHA256',
                      dv.weights_io.file_sha256(tiny_file))
  assert ext.feature_net == f'{dv.arch_name(TINY)}/hub'
  out = ext(_images(6, 8, 8))['features']  # batches [0..3], [4, 5, pad]
  assert out.shape == (6, 64) and out.dtype == np.float64
  single = ext(_images(6, 8, 8)[5:])['features']
  assert _rel_err(out[5], single[0]) < 1e-5
  assert _rel_err(out[0], out[1]) > 1e-3
  with pytest.raises(TypeError, match='uint8'):
    ext(_images(1, 8, 8).astype(np.float32))
  # Missing weights: one error naming the file, the source, the converter.
  monkeypatch.delenv(dv.WEIGHTS_ENV, raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))
  with pytest.raises(FileNotFoundError) as e:
    dv.DinoV2Extractor(str(tmp_path / 'nope.npz'))
  for part in ('nope.npz', 'convert_dinov2', dv.HF_URL, dv.WEIGHTS_ENV):
    assert part in str(e.value)
  assert not dv.weights_available()
  # No pickles, and the architecture record is required.
  bad = str(tmp_path / 'pickled.npz')
  np.savez(bad, x=np.array([{'a': 1}], dtype=object))
  with pytest.raises(ValueError, match='architecture|allow_pickle'):
    dv.load_params(bad)


def test_fd_dinov2_wiring(tiny_file, tiny_ext, tmp_path, monkeypatch):
  """Weights present: an extra record of its own space; absent: nothing."""
  monkeypatch.setenv('ONESTEP_CACHE', str(tmp_path))
  monkeypatch.setitem(image_eval._EXTRACTORS, ('dinov2', tiny_file, 'hub'),
                      tiny_ext)
  class Pix:  # stand-in primary net
    weights_sha256 = 'pixels'

    def __call__(self, images):
      f = images.reshape(len(images), -1).astype(np.float64) / 255.0
      return {'features': f, 'probs': np.full((len(images), 10), 0.1)}

  stub_digits_classifier(monkeypatch, Pix())
  ds = data.build(mlc.ConfigDict({'name': 'digits'}))
  x = ds.split_images('test')[0][:40].astype(np.float32) / 127.5 - 1
  base = dict(feature_net='auto', ref_n=40, fid_bootstrap=0)
  monkeypatch.setenv(dv.WEIGHTS_ENV, str(tmp_path / 'absent.npz'))
  out = image_eval.score_images(x, ds, mlc.ConfigDict(base), seed=0)
  assert 'extra_records' not in out and 'fd_dinov2' not in out
  with pytest.raises(ConfigError, match='evals.main.fd_dinov2.*convert'):
    image_eval.eval_settings(mlc.ConfigDict(dict(base, fd_dinov2='on')),
                             'main')
  with pytest.raises(ConfigError, match='evals.main.fd_dinov2'):
    image_eval.eval_settings(mlc.ConfigDict(dict(base, fd_dinov2='yes')),
                             'main')
  monkeypatch.setenv(dv.WEIGHTS_ENV, tiny_file)
  out = image_eval.score_images(x, ds, mlc.ConfigDict(base), seed=0)
  (rec,) = out['extra_records']
  assert rec['feature_net'] == f'{dv.arch_name(TINY)}/hub/unverified'
  assert rec['reference']['feature_net'] == rec['feature_net']
  assert rec['reference']['weights_sha256'] == (
      dv.weights_io.file_sha256(tiny_file)[:16])
  assert np.isfinite(rec['metrics']['fd_dinov2'])
  assert rec['settings'] == out['settings']  # eval_settings unchanged
  off = image_eval.score_images(x, ds, mlc.ConfigDict(dict(
      base, fd_dinov2='off')), seed=0)
  assert 'extra_records' not in off


def test_runner_writes_fd_dinov2_as_its_own_record(monkeypatch):
  """Same samples and cost, own feature space: never ranked with FID."""
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top

  from onestep_bench import leaderboard  # pylint: disable=g-import-not-at-top
  from onestep_bench.evaluators import runner  # pylint: disable=g-import-not-at-top
  cost = {'ms_per_sample': 1.5, 'flops_per_sample': 2.0, 'flops_exact': True}
  monkeypatch.setattr(runner, 'reference_forward', lambda *a: (
      runner.ReferenceForward(flops=1.0, params=1)))
  monkeypatch.setattr(runner, 'draw_samples', lambda *a, **k: (
      np.zeros((4, 8, 8, 1)), dict(cost)))
  monkeypatch.setattr(runner, 'feature_net', lambda ds, ev: 'inception_x')
  ref = lambda net: {'dataset': 'd', 'split': 'train', 'n': 4,
                     'feature_net': net, 'weights_sha256': net[:3],
                     'cache': '/c'}
  monkeypatch.setattr(runner, 'score', lambda *a: {
      'fid': 3.0, 'sfid': 4.0, 'reference': ref('inception_x'),
      'settings': {'quantize': 'round'},
      'extra_records': [{'metrics': {'fd_dinov2': 5.0},
                         'feature_net': 'dinov2_x',
                         'reference': ref('dinov2_x'),
                         'settings': {'quantize': 'round'}}]})
  method = SimpleNamespace(supported_nfe=(1,), config=SimpleNamespace(
      model=None))
  ds = SimpleNamespace(spec=SimpleNamespace(num_classes=0, kind='image',
                                            name='stub'))
  evals = mlc.ConfigDict({'main': {'nfe': (1,), 'n_samples': 4}})
  fid, fd = runner.evaluate(method, None, ds, evals, None, jax.random.key(0),
                            seed=0, save_samples=False)
  assert fid['metrics'] == {'fid': 3.0, 'sfid': 4.0}
  assert fd['metrics'] == {'fd_dinov2': 5.0}
  assert (fid['feature_net'], fd['feature_net']) == ('inception_x',
                                                     'dinov2_x')
  assert fid['feature_weights'] == 'inc' and fd['feature_weights'] == 'din'
  assert fid['ref_stats'] != fd['ref_stats']
  assert fd['eval_settings'] == fid['eval_settings'] == 'quantize=round'
  for k in ('eval', 'nfe', 'n_samples', *cost):
    assert fd[k] == fid[k], k
  rows = leaderboard.rows_from_summary({'evals': [fid, fd]})
  assert {(r['metric'], r['feature_net']) for r in rows} >= {
      ('fid_4', 'inception_x'), ('sfid_4', 'inception_x'),
      ('fd_dinov2_4', 'dinov2_x')}  # FID-type names carry the sample count


# ---------------------------------------------------------------------------
# Parity with torch / transformers (optional extra).


def _torch_model(torch, arch, seed=0):
  """transformers' Dinov2Model with every weight random (not the init)."""
  try:  # transformers imports torchvision, whose ops may not load
    torch_compat.import_torchvision()
  except ImportError:
    pass
  tf = pytest.importorskip('transformers')
  cfg = tf.Dinov2Config(
      hidden_size=arch.width, num_hidden_layers=arch.depth,
      num_attention_heads=arch.num_heads, mlp_ratio=arch.mlp // arch.width,
      patch_size=arch.patch, image_size=arch.patch * arch.grid,
      layer_norm_eps=dv.LN_EPS)
  cfg._attn_implementation = 'eager'  # pylint: disable=protected-access
  torch.manual_seed(seed)
  model = tf.Dinov2Model(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('lambda1'):
        p.uniform_(0.2, 1.0)
      elif 'norm' in name and name.endswith('weight'):
        p.uniform_(0.5, 1.5)
      elif name.endswith(('cls_token', 'position_embeddings')):
        p.normal_(0.0, 0.5)
      elif p.ndim >= 2:
        p.normal_(0.0, 1.0 / np.sqrt(np.prod(p.shape[1:])))
      else:
        p.normal_(0.0, 0.1)
  return model


def _hf_v4_names(sd):
  """transformers-5 names -> those of the Hub's model.safetensors."""
  ren = (('attention.q_proj', 'attention.attention.query'),
         ('attention.k_proj', 'attention.attention.key'),
         ('attention.v_proj', 'attention.attention.value'),
         ('attention.o_proj', 'attention.output.dense'))
  out = {}
  for k, v in sd.items():
    for a, b in ren:
      k = k.replace(a, b)
    out[k] = v
  return out


def _hub_names(sd, depth):
  """The same tensors in torch.hub's DinoVisionTransformer layout."""
  out = {'cls_token': sd['embeddings.cls_token'],
         'pos_embed': sd['embeddings.position_embeddings'],
         'mask_token': sd['embeddings.mask_token'],
         'patch_embed.proj.weight':
             sd['embeddings.patch_embeddings.projection.weight'],
         'patch_embed.proj.bias':
             sd['embeddings.patch_embeddings.projection.bias'],
         'norm.weight': sd['layernorm.weight'],
         'norm.bias': sd['layernorm.bias']}
  for i in range(depth):
    a, b = f'encoder.layer.{i}', f'blocks.{i}'
    for s in ('weight', 'bias'):
      out[f'{b}.attn.qkv.{s}'] = np.concatenate(
          [sd[f'{a}.attention.{x}_proj.{s}'] for x in 'qkv'])
      out[f'{b}.attn.proj.{s}'] = sd[f'{a}.attention.o_proj.{s}']
      for n in ('norm1', 'norm2', 'mlp.fc1', 'mlp.fc2'):
        out[f'{b}.{n}.{s}'] = sd[f'{a}.{n}.{s}']
    out[f'{b}.ls1.gamma'] = sd[f'{a}.layer_scale1.lambda1']
    out[f'{b}.ls2.gamma'] = sd[f'{a}.layer_scale2.lambda1']
  return out


def _hub_interpolation(torch, model, arch):
  """model's pos-embed resize replaced by the torch.hub code's (offset 0.1)."""
  emb = model.embeddings

  def interp(embeddings, height, width):
    pos = emb.position_embeddings
    g, d = arch.grid, pos.shape[-1]
    h0, w0 = height // arch.patch, width // arch.patch
    grid = pos[:, 1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(
        grid, mode='bicubic', antialias=False,
        scale_factor=((h0 + 0.1) / g, (w0 + 0.1) / g))
    assert tuple(grid.shape[-2:]) == (h0, w0)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(
        1, -1, d)], dim=1)
  emb.interpolate_pos_encoding = interp


def _edm2_preprocess(torch, images):
  """EDM2 DINOv2Detector (resize_mode='torch') preprocessing, NCHW float."""
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  x = torch.nn.functional.interpolate(x.float(), size=(224, 224),
                                      mode='bicubic', antialias=True) / 255
  mean = torch.tensor(dv.MEAN).reshape(1, -1, 1, 1)
  return (x - mean) / torch.tensor(dv.STD).reshape(1, -1, 1, 1)


def _parity(torch, arch, tmp_path, n_images):
  """(transformers-mode err, hub-mode err, end-to-end err) on random nets."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  model = _torch_model(torch, arch)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  src = tmp_path / 'model.safetensors'
  save_file(_hf_v4_names(sd), str(src))
  (tmp_path / 'config.json').write_text(json.dumps(
      {'num_attention_heads': arch.num_heads}))
  dst = str(tmp_path / 'dinov2.npz')
  assert convert_dinov2.main(['--src', str(src), '--dst', dst]) == 0
  params, got_arch = dv.load_params(dst)
  assert got_arch == arch
  hub, _ = convert_dinov2.convert_state_dict(_hub_names(sd, arch.depth),
                                             arch.num_heads)
  assert all(np.array_equal(hub[k], params[k]) for k in params)
  del hub  # ViT-L: 1.2 GB per copy
  x = np.random.default_rng(1).standard_normal(
      (n_images, 224, 224, 3)).astype(np.float32)
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  fwd = jax.jit(dv.forward, static_argnums=2)
  ours = {m: fwd(dv.prepare_params(params, arch, pos_interp=m), x, arch)
          for m in dv.POS_INTERP}
  errs = []
  for mode in ('transformers', 'hub'):
    if mode == 'hub':
      _hub_interpolation(torch, model, arch)
    with torch.no_grad():
      ref = model(pixel_values=xt).pooler_output.numpy()
    errs.append(_rel_err(ours[mode], ref))
  # The two interpolations are different feature spaces (the test can fail).
  assert _rel_err(ours['transformers'], ref) > 1e-3
  im = _images(n_images, 32, 32, seed=2)  # uint8 end to end
  with torch.no_grad():
    ref = model(pixel_values=_edm2_preprocess(torch, im)).pooler_output
  ours = fwd(dv.prepare_params(params, arch), dv.preprocess(im), arch)
  errs.append(_rel_err(ours, ref.numpy()))
  return errs


@pytest.mark.parity
def test_resize_matches_torch_interpolate():
  torch = pytest.importorskip('torch')
  f = torch.nn.functional
  rng = np.random.default_rng(0)
  for h in (8, 32, 256):  # up and down (antialiased) to 224
    im = rng.integers(0, 256, (2, h, h + 3, 3)).astype(np.float32)
    ref = f.interpolate(torch.from_numpy(im.transpose(0, 3, 1, 2)),
                        size=(224, 224), mode='bicubic', antialias=True)
    ours = resize.resize_nhwc(im, resize.bicubic_aa_matrix(h, 224),
                              resize.bicubic_aa_matrix(h + 3, 224))
    assert _rel_err(ours, ref.numpy().transpose(0, 2, 3, 1)) < 1e-6, h
  g = rng.standard_normal((1, 5, 37, 37)).astype(np.float32)
  for kw, sf in (({'size': (16, 16)}, None),
                 ({'scale_factor': (16.1 / 37,) * 2}, 16.1 / 37)):
    ref = f.interpolate(torch.from_numpy(g), mode='bicubic', **kw)[0]
    m = resize.bicubic_matrix(37, 16, scale_factor=sf)
    ours = resize.resize_grid(g[0].transpose(1, 2, 0), m, m)
    assert _rel_err(ours, ref.numpy().transpose(1, 2, 0)) < 1e-6, kw


@pytest.mark.parity
def test_parity_with_transformers_tiny(tmp_path):
  torch = pytest.importorskip('torch')
  e_tf, e_hub, e_e2e = _parity(torch, TINY, tmp_path, n_images=2)
  print(f'tiny DINOv2 CLS rel err: transformers pos-embed {e_tf:.2e}, hub '
        f'pos-embed {e_hub:.2e}, uint8 end to end (EDM2 resize) {e_e2e:.2e}')
  assert max(e_tf, e_hub, e_e2e) <= 1e-4


@pytest.mark.parity
@pytest.mark.slow
def test_parity_with_transformers_vitl14(tmp_path):
  torch = pytest.importorskip('torch')
  e_tf, e_hub, e_e2e = _parity(torch, dv.VITL14, tmp_path, n_images=1)
  print(f'ViT-L/14 CLS rel err: transformers pos-embed {e_tf:.2e}, hub '
        f'pos-embed {e_hub:.2e}, uint8 end to end {e_e2e:.2e}')
  assert max(e_tf, e_hub, e_e2e) <= 1e-4
