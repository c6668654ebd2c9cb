"""Image datasets held in memory: `ImageArrays` (the image `Dataset`).

Images are stored once as uint8 NHWC (`[N, H, W, C]`, the exact pixels of the
source files) and converted to float32 in [-1, 1] only when a batch is drawn.
Small sets (digits, MNIST, Fashion-MNIST, CIFAR-10: <= ~200 MB) live on the
accelerator, replicated; a batch is a random gather drawn *inside* the jitted
train step from the step's key, so there is no iterator state and resume is
bitwise (docs/architecture.md §4).

The evaluator reads `split_images(split)` (uint8, exact pixels) to build the
reference statistics: FID references are computed from the data's own pixels,
never from a float round trip.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from onestep_bench.data import DataSpec

Split = tuple[np.ndarray, np.ndarray]  # (images uint8 [N,H,W,C], labels [N])


def to_float(x: jax.Array) -> jax.Array:
  """uint8 [..., H, W, C] -> float32 in [-1, 1].

  (x - 127.5) / 127.5 maps 0 and 255 to exactly -1 and 1 in float32.
  """
  return (x.astype(jnp.float32) - 127.5) / 127.5


QUANTIZE_MODES = ('round', 'truncate')
DEFAULT_QUANTIZE = 'round'


def to_uint8(x: np.ndarray | jax.Array,
             quantize: str = DEFAULT_QUANTIZE) -> np.ndarray:
  """Float in [-1, 1] -> uint8 [0, 255], clipped, as a saved PNG holds it.

  Two published rules, both computed in float32 as in their torch sources:

    'round' (default): EDM, NVlabs/edm `generate.py`
      `(images * 127.5 + 128).clip(0, 255).to(torch.uint8)`, i.e.
      floor(127.5 x + 128) = 127.5 (x + 1) rounded half up. Unbiased: a
      continuous output keeps its mean, and `to_float` pixels come back
      exactly.
    'truncate': ADM, openai/guided-diffusion `scripts/image_sample.py`
      `((sample + 1) * 127.5).clamp(0, 255).to(th.uint8)`, i.e.
      floor(127.5 (x + 1)): every pixel moves down by 0.5 on average, and
      a float just below an integer drops by one level (103 of the 256
      `to_float` pixels do, after float32 rounding). Use it to reproduce
      ADM-protocol numbers.

  Args:
    x: floats in [-1, 1] (values outside are clipped), any shape.
    quantize: 'round' or 'truncate' (`QUANTIZE_MODES`).

  Returns:
    uint8 array of x's shape.
  """
  if quantize not in QUANTIZE_MODES:
    raise ValueError(f'quantize={quantize!r}: expected one of '
                     f'{QUANTIZE_MODES}.')
  x = np.asarray(x, np.float32)
  if quantize == 'round':
    y = x * np.float32(127.5) + np.float32(128)
  else:
    y = (x + np.float32(1)) * np.float32(127.5)
  # float -> uint8 truncates toward zero, as torch's .to(uint8) does.
  return np.clip(y, 0, 255).astype(np.uint8)


def random_shift(key: jax.Array, x: jax.Array, pad: int) -> jax.Array:
  """Random translation by up to `pad` pixels (edge padding), per image."""
  if not pad:
    return x
  b, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='edge')
  off = jax.random.randint(key, (b, 2), 0, 2 * pad + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0),
                                              (h, w, img.shape[-1]))
  return jax.vmap(crop)(xp, off)


def check_split(name: str, split: str, images: np.ndarray,
                labels: np.ndarray, kind: str = 'image') -> Split:
  """Validates one split: uint8 (float for latents) NHWC + int labels."""
  ok = images.dtype == np.uint8 if kind == 'image' else np.issubdtype(
      images.dtype, np.floating)
  if not ok or images.ndim != 4:
    want = 'uint8 images' if kind == 'image' else 'float latents'
    raise ValueError(f'{name}/{split}: expected {want} [N, H, W, C], got '
                     f'{images.dtype} {images.shape}.')
  if labels.shape != (images.shape[0],):
    raise ValueError(f'{name}/{split}: {images.shape[0]} images but labels of '
                     f'shape {labels.shape}.')
  return images, labels.astype(np.int32)


# The split a `data.holdout` carves from train (`carve_holdout`): named
# 'validation' so evals can score against it (`evals.<name>.ref_split`).
HOLDOUT_SPLIT = 'validation'


def holdout_count(holdout: Any, n: int, name: str = '') -> int:
  """Images `data.holdout` takes from a train split of `n` (0 = none).

  Args:
    holdout: 0 / None (none), a fraction in (0, 1) (rounded to the nearest
      count), or a whole count >= 1 (an int, or a float like 300.0).
    n: size of the train split.
    name: the dataset, for the error.

  Raises:
    ConfigError: not one of those, or it would hold out no image or every
      image.
  """
  from onestep_bench.config_check import ConfigError, is_real  # pylint: disable=g-import-not-at-top
  fix = ('e.g. --config.data.holdout=0.2 (a fraction of the train split) '
         'or =300 (a count); 0 = no holdout')
  if holdout is None or (is_real(holdout) and holdout == 0):
    return 0
  if is_real(holdout) and holdout >= 1 and float(holdout).is_integer():
    h = int(holdout)  # a count (300.0 too: ConfigDict casts to the type)
  elif is_real(holdout) and 0 < holdout < 1:
    h = int(round(float(holdout) * n))
  else:
    raise ConfigError('data.holdout', holdout, 'must be 0 (none), a fraction '
                      'in (0, 1) or a whole count >= 1', fix)
  if n and not 1 <= h < n:
    raise ConfigError('data.holdout', holdout, f'holds out {h} of the {n} '
                      f'train images of {name or "the data"}: it must take at '
                      'least one and leave at least one', fix)
  return h


def carve_holdout(splits: dict[str, Split], holdout: Any, seed: int,
                  name: str = '') -> tuple[dict[str, Split], dict[str, Any]]:
  """{'train': train minus the held-out images, HOLDOUT_SPLIT: them}.

  The held-out indices are the first `holdout_count` of a
  `np.random.RandomState(seed)` permutation of the train split (sorted), so
  the split is a pure function of (train split, holdout, seed). Every other
  split of the source (test, its own validation) is dropped: nothing run on
  a development dataset can read the test split.

  Returns:
    (splits, info): info records holdout, seed, the counts, the dropped
    splits and a sha256 of the held-out indices (provenance).
  """
  import hashlib  # pylint: disable=g-import-not-at-top
  images, labels = splits['train']
  n = len(images)
  h = holdout_count(holdout, n, name)
  perm = np.random.RandomState(seed).permutation(n)
  held, keep = np.sort(perm[:h]), np.sort(perm[h:])
  info = {'holdout': holdout, 'holdout_seed': int(seed), 'n_train': int(
      len(keep)), 'n_holdout': int(h), 'split': HOLDOUT_SPLIT,
          'dropped_splits': sorted(set(splits) - {'train'}),
          'indices_sha256': hashlib.sha256(
              held.astype(np.int64).tobytes()).hexdigest()[:16]}
  return {'train': (images[keep], labels[keep]),
          HOLDOUT_SPLIT: (images[held], labels[held])}, info


class ImageArrays:
  """An in-memory labelled image dataset with the `Dataset` API.

  `kind='image'` stores uint8 pixels and yields x / 127.5 - 1; `kind='latent'`
  stores float VAE latents and yields them times `scale` (e.g. SD-VAE's
  0.18215), so the generator works in a unit-variance latent space.

  Attributes:
    spec: shape (H, W, C); num_classes is 0 when `conditional=False` (labels
      are then neither fed to the model nor used by the evaluator).
    holdout: None, or `carve_holdout`'s info when the splits are a
      development view (train minus a held-out validation split).
  """

  def __init__(self, name: str, splits: dict[str, Split], num_classes: int,
               *, conditional: bool = False, hflip: bool = False,
               train_split: str = 'train', kind: str = 'image',
               scale: float = 1.0, holdout: dict[str, Any] | None = None):
    self.holdout = holdout
    if train_split not in splits:
      raise ValueError(f'{name}: no split {train_split!r}; have '
                       f'{sorted(splits)}.')
    self.splits = {k: check_split(name, k, *v, kind=kind)
                   for k, v in splits.items()}
    self.scale = scale
    self.train_split = train_split
    self.hflip = hflip
    self.label_classes = num_classes
    images, labels = self.splits[train_split]
    self.spec = DataSpec(name=name, shape=tuple(images.shape[1:]),
                         num_classes=num_classes if conditional else 0,
                         kind=kind)
    self._arrays: dict[str, jax.Array] | None = None
    self._host = {'x': images, 'y': labels}
    if num_classes:  # class index tables for class-grouped batches
      order = np.argsort(labels, kind='stable').astype(np.int32)
      counts = np.bincount(labels, minlength=num_classes).astype(np.int32)
      start = (np.cumsum(counts) - counts).astype(np.int32)
      self._host.update(by_class=order, class_count=counts,
                        class_start=start)

  @property
  def arrays(self) -> dict[str, jax.Array]:
    """The training split as device arrays (uint8 images, int32 labels)."""
    if self._arrays is None:
      self._arrays = jax.tree.map(jnp.asarray, self._host)
    return self._arrays

  def sample(self, key: jax.Array, n: int,
             arrays: dict[str, Any] | None = None, *,
             groups: int = 0) -> dict[str, jax.Array]:
    """A uniform random batch with replacement; jit-able.

    Args:
      key: PRNG key (the step's data key).
      n: batch size.
      arrays: `self.arrays`, passed explicitly by the jitted train step so the
        dataset is an argument, not a constant baked into the program.
      groups: G > 0 on conditional data: the batch is G contiguous blocks of
        n / G examples of one class each, the G classes drawn at data
        frequency (the label of a uniformly random example) and the examples
        uniformly within the class (Drifting's per-class groups, spec §1.4).
        Ignored on unconditional data (one group: the plain batch).

    Returns:
      {'x': [n, H, W, C] float32 in [-1, 1]} plus 'y': [n] int32 when the
      spec is conditional.
    """
    arrays = self.arrays if arrays is None else arrays
    k_idx, k_flip = jax.random.split(key)
    if groups and self.spec.num_classes:
      idx = self._grouped_indices(k_idx, n, groups, arrays)
    else:
      idx = jax.random.randint(k_idx, (n,), 0, arrays['x'].shape[0])
    x = arrays['x'][idx]
    x = to_float(x) if x.dtype == jnp.uint8 else x * self.scale
    if self.hflip:
      flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
      x = jnp.where(flip, x[:, :, ::-1], x)
    batch = {'x': x}
    if self.spec.num_classes:
      batch['y'] = arrays['y'][idx]
    return batch

  @staticmethod
  def _grouped_indices(key: jax.Array, n: int, groups: int,
                       arrays: dict[str, Any]) -> jax.Array:
    """[n] example indices: `groups` blocks, one class per block."""
    if n % groups:
      raise ValueError(f'batch size {n} is not divisible into {groups} class '
                       'groups; change config.train.batch_size or the '
                       "method's group count.")
    k_cls, k_ex = jax.random.split(key)
    anchor = jax.random.randint(k_cls, (groups,), 0, arrays['y'].shape[0])
    cls = arrays['y'][anchor]                                     # [G]
    u = jax.random.uniform(k_ex, (groups, n // groups))
    pos = jnp.floor(u * arrays['class_count'][cls][:, None]).astype(jnp.int32)
    pos = jnp.minimum(pos, arrays['class_count'][cls][:, None] - 1)
    start = arrays['class_start'][cls][:, None]
    return arrays['by_class'][start + pos].reshape(n)

  def split_images(self, split: str) -> Split:
    """(uint8 images, labels) of `split`, for reference statistics."""
    if split not in self.splits:
      raise ValueError(f'{self.spec.name} has no split {split!r}; available: '
                       f'{sorted(self.splits)} '
                       '(config.evals.<name>.ref_split).')
    return self.splits[split]

  def label_frequencies(self) -> np.ndarray:
    """[num_classes] empirical class frequencies of the training split."""
    labels = self.splits[self.train_split][1]
    return np.bincount(labels, minlength=self.label_classes) / labels.size

  def reference(self, key: jax.Array, n: int) -> np.ndarray:
    """`n` training images as float [-1, 1] (toy-API compatibility)."""
    images = self.splits[self.train_split][0]
    idx = np.asarray(jax.random.choice(key, images.shape[0], (n,),
                                       replace=n > images.shape[0]))
    return (np.asarray(images[idx], np.float64) - 127.5) / 127.5
