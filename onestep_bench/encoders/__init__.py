"""Frozen self-supervised feature encoders: a ResNet trained as a masked AE.

Deng, Li, Li, Du, He 2026, "Generative Modeling via Drifting", arXiv
2602.04770, App. A.3 (ResNet-MAE encoder and its pre-training) and A.5 (the
multi-scale feature dictionary). Spec: docs/methods/drifting.md §1.5,
§1.11 ("a ResNet-MAE trained by the harness on the same training set").

`load_or_train(dataset) -> FrozenEncoder`: the encoder is trained once per
(dataset content, recipe), on the training split only and without labels,
and its EMA weights are cached (`cache_dir()/encoders/<key>.npz`). A method
stores `encoder.params` in its state and calls the pure function
`encoder.features(params, x)` inside its jitted step. The encoder is a
network of its own: it shares nothing with the evaluator's feature network
(`evaluators/classifier.py`), which is trained on labels.

One job per module:
  recipe.py    `RECIPE`, `resolve_recipe`, `CODE_VERSION` (what is trained).
  network.py   ResNet encoder, U-Net decoder, GroupNorm rule, `init_numpy`.
  features.py  the multi-scale feature dictionary, `FrozenEncoder`.
  mae.py       masks, the masked-AE model and its loss.
  pretrain.py  optimizer, train step, `train`, `pretrain_flops`.
  probe.py     masked-pixel test errors and the k-NN sanity probe.
  cache.py     cache key / path, checksummed save / load, `load_or_train`.

Cost of `RECIPE` at 600 steps (2 shared CPU cores, CPU time incl. compile
and evaluation): digits ≈ 38 CPU-s (training 32), Fashion-MNIST ≈ 240 CPU-s
(training 208, evaluation 32); a cache hit takes < 0.5 s. The masked-pixel
test MSE and k-NN sanity accuracies are in `FrozenEncoder.info`.
"""

from onestep_bench.encoders.cache import (
  CacheError,
  cache_key,
  encoder_path,
  load,
  load_or_train,
  save,
)
from onestep_bench.encoders.features import (
  EPS,
  POOLS,
  FrozenEncoder,
  feature_dict,
)
from onestep_bench.encoders.mae import MAE, patch_mask
from onestep_bench.encoders.network import (
  GroupRule,
  ResNetEncoder,
  UNetDecoder,
  decoder_fn,
  encoder_fn,
  group_rule,
  init_numpy,
  num_groups,
  num_params,
)
from onestep_bench.encoders.pretrain import pretrain_flops, train
from onestep_bench.encoders.probe import knn_probe, masked_errors, masked_mse
from onestep_bench.encoders.recipe import CODE_VERSION, RECIPE, resolve_recipe

__all__ = [
    'CODE_VERSION', 'EPS', 'MAE', 'POOLS', 'RECIPE', 'CacheError',
    'FrozenEncoder', 'GroupRule', 'ResNetEncoder', 'UNetDecoder',
    'cache_key', 'decoder_fn', 'encoder_fn', 'encoder_path', 'feature_dict',
    'group_rule', 'init_numpy', 'knn_probe', 'load', 'load_or_train',
    'masked_errors', 'masked_mse', 'num_groups', 'num_params', 'patch_mask',
    'pretrain_flops', 'resolve_recipe', 'save', 'train',
]
