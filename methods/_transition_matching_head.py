"""Head network and head ODE solver of `methods/transition_matching.py`.

Shaul, Singer, Gat, Lipman 2025, arXiv 2506.23589 (§2.5: the MAR-style
per-token MLP head; spec docs/methods/transition_matching.md §2.3, §2.6).
Holds `Head` (with its `_HeadBlock`), `HeadFn`, `HEAD_SAMPLERS` and
`integrate_head`; `methods/transition_matching.py` re-exports these names
(the method and tests read them there). Private module (leading '_'):
not a method plug-in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from onestep_bench import models
from onestep_bench.models import layers
from onestep_bench.models.embeddings import TimeEmbed


# ------------------------------------------------------------------- head
class _HeadBlock(nnx.Module):
  """MAR ResBlock: LN -> modulate -> Linear -> SiLU -> Linear, gated."""

  def __init__(self, width: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(width, width, rngs=rngs)
    self.fc2 = nnx.Linear(width, width, rngs=rngs)
    self.adaln = layers.AdaLN(width, width, 3, rngs=rngs)  # zero-init

  def __call__(self, z: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale, gate = self.adaln(c)
    h = layers.layer_norm(z) * (1 + scale) + shift
    return z + gate * self.fc2(nnx.silu(self.fc1(h)))


class Head(nnx.Module):
  """Per-token velocity g(Y_s, s, t, h): tokens [..., n, d] -> [..., n, d].

  Every token is processed independently (only Linear / per-token norms
  over the last axis), so no information crosses tokens (spec §2.3).
  """

  def __init__(self, token_dim: int, cond_dim: int, *, width: int, depth: int,
               freq_dim: int, rngs: nnx.Rngs):
    self.depth = depth
    self.inp = nnx.Linear(token_dim, width, rngs=rngs)
    self.cond = nnx.Linear(cond_dim, width, rngs=rngs)
    self.t_embed = TimeEmbed(width, freq_dim, rngs=rngs)
    self.s_embed = TimeEmbed(width, freq_dim, rngs=rngs)
    for i in range(depth):  # named attributes: plain str-keyed params
      setattr(self, f'block{i}', _HeadBlock(width, rngs=rngs))
    self.final_adaln = layers.AdaLN(width, width, 2, rngs=rngs)
    self.out = nnx.Linear(width, token_dim,
                          kernel_init=nnx.initializers.zeros, rngs=rngs)

  def context(self, rep: jax.Array, t: jax.Array) -> jax.Array:
    """Per-transition condition: rep [B, n, r], t [B] -> [B, n, w]."""
    return self.cond(rep) + self.t_embed(t)[:, None]

  def velocity(self, ctx: jax.Array, y: jax.Array, s: jax.Array) -> jax.Array:
    """Velocity: ctx [B, n, w], y [B, n, d], s ~ [B, n] -> [B, n, d]."""
    s = jnp.asarray(s, jnp.float32)
    c = ctx + self.s_embed(s.reshape(-1)).reshape(*s.shape, -1)
    z = self.inp(y)
    for i in range(self.depth):
      z = getattr(self, f'block{i}')(z, c)
    shift, scale = self.final_adaln(c)
    return self.out(layers.layer_norm(z) * (1 + scale) + shift)


class HeadFn(models.Functional):
  """`Head` as pure functions of its params (`models.Functional` + names)."""

  def context(self, params: dict[str, Any], rep: jax.Array,
              t: jax.Array) -> jax.Array:
    """`Head.context(rep, t)` with `params`."""
    return self.bind(params).context(rep, t)

  def velocity(self, params: dict[str, Any], ctx: jax.Array, y: jax.Array,
               s: jax.Array) -> jax.Array:
    """`Head.velocity(ctx, y, s)` with `params`."""
    return self.bind(params).velocity(ctx, y, s)



# ------------------------------------------------------ the head's solver
# Head evaluations per step of each `head_sampler`.
HEAD_SAMPLERS = {'euler': 1, 'midpoint': 2, 'heun': 2}


def integrate_head(velocity: Callable[[jax.Array, jax.Array], jax.Array],
                   y: jax.Array, steps: int, sampler: str) -> jax.Array:
  """Y_0 -> Y_1 along the head's flow dY/ds = u(Y, s), `steps` steps of 1/N.

  Args:
    velocity: u(y, s), y [B, n, d], s [1, 1] (one time for every token, so
      the s-embedding runs once per evaluation) -> [B, n, d].
    y: Y_0 ~ N(0, I), [B, n, d].
    steps: N uniform steps on s ∈ [0, 1].
    sampler: 'euler' (paper, N evaluations), 'midpoint' (explicit midpoint,
      2N evaluations, u at s_j and s_j + 1/2N) or 'heun' (trapezoidal
      predictor-corrector, 2N evaluations, u at s_j and s_{j+1}).

  Returns:
    Y_1, [B, n, d].
  """
  if sampler not in HEAD_SAMPLERS:
    raise ValueError(f'Unknown head_sampler={sampler!r}; valid: '
                     f'{tuple(HEAD_SAMPLERS)}.')
  dt = 1.0 / steps

  def step(y, j):
    s = jnp.reshape(j.astype(jnp.float32) * dt, (1, 1))
    u = velocity(y, s)
    if sampler == 'midpoint':
      u = velocity(y + 0.5 * dt * u, s + 0.5 * dt)
    elif sampler == 'heun':
      u = 0.5 * (u + velocity(y + dt * u, s + dt))
    return y + dt * u, None

  return jax.lax.scan(step, y, jnp.arange(steps))[0]
