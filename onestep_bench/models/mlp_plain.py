"""`mlp_plain`: the peers' plain MLP, layer for layer, for like-for-like runs.

Two reference networks, one class (docs/perf_peers.md has the tables):

  torchcfm (atong01/conditional-flow-matching, `torchcfm/models/models.py`,
  `MLP(dim, w=..., time_varying=True)`, called on `cat([x_t, t[:, None]])`):
    Linear(dim + 1, w) -> SELU -> Linear(w, w) -> SELU -> Linear(w, w)
    -> SELU -> Linear(w, dim)
  = `mlp_plain` with activation='selu', time_input='t', depth=3.

  Drifting toy demo (lambertae.github.io `projects/drifting/notebooks/
  drifting_model_demo.ipynb`, `MLP(in_dim, hidden=256, out_dim=2)`, called
  on noise z only, no time input):
    Linear(in_dim, 256) -> SiLU -> Linear(256, 256) -> SiLU
    -> Linear(256, 256) -> SiLU -> Linear(256, 2)
  = `mlp_plain` with activation='silu', time_input='none', depth=3, where
  in_dim is the data dim (the harness draws the generator's noise with the
  data's shape; the demo's default in_dim is 32, a `train_toy` argument).

`depth` counts hidden layers (activations), as both references have 3:
one input Linear, depth - 1 Linear(w, w), one output Linear. Parameters for
dim 2, w 256: 133,122 (torchcfm, time input) / 132,866 (no time input).

Init is PyTorch's `nn.Linear` default, so a run starts from the same law as
the peer's: weight kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in),
1/sqrt(fan_in)) (gain sqrt(2 / (1 + 5)) times sqrt(3 / fan_in)), and bias
U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Unlike the project's own backbones the
output layer is NOT zero-initialised (the peers' is not).

Time convention: the harness passes its own t (t = 0 data, t = 1 noise;
torchcfm's t = 1 is data). The time value is one input feature either way,
so the network and its cost are the same. `time_input='t'` ignores h: use it
with methods whose h is a constant (flow matching h = 0, Drifting h = 1);
two-time methods (MeanFlow, TVM, ...) need `time_input='th'` ([x, t, h]).
Labels, guidance and style inputs are refused (the peers take none).

Weight layout: `layers[i].kernel` [in, out] is torch `net.{2i}.weight.T`,
`layers[i].bias` is `net.{2i}.bias` (`torch_state_dict`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from onestep_bench import config_check as cc

ACTIVATIONS = {'selu': nnx.selu, 'silu': nnx.silu}
# Scalars concatenated to the flattened x, in this order.
TIME_INPUTS = {'none': (), 't': ('t',), 'th': ('t', 'h')}


def torch_linear_init(fan_in: int):
  """PyTorch `nn.Linear.reset_parameters`: (kernel_init, bias_init).

  Weight: kaiming_uniform_(a=sqrt(5)) = U(-b, b), b = gain * sqrt(3 /
  fan_in) with gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), so b = 1/sqrt(fan_in);
  in flax terms variance_scaling(1/3, 'fan_in', 'uniform'). Bias: U(-1 /
  sqrt(fan_in), 1 / sqrt(fan_in)).
  """
  bound = 1.0 / np.sqrt(fan_in)

  def bias_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return (nnx.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform'),
          bias_init)


class MLPPlain(nnx.Module):
  """Plain MLP on [x (, t (, h))]: torchcfm's / the Drifting demo's network.

  x: [B, ...] -> x's shape. No embeddings, no residuals, no normalisation.
  """

  def __init__(self, dim: int, *, width: int = 256, depth: int = 3,
               activation: str = 'selu', time_input: str = 't',
               num_classes: int = 0, guidance_embed: bool = False,
               style_tokens: int = 0, style_vocab: int = 64,
               rngs: nnx.Rngs):
    """Builds the layers (see the module docstring for the references).

    Args:
      dim: flattened data dim (input and output size).
      width: hidden width (torchcfm `w`, the demo's `hidden`).
      depth: hidden layers (activations), >= 1; both references use 3.
      activation: 'selu' (torchcfm) or 'silu' (Drifting demo).
      time_input: 'none' (demo: the noise only), 't' (torchcfm: [x, t]) or
        'th' ([x, t, h], for two-time methods).
      num_classes: from the data; must be 0 (no label input).
      guidance_embed: must be False (no guidance input).
      style_tokens: must be 0 (no style input).
      style_vocab: unused (accepted because every bench config sets it).
      rngs: nnx RNG streams.

    Raises:
      ConfigError: an option this network does not have, naming the key.
    """
    del style_vocab
    cc.require_choice({'activation': activation}, 'model', 'activation',
                      tuple(ACTIVATIONS))
    cc.require_choice({'time_input': time_input}, 'model', 'time_input',
                      tuple(TIME_INPUTS))
    cc.require_int({'depth': depth}, 'model', 'depth', 1, example=3)
    if num_classes:
      raise cc.ConfigError(
          'data.conditional', True, f'backbone mlp_plain takes no labels '
          f'(the data has {num_classes} classes)',
          '--config.data.conditional=False, or --config.model.name=mlp')
    if guidance_embed:
      raise cc.ConfigError('model.guidance_embed', guidance_embed,
                           'backbone mlp_plain has no guidance input',
                           '--config.model.guidance_embed=False')
    if style_tokens:
      raise cc.ConfigError('model.style_tokens', style_tokens,
                           'backbone mlp_plain has no style input',
                           '--config.model.style_tokens=0')
    self.act = ACTIVATIONS[activation]
    self.time_input = time_input
    sizes = [dim + len(TIME_INPUTS[time_input])] + [width] * depth + [dim]
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
      k_init, b_init = torch_linear_init(fan_in)
      layers.append(nnx.Linear(fan_in, fan_out, kernel_init=k_init,
                               bias_init=b_init, rngs=rngs))
    self.layers = nnx.List(layers)

  def __call__(self, x: jax.Array, t: jax.Array, h: jax.Array,
               y: jax.Array | None = None, g: jax.Array | None = None,
               s: jax.Array | None = None) -> jax.Array:
    """model(x, t, h): the shared signature; y, g, s must be None.

    Args:
      x: [B, ...] float32.
      t: [B] current time (used with time_input 't' / 'th').
      h: [B] second time input (used with time_input 'th' only).
      y: labels: must be None.
      g: guidance input: must be None.
      s: style input: must be None.

    Returns:
      [B, ...] float32, x's shape.
    """
    for name, v in (('labels y', y), ('guidance g', g), ('style s', s)):
      if v is not None:
        raise ValueError(f'backbone mlp_plain got {name}, which it does not '
                         'take; use config.model.name=mlp for conditional '
                         'inputs.')
    b = x.shape[0]
    inputs = {'t': t, 'h': h}
    z = jnp.concatenate(
        [x.reshape(b, -1)] + [jnp.broadcast_to(inputs[k], (b,))[:, None]
                              .astype(x.dtype)
                              for k in TIME_INPUTS[self.time_input]], -1)
    for layer in self.layers[:-1]:
      z = self.act(layer(z))
    return self.layers[-1](z).reshape(x.shape).astype(jnp.float32)


def torch_state_dict(params: dict[str, Any]) -> dict[str, np.ndarray]:
  """`Backbone.init` params -> torchcfm / demo `MLP.state_dict()` (numpy).

  Keys `net.{2i}.weight` ([out, in], the kernel transposed) and
  `net.{2i}.bias`: the `nn.Sequential` indices of the Linear layers, the
  activations sitting at the odd indices.
  """
  layers = params['layers']
  out = {}
  for i in sorted(layers, key=int):
    out[f'net.{2 * int(i)}.weight'] = np.asarray(layers[i]['kernel']).T.copy()
    out[f'net.{2 * int(i)}.bias'] = np.asarray(layers[i]['bias']).copy()
  return out
