"""FID Inception port: shapes, batching, resize modes, weights, parity.

The Inception runs ~6 GFLOP per 299x299 image, so the CPU tests use a few
images only (and 75x75 inputs where the net need not see 299x299).

The `parity` test needs torch + pytorch-fid (`pip install -e '.[parity]'`)
and compares with pytorch-fid's own network on random weights (no download).
"""

from __future__ import annotations

import jax
import ml_collections as mlc
import numpy as np
import pytest

from onestep_bench import data
from onestep_bench.evaluators import convert_inception, image_eval, torch_compat
from onestep_bench.evaluators import inception as inc

# ---------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope='module')
def params():
  return inc.random_params(jax.random.key(0))


@pytest.fixture(scope='module')
def folded(params):
  return inc.fold_batchnorm(params)


@pytest.fixture(scope='module')
def weights_file(params, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('inception') / 'random_inception.npz')
  inc.save_params(params, path)
  return path


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _images(n, h, w, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), np.uint8)


# ---------------------------------------------------------------------------
# Params, conversion, weights files (no torch).


def test_param_shapes_match_pytorch_fid_inception():
  shapes = inc.param_shapes()
  # 94 BasicConv2d (conv weight + 4 BN tensors each) + fc weight and bias.
  assert len(inc.CONV_SPECS) == 94 and len(shapes) == 94 * 5 + 2
  assert sum(int(np.prod(s)) for s in shapes.values()) == 23_885_392
  assert shapes['Conv2d_1a_3x3.conv.weight'] == (3, 3, 3, 32)
  assert shapes['Mixed_5b.branch_pool.conv.weight'] == (1, 1, 192, 32)
  assert shapes['Mixed_6e.branch7x7_2.conv.weight'] == (1, 7, 192, 192)
  assert shapes['Mixed_7c.branch3x3dbl_3b.conv.weight'] == (3, 1, 384, 384)
  assert shapes['Mixed_7c.branch_pool.bn.running_var'] == (192,)
  assert shapes['fc.weight'] == (2048, 1008)


def test_convert_state_dict_roundtrip_and_errors(params):
  torch_sd = {}
  for k, v in params.items():
    if v.ndim == 4:
      v = v.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif k == 'fc.weight':
      v = v.T
    torch_sd[k] = v
    if k.endswith('bn.running_var'):
      torch_sd[k.replace('running_var', 'num_batches_tracked')] = np.int64(0)
  out = convert_inception.convert_state_dict(torch_sd)
  assert out.keys() == params.keys()
  for k in params:
    np.testing.assert_array_equal(out[k], params[k])
  bad = dict(torch_sd, **{'Mixed_5b.extra.weight': np.zeros(3)})
  with pytest.raises(ValueError, match='unexpected.*Mixed_5b.extra.weight'):
    convert_inception.convert_state_dict(bad)
  bad = dict(torch_sd)
  bad['fc.bias'] = np.zeros(1000, np.float32)
  del bad['fc.weight']
  with pytest.raises(ValueError, match=r'missing: \[fc.weight\].*fc.bias'):
    convert_inception.convert_state_dict(bad)


def test_converter_rejects_unverified_checkpoint(tmp_path):
  src = tmp_path / 'pt_inception-2015-12-05-6726825d.pth'
  src.write_bytes(b'not the pytorch-fid checkpoint')
  with pytest.raises(ValueError, match='6726825d'):
    convert_inception.main(['--src', str(src), '--dst',
                            str(tmp_path / 'x.npz')])


def _torch_state_dict(params):
  """Our params back in pytorch-fid's layout (OIHW convs, [1008, 2048] fc)."""
  return {k: v.transpose(3, 2, 0, 1) if v.ndim == 4 else
          (v.T if k == 'fc.weight' else v) for k, v in params.items()}


def test_weights_provenance_is_stored_and_labels_rows(params, tmp_path,
                                                      monkeypatch):
  unverified, verified = str(tmp_path / 'u.npz'), str(tmp_path / 'v.npz')
  inc.save_params(params, unverified)  # default: unverified
  inc.save_params(params, verified, verified=True,
                  source_sha256=inc.TORCH_WEIGHTS_SHA256)
  assert inc.load_meta(verified) == {
      'verified': True, 'source_sha256': inc.TORCH_WEIGHTS_SHA256}
  assert not inc.weights_verified(unverified) and inc.weights_verified(
      verified)
  assert inc.load_params(verified).keys() == params.keys()  # meta skipped
  # Deterministic bytes, whatever the input order: one official sha256.
  again = str(tmp_path / 'v2.npz')
  inc.save_params(dict(reversed(list(params.items()))), again, verified=True,
                  source_sha256=inc.TORCH_WEIGHTS_SHA256)
  assert inc.file_sha256(again) == inc.file_sha256(verified)
  # A file written before the provenance record: unverified.
  legacy = str(tmp_path / 'legacy.npz')
  np.savez(legacy, **params)
  assert inc.load_meta(legacy) == {} and not inc.weights_verified(legacy)
  # The resolved feature-net name of every row says so.
  ds = data.build(mlc.ConfigDict({'name': 'digits'}))
  for path, want in ((unverified, 'inception_v3/pytorch_fid/unverified'),
                     (legacy, 'inception_v3/pytorch_fid/unverified'),
                     (verified, 'inception_v3/pytorch_fid')):
    ev = mlc.ConfigDict(dict(feature_net='inception_v3',
                             preprocess='pytorch_fid', inception_weights=path))
    assert image_eval.feature_net_name(ds, ev) == want
  # Once the official output hash is recorded, a mislabelled file is refused.
  monkeypatch.setattr(inc, 'OFFICIAL_NPZ_SHA256', '0' * 64)
  with pytest.raises(ValueError, match='official'):
    inc.weights_verified(verified)
  monkeypatch.setattr(inc, 'OFFICIAL_NPZ_SHA256', inc.file_sha256(verified))
  assert inc.weights_verified(verified)


def test_converter_records_verification(params, tmp_path, monkeypatch,
                                        capsys):
  torch = pytest.importorskip('torch')
  pth = str(tmp_path / 'random.pth')
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v))
              for k, v in _torch_state_dict(params).items()}, pth)
  dst = str(tmp_path / 'out.npz')
  assert convert_inception.main(['--src', pth, '--dst', dst,
                                 '--allow_unverified']) == 0
  assert inc.load_meta(dst) == {'verified': False,
                                'source_sha256': inc.file_sha256(pth)}
  # The source check is on the full sha256, not only the name's prefix.
  monkeypatch.setattr(inc, 'TORCH_WEIGHTS_SHA256', inc.file_sha256(pth))
  assert convert_inception.main(['--src', pth, '--dst', dst]) == 0
  assert inc.weights_verified(dst)
  assert 'OFFICIAL_NPZ_SHA256' in capsys.readouterr().out


def test_load_params_refuses_pickles(tmp_path):
  path = str(tmp_path / 'pickled.npz')
  np.savez(path, **{'fc.weight': np.array([{'a': 1}], dtype=object)})
  with pytest.raises(ValueError, match='allow_pickle'):
    inc.load_params(path)


def test_missing_weights_message(tmp_path, monkeypatch):
  monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))  # default ~/.cache/... missing
  for arg in (None, str(tmp_path / 'nope.npz')):
    with pytest.raises(FileNotFoundError, match='convert_inception') as e:
      inc.InceptionExtractor(arg)
    assert inc.TORCH_WEIGHTS_URL in str(e.value)
    assert inc.WEIGHTS_ENV in str(e.value)
  monkeypatch.setenv(inc.WEIGHTS_ENV, str(tmp_path / 'env.npz'))
  with pytest.raises(FileNotFoundError, match='env.npz'):
    inc.resolve_weights_path()


def test_weights_path_resolution_order(weights_file, tmp_path, monkeypatch):
  monkeypatch.setenv(inc.WEIGHTS_ENV, weights_file)
  assert inc.resolve_weights_path() == weights_file
  with pytest.raises(FileNotFoundError):  # explicit beats env
    inc.resolve_weights_path(str(tmp_path / 'missing.npz'))


# ---------------------------------------------------------------------------
# Network (random weights, no torch).


def test_apply_shapes_folded_equals_unfolded(params, folded):
  x = jax.random.uniform(jax.random.key(1), (2, 75, 75, 3), minval=-1.0,
                         maxval=1.0)
  fn = jax.jit(inc.apply)
  pool3, logits = fn(folded, x)
  assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
  assert pool3.dtype == np.float32 and logits.dtype == np.float32
  assert np.all(np.isfinite(pool3)) and np.all(np.isfinite(logits))
  assert float(np.std(pool3)) > 1e-3  # not collapsed
  pool3_u, logits_u = fn(params, x)
  assert _rel_err(pool3_u, pool3) < 1e-5
  assert _rel_err(logits_u, logits) < 1e-5
  # Bias-free logits.
  np.testing.assert_allclose(
      logits, np.asarray(pool3, np.float64) @ params['fc.weight'],
      rtol=1e-4, atol=1e-5 * float(np.abs(logits).max()))


def test_extractor_partial_batch_and_batch_independence(folded,
                                                        weights_file):
  ext = inc.InceptionExtractor(weights_file, batch_size=2)
  assert ext.name == 'inception_v3' and ext.mode == 'legacy_tf'
  assert not ext.verified  # random weights
  assert ext.feature_net == 'inception_v3/legacy_tf/unverified'
  assert ext.weights_sha256 == inc.file_sha256(weights_file)[:16]
  images = _images(3, 16, 16)
  out = ext(images)  # batches [0, 1] and [2, pad]
  assert out['features'].shape == (3, 2048)
  assert out['logits'].shape == (3, 1008)
  assert out['features'].dtype == np.float64
  assert out['spatial'].shape == (3, inc.SPATIAL_DIM)
  assert np.all(np.isfinite(out['features']))
  fn = jax.jit(lambda p, im: inc.apply(p, inc.preprocess(im, 'legacy_tf')))
  for i in range(3):  # each image alone
    f, lg = fn(jax.device_put(folded), images[i:i + 1])
    assert _rel_err(out['features'][i], f[0]) < 1e-5, i
    assert _rel_err(out['logits'][i], lg[0]) < 1e-5, i
  assert _rel_err(out['features'][0], out['features'][1]) > 1e-3
  with pytest.raises(TypeError, match='uint8'):
    ext(images.astype(np.float32))


# ---------------------------------------------------------------------------
# Preprocessing (no torch needed).


def _ref_resize(x, out_h, out_w, mode):
  """Per-pixel bilinear resize of x [H, W, C] (float64 interpolation).

  Sample positions are float32, as TF1 / torch's CPU kernel compute them:
    legacy_tf:   src = dst * (in / out)             (one float32 product)
    pytorch_fid: src = max((dst + 0.5) * (in / out) - 0.5, 0)   (one rounding)
  then y0 = floor(src), y1 = min(y0 + 1, in - 1), lerp with src - y0.
  """
  in_h, in_w = x.shape[:2]
  x = x.astype(np.float64)
  out = np.zeros((out_h, out_w, x.shape[2]))

  def src(d, n_in, n_out):
    scale = np.float32(n_in / n_out)
    if mode == 'legacy_tf':
      s = np.float32(d) * scale
    else:  # torch rounds scale * (d + 0.5) - 0.5 once (fused mul-add)
      s = max(np.float32(float(scale) * (d + 0.5) - 0.5), np.float32(0))
    y0 = min(int(np.floor(s)), n_in - 1)
    return y0, min(y0 + 1, n_in - 1), float(s) - y0

  cols = [src(j, in_w, out_w) for j in range(out_w)]
  for i in range(out_h):
    y0, y1, dy = src(i, in_h, out_h)
    for j, (x0, x1, dx) in enumerate(cols):
      top = x[y0, x0] + (x[y0, x1] - x[y0, x0]) * dx
      bot = x[y1, x0] + (x[y1, x1] - x[y1, x0]) * dx
      out[i, j] = top + (bot - top) * dy
  return out


@pytest.mark.parametrize('shape', [(8, 8), (28, 28), (13, 40)])
def test_legacy_tf_resize_matches_tf1_formula(shape):
  images = _images(1, *shape, seed=shape[0])
  got = np.asarray(inc.preprocess(images, 'legacy_tf'))[0] * 128.0 + 128.0
  ref = _ref_resize(images[0], 299, 299, 'legacy_tf')
  assert got.shape == (299, 299, 3)
  assert np.max(np.abs(got - ref)) <= 1e-4
  # TF1 (no half-pixel) and torch (half-pixel) bilinear are different maps.
  half = _ref_resize(images[0], 299, 299, 'pytorch_fid')
  assert np.max(np.abs(half - ref)) > 1.0


@pytest.mark.parametrize('shape', [(8, 8), (28, 28), (13, 40)])
def test_pytorch_fid_resize_matches_half_pixel_bilinear(shape):
  images = _images(2, *shape, seed=shape[1])
  got = (np.asarray(inc.preprocess(images, 'pytorch_fid')) + 1.0) / 2.0
  ref = _ref_resize(images[1], 299, 299, 'pytorch_fid') / 255.0
  assert np.max(np.abs(got[1] * 255.0 - ref * 255.0)) <= 1e-4
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  t = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255)
  t = torch.nn.functional.interpolate(t, size=(299, 299), mode='bilinear',
                                      align_corners=False)
  t = t.numpy().transpose(0, 2, 3, 1)
  assert np.max(np.abs(got - t)) * 255.0 <= 1e-4


def test_preprocess_identity_grayscale_and_dtype():
  images = _images(2, 299, 299)
  x = np.asarray(inc.preprocess(images, 'legacy_tf'))
  np.testing.assert_allclose(x, (images - 128.0) / 128.0, atol=1e-6)
  x = np.asarray(inc.preprocess(images, 'pytorch_fid'))
  np.testing.assert_allclose(x, images / 127.5 - 1.0, atol=1e-6)
  gray = _images(2, 10, 12, c=1)
  for mode in inc.MODES:
    np.testing.assert_array_equal(
        inc.preprocess(gray, mode),
        inc.preprocess(np.repeat(gray, 3, axis=-1), mode))
  with pytest.raises(TypeError, match='uint8'):
    inc.preprocess(images.astype(np.float32) / 255.0)
  with pytest.raises(ValueError, match='mode'):
    inc.preprocess(images, 'clean')


# ---------------------------------------------------------------------------
# Parity with pytorch-fid (optional extra: torch + pytorch-fid).



def _import_torchvision():
  pytest.importorskip('torch')
  try:
    return torch_compat.import_torchvision()
  except ImportError:
    pytest.skip('torchvision is not installed')


def _random_fid_inception(torch, pfi):
  """pytorch-fid's fid_inception_v3() on random, BN-calibrated weights."""
  torch.manual_seed(0)
  with torch_compat.random_fid_weights(pfi):
    net = pfi.fid_inception_v3()
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for bn in bns:
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.normal_(0.0, 0.2)
      bn.momentum = 1.0  # running stats := this batch's
    # Running stats := batch stats of 299x299 uniform noise. (Calibrating on
    # smooth upsampled images instead leaves channels whose BN amplifies
    # float32 rounding: torch f32 vs f64 then differ by ~3e-5 instead of
    # ~6e-7, and so do we.)
    x = torch.rand(6, 3, 299, 299, generator=torch.Generator().manual_seed(
        11)) * 2 - 1
    net.train()
    net(x)
    net.eval()
  for bn in bns:  # non-trivial running stats
    assert bn.running_var.min() > 0
    assert (bn.running_mean.abs().max() > 1e-3
            and (bn.running_var - 1).abs().max() > 1e-2)
  return net


@pytest.mark.parity
def test_parity_with_pytorch_fid(tmp_path, monkeypatch):
  torch = pytest.importorskip('torch')
  _import_torchvision()
  pfi = pytest.importorskip('pytorch_fid.inception')
  from pytorch_fid.fid_score import calculate_frechet_distance  # pylint: disable=g-import-not-at-top

  # A random FID Inception saved as a pytorch-fid checkpoint, then loaded by
  # pytorch-fid's own InceptionV3 through its own loading code.
  pth = str(tmp_path / 'random_inception.pth')
  torch.save(_random_fid_inception(torch, pfi).state_dict(), pth)
  monkeypatch.setattr(
      pfi, 'load_state_dict_from_url',
      lambda *a, **k: torch.load(pth, map_location='cpu', weights_only=True))
  model = pfi.InceptionV3([3], resize_input=False, normalize_input=False,
                          use_fid_inception=True).eval()
  fc_w = torch.load(pth, weights_only=True)['fc.weight'].numpy()
  # sFID: ADM's `mixed_6/conv:0`[..., :7] = Mixed_6d.branch1x1 (post-ReLU).
  mixed_6d = model.blocks[2][6]
  assert isinstance(mixed_6d, pfi.FIDInceptionC)
  spatial = []
  mixed_6d.branch1x1.register_forward_hook(
      lambda m, i, o: spatial.append(o.numpy().transpose(0, 2, 3, 1)))

  def torch_pool3(x_nchw):
    with torch.no_grad():
      return np.concatenate([
          model(torch.from_numpy(x_nchw[i:i + 16]))[0][:, :, 0, 0].numpy()
          for i in range(0, len(x_nchw), 16)]).astype(np.float64)

  npz = str(tmp_path / 'random_inception.npz')
  assert convert_inception.main(
      ['--src', pth, '--dst', npz, '--allow_unverified']) == 0

  # 1) Identical preprocessed 299x299 inputs: pool3, bias-free logits and
  # the sFID features (17 x 17 x 7, flattened in (h, w, c) order as ADM).
  x = np.asarray(inc.preprocess(_images(4, 16, 16, seed=3), 'pytorch_fid'))
  out = jax.jit(inc.forward)(inc.fold_batchnorm(inc.load_params(npz)), x)
  ref = torch_pool3(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  feat_err = _rel_err(out['pool3'], ref)
  logit_err = _rel_err(out['logits'], ref @ fc_w.T)
  ref_s = spatial[0][..., :inc.SPATIAL_CHANNELS].reshape(len(x), -1)
  spatial_err = _rel_err(out['spatial'], ref_s)
  print(f'pool3 rel err {feat_err:.2e}, logits rel err {logit_err:.2e}, '
        f'sFID features rel err {spatial_err:.2e}')
  assert out['spatial'].shape == (4, inc.SPATIAL_DIM) == (4, 2023)
  assert feat_err <= 1e-4 and logit_err <= 1e-4 and spatial_err <= 1e-4
  assert float(np.std(ref_s)) > 1e-3  # not a dead layer

  # 2) End to end from uint8 16x16 images: pytorch-fid's own resize and
  # normalization vs our extractor in pytorch_fid mode; FID with
  # pytorch-fid's calculate_frechet_distance on both feature sets.
  # 64 samples give a singular 2048-d covariance (sqrtm is then ill-posed),
  # so the FID is compared on a fixed random projection of the 2048 features
  # to 32 dims (full rank; every feature dim contributes).
  rng = np.random.default_rng(7)
  set_a = rng.integers(0, 256, (64, 16, 16, 3), np.uint8)
  set_b = np.clip(rng.normal(150, 40, (64, 16, 16, 3)), 0, 255).astype(
      np.uint8)
  model.resize_input, model.normalize_input = True, True
  ext = inc.InceptionExtractor(npz, mode='pytorch_fid', batch_size=32)
  feats = {}
  for name, im in (('a', set_a), ('b', set_b)):
    t = np.ascontiguousarray(im.transpose(0, 3, 1, 2), np.float32) / 255.0
    feats[name] = (torch_pool3(t), ext(im)['features'])
  e2e_err = max(_rel_err(ours, theirs) for theirs, ours in feats.values())

  proj = np.random.default_rng(0).standard_normal((2048, 32)) / np.sqrt(2048)

  def fid(fa, fb):
    fa, fb = fa @ proj, fb @ proj
    return calculate_frechet_distance(
        fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0),
        np.cov(fb, rowvar=False))

  fid_torch = fid(feats['a'][0], feats['b'][0])
  fid_ours = fid(feats['a'][1], feats['b'][1])
  fid_err = abs(fid_ours - fid_torch) / abs(fid_torch)
  print(f'end-to-end pool3 rel err {e2e_err:.2e}; FID (32-d projection) '
        f'torch {fid_torch:.6f} ours {fid_ours:.6f} rel err {fid_err:.2e}')
  assert e2e_err <= 1e-4
  assert fid_err <= 1e-3
