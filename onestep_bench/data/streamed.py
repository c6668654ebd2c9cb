"""`StreamedImages`: the image `Dataset` of the host-fed grain pipeline.

Same API as `images.ImageArrays` (spec, `sample`, `split_images`,
`reference`, ...), but nothing is resident on the device (`arrays` is {}):
the train loop feeds each step's batch (data/pipeline.py) and `sample`
turns it into the training batch inside the jitted step, with the same
conversions as the device path: uint8 -> (x - 127.5) / 127.5, latents x
`scale`, and the random horizontal flip drawn from the step's data key.

Evaluation-side reads (`split_images`, reference statistics, the domain
classifier, Drifting's frozen encoder) materialise a split in host memory
on first use, as before; only training batches stream.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from onestep_bench.data import DataSpec, arrayrecord, latent_records, sources
from onestep_bench.data.images import to_float

Split = tuple[np.ndarray, np.ndarray]


class StreamedImages:
  """A labelled image / latent set read from random-access sources.

  Attributes:
    spec: shape of one example; num_classes 0 unless `conditional`.
    splits: {split: source} (membership: which splits exist).
    train_source: the source the grain pipeline reads.
  """

  host_fed = True

  def __init__(self, name: str, split_sources: dict[str, Any],
               num_classes: int, *, conditional: bool = False,
               hflip: bool = False, train_split: str = 'train',
               kind: str = 'image', scale: float = 1.0):
    if train_split not in split_sources:
      raise ValueError(f'{name}: no split {train_split!r}; have '
                       f'{sorted(split_sources)}.')
    self.splits = dict(split_sources)
    self.train_split, self.hflip, self.scale = train_split, hflip, scale
    self.label_classes = num_classes
    first = np.asarray(self.train_source[0]['x'])
    ok = (first.dtype == np.uint8 if kind == 'image'
          else np.issubdtype(first.dtype, np.floating))
    if not ok or first.ndim != 3:
      want = 'uint8 images' if kind == 'image' else 'float latents'
      raise ValueError(f'{name}/{train_split}: expected {want} [H, W, C], '
                       f'got {first.dtype} {first.shape}.')
    self.spec = DataSpec(name=name, shape=tuple(first.shape),
                         num_classes=num_classes if conditional else 0,
                         kind=kind)
    self._cache: dict[str, Split] = {}

  @property
  def train_source(self) -> Any:
    """Random-access source of the training split."""
    return self.splits[self.train_split]

  @property
  def arrays(self) -> dict[str, jax.Array]:
    """Nothing is device-resident: batches are fed per step."""
    return {}

  def _read(self, split: str, idx: Any) -> dict[str, np.ndarray]:
    return sources.read_rows(self.splits[split], idx)

  def sample(self, key: jax.Array, n: int,
             arrays: dict[str, Any] | None = None, *,
             groups: int = 0) -> dict[str, jax.Array]:
    """The training batch of a fed host batch; jit-able.

    Args:
      key: the step's data key (only the flip uses it).
      n: batch size (= the fed batch's).
      arrays: the step's fed batch {'x': [n, ...], 'y': [n]}; None (outside
        jit: example batches for shapes) reads the first `n` examples.
      groups: must be 0 on conditional data (class-grouped batches are the
        device path's; refused by the config check).

    Returns:
      {'x': [n, *shape] float32} plus 'y' [n] int32 when conditional.
    """
    if groups and self.spec.num_classes:
      raise ValueError('Class-grouped batches need config.data.pipeline='
                       "'device'.")
    if not arrays:
      arrays = jax.tree.map(jnp.asarray, self._read(self.train_split,
                                                    range(n)))
    _, k_flip = jax.random.split(key)  # the device path's key split
    x = arrays['x']
    if x.shape[0] != n:
      raise ValueError(f'fed batch of {x.shape[0]}, expected {n}.')
    x = (to_float(x) if x.dtype == jnp.uint8
         else x.astype(jnp.float32) * self.scale)
    if self.hflip:
      flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
      x = jnp.where(flip, x[:, :, ::-1], x)
    batch = {'x': x}
    if self.spec.num_classes:
      batch['y'] = arrays['y'].astype(jnp.int32)
    return batch

  def split_images(self, split: str) -> Split:
    """(examples, int32 labels) of `split`, read once into host memory."""
    if split not in self.splits:
      raise ValueError(f'{self.spec.name} has no split {split!r}; available: '
                       f'{sorted(self.splits)} '
                       '(config.evals.<name>.ref_split).')
    if split not in self._cache:
      src = self.splits[split]
      if hasattr(src, 'read_all'):
        self._cache[split] = src.read_all()
      elif isinstance(src, sources.ArraySource):
        x = src.examples
        self._cache[split] = (np.asarray(x, np.float32 if x.dtype != np.uint8
                                         else np.uint8), src.labels)
      else:
        d = self._read(split, range(len(src)))
        self._cache[split] = (d['x'], d['y'])
    return self._cache[split]

  def label_frequencies(self) -> np.ndarray:
    """[num_classes] empirical class frequencies of the training split."""
    src = self.train_source
    counts = getattr(src, 'meta', {}).get('class_counts')
    if not counts:
      labels = self.split_images(self.train_split)[1]
      counts = np.bincount(labels, minlength=self.label_classes)
    counts = np.asarray(counts, np.float64)
    return counts / counts.sum()

  def reference(self, key: jax.Array, n: int) -> np.ndarray:
    """`n` training examples as float [-1, 1] (reads only those `n`)."""
    total = len(self.train_source)
    idx = np.asarray(jax.random.choice(key, total, (n,),
                                       replace=n > total))
    x = self._read(self.train_split, idx)['x']
    return (np.asarray(x, np.float64) - 127.5) / 127.5


def build(config: ml_collections.ConfigDict) -> StreamedImages:
  """The host-fed dataset of `config` (`data.build` with pipeline='grain').

  Sources, first match: the harness's ArrayRecord files in `config.dir`
  (for `latents:<dir>`: in <dir>); `prepare_latents` records
  (`onestep_latents/v1`, data/latent_records.py: already scaled, so
  `latent_scale` must equal their sidecar's and is not applied again);
  memory-mapped latent `.npy` files (times `latent_scale`); TFDS
  `data_source` splits (mnist, cifar10, imagenet64); the in-memory loaders
  (digits, fashion_mnist) as `ArraySource`s.
  """
  family, _, sub = config.name.partition(':')
  directory = sub if family == 'latents' else (config.get('dir') or None)
  kwargs = dict(conditional=bool(config.get('conditional', False)),
                hflip=bool(config.get('hflip', False)),
                scale=float(config.get('latent_scale', 1.0)))
  if family == 'latents' and not sub:
    raise ValueError("Use config.data.name='latents:<directory>'.")
  if arrayrecord.has_split(directory):
    srcs = arrayrecord.open_splits(
        directory, None if family == 'latents' else family)
    train = srcs['train']
    return StreamedImages(config.name, srcs, train.num_classes,
                          kind=arrayrecord.kind_of(train.dtype), **kwargs)
  if family == 'latents' and latent_records.has_split(sub):
    srcs = latent_records.open_splits(sub)  # prepare_latents' records
    kwargs['scale'] = latent_records.loader_scale(config, srcs['train'])
    return StreamedImages(config.name, srcs, srcs['train'].num_classes,
                          kind='latent', **kwargs)
  if family == 'latents':
    srcs, k = sources.open_latents(sub)
    return StreamedImages(config.name, srcs, k, kind='latent', **kwargs)
  if family in sources.TFDS_NAMES:
    srcs = {s: sources.TfdsSource(family, directory, s)
            for s in sources.tfds_splits(family)}
    return StreamedImages(config.name, srcs, sources.TFDS_NAMES[family][1],
                          **kwargs)
  if family == 'digits':
    splits, k = sources.load_digits()
  elif family == 'fashion_mnist':
    splits, k = sources.load_fashion_mnist(directory)
  else:
    raise ValueError(f'config.data.pipeline=grain: no source for dataset '
                     f'{config.name!r}.')
  return StreamedImages(
      config.name, {s: sources.ArraySource(x, y, config.name, s)
                    for s, (x, y) in splits.items()}, k, **kwargs)
