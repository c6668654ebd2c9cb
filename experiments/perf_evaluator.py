"""`make perf` section `evaluator`: FID Inception vs pytorch-fid, FID e2e.

From experiments/perf.py, `evaluator_section(perf)` (called by
`Perf.evaluator`, i.e. `--sections=evaluator`) adds its rows to the `Perf`
instance: the Flax FID Inception vs pytorch-fid's on the same batch, uint8
32x32 -> pool3 end to end with each side's own pipeline, and the bench's
classifier FID end to end. This module never imports experiments.perf at
run time (that module defines the absl flags; `Perf` is imported for the
annotations only); its timing helper `interleaved` comes from
experiments/perf_common.py. torch / pytorch-fid (the parity extra) are
imported lazily; without them the pytorch-fid rows say so.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import jax
import ml_collections
import numpy as np

from experiments.bench import get_config as bench_config
from experiments.perf_common import interleaved
from onestep_bench import data

if TYPE_CHECKING:  # only for the annotations: never defines the flags
  from experiments.perf import Perf


# ============================================================ evaluator
def _pytorch_fid_model(params: dict[str, np.ndarray] | None = None,
                       resize: bool = False):
  """pytorch-fid's FID InceptionV3 (pool3 output), or None without it.

  Random weights: torchvision's init, or `params` (the Flax port's layout,
  loaded into pytorch-fid's modules) so both networks compute the same
  function. `resize`: pytorch-fid's own resize to 299 and 2x - 1 scaling of
  [0, 1] inputs (what `pytorch_fid.fid_score` runs).
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top

    from onestep_bench.evaluators import torch_compat  # pylint: disable=g-import-not-at-top
    torch_compat.import_torchvision()
    from pytorch_fid import inception as pfi  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.manual_seed(0)
  if params is None:
    with torch_compat.random_fid_weights(pfi):
      return pfi.InceptionV3([3], resize_input=resize,  # pool3, as FID uses
                             normalize_input=resize).eval()
  sd = {k: torch.from_numpy(np.ascontiguousarray(
      v.transpose(3, 2, 0, 1) if v.ndim == 4 else
      (v.T if k == 'fc.weight' else v))) for k, v in params.items()}
  orig = pfi.load_state_dict_from_url
  pfi.load_state_dict_from_url = lambda *a, **k: sd  # its own loading code
  try:
    return pfi.InceptionV3([3], resize_input=resize,
                           normalize_input=resize).eval()
  finally:
    pfi.load_state_dict_from_url = orig


def evaluator_section(perf: Perf) -> None:
  """FID Inception speed vs pytorch-fid, then classifier FID end to end.

  Rows (section `evaluator`, interleaved rounds, median of `--repeats`):
    flax_images_per_s, pytorch_fid_images_per_s, flax_over_pytorch_fid:
      the network alone on the same preprocessed 299 px batch (target 1.0).
    e2e_flax_images_per_s, e2e_pytorch_fid_images_per_s,
    e2e_flax_over_pytorch_fid: uint8 32x32 images -> pool3, each with its
      own preprocessing and batching (ours: `InceptionExtractor`, one jit
      from uint8, `pytorch_fid` resize mode, its CPU batch; pytorch-fid:
      `F.interpolate` bilinear + 2x - 1 inside `InceptionV3`, its default
      batch of 50), the same random weights in both (target 1.5).
    fid_<n>_end_to_end_s: the bench's classifier FID + IS + P/R + KID.
  """
  _inception_network(perf)
  _inception_end_to_end(perf)
  _classifier_fid_end_to_end(perf)


def _inception_network(perf: Perf) -> None:
  from onestep_bench.evaluators import inception as inc  # pylint: disable=g-import-not-at-top
  batch, size = (2, 75) if perf.quick else (16, 299)
  x = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)
                                       ).astype(np.float32)
  params = jax.device_put(inc.prepare_params(inc.random_params(0)))
  flax_fn = jax.jit(inc.apply)
  fns = {'flax': lambda: flax_fn(params, x)}
  torch_model = _pytorch_fid_model()
  if torch_model is not None:
    import torch  # pylint: disable=g-import-not-at-top
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    def run_torch():
      with torch.no_grad():
        return torch_model(xt)[0].numpy()
    fns['pytorch_fid'] = run_torch
  tm = interleaved(fns, perf.repeats)
  perf.add('evaluator', 'inception', '', 'flax_images_per_s',
           batch / tm['flax'], 'img/s', detail=f'batch {batch}, {size}px')
  if 'pytorch_fid' in tm:
    import torch  # pylint: disable=g-import-not-at-top
    perf.add('evaluator', 'inception', '', 'pytorch_fid_images_per_s',
             batch / tm['pytorch_fid'], 'img/s',
             detail=f'torch {torch.__version__}, '
                    f'{torch.get_num_threads()} threads')
    perf.add('evaluator', 'inception', '', 'flax_over_pytorch_fid',
             tm['pytorch_fid'] / tm['flax'], 'ratio', target=1.0,
             higher_is_better=True)
  else:
    perf.add('evaluator', 'inception', '', 'flax_over_pytorch_fid', None,
             '', detail='torch/pytorch-fid not installed (make '
                        'install-parity)')


def _inception_end_to_end(perf: Perf) -> None:
  """uint8 32x32 -> pool3: the extractor vs pytorch-fid's own pipeline."""
  import tempfile  # pylint: disable=g-import-not-at-top

  from onestep_bench.evaluators import inception as inc  # pylint: disable=g-import-not-at-top
  n = 4 if perf.quick else 32
  images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3),
                                             np.uint8)
  params = inc.random_params(0)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, 'random_inception.npz')
    inc.save_params(params, path)
    ext = inc.InceptionExtractor(path, mode='pytorch_fid')
  fns = {'flax': lambda: ext(images)['features']}
  torch_model = _pytorch_fid_model(params, resize=True)
  if torch_model is not None:
    import torch  # pylint: disable=g-import-not-at-top

    def run_torch():  # pytorch-fid: ToTensor ([0, 1]), batches of 50
      out = []
      with torch.no_grad():
        for i in range(0, n, 50):
          x = torch.from_numpy(np.ascontiguousarray(
              images[i:i + 50].transpose(0, 3, 1, 2))).float() / 255.0
          out.append(torch_model(x)[0][:, :, 0, 0].numpy())
      return np.concatenate(out)
    fns['pytorch_fid'] = run_torch
  tm = interleaved(fns, perf.repeats)
  detail = f'{n} uint8 32x32 images, batch {ext.batch_size}'
  perf.add('evaluator', 'inception', '', 'e2e_flax_images_per_s',
           n / tm['flax'], 'img/s', detail=detail)
  if 'pytorch_fid' not in tm:
    perf.add('evaluator', 'inception', '', 'e2e_flax_over_pytorch_fid', None,
             '', detail='torch/pytorch-fid not installed (make '
                        'install-parity)')
    return
  ours, theirs = fns['flax'](), fns['pytorch_fid']()
  err = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
  perf.add('evaluator', 'inception', '', 'e2e_pytorch_fid_images_per_s',
           n / tm['pytorch_fid'], 'img/s', detail=f'{n} images, batch 50')
  perf.add('evaluator', 'inception', '', 'e2e_flax_over_pytorch_fid',
           tm['pytorch_fid'] / tm['flax'], 'ratio', target=1.5,
           higher_is_better=True,
           detail=f'same random weights, pool3 max rel diff {err:.1e}')


def _classifier_fid_end_to_end(perf: Perf) -> None:
  """Classifier-FID eval of 10k images (the bench's image scorer)."""
  from onestep_bench.evaluators import runner  # pylint: disable=g-import-not-at-top
  n = 256 if perf.quick else 10_000
  name = 'digits' if perf.quick else 'fashion_mnist'
  try:
    ds = data.build(ml_collections.ConfigDict(dict(
        name=name, dir='', conditional=False, hflip=False)))
  except FileNotFoundError as e:
    perf.add('evaluator', 'classifier', '', 'fid_10k_end_to_end_s', None,
             's', detail=str(e)[:200])
    return
  ev = bench_config(f'method=flow_matching,dataset={name}').evals.main
  ev.update(n_samples=n, fid_bootstrap=0)
  imgs = np.asarray(ds.arrays['x'])[:n]  # real images stand in for samples
  runner.score(imgs, ds, 0, ev)  # classifier + reference stats (cached)
  t0 = time.perf_counter()
  runner.score(imgs, ds, 0, ev)
  perf.add('evaluator', 'classifier', '', f'fid_{n}_end_to_end_s',
           time.perf_counter() - t0, 's',
           detail=f'{name}, FID+IS+PR+KID, reference cached')

