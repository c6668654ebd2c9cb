"""`make plan`: compile every paper protocol on an abstract mesh, project cost.

python -m onestep_bench.plan [--protocols=all|meanflow/imagenet256_latent@B/2,
    equal_budget:tvm,...] [--mfu=0.4] [--fit] [--smoke] [--out=results/plan]

For each protocol of experiments/paper.py (the published / derived ones and
the equal-budget ones) this builds the state from the data *spec* only
(`jax.eval_shape`; no data, no allocation), then ahead-of-time lowers and
compiles (`jax.jit(...).lower(...).compile()`) the harness's real train
step (`train.make_train_chunk`: the batch drawn inside the step, the state
sharded by `sharding.state_shardings`) and the 1- and 4-NFE samplers, on a
simulated ('data', 'fsdp') mesh of 8 host devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set before jax is
imported). Reported per protocol:

- params; train FLOPs per step counted on the step's jaxpr
  (`train.train_step_flops`: matmuls and convolutions, JVPs, teachers and
  critics included, alternating phases averaged); sampling FLOPs per image;
- peak memory per device from `compiled.memory_analysis()` (arguments +
  outputs + temporaries - aliased): **the XLA:CPU compiler's estimate**,
  not a GPU / TPU measurement; dataset arrays are not part of it (batches
  are synthetic draws inside the step);
- projected accelerator-hours at `--mfu` on named chips (`CHIPS`) for the
  whole budget and for FID-50K sampling, beside the compute the paper
  states for its own run (`paper_settings.Compute`) and the MFU that would
  imply; with `--fit`, for each chip the protocol does not fit at the
  published batch: the smallest FSDP degree, else the smallest batch split
  (`train.grad_accum`, gradient accumulation at FSDP 8) that fits, each
  variant's real train step recompiled (`fit_search`; columns `fit[chip]`,
  `fit_fsdp[chip]`, `fit_grad_accum[chip]`, `fit_peak_gib[chip]`).

Writes `<out>.csv` and `<out>.md`.
"""

from __future__ import annotations

import os

if __name__ == '__main__':  # a simulated 8-device mesh, before jax loads
  os.environ.setdefault('XLA_FLAGS',
                        '--xla_force_host_platform_device_count=8')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# pylint: disable=g-import-not-at-top,wrong-import-position
import csv
import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from onestep_bench import config_check, sharding, train
from onestep_bench.data import DataSpec
from onestep_bench.evaluators.runner import sample_labels
from onestep_bench.flops import count_flops
from onestep_bench.method import Method, load_method

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """A named accelerator: dense bf16 peak and memory per chip."""

  peak: float      # FLOP/s, dense bf16
  memory: float    # bytes
  cite: str


CHIPS = {
    'H100 SXM': Chip(989e12, 80 * GIB, 'NVIDIA H100 Tensor Core GPU '
                     'datasheet: BF16 1,979 TFLOPS with sparsity (989.5 '
                     'dense), 80 GB HBM3'),
    'TPU v5p': Chip(459e12, 95 * GIB, 'Google Cloud TPU v5p docs: 459 '
                    'TFLOPS bf16, 95 GB HBM2e per chip'),
    'TPU v6e': Chip(918e12, 32 * GIB, 'Google Cloud TPU v6e (Trillium) docs:'
                    ' 918 TFLOPS bf16, 32 GB HBM per chip'),
}
# Peaks of the chips papers state their runs on (implied-MFU check only).
STATED_PEAKS = {
    'H200': (989e12, 'NVIDIA H200 datasheet: BF16 1,979 TFLOPS sparse'),
    'A100': (312e12, 'NVIDIA A100 datasheet: BF16/FP16 312 TFLOPS dense'),
    'V100': (125e12, 'NVIDIA V100 datasheet: 125 TFLOPS tensor (fp16)'),
    'TPU v6e': (918e12, CHIPS['TPU v6e'].cite),
}
FID_SAMPLES = 50_000

_PROTOCOLS = flags.DEFINE_list(
    'protocols', ['all'], "'all', or entries 'method/dataset[@size]' (paper)"
    " and 'equal_budget:method'.")
_MFU = flags.DEFINE_float('mfu', 0.4, 'Model-FLOPs utilisation assumed.')
_FIT = flags.DEFINE_bool('fit', True, 'Search FSDP / batch splits that fit '
                         'each chip (recompiles).')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny sizes (tests).')
_OUT = flags.DEFINE_string('out', 'results/plan', 'Output path stem.')
_COMPILE = flags.DEFINE_bool('compile', True, 'Compile (memory); --nocompile'
                             ' counts params and FLOPs only (fast).')
_RESUME = flags.DEFINE_bool('resume', True, 'Keep the rows of an existing '
                            '<out>.csv planned with the same --mfu / --fit / '
                            '--smoke / --compile and plan only the others.')


# ================================================================== data
class SpecDataset:
  """A `Dataset` from the spec alone: synthetic batches, no arrays.

  Batches have the real shapes and dtypes (float32 [-1, 1] pixels or unit-
  variance latents, int32 labels, one-class blocks for `groups`), so the
  compiled step is the real one minus the gather from the stored data.
  """

  def __init__(self, spec: DataSpec):
    self.spec = spec
    self.arrays: dict[str, jax.Array] = {}

  def sample(self, key: jax.Array, n: int, arrays: Any = None, *,
             groups: int = 0) -> dict[str, jax.Array]:
    """{'x': [n, *shape]} (+ 'y' on labelled specs); jit-able."""
    del arrays
    kx, ky = jax.random.split(key)
    shape = (n, *self.spec.shape)
    x = (jax.random.normal(kx, shape) if self.spec.kind == 'latent'
         else jax.random.uniform(kx, shape, minval=-1.0, maxval=1.0))
    batch = {'x': x}
    if self.spec.num_classes:
      g = groups if groups and n % groups == 0 else n
      cls = jax.random.randint(ky, (g,), 0, self.spec.num_classes)
      batch['y'] = jnp.repeat(cls, n // g).astype(jnp.int32)
    return batch


_SHAPES = {'cifar10': ((32, 32, 3), 10, 'image'),
           'imagenet64': ((64, 64, 3), 1000, 'image'),
           'imagenet256_latent': ((32, 32, 4), 1000, 'latent')}


def spec_for(dataset: str, conditional: bool) -> DataSpec:
  """The DataSpec of a paper dataset (shape, classes, kind), no files."""
  shape, classes, kind = _SHAPES[dataset]
  return DataSpec(name=dataset, shape=shape,
                  num_classes=classes if conditional else 0, kind=kind)


# ============================================================== compiling
@dataclasses.dataclass
class Abstract:
  """A method and its state as shapes + shardings on a mesh."""

  method: Method
  dataset: SpecDataset
  mesh: jax.sharding.Mesh
  state: Any           # TrainState of ShapeDtypeStructs (with shardings)
  shardings: Any


def build_abstract(config: ml_collections.ConfigDict,
                   dataset: str) -> Abstract:
  """`train.build_state` without data or allocation (shapes only)."""
  ds = SpecDataset(spec_for(dataset, bool(config.data.conditional)))
  method = load_method(config, ds.spec)
  config_check.validate(config, method)
  method.prepare(ds)
  mesh = sharding.make_mesh(config.mesh)
  if config.train.batch_size % mesh.size:
    raise ValueError(f'batch {config.train.batch_size} does not divide the '
                     f'{mesh.size}-device mesh')
  example = ds.sample(jax.random.key(0), 2)
  abstract = jax.eval_shape(method.init, jax.random.key(0), example)
  shard = sharding.state_shardings(mesh, abstract,
                                   config.mesh.get('fsdp_min_size',
                                                   sharding.FSDP_MIN_SIZE))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                         sharding=s),
                       abstract, shard)
  return Abstract(method, ds, mesh, state, shard)


def peak_bytes(compiled: Any) -> float:
  """Arguments + outputs + temporaries - aliased, per device (XLA's view)."""
  ma = compiled.memory_analysis()
  if ma is None:
    return float('nan')
  return float(ma.argument_size_in_bytes + ma.output_size_in_bytes
               + ma.temp_size_in_bytes - ma.alias_size_in_bytes)


def compile_train(config: ml_collections.ConfigDict, dataset: str,
                  flops: bool = True, compile_: bool = True
                  ) -> dict[str, Any]:
  """Params, FLOPs / step and compiled peak memory of the real train step."""
  ab = build_abstract(config, dataset)
  batch = config.train.batch_size
  key = jax.random.key(0)
  out: dict[str, Any] = {
      'params': sum(math.prod(x.shape)
                    for x in jax.tree.leaves(ab.state.params)),
      'state_bytes': sum(math.prod(x.shape) * x.dtype.itemsize
                         for x in jax.tree.leaves(ab.state))}
  if flops:
    one = train.make_step_fn(ab.method, ab.dataset, ab.mesh, batch)
    out['step_flops'], out['flops_exact'] = train.train_step_flops(
        ab.method, one, ab.state, key, {})
  chunk = train.make_train_chunk(ab.method, ab.dataset, ab.mesh, batch,
                                 ab.shardings)
  cycle = ab.method.step_cycle
  t0, peak = time.perf_counter(), float('nan') if not compile_ else 0.0
  for phase in ((range(min(cycle, 2)) if cycle > 1 else [None])
                if compile_ else []):
    compiled = chunk.lower(ab.state, key, {}, 1, phase).compile()
    peak = max(peak, peak_bytes(compiled))
  out.update(peak_bytes=peak, compile_s=time.perf_counter() - t0,
             abstract=ab)
  return out


def compile_sampler(ab: Abstract, nfe: int, chunk: int,
                    guidance: float | None,
                    compile_: bool = True) -> dict[str, float]:
  """FLOPs / image (jaxpr) and compiled peak memory of one sampling chunk."""
  k = ab.dataset.spec.num_classes

  def fn(p, key):
    labels = None
    if k:
      k_lab, key = jax.random.split(key)
      labels = sample_labels(k_lab, chunk, k)
    return ab.method.sample(p, key, chunk, nfe=nfe, labels=labels,
                            guidance=guidance)
  params = ab.state.ema_params
  key = jax.random.key(0)
  flops, _ = count_flops(fn, params, key)
  t0 = time.perf_counter()
  if not compile_:
    return {'flops_per_image': flops / chunk, 'peak_bytes': float('nan'),
            'compile_s': 0.0}
  out_sh = (sharding.batch_sharded(ab.mesh) if chunk % ab.mesh.size == 0
            else sharding.replicated(ab.mesh))
  compiled = jax.jit(fn, out_shardings=out_sh).lower(params, key).compile()
  return {'flops_per_image': flops / chunk, 'peak_bytes': peak_bytes(
      compiled), 'compile_s': time.perf_counter() - t0}


# ============================================================= protocols
@dataclasses.dataclass(frozen=True)
class Entry:
  """One protocol to plan."""

  method: str
  dataset: str
  size: str = ''
  kind: str = 'paper'

  @property
  def name(self) -> str:
    """'method/dataset[@size]' or 'equal_budget:method'."""
    if self.kind == 'equal_budget':
      return f'equal_budget:{self.method}'
    return f'{self.method}/{self.dataset}' + (f'@{self.size}' if self.size
                                              else '')

  def config(self, smoke: bool) -> ml_collections.ConfigDict:
    """Its experiments/paper.py config (no teacher run: shapes only)."""
    from experiments import paper  # pylint: disable=g-import-not-at-top
    args = (f'method={self.method},dataset={self.dataset},'
            f'protocol={self.kind},smoke={smoke}')
    c = paper.get_config(args + (f',size={self.size}' if self.size else ''))
    if 'allow_untrained_teacher' in c.method:  # shapes only: no teacher run
      c.method.update(allow_untrained_teacher=True, teacher_workdir='')
    # Shapes only: the plan compiles its own samplers, and the eval's files
    # (ADM reference batch, VAE weights) are not needed to compile.
    c.evals = ml_collections.ConfigDict()
    return c


def all_entries() -> list[Entry]:
  """Every paper protocol at its default size, then the equal budget."""
  from experiments import paper_settings as ps  # pylint: disable=g-import-not-at-top
  from onestep_bench.method import available_methods  # pylint: disable=g-import-not-at-top
  have = set(available_methods())
  out = [Entry(m, d) for (m, d) in ps.PROTOCOLS if m in have]
  out += [Entry(m, 'imagenet256_latent', kind='equal_budget')
          for (m, d) in ps.PROTOCOLS if m in have and d == 'imagenet256_latent']
  return out


def parse_entries(names: Sequence[str]) -> list[Entry]:
  """--protocols values -> entries ('all' expands)."""
  out = []
  for n in names:
    if n == 'all':
      out += all_entries()
    elif n.startswith('equal_budget:'):
      out.append(Entry(n.split(':', 1)[1], 'imagenet256_latent',
                       kind='equal_budget'))
    else:
      md, _, size = n.partition('@')
      m, _, d = md.partition('/')
      out.append(Entry(m, d, size))
  return out


def fit_search(entry: Entry, config: ml_collections.ConfigDict, base: dict,
               smoke: bool) -> dict[str, dict[str, Any]]:
  """Per chip: fits as is, or the smallest FSDP degree / batch split.

  Every variant is the real train step recompiled: FSDP degrees 2, 4, 8
  shard the whole TrainState over that many of the 8 devices; if none fits,
  batch splits k = 2, 4, ... (`train.grad_accum`: k micro-batches of
  batch / k, powers of two while batch / k divides over the 8 devices) at
  FSDP 8, the published global batch and optimizer unchanged. A method
  that refuses accumulation (`Method.grad_accum_refused`, config_check),
  or whose checks refuse the micro-batch, stops the search there.

  Returns:
    chip name -> {'verdict': text, 'fsdp': int | '', 'grad_accum': int | '',
    'peak_gib': float | ''}.
  """
  cache: dict[tuple[int, int], float | str] = {(1, 1): base['peak_bytes']}

  def mem(fsdp: int, split: int) -> float | str:
    """Compiled peak bytes per device, or why the variant is refused."""
    if (fsdp, split) not in cache:
      c = ml_collections.ConfigDict(config.to_dict())
      c.mesh.fsdp = fsdp
      c.train.grad_accum = split
      try:
        cache[(fsdp, split)] = compile_train(c, entry.dataset, flops=False)[
            'peak_bytes']
      except config_check.ConfigError as e:
        cache[(fsdp, split)] = e.allowed
    return cache[(fsdp, split)]

  out = {}
  batch, devices = config.train.batch_size, jax.device_count()
  for name, chip in CHIPS.items():
    cap = chip.memory * (1e-4 if smoke else 1.0)  # smoke: force a search
    found = next(((f, 1) for f in (1, 2, 4, 8) if devices % f == 0
                  and isinstance(mem(f, 1), float) and mem(f, 1) <= cap),
                 None)
    why, k, tried = '', 2, 1
    while found is None and batch % k == 0 and (batch // k) % devices == 0:
      m = mem(devices, k)
      if isinstance(m, str):
        why = m
        break
      tried = k
      if m <= cap:
        found = (devices, k)
      k *= 2
    if found is None:
      last = mem(devices, tried)
      gib = f'{last / GIB:.1f} GiB' if isinstance(last, float) else ''
      if why:
        at = f' (fsdp={devices}: {gib})' if gib else ''
        verdict = f'does not fit{at}: grad_accum={k} refused ({why})'
      else:
        verdict = (f'does not fit at fsdp={devices} + grad_accum={tried} '
                   f'(micro-batch {batch // tried}, {devices} devices'
                   + (f': {gib})' if gib else ')'))
      out[name] = {'verdict': verdict, 'fsdp': '', 'grad_accum': '',
                   'peak_gib': ''}
      continue
    f, k = found
    gib = round(float(mem(f, k)) / GIB, 2)
    verdict = ('fits' if found == (1, 1) else
               f'fsdp={f}' + (f' + grad_accum={k}' if k > 1 else '')
               + f' ({gib:.1f} GiB)')
    out[name] = {'verdict': verdict, 'fsdp': f, 'grad_accum': k,
                 'peak_gib': gib}
  return out


def plan_entry(entry: Entry, mfu: float, fit: bool, smoke: bool,
               compile_: bool = True) -> dict[str, Any]:
  """Compile one protocol and project its cost."""
  from experiments import paper  # pylint: disable=g-import-not-at-top
  config = entry.config(smoke)
  proto, values = paper.resolve(entry.method, entry.dataset, entry.size,
                                entry.kind)
  t0 = time.perf_counter()
  tr = compile_train(config, entry.dataset, compile_=compile_)
  ab = tr.pop('abstract')
  guidance = values.get('evals.main.guidance')
  guidance = guidance.value if guidance else None
  chunk = 16 if smoke else 256
  samp = {n: compile_sampler(ab, n, chunk, guidance, compile_)
          for n in (1, 4)
          if n in ab.method.supported_nfe}
  steps = config.train.num_steps
  total = tr['step_flops'] * steps
  paper_nfe = values.get('meta.paper_nfe')
  row: dict[str, Any] = {
      'protocol': entry.name, 'method': entry.method,
      'dataset': entry.dataset, 'kind': entry.kind,
      'status': 'equal_budget' if entry.kind == 'equal_budget'
                else proto.status,
      'derived_from': proto.derived_from if entry.kind == 'paper' else '',
      'backbone': (f'dit-{config.model.size}/{config.model.patch_size}'
                   if config.model.name == 'dit' else
                   f'unet-{config.model.channels}'),
      'params_m': round(tr['params'] / 1e6, 2),
      'batch': config.train.batch_size, 'steps': steps,
      'train_tflop_per_step': round(tr['step_flops'] / 1e12, 3),
      'flops_exact': tr['flops_exact'],
      'train_eflop_total': round(total / 1e18, 3),
      'peak_gib_per_device': round(tr['peak_bytes'] / GIB, 2),
      'state_gib': round(tr['state_bytes'] / GIB, 2),
      'mesh': f'data={ab.mesh.shape["data"]} x fsdp={ab.mesh.shape["fsdp"]}',
      'paper_nfe': paper_nfe.value if paper_nfe else '',
  }
  for n, s in samp.items():
    row[f'sample_gflop_per_image_nfe{n}'] = round(s['flops_per_image'] / 1e9,
                                                  3)
    row[f'sample_peak_gib_nfe{n}'] = round(s['peak_bytes'] / GIB, 2)
  for name, chip in CHIPS.items():
    rate = chip.peak * mfu
    row[f'train_chip_hours[{name}]'] = round(total / rate / 3600, 1)
    if 1 in samp:
      row[f'fid50k_chip_hours_nfe1[{name}]'] = round(
          FID_SAMPLES * samp[1]['flops_per_image'] / rate / 3600, 3)
  if proto.compute is not None and entry.kind == 'paper':
    c = proto.compute
    row['stated_compute'] = (f'{c.chips}x {c.chip}' + (
        f' {c.hours:.1f} h' if c.hours else ' (no duration)'))
    if c.hours and c.chip in STATED_PEAKS:
      peak = STATED_PEAKS[c.chip][0]
      implied = total / (c.chips * c.hours * 3600 * peak)
      row['implied_mfu'] = round(implied, 3)
      proj = total / (c.chips * peak * mfu) / 3600
      row['projected_vs_stated'] = round(proj / c.hours, 2)
  if fit and compile_:
    for name, fit_ in fit_search(entry, config, tr, smoke).items():
      row[f'fit[{name}]'] = fit_['verdict']
      for k in ('fsdp', 'grad_accum', 'peak_gib'):
        row[f'fit_{k}[{name}]'] = fit_[k]
  row['git_sha'], row['jax'] = train.git_sha(), jax.__version__
  row['compile_s'] = round(tr['compile_s'] + sum(
      s['compile_s'] for s in samp.values()), 1)
  row['wall_s'] = round(time.perf_counter() - t0, 1)
  return row


# ================================================================ output
def write(rows: list[dict[str, Any]], stem: str, mfu: float) -> None:
  """<stem>.csv (all columns) and <stem>.md (the summary tables)."""
  os.makedirs(os.path.dirname(stem) or '.', exist_ok=True)
  cols: list[str] = []
  for r in rows:
    cols += [k for k in r if k not in cols]
  with open(stem + '.csv', 'w', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
  codes = ', '.join(f'`{v}`' for v in sorted(
      {str(r.get('git_sha') or '?') for r in rows})) or '?'
  lines = [
      '# Paper-scale plan (`make plan`)', '',
      'Every protocol of `experiments/paper.py` compiled ahead of time on a '
      'simulated 8-device (data x fsdp) CPU mesh; nothing was trained. '
      f'Projections assume {mfu:.0%} MFU on the chips below. **Memory is '
      'the XLA:CPU compiler\'s estimate** (`compiled.memory_analysis()`, '
      'per device, float32 unless the protocol sets bf16), not a GPU / TPU '
      'measurement. FLOPs count matmuls and convolutions on the jaxpr '
      f'(JVPs, teachers, critics included). Code: {codes} (column '
      '`git_sha`).', '',
      '| chip | bf16 dense peak | memory | source |', '|---|---|---|---|']
  lines += [f'| {n} | {c.peak / 1e12:.0f} TFLOP/s | {c.memory / GIB:.0f} GiB'
            f' | {c.cite} |' for n, c in CHIPS.items()]
  main = ['protocol', 'status', 'backbone', 'params_m', 'batch', 'steps',
          'train_tflop_per_step', 'train_eflop_total', 'peak_gib_per_device',
          'sample_gflop_per_image_nfe1', 'sample_gflop_per_image_nfe4']
  lines += ['', '## Compute and memory', '', _md_table(rows, main)]
  hours = ['protocol'] + [k for k in cols if k.startswith(
      ('train_chip_hours', 'fid50k_chip_hours'))]
  lines += ['', '## Projected chip-hours (whole budget; FID-50K at 1 NFE)',
            '', 'Wall time on 8 chips = chip-hours / 8 (data-parallel, '
            'same MFU).', '', _md_table(rows, hours)]
  stated = [r for r in rows if r.get('stated_compute')]
  if stated:
    lines += ['', '## Against the compute the sources state', '',
              'implied MFU = counted FLOPs / (stated chip-hours x chip '
              'peak); projected/stated = our hours on their chips at the '
              'assumed MFU over theirs.', '',
              _md_table(stated, ['protocol', 'stated_compute',
                                 'train_eflop_total', 'implied_mfu',
                                 'projected_vs_stated'])]
  fits = ['protocol'] + [k for k in cols if k.startswith('fit[')]
  if len(fits) > 1:
    lines += ['', '## Memory fit at the published batch (8 chips)', '',
              '`fsdp=F`: the TrainState sharded over F devices; `+ '
              'grad_accum=k`: the global batch as k micro-batches '
              '(`train.grad_accum`, one optimizer step per batch), each '
              'variant recompiled; the GiB are its compiled peak per device.',
              '', _md_table(rows, fits)]
  with open(stem + '.md', 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')


def _md_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
  out = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  out += ['| ' + ' | '.join(str(r.get(c, '')) for c in cols) + ' |'
          for r in rows]
  return '\n'.join(out)


def planned_rows(stem: str, settings: str) -> dict[str, dict[str, Any]]:
  """Rows of an earlier `<stem>.csv` made with `settings`, by protocol."""
  if not os.path.exists(stem + '.csv'):
    return {}
  with open(stem + '.csv', newline='', encoding='utf-8') as f:
    return {r['protocol']: r for r in csv.DictReader(f)
            if r.get('plan_settings') == settings}


def main(argv: Sequence[str]) -> None:
  """Plans the --protocols, writes <out>.csv and <out>.md after each one.

  The files are rewritten after every protocol, so an interrupted plan keeps
  what it compiled; rerun it and (--resume) only the rest is compiled.
  """
  del argv
  settings = (f'mfu={_MFU.value},fit={_FIT.value},smoke={_SMOKE.value},'
              f'compile={_COMPILE.value}')
  done = planned_rows(_OUT.value, settings) if _RESUME.value else {}
  rows = []
  for entry in parse_entries(_PROTOCOLS.value):
    if entry.name in done:
      rows.append(done[entry.name])
      print(f'{entry.name}: kept from {_OUT.value}.csv', flush=True)
      continue
    t0 = time.perf_counter()
    row = plan_entry(entry, _MFU.value, _FIT.value, _SMOKE.value,
                     _COMPILE.value)
    row['plan_settings'] = settings
    row['plan_wall_s'] = round(time.perf_counter() - t0, 1)
    rows.append(row)
    print(f'{entry.name}: {row["plan_wall_s"]} s', flush=True)
    write(rows, _OUT.value, _MFU.value)
  write(rows, _OUT.value, _MFU.value)


if __name__ == '__main__':
  app.run(main)
