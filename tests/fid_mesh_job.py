"""Multi-process jobs of test_sharded_features (one per mode).

Run as one of two jax.distributed processes (conftest.run_two_processes) or
alone:

  python tests/fid_mesh_job.py eval WORKDIR INCEPTION.npz DINOV2.npz
    Flow matching (smoke digits UNet, perturbed init, no training) samples 8
    digits in 2 chunks of 4 (cache_every=1: 2 cached parts), scored with
    random-weight Inception and the tiny DINOv2 over every device
    (reference: 8 test images, so no held-out split and no FID floor). Each
    process works in WORKDIR/p<process index>.
  python tests/fid_mesh_job.py resume CACHE
    `streaming._broadcast_resume` of CACHE (process 0's; the others have
    none) in 4 KiB pieces.

Each process prints one line 'FIDJOB <json>': the eval's records' metrics,
or the resumed chunk count and a sha256 of the parts' bytes.
"""

import hashlib
import json
import os
import sys

from onestep_bench import sharding

sharding.maybe_initialize_distributed()

import jax  # noqa: E402
import ml_collections  # noqa: E402


def evaluate(workdir: str, inception: str, dinov2: str) -> list[dict]:
  from experiments.bench import get_config  # pylint: disable=g-import-not-at-top
  from onestep_bench import data  # pylint: disable=g-import-not-at-top
  from onestep_bench.evaluators import runner  # pylint: disable=g-import-not-at-top
  from onestep_bench.method import load_method  # pylint: disable=g-import-not-at-top
  c = get_config('method=flow_matching,dataset=digits,smoke=True')
  ds = data.build(c.data)
  method = load_method(c, ds.spec)

  def init(key):  # zero-init output layers: perturb so samples vary
    leaves, tdef = jax.tree.flatten(method.net.init(key))
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    return jax.tree.unflatten(tdef, [
        a + 0.3 * jax.random.normal(k, a.shape)
        for a, k in zip(leaves, keys, strict=True)])
  params = jax.jit(init)(jax.random.key(0))
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1}))
  evals = ml_collections.ConfigDict({'fid': dict(
      nfe=(1,), n_samples=8, batch_size=4, cache_every=1,
      feature_net='inception_v3', inception_weights=inception,
      fd_dinov2='on', dinov2_weights=dinov2, fid_bootstrap=0, pr_k=2,
      ref_split='test', ref_n=8)})  # no FID floor: one sqrtm fewer
  own = os.path.join(workdir, f'p{jax.process_index()}')
  os.makedirs(own, exist_ok=True)
  recs = runner.evaluate(method, params, ds, evals, own, jax.random.key(1),
                         seed=0, mesh=mesh, save_samples=False)
  return [{'feature_net': r['feature_net'], 'metrics': r['metrics']}
          for r in recs]


def resume(cache: str) -> dict:
  from onestep_bench.evaluators import streaming  # pylint: disable=g-import-not-at-top
  streaming._PIECE = 4096  # pylint: disable=protected-access
  with open(os.path.join(cache, 'key.json')) as f:
    key = json.load(f)
  mine = cache if jax.process_index() == 0 else None
  done, parts = streaming._broadcast_resume(mine, key)  # pylint: disable=protected-access
  h = hashlib.sha256()
  for part in parts:
    for k in sorted(part):
      h.update(f'{k}{part[k].dtype.str}{part[k].shape}'.encode())
      h.update(part[k].tobytes())
  return {'done': done, 'sha256': h.hexdigest()}


if __name__ == '__main__':
  mode, *args = sys.argv[1:]
  out = evaluate(*args) if mode == 'eval' else resume(*args)
  print('FIDJOB ' + json.dumps(out), flush=True)
