"""Image metrics for every method: FID (+ bootstrap CI), IS, P/R, KID.

One path (docs/evaluation.md): samples in [-1, 1] are quantised to uint8 (as a
PNG would store them), passed through the configured feature network, and
compared with cached reference statistics of a real split.

Protocol options (`config.evals.<name>.<key>`; `eval_settings` resolves and
checks them, and `score_images` returns them under 'settings' for the row):
  quantize        'round' (default; EDM `generate.py`) | 'truncate' (ADM
                  `image_sample.py`): see `data.images.to_uint8`.
  is_split_size   rows per Inception Score split (default 5000, ADM's
                  evaluator: the published IS is N = 50k in 10 splits).
                  Splits are consecutive, the last partial; N < size gives
                  one split of N. IS is biased low for smaller splits, so an
                  IS at N < 50k is not comparable with published numbers.
  pr_k            k of the precision / recall balls (default 3, ADM).
  fid_bootstrap   bootstrap replicates of the FID interval (default 10;
                  0 = none).
  ref_split       real split of the reference statistics (default 'train').
  ref_n           images of it used (default 0 = all).
  fd_dinov2       'auto' (default): FD_DINOv2 whenever DINOv2 weights are
                  found (`dinov2.resolve_weights_path`: `dinov2_weights`,
                  $ONESTEP_DINOV2_WEIGHTS, ~/.cache/onestep_bench/
                  dinov2_vitl14.npz), silently skipped otherwise; 'on':
                  required (missing weights are a ConfigError before any
                  compute); 'off'. Not part of `settings` (FD_DINOv2 rows
                  have their own feature space, below).
  dinov2_pos      DINOv2 position-embedding interpolation, 'hub' (default,
                  EDM2 / dgm-eval) or 'transformers' (see `dinov2`).

Metrics of the primary feature net: fid, fid_floor, fid_ci_lo/hi,
inception_score(_std), precision, recall, kid(_std), and sfid (Inception
nets only: ADM's spatial FID on `inception.SPATIAL_LAYER`, same network,
weights and reference images as the FID, so it shares the row's feature
space). FD_DINOv2 is returned as an extra record (`extra_records`) with its
own feature_net / weights / reference statistics: the runner writes it as
its own result record, so its rows are never mixed with Inception rows.

Feature networks, by name (`config.evals.<name>.feature_net`):
  `inception_v3`        Flax port of the FID Inception (pool3 / 1008 logits);
                        `preprocess` = 'legacy_tf' (default) | 'pytorch_fid'.
                        Recorded as `inception_v3/<preprocess>`, or
                        `inception_v3/<preprocess>/unverified` when the
                        weights file was not converted from the verified
                        pytorch-fid checkpoint (`inception.weights_verified`).
  `classifier:<data>`   a CNN trained on the dataset's labels (offline FID
                        for digits / MNIST / Fashion-MNIST; NOT Inception FID).
  `auto`                classifier for 1-channel sets, inception_v3 otherwise.

Reference statistics are cached under a key of (dataset, split, content hash
of the split, feature net, its weights hash, n). The key is stored in the
file and compared on load: different settings never reuse a cache entry.
An Inception entry also holds the sFID statistics (mu_s, sigma_s) of the
same images (latent data: the key also holds the VAE's `row_fields()`).

Reference source, latent decoding and streaming (`config.evals.<name>.<key>`):
  reference       '' / 'dataset' (default): statistics of `ref_split`;
                  'adm:<path>.npz': an ADM evaluator reference batch
                  (`reference.py`: its mu / sigma for FID, its images'
                  features for P/R and KID; `ref_stats` names the file, no
                  FID floor).
  cache_every     > 0: sample, decode and extract features chunk by chunk
                  (`batch_size` samples each), caching the features to the
                  workdir every `cache_every` chunks; a preempted eval
                  resumes from the cache (`streaming.py`). 0 (default): all
                  samples first. Not a protocol option (same numbers).
                  With the eval's mesh (`prepare(..., mesh)`) the feature
                  nets are split over its devices and processes
                  (`sharded_features.py`).
  vae, vae_config latent datasets: the VAE that decodes samples (and the
                  reference split's latents) before the feature net
                  (`decode.py`); its `row_fields()` join `settings`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from onestep_bench.config_check import ConfigError
from onestep_bench.data.images import (
  DEFAULT_QUANTIZE,
  QUANTIZE_MODES,
  ImageArrays,
  to_uint8,
)
from onestep_bench.evaluators import decode, image_metrics, reference
from onestep_bench.evaluators.dataset_reference import (  # noqa: F401 (API)
  MAX_REF_FEATURES,
  fid_floor,
  reference_stats,
)

if TYPE_CHECKING:
  from jax.sharding import Mesh

KID_NUM_SUBSETS = 100  # torch-fidelity's defaults
KID_SUBSET_SIZE = 1000
FD_DINOV2_MODES = ('auto', 'on', 'off')


def eval_settings(ev: ml_collections.ConfigDict, name: str = '<name>', *,
                  latent: bool = False) -> dict[str, Any]:
  """The image-protocol options of `ev`, defaults filled in and checked.

  Args:
    ev: one eval config (`config.evals.<name>`).
    name: the eval's name, for error messages.
    latent: the data are latents (the VAE weights are then required).

  Returns:
    Flat {key: str | int | float | bool}: quantize, is_split_size, pr_k,
    fid_bootstrap, ref_split, ref_n, and the fixed max_ref_features,
    kid_num_subsets, kid_subset_size.

  Raises:
    ConfigError: a value out of range (names the key and the fix).
  """
  quantize = ev.get('quantize', DEFAULT_QUANTIZE)
  if quantize not in QUANTIZE_MODES:
    raise ConfigError(f'evals.{name}.quantize', quantize,
                      f'must be one of {QUANTIZE_MODES}',
                      "'round' (EDM, default) or 'truncate' (ADM).")
  out: dict[str, Any] = {'quantize': str(quantize)}
  for key, default, low in (('is_split_size', image_metrics.IS_SPLIT_SIZE, 1),
                            ('pr_k', 3, 1), ('fid_bootstrap', 10, 0),
                            ('ref_n', 0, 0)):
    value = ev.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
        or value < low:
      raise ConfigError(f'evals.{name}.{key}', value,
                        f'must be an integer >= {low}',
                        f'e.g. --config.evals.{name}.{key}={default}.')
    out[key] = int(value)
  ref_split = ev.get('ref_split', 'train')
  if not isinstance(ref_split, str) or not ref_split:
    raise ConfigError(f'evals.{name}.ref_split', ref_split,
                      'must be a split name', "e.g. 'train'.")
  out['ref_split'] = ref_split
  out.update(max_ref_features=MAX_REF_FEATURES,
             kid_num_subsets=KID_NUM_SUBSETS, kid_subset_size=KID_SUBSET_SIZE)
  fd_dinov2_mode(ev, name)  # checked here, before any compute
  every = ev.get('cache_every', 0)  # streamed evals; not a protocol option
  if isinstance(every, bool) or not isinstance(every, (int, np.integer)) \
      or every < 0:
    raise ConfigError(f'evals.{name}.cache_every', every,
                      'must be an integer >= 0 (chunks per cached feature '
                      'part; 0 = not streamed)',
                      f'e.g. --config.evals.{name}.cache_every=10')
  reference.adm_path(ev, name)
  if latent or ev.get('vae'):
    decode.vae_options(ev, name)
  return out


def fd_dinov2_mode(ev: ml_collections.ConfigDict,
                   name: str = '<name>') -> str:
  """'on' (weights found, required or auto) or 'off'; checks the options.

  Raises:
    ConfigError: `fd_dinov2` / `dinov2_pos` is not a known value, or
      `fd_dinov2='on'` and no weights file is found (the message says how to
      convert one).
  """
  from onestep_bench.evaluators import dinov2  # pylint: disable=g-import-not-at-top
  mode = ev.get('fd_dinov2', 'auto')
  if mode not in FD_DINOV2_MODES:
    raise ConfigError(f'evals.{name}.fd_dinov2', mode,
                      f'must be one of {FD_DINOV2_MODES}',
                      f'e.g. --config.evals.{name}.fd_dinov2=auto')
  pos = ev.get('dinov2_pos', 'hub')
  if pos not in dinov2.POS_INTERP:
    raise ConfigError(f'evals.{name}.dinov2_pos', pos,
                      f'must be one of {dinov2.POS_INTERP}',
                      f'e.g. --config.evals.{name}.dinov2_pos=hub (EDM2)')
  if mode == 'off':
    return 'off'
  try:
    dinov2.resolve_weights_path(ev.get('dinov2_weights') or None)
  except FileNotFoundError as e:
    if mode == 'on':
      raise ConfigError(f'evals.{name}.fd_dinov2', mode,
                        f'needs the DINOv2 weights. {e}',
                        f'convert them as above, or set --config.evals.'
                        f'{name}.fd_dinov2=auto to skip FD_DINOv2 without '
                        'them') from None
    return 'off'
  return 'on'


def _inception_weights(ev: ml_collections.ConfigDict) -> str | None:
  """The resolved Inception weights path, None when there is no file."""
  from onestep_bench.evaluators import inception  # pylint: disable=g-import-not-at-top
  try:
    return inception.resolve_weights_path(ev.get('inception_weights') or None)
  except FileNotFoundError:
    return None  # the extractor raises the full message


def feature_net_name(dataset: ImageArrays,
                     ev: ml_collections.ConfigDict) -> str:
  """The resolved feature-network name recorded in every result row.

  Inception weights not converted from the verified checkpoint get the
  suffix '/unverified' (read from the weights file's provenance record).
  """
  name = ev.get('feature_net', 'auto')
  if name == 'auto':
    one_channel = dataset.spec.shape[-1] == 1
    name = f'classifier:{dataset.spec.name}' if one_channel else 'inception_v3'
  if name == 'inception_v3':
    from onestep_bench.evaluators import inception  # pylint: disable=g-import-not-at-top
    name = f'inception_v3/{ev.get("preprocess", "legacy_tf")}'
    path = _inception_weights(ev)
    if path is not None and not inception.weights_verified(path):
      name = f'{name}/{inception.UNVERIFIED}'
  return name


_EXTRACTORS: dict[Any, Any] = {}


def extractor_key(dataset: ImageArrays, ev: ml_collections.ConfigDict
                  ) -> tuple[str, str | None]:
  """The memo key of `get_extractor`: (feature net name, weights identity).

  Inception: the weights file. A classifier: its training split + recipe
  (`classifier.weights_key`), so a tuning dataset with a held-out split
  trains its own classifier, never reused for the board's full-train one.
  """
  name = feature_net_name(dataset, ev)
  if name.startswith('inception_v3/'):
    return name, _inception_weights(ev)
  if name.startswith('classifier:'):
    from onestep_bench.evaluators import classifier  # pylint: disable=g-import-not-at-top
    return name, classifier.weights_key(*dataset.split_images('train'),
                                        classifier.RECIPE)
  return name, ''


def get_extractor(dataset: ImageArrays, ev: ml_collections.ConfigDict):
  """The feature network for `ev` (memoised per process).

  Raises:
    ConfigError: latent data without VAE weights (`decode.vae_options`).
  """
  if dataset.spec.kind == 'latent':
    decode.vae_options(ev)  # image-space features need the decoder
  elif dataset.spec.kind != 'image':
    raise ValueError(f'{dataset.spec.name} is a {dataset.spec.kind} '
                     'dataset: it has no image features.')
  name = feature_net_name(dataset, ev)
  key = extractor_key(dataset, ev)
  if key not in _EXTRACTORS:
    if name.startswith('inception_v3/'):
      from onestep_bench.evaluators.inception import InceptionExtractor  # pylint: disable=g-import-not-at-top
      _EXTRACTORS[key] = InceptionExtractor(
          ev.get('inception_weights') or None, mode=name.split('/')[1])
    elif name.startswith('classifier:'):
      if name != f'classifier:{dataset.spec.name}':
        raise ValueError(f'feature_net={name!r} but the data is '
                         f'{dataset.spec.name!r}: a classifier is trained on '
                         'the dataset it evaluates.')
      from onestep_bench.evaluators.classifier import ClassifierExtractor  # pylint: disable=g-import-not-at-top
      _EXTRACTORS[key] = ClassifierExtractor(dataset)
    else:
      raise ValueError(f"Unknown feature_net {name!r}: use 'auto', "
                       "'inception_v3' or 'classifier:<dataset>'.")
  return _EXTRACTORS[key]


def get_dinov2_extractor(ev: ml_collections.ConfigDict):
  """The DINOv2 feature network for `ev` (memoised per file and mode)."""
  from onestep_bench.evaluators import dinov2  # pylint: disable=g-import-not-at-top
  path = dinov2.resolve_weights_path(ev.get('dinov2_weights') or None)
  key = ('dinov2', path, ev.get('dinov2_pos', 'hub'))
  if key not in _EXTRACTORS:
    _EXTRACTORS[key] = dinov2.DinoV2Extractor(path, pos_interp=key[2])
  return _EXTRACTORS[key]


def decode_to_images(samples: np.ndarray, dataset: ImageArrays,
                     ev: ml_collections.ConfigDict,
                     quantize: str = DEFAULT_QUANTIZE) -> np.ndarray:
  """Generated samples -> uint8 images for the feature networks.

  Image datasets: the samples in [-1, 1], quantised by `quantize`. Latent
  datasets (`kind == 'latent'`): decoded by the eval's VAE
  (`decode.decode_samples`, DiT's uint8 rule).
  """
  if dataset.spec.kind == 'latent':
    return decode.decode_samples(samples, dataset, decode.get_decoder(ev))
  return to_uint8(samples, quantize)


def score_images(samples: np.ndarray, dataset: ImageArrays,
                 ev: ml_collections.ConfigDict, seed: int, *,
                 mesh: Mesh | None = None) -> dict[str, Any]:
  """FID, bootstrap CI, IS, precision/recall and KID of `samples`.

  Args:
    samples: [N, H, W, C] float in [-1, 1] (quantised to uint8 here, by
      `ev.quantize`).
    dataset: the image dataset (reference split via `ev.ref_split`).
    ev: the eval config (feature_net, preprocess, inception_weights and the
      protocol options of `eval_settings`).
    seed: seeds the bootstrap / subset draws.
    mesh: the eval's mesh: feature nets split over its devices
      (`prepare`); None: one device.

  Returns:
    Scalar metrics plus 'reference' (a dict describing the statistics used)
    and 'settings' (`eval_settings(ev)` plus is_num_splits, the number of
    IS splits used): both for the harness to move into the row. With
    FD_DINOv2 on (`fd_dinov2_mode`), 'extra_records': [{'metrics':
    {'fd_dinov2': float}, 'feature_net', 'reference', 'settings'}], one
    record of its own feature space for the runner.
  """
  ctx = prepare(dataset, ev, mesh)
  images = decode_to_images(samples, dataset, ev, ctx.settings['quantize'])
  return score_features(features(images, ctx), dataset, ctx, seed)


@dataclasses.dataclass
class Context:
  """What scoring one eval needs, resolved once (`prepare`)."""

  ev: ml_collections.ConfigDict
  settings: dict[str, Any]
  adm: str | None
  feature_net: str
  extractor: Any
  decoder: Any
  ref: dict[str, Any]
  dinov2: Any = None  # the DINOv2 extractor when FD_DINOv2 is on
  # The generated samples' nets, split over every device of the eval's mesh
  # (`sharded_features`); None: `extractor` / `dinov2`.
  sample_extractor: Any = None
  sample_dinov2: Any = None


def prepare(dataset: ImageArrays, ev: ml_collections.ConfigDict,
            mesh: Mesh | None = None) -> Context:
  """Checks `ev`, loads the nets (+ VAE) and the reference statistics.

  With a `mesh`, the feature nets run data-parallel (`sharded_features`):
  on this process's devices of the mesh for the real images (reference
  statistics, FID floor), on all its devices, across processes, for the
  samples (`features`).
  """
  latent = dataset.spec.kind == 'latent'
  settings = eval_settings(ev, latent=latent)
  adm = reference.adm_path(ev)
  feature_net = feature_net_name(dataset, ev)
  if adm is not None and feature_net.startswith('classifier:'):
    raise ConfigError('evals.<name>.reference', ev.reference,
                      f'an ADM reference batch holds Inception statistics, '
                      f'but the feature net is {feature_net}',
                      "set feature_net='inception_v3' or reference=''")
  extractor = get_extractor(dataset, ev)
  dino = get_dinov2_extractor(ev) if fd_dinov2_mode(ev) == 'on' else None
  nets: dict[str, Any] = {}
  if mesh is not None:
    from onestep_bench.evaluators import sharded_features as sf  # pylint: disable=g-import-not-at-top
    everywhere, here = sf.eval_devices(mesh), sf.local_devices(mesh)
    nets = {'sample_extractor': sf.shard(extractor, everywhere),
            'sample_dinov2': sf.shard(dino, everywhere)}
    extractor, dino = sf.shard(extractor, here), sf.shard(dino, here)
  decoder = decode.get_decoder(ev) if latent else None
  if decoder is not None:
    settings.update(decode.row_fields(decoder, dataset))
  ref = get_reference(dataset, extractor, feature_net, settings, adm,
                      decoder=decoder)
  return Context(ev, settings, adm, feature_net, extractor, decoder, ref,
                 dino, **nets)


def features(images: np.ndarray, ctx: Context) -> dict[str, np.ndarray]:
  """uint8 samples -> the primary net's outputs (+ 'dinov2' features).

  Every process passes the same images and gets the same features (with a
  mesh, each extracts its devices' share: `sharded_features`).
  """
  net = ctx.extractor if ctx.sample_extractor is None else ctx.sample_extractor
  out = dict(net(images))
  if ctx.dinov2 is not None:
    dino = ctx.dinov2 if ctx.sample_dinov2 is None else ctx.sample_dinov2
    out['dinov2'] = dino(images)['features']
  return out


def score_features(out: dict[str, np.ndarray], dataset: ImageArrays,
                   ctx: Context, seed: int) -> dict[str, Any]:
  """`score_images`' metrics from `features(images, ctx)` of the samples.

  Lets a streamed evaluation (`streaming.py`) score features it extracted
  chunk by chunk, without keeping the images.
  """
  settings, ref, extractor = ctx.settings, ctx.ref, ctx.extractor
  feats = out['features']
  n = len(feats)
  mu, sigma = image_metrics.gaussian_stats(feats)
  m: dict[str, Any] = {
      'fid': image_metrics.frechet_distance(mu, sigma, ref['mu'],
                                            ref['sigma'])}
  if 'spatial' in out and 'mu_s' in ref:  # ADM's sFID
    m['sfid'] = image_metrics.frechet_distance(
        *image_metrics.gaussian_stats(out['spatial']), ref['mu_s'],
        ref['sigma_s'])
  floor = fid_floor(dataset, extractor, ref, n, seed, ctx.decoder)
  if floor is not None:
    m['fid_floor'] = floor
  n_boot = settings['fid_bootstrap']
  if n_boot:
    lo, hi = image_metrics.fid_bootstrap_ci(feats, ref['mu'], ref['sigma'],
                                            n_boot=n_boot, seed=seed)
    m['fid_ci_lo'], m['fid_ci_hi'] = float(lo), float(hi)
  split = settings['is_split_size']
  is_mean, is_std = (
      image_metrics.inception_score(out['logits'], split_size=split)
      if 'logits' in out else
      image_metrics.inception_score(probs=out['probs'], split_size=split))
  m['inception_score'], m['inception_score_std'] = float(is_mean), float(
      is_std)
  real = ref['features']
  fake = feats[:MAX_REF_FEATURES].astype(np.float32)
  p, r = image_metrics.precision_recall(real, fake, k=settings['pr_k'])
  m['precision'], m['recall'] = float(p), float(r)
  kid_mean, kid_std = image_metrics.kid(
      real, fake, num_subsets=KID_NUM_SUBSETS, subset_size=KID_SUBSET_SIZE,
      seed=seed)
  m['kid'], m['kid_std'] = float(kid_mean), float(kid_std)
  m['reference'] = _reference_record(ref)
  m['settings'] = {**settings, 'is_num_splits': len(
      image_metrics.is_split_rows(n, split))}
  if ctx.dinov2 is not None:
    m['extra_records'] = [fd_dinov2_record(out['dinov2'], dataset, ctx,
                                           m['settings'])]
  return m


def get_reference(dataset: ImageArrays, extractor: Any, feature_net: str,
                  settings: dict[str, Any], adm: str | None, *,
                  file_stats: bool = True,
                  decoder: Any = None) -> dict[str, Any]:
  """The ADM batch at `adm` (`reference.adm_reference`), else the split's."""
  if adm is not None:
    return reference.adm_reference(adm, extractor, feature_net,
                                   file_stats=file_stats)
  return reference_stats(dataset, extractor, feature_net,
                         settings['ref_split'], settings['ref_n'],
                         decoder=decoder)


def _reference_record(ref: dict[str, Any]) -> dict[str, Any]:
  """What a row records of its reference (the runner's `provenance`)."""
  out = {**ref['key'], 'cache': ref['path']}
  if 'ref_stats' in ref:  # an ADM batch names itself
    out['ref_stats'] = ref['ref_stats']
  return out


def fd_dinov2_record(feats: np.ndarray, dataset: ImageArrays, ctx: Context,
                     settings: dict[str, Any]) -> dict[str, Any]:
  """FD_DINOv2 of the samples' DINOv2 `feats` against its reference.

  The reference statistics are computed and cached exactly as the primary
  net's (`reference_stats`: same split and n, key with the DINOv2 feature
  net and its weights hash); with an ADM batch, from DINOv2 features of
  its images (the file's statistics are Inception's).
  """
  ext = ctx.dinov2
  ref = get_reference(dataset, ext, ext.feature_net, settings, ctx.adm,
                      file_stats=False, decoder=ctx.decoder)
  mu, sigma = image_metrics.gaussian_stats(feats)
  return {'metrics': {'fd_dinov2': image_metrics.frechet_distance(
              mu, sigma, ref['mu'], ref['sigma'])},
          'feature_net': ext.feature_net,
          'reference': _reference_record(ref),
          'settings': dict(settings)}
