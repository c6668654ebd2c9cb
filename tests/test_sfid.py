"""sFID: ADM's spatial features from the Inception port, and their scoring.

ADM's evaluator (openai/guided-diffusion `evaluations/evaluator.py`) takes
`mixed_6/conv:0`[..., :7] of the TF graph, flattened: the output of
pytorch-fid's `Mixed_6d.branch1x1` (BasicConv2d, after its ReLU), first 7
channels (`inception_net` docstring has the name mapping). Parity of that
layer with pytorch-fid's own network on identical random weights is part of
`tests/test_inception.py::test_parity_with_pytorch_fid` (same 299 px
forward as the pool3 parity, no extra network run).
"""

from __future__ import annotations

import jax
import ml_collections as mlc
import numpy as np
import pytest
from conftest import stub_digits_classifier

from onestep_bench import data
from onestep_bench.evaluators import image_eval, image_metrics
from onestep_bench.evaluators import inception as inc


def test_spatial_features_are_2023_dims_at_299():
  params = jax.eval_shape(lambda: {k: np.zeros(s, np.float32) for k, s in
                                   inc.param_shapes().items()})
  out = jax.eval_shape(inc.forward, params,
                       jax.ShapeDtypeStruct((2, 299, 299, 3), np.float32))
  assert out['spatial'].shape == (2, inc.SPATIAL_DIM) == (2, 2023)
  assert out['pool3'].shape == (2, 2048)


class _Spatial:
  """Stand-in Inception: pixels as pool3, a pixel subset as 'spatial'."""

  weights_sha256 = 'pixels'
  has_spatial = True

  def __call__(self, images):
    f = images.reshape(len(images), -1).astype(np.float64) / 255.0
    return {'features': f, 'logits': np.zeros((len(images), 10)),
            'spatial': f[:, ::2].astype(np.float32)}


def test_sfid_is_scored_and_cached_beside_fid(tmp_path, monkeypatch):
  monkeypatch.setenv('ONESTEP_CACHE', str(tmp_path))
  stub_digits_classifier(monkeypatch, _Spatial())
  ds = data.build(mlc.ConfigDict({'name': 'digits'}))
  ev = mlc.ConfigDict(dict(feature_net='auto', ref_n=300, fid_bootstrap=0,
                           fd_dinov2='off'))
  real = ds.split_images('test')[0]
  x = real.astype(np.float32) / 127.5 - 1
  out = image_eval.score_images(x, ds, ev, seed=0)
  ref = image_eval.reference_stats(ds, _Spatial(), 'classifier:digits',
                                   'train', 300)
  mu, sigma = image_metrics.gaussian_stats(_Spatial()(real)['spatial'])
  assert out['sfid'] == pytest.approx(image_metrics.frechet_distance(
      mu, sigma, ref['mu_s'], ref['sigma_s']), rel=1e-9)
  noise = image_eval.score_images(np.random.RandomState(0).uniform(
      -1, 1, x.shape), ds, ev, seed=0)
  assert out['sfid'] < 0.2 * noise['sfid']
  # An entry written without sFID statistics is recomputed, same key.
  with np.load(ref['path']) as z:
    old = {k: z[k] for k in z.files if k not in ('mu_s', 'sigma_s')}
  np.savez(ref['path'], **old)
  again = image_eval.reference_stats(ds, _Spatial(), 'classifier:digits',
                                     'train', 300)
  assert again['path'] == ref['path'] and 'mu_s' in again
  np.testing.assert_array_equal(again['sigma_s'], ref['sigma_s'])
