"""Paper-scale protocols (experiments/paper.py) and onestep_bench/plan.py.

Fast: every table value is cited; every protocol's config builds and passes
config_check at real and smoke size; bad arguments fail with ConfigError;
the spec dataset draws the real shapes. Slow: the plan compiles smoke
protocols (train step + samplers, a forced fit search), and smoke protocols
train end to end on mock data (TFDS mock CIFAR-10, tiny latent files).
"""

import re

import jax
import numpy as np
import pytest

from experiments import paper
from experiments import paper_settings as ps
from onestep_bench import config_check
from onestep_bench.config_check import ConfigError
from onestep_bench.method import available_methods, method_module

_SNAPSHOT = re.compile(r'[\w.-]+/[\w.-]+@[0-9a-f]{7}:\S+')
_SNAPSHOTS = {ps.MF, ps.PYMF, ps.IMF, ps.TVM, ps.DRIFT, ps.FG, ps.DIT, ps.SIT,
              ps.SC, ps.EDM}


def _entries():
  for (m, d) in ps.PROTOCOLS:
    yield m, d, 'paper'
    if d == 'imagenet256_latent':
      yield m, d, 'equal_budget'


def test_every_table_value_has_a_citation():
  values = ps.all_values()
  assert len(values) > 400
  for where, key, cv in values:
    assert isinstance(cv, ps.C), (where, key)
    cite = cv.cite.strip()
    assert cite and '{' not in cite, (where, key, cite)  # unformatted f-str
    ok = (_SNAPSHOT.search(cite) or cite.startswith('derived:')
          or re.match(r'arXiv:\d{4}\.\d{4,5}\b', cite))
    assert ok, f'{where} {key}: {cite!r} names no source'
    for snap in re.findall(r'[\w.-]+/[\w.-]+@[0-9a-f]{7}', cite):
      assert snap in _SNAPSHOTS, (where, key, snap)
  for proto in ps.PROTOCOLS.values():
    if proto.compute is not None:
      assert _SNAPSHOT.search(proto.compute.cite), proto.compute


def test_table_covers_every_method_and_labels_derived_ones():
  for m in available_methods():
    for d in ps.DATASETS:
      proto = ps.PROTOCOLS[(m, d)]
      assert proto.status in ('published', 'derived'), proto
      if proto.status == 'derived':
        assert proto.derived_from, (m, d)
        assert any(v.cite.startswith('derived') for v in
                   proto.values.values()) or proto.notes, (m, d)
  assert ps.PROTOCOLS[('meanflow', 'cifar10')].status == 'published'
  assert ps.PROTOCOLS[('transition_matching', 'cifar10')].status == 'derived'


def _eval_files(tmp_path):
  """A mock ADM reference batch and a stand-in VAE weights file."""
  adm = tmp_path / 'VIRTUAL_imagenet256_labeled.npz'
  np.savez(adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8),
           mu=np.zeros(2048), sigma=np.eye(2048))
  vae = tmp_path / 'sd-vae-ft-ema.npz'
  vae.write_bytes(b'')  # only its presence is checked before training
  return f'adm:{adm}', str(vae)


def test_every_protocol_builds_and_validates(tmp_path, monkeypatch):
  from onestep_bench.vae import weights  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv(weights.WEIGHTS_ENV, raising=False)
  monkeypatch.setattr(weights, 'default_path',
                      lambda name: str(tmp_path / 'none' / f'{name}.npz'))
  adm, vae = _eval_files(tmp_path)
  for m, d, kind in _entries():
    if m not in available_methods():
      continue
    cls = method_module(m).Method
    for smoke in (False, True):
      c = paper.get_config(f'method={m},dataset={d},protocol={kind},'
                           f'smoke={smoke}')
      if d == 'imagenet256_latent' and not smoke:
        # FID-50K against the ADM batch of the VAE-decoded samples: the
        # declared files must exist before training starts.
        ev = c.evals.main
        assert (ev.reference, ev.vae_config) == (paper.ADM_REFERENCE,
                                                  paper.LATENT_VAE)
        with pytest.raises(ConfigError, match='evals.main.reference'):
          config_check.validate(c, cls)
        ev.reference = adm
        with pytest.raises(ConfigError, match='evals.main.vae'):
          config_check.validate(c, cls)
        ev.vae = vae
      config_check.validate(c, cls)
      assert c.protocol == ('smoke' if smoke else kind)
  c = paper.get_config('method=meanflow,dataset=imagenet256_latent')
  assert (c.train.batch_size, c.train.b2, c.model.size) == (256, 0.95, 'XL')
  assert c.train.num_steps == round(240 * ps.IMAGENET_TRAIN / 256)
  assert (c.method.cfg_omega, c.method.cfg_kappa) == (0.2, 0.92)
  b2 = paper.get_config('method=meanflow,dataset=imagenet256_latent,'
                        'size=B/2')
  assert (b2.model.size, b2.method.cfg_omega, b2.method.cfg_kappa) == (
      'B', 1.0, 0.5)
  eq = paper.get_config('method=tvm,protocol=equal_budget')
  assert (eq.model.size, eq.train.batch_size, eq.train.num_steps) == (
      'B', 256, 400_000)
  assert eq.model.norm == 'rmsnorm' and 'num_heads' not in eq.model
  fd = paper.get_config('method=f_distill,dataset=cifar10')
  assert fd.method.teacher_workdir == 'runs/flow_matching/cifar10/paper_seed0'
  assert fd.model.to_dict() == paper.get_config(
      'method=flow_matching,dataset=cifar10').model.to_dict()


@pytest.mark.parametrize('args, key', [
    ('method=meanflow,dataset=mnist', 'dataset'),
    ('method=meanflow,protocol=bench', 'protocol'),
    ('method=meanflow,size=Q/2', 'size'),
    ('method=f_distill,dataset=cifar10,size=B/2', 'size'),
    ('method=tvm,dataset=cifar10,protocol=equal_budget', 'dataset'),
    ('method=meanflow,seed=-1', 'seed'),
])
def test_bad_arguments_name_the_key(args, key):
  with pytest.raises(ConfigError) as e:
    paper.get_config(args)
  assert e.value.key == key


def test_spec_dataset_draws_real_shapes_and_groups():
  from onestep_bench import plan  # pylint: disable=g-import-not-at-top
  ds = plan.SpecDataset(plan.spec_for('imagenet256_latent', True))
  b = jax.eval_shape(lambda k: ds.sample(k, 8, groups=2), jax.random.key(0))
  assert b['x'].shape == (8, 32, 32, 4) and b['y'].dtype == np.int32
  px = plan.SpecDataset(plan.spec_for('cifar10', False))
  assert set(jax.eval_shape(lambda k: px.sample(k, 4), jax.random.key(1))) == {
      'x'}
  # One-class blocks, labels in range (one small jitted draw).
  y = np.asarray(jax.jit(lambda k: ds.sample(k, 8, groups=2)['y'])(
      jax.random.key(0)))
  assert (y[:4] == y[0]).all() and (y[4:] == y[4]).all() and y.max() < 1000


def test_fit_search_finds_smallest_fsdp_then_grad_accum(monkeypatch):
  """The search order on a fake memory model (no compile): state / fsdp +
  activations / grad_accum; a method refusing accumulation stops it."""
  from onestep_bench import plan  # pylint: disable=g-import-not-at-top
  mb = 2 ** 20
  seen, model = [], {'state': 4 * mb, 'act': 16 * mb}

  def fake_compile(c, dataset, flops=True):
    del dataset, flops
    config_check.validate(c, method_module(c.method.name).Method)
    f, k = c.mesh.fsdp, c.train.grad_accum
    seen.append((f, k))
    return {'peak_bytes': float(model['state'] / f + model['act'] / k)}

  monkeypatch.setattr(plan, 'compile_train', fake_compile)
  entry = plan.Entry('flow_matching', 'cifar10')
  config = entry.config(smoke=True)
  config.train.batch_size = 64
  # Smoke caps (memory x 1e-4): 8.19 MiB (H100), 9.73 (v5p), 3.28 (v6e);
  # fsdp 8 + k micro-batches: 8.5 MiB (k = 2), 4.5 (4), 2.5 (8).
  fit = plan.fit_search(entry, config, {'peak_bytes': 20.0 * mb}, smoke=True)
  assert fit['H100 SXM']['fsdp'] == 8 and fit['H100 SXM']['grad_accum'] == 4
  assert fit['TPU v5p']['grad_accum'] == 2
  assert fit['TPU v6e']['grad_accum'] == 8
  assert fit['TPU v6e']['verdict'] == 'fsdp=8 + grad_accum=8 (0.0 GiB)'
  assert seen == [(2, 1), (4, 1), (8, 1), (8, 2), (8, 4), (8, 8)]  # cached
  # A state-bound model: FSDP alone first, then accumulation, else no fit.
  model.update(state=30 * mb, act=2 * mb)
  st = plan.fit_search(entry, config, {'peak_bytes': 32.0 * mb}, smoke=True)
  assert (st['TPU v5p']['fsdp'], st['TPU v5p']['grad_accum']) == (4, 1)
  assert (st['H100 SXM']['fsdp'], st['H100 SXM']['grad_accum']) == (8, 1)
  assert st['TPU v6e']['verdict'] == ('does not fit at fsdp=8 + grad_accum=8 '
                                      '(micro-batch 8, 8 devices: 0.0 GiB)')
  big = plan.fit_search(entry, config, {'peak_bytes': 1.0 * mb}, smoke=True)
  assert all(v['verdict'] == 'fits' for v in big.values())
  # f_distill refuses grad_accum > 1 (config_check): the search says so.
  model.update(state=4 * mb, act=16 * mb)
  fd = plan.Entry('f_distill', 'cifar10')
  fc = fd.config(smoke=True)
  fc.train.batch_size = 64
  out = plan.fit_search(fd, fc, {'peak_bytes': 20.0 * mb}, smoke=True)
  for v in out.values():
    # ... with the compiled peak at the largest FSDP degree it reached.
    assert v['verdict'].startswith(
        'does not fit (fsdp=8: 0.0 GiB): grad_accum=2 refused')
    assert 'batch mean' in v['verdict'] and v['grad_accum'] == ''


def test_plan_resume_keeps_only_rows_of_the_same_settings(tmp_path):
  from onestep_bench import plan  # pylint: disable=g-import-not-at-top
  stem = str(tmp_path / 'plan')
  assert plan.planned_rows(stem, 'a') == {}
  rows = [{'protocol': 'fm/cifar10', 'params_m': 1.0, 'plan_settings': 'a',
           'git_sha': 'abc1234'},
          {'protocol': 'mf/cifar10', 'params_m': 2.0, 'plan_settings': 'b',
           'git_sha': 'def5678+dirty'}]
  plan.write(rows, stem, 0.4)
  # plan.md names every code version its rows were compiled from.
  md = (tmp_path / 'plan.md').read_text()
  assert 'Code: `abc1234`, `def5678+dirty`' in md
  kept = plan.planned_rows(stem, 'a')
  assert list(kept) == ['fm/cifar10']
  assert kept['fm/cifar10']['params_m'] == '1.0'


# ------------------------------------------------------------------ slow
@pytest.mark.slow
def test_plan_compiles_smoke_protocols(tmp_path):
  from onestep_bench import plan  # pylint: disable=g-import-not-at-top
  entries = [plan.Entry('flow_matching', 'cifar10'),
             plan.Entry('meanflow', 'imagenet256_latent'),
             plan.Entry('f_distill', 'cifar10'),
             plan.Entry('drifting', 'imagenet256_latent')]
  rows = [plan.plan_entry(e, 0.4, fit=False, smoke=True) for e in entries]
  for r in rows:
    assert r['params_m'] > 0 and r['train_tflop_per_step'] > 0, r
    assert r['peak_gib_per_device'] > 0 and r['sample_gflop_per_image_nfe1']
    assert r['mesh'] == 'data=8 x fsdp=1'
    assert r['git_sha'] and r['jax'] == jax.__version__
  # FLOPs scale with NFE on an any-NFE sampler.
  mf = rows[1]
  assert mf['sample_gflop_per_image_nfe4'] == pytest.approx(
      4 * mf['sample_gflop_per_image_nfe1'], rel=0.01)
  # A forced fit search (capacity shrunk in smoke) recompiles and answers.
  fit = plan.plan_entry(entries[0], 0.4, fit=True, smoke=True)
  assert all(v for k, v in fit.items() if k.startswith('fit['))
  for chip in plan.CHIPS:  # each verdict has its (fsdp, grad_accum) columns
    assert f'fit_grad_accum[{chip}]' in fit and f'fit_fsdp[{chip}]' in fit
  plan.write(rows + [fit], str(tmp_path / 'plan'), 0.4)
  md = (tmp_path / 'plan.md').read_text()
  assert 'XLA:CPU' in md and 'meanflow/imagenet256_latent' in md
  assert (tmp_path / 'plan.csv').read_text().count('\n') == 6


class _PixelFeatures:
  """A deterministic stand-in for the Inception (its weights are offline)."""

  weights_sha256 = 'pixels'

  def __call__(self, images):
    f = images.reshape(len(images), -1)[:, :64].astype(np.float64) / 255.0
    return {'features': f, 'probs': np.full((len(images), 10), 0.1)}


@pytest.mark.slow
@pytest.mark.parametrize('method', ['flow_matching', 'meanflow'])
def test_smoke_trains_end_to_end_on_mock_cifar10(tmp_path, monkeypatch,
                                                 method):
  tfds = pytest.importorskip('tensorflow_datasets')
  from onestep_bench import train  # pylint: disable=g-import-not-at-top
  from onestep_bench.evaluators import image_eval  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('ONESTEP_CACHE', str(tmp_path / 'cache'))
  c = paper.get_config(f'method={method},dataset=cifar10,smoke=True')
  c.mesh.data = 1
  monkeypatch.setattr(image_eval, 'get_extractor',
                      lambda ds, ev: _PixelFeatures())
  with tfds.testing.mock_data(num_examples=40,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    s = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert s['steps'] == 2 and s['protocol'] == 'smoke'
  assert np.isfinite(s['evals'][0]['metrics']['fid'])


@pytest.mark.slow
def test_smoke_trains_on_latent_files(tmp_path):
  from onestep_bench import train  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  np.save(tmp_path / 'train_latents.npy',
          rng.randn(24, 32, 32, 4).astype(np.float32))
  np.save(tmp_path / 'train_labels.npy', np.arange(24) % 1000)
  c = paper.get_config('method=tvm,protocol=equal_budget,smoke=True')
  c.data.name = f'latents:{tmp_path}'
  c.mesh.data = 1
  s = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert s['steps'] == 2 and s['evals'] == []
