"""Difference Transition Matching (DTM): a backbone plus a per-token FM head.

Shaul, Singer, Gat, Lipman 2025, "Transition Matching: Scalable and Flexible
Generative Modeling", arXiv 2506.23589 (§2.2, Algs. 3-4, eq. 14, Thm. 1).
Spec: docs/methods/transition_matching.md §2 (no official code exists).

Time convention (the paper's, used in all maths below): τ ∈ [0, 1], τ = 0 is
noise and τ = 1 is data; T transitions visit τ_k = k / T. The harness's
convention (flow_matching.py: t = 0 data, t = 1 noise) is kept for the
*network inputs*: backbone and head are fed t = 1 - τ, so X_τ below is the
same point as flow matching's z_t and the two methods' backbones see the
same (z, t) pairs.

Supervising process (dependent linear process, spec §2.3), X_0 ~ N(0, I),
X_1 ~ data:
  X_τ = (1 - τ) X_0 + τ X_1,   Y = X_1 - X_0,   X_{τ+Δ} = X_τ + Δ·Y.
Y is fixed along a path, so one model serves every grid: with continuous
training τ ~ U[0, 1) (spec §2.3 recommendation) sampling works at any T;
with `train_T` > 0 the paper's discrete τ ∈ {0, 1/T, ..., (T-1)/T} is used
and any T' dividing train_T visits only trained times.

Kernel p_θ(Y | X_τ) = backbone + head: h = f_θ(X_τ, t) (one backbone NFE);
X and Y are cut into n tokens (head_patch × head_patch × C pixel groups for
images, the whole vector for toy data) and every token's Y^i is generated
independently given h^i by a small flow-matching head g_θ(Y^i_s, s, t, h^i).
Head training (conditional FM on Y | X_τ, one (s, Y_0) draw per token):
  Y_s = (1 - s) Y_0 + s Y,   Y_0 ~ N(0, I),   s ~ U[0, 1],
  L(θ) = E_{τ, X_0, X_1} (1/n) Σ_i E_{s, Y_0} ‖g_θ(Y^i_s, s, t, h^i)
                                                - (Y^i - Y^i_0)‖²
(MSE averaged over tokens and dims, spec §2.3). Sampling, T transitions:
  for k = 0..T-1: h = f_θ(X_{τ_k}, 1 - τ_k); Y ~ N(0, I); integrate
  dY/ds = g_θ(Y, s, t, h) over s ∈ [0, 1] in N steps; X ← X + Y/T.
The head solver is `head_sampler`: 'euler' (the paper's, Y ← Y + g/N) or
'midpoint' (default; Y ← Y + g(Y + g(Y, s_j)/2N, s_j + 1/2N)/N, 2 head
evaluations per step), or 'heun'. Euler under-disperses the kernel: with
the exact closed-form kernel of toy2d:gaussian, Euler x 8 gives a head
output covariance 28-39 % short of Cov(Y | X_τ) and samples 29 / 23 / 15 %
short of the data covariance (trace) at T = 1 / 2 / 4; midpoint x 4 (the
same 8 evaluations) is within 1.3 % (tests/test_transition_matching.py
§2, docs/methods/transition_matching.md §2.6).
Link to FM (eq. 14, Thm. 1): E[Y | X_τ] = E[X_1 - X_0 | z_t] = -v_FM(z_t, t),
so the *mean* DTM step is FM's Euler step; with an exact head DTM samples
exactly at any T (spec §2.9.1), and a 1-step Euler head gives back FM-Euler.

Design: what the head reads is `head_input`. 'hidden' (default, paper §2.5:
the head replaces the backbone's final layer): the backbone's last hidden
activation (`features` of the shared backbones, their output layer unused:
MLP: last hidden layer; U-Net: the last decoder map, head_patch² pixels of
it per token; DiT: its final tokens, (head_patch / patch_size)² per head
token). 'output': the backbone is `models.build(config.model, spec')` with
spec' = the data spec with `rep_dim` channels; X_τ is zero-padded to
rep_dim channels and the output is h. The head is the MAR-style MLP of
paper §2.5 (input Linear, AdaLN residual blocks, AdaLN final layer;
condition = Linear(h^i) + t-embedding, computed once per transition, +
s-embedding per head evaluation). Params are {'backbone': ..., 'head': ...},
so the default train_step / EMA apply. `nfe` = T = backbone calls; the
evaluator counts sampling FLOPs from the jitted sampler, so effective NFE
= T·(c_pass + c_ctx + E·c_head)/c_ref with E = N x (evaluations per step)
head evaluations, c_ref the protocol's reference backbone forward.

Classes (optional): labels are dropped to the null class with
`class_dropout`; with guidance w ≠ 1 the conditional and null backbones run
as one batched call per transition (FLOPs ×2) and the head velocity is
guided, u = u_∅ + w (u_y - u_∅) (paper §2.5: CFG on the head velocity).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from methods import _transition_matching_config
from methods._transition_matching_config import (  # noqa: F401 (API)
  HEAD_INPUTS,
  IMAGE_PRESET,
  divisors,
  get_config,
)
from methods._transition_matching_head import (  # noqa: F401 (API)
  HEAD_SAMPLERS,
  Head,
  HeadFn,
  _HeadBlock,
  integrate_head,
)
from onestep_bench import method as base
from onestep_bench import models


# ------------------------------------------------------------- the method
class Method(base.Method):
  """DTM: T backbone passes, each followed by a `head_steps`-step head ODE."""

  supported_nfe = base.AnyNFE()  # continuous τ; see __init__ for train_T
  # The head's inner steps cost FLOPs on top of the T backbone passes: the
  # evaluator's effective NFE is T·(1 + N·c_head/c_backbone) > T.
  extra_sampling_flops = True

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict) -> None:
    """Grid, representation / head sizes; NFEs dividing a discrete train_T.

    The checks: `validate_config` in methods/_transition_matching_config.py.
    """
    _transition_matching_config.validate_config(config)

  def __init__(self, config: ml_collections.ConfigDict, spec):
    super().__init__(config, spec)
    c = self.mcfg
    shape = tuple(spec.shape)
    if len(shape) not in (1, 3):
      raise ValueError(f'transition_matching handles vectors [D] or images '
                       f'[H, W, C]; got data shape {shape}.')
    self.chan = shape[-1]
    if c.head_input == 'output' and c.rep_dim < self.chan:
      raise ValueError(f'method.rep_dim={c.rep_dim} must be >= the data '
                       f'channels ({self.chan}): X_τ is zero-padded to it.')
    p = c.head_patch
    if len(shape) == 1 and p != 1:
      raise ValueError('method.head_patch must be 1 for vector data (one '
                       'token = the whole sample).')
    if len(shape) == 3 and (shape[0] % p or shape[1] % p):
      raise ValueError(f'method.head_patch={p} must divide the image size '
                       f'{shape[:2]}.')
    if c.train_T < 0 or c.head_steps < 1 or c.head_batch_mul < 1:
      raise ValueError('method.train_T must be >= 0, head_steps and '
                       'head_batch_mul >= 1.')
    if c.train_T:
      self.supported_nfe = divisors(c.train_T)
    if c.head_sampler not in HEAD_SAMPLERS:
      raise ValueError(f'method.head_sampler={c.head_sampler!r}; valid: '
                       f'{tuple(HEAD_SAMPLERS)}.')
    if c.head_input not in HEAD_INPUTS:
      raise ValueError(f'method.head_input={c.head_input!r}; valid: '
                       f'{HEAD_INPUTS}.')
    if c.head_input == 'output':  # the backbone emits rep_dim channels
      rep_spec = dataclasses.replace(spec, shape=(*shape[:-1], c.rep_dim))
      self.net = models.build(config.model, rep_spec)
    # else: the base class's data-shaped backbone; its output layer is unused.
    self.feature_stride = 1  # pixels per feature cell (DiT: patch_size)
    if c.head_input == 'hidden' and len(shape) == 3:
      fshape = jax.eval_shape(self._features, self.net.abstract(),
                              jnp.zeros((1, *shape)), jnp.zeros((1,)),
                              None).shape
      if len(fshape) != 4:
        raise ValueError(
            "method.head_input='hidden' needs a backbone whose features keep "
            f'the image grid (unet, dit); config.model.name='
            f'{config.model.name!r} gives {fshape[1:]}. Use '
            '--config.method.head_input=output.')
      stride = shape[0] // fshape[1]
      self.feature_stride = stride
      if (fshape[1:3] != (shape[0] / stride, shape[1] / stride)
          or p % stride):
        raise ValueError(
            f'method.head_patch={p} must be a multiple of the backbone\'s '
            f'feature stride: features {fshape[1:]} of images {shape} '
            f'(DiT: config.model.patch_size).')
    area = 1 if len(shape) == 1 else p * p
    rep = jax.eval_shape(
        lambda b, x: self.representation({'backbone': b}, x,
                                         jnp.zeros((1,)), None),
        self.net.abstract(), jnp.zeros((1, *shape)))
    self.head = HeadFn(lambda rngs: Head(
        area * self.chan, rep.shape[-1], width=c.head_width,
        depth=c.head_depth, freq_dim=c.head_freq_dim, rngs=rngs))

  # --------------------------------------------------------------- tokens
  def to_tokens(self, a: jax.Array, patch: int | None = None) -> jax.Array:
    """[B, D] -> [B, 1, D]; [B, H, W, C] -> [B, (H/p)(W/p), p·p·C].

    p = `patch`, default `head_patch` (feature maps pass their own).
    """
    if a.ndim == 2:
      return a[:, None]
    b, hh, ww, ch = a.shape
    p = self.mcfg.head_patch if patch is None else patch
    a = a.reshape(b, hh // p, p, ww // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    return a.reshape(b, (hh // p) * (ww // p), p * p * ch)

  def from_tokens(self, tok: jax.Array) -> jax.Array:
    """Inverse of `to_tokens` for data-shaped ([B, *spec.shape]) arrays."""
    b = tok.shape[0]
    if len(self.spec.shape) == 1:
      return tok[:, 0]
    hh, ww, ch = self.spec.shape
    p = self.mcfg.head_patch
    a = tok.reshape(b, hh // p, ww // p, p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    return a.reshape(b, hh, ww, ch)

  # ---------------------------------------------------------------- model
  def init(self, key: jax.Array, example_batch: base.Batch) -> base.TrainState:
    """Params {'backbone', 'head'}, optimizer state, EMA = params."""
    del example_batch
    kb, kh = jax.random.split(key)
    params = {'backbone': self.net.init(kb), 'head': self.head.init(kh)}
    return base.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state=self.tx.init(params), ema_params=params,
        extras=self.init_extras(key, params))

  def apply(self, params, x, t, h=None, y=None, g=None):
    """One backbone forward (its output layer): X [B, *shape] -> [B, ...].

    `params` is the full {'backbone', 'head'} dict. With head_input='output'
    X is zero-padded to rep_dim channels and the output is the
    representation; its rep_dim channels make it costlier than the
    protocol's reference forward (the evaluator's effective-NFE unit,
    `runner.reference_forward`), and that is counted.
    """
    if self.mcfg.head_input == 'output':
      pad = [(0, 0)] * (x.ndim - 1) + [(0, self.mcfg.rep_dim - self.chan)]
      x = jnp.pad(x, pad)
    return super().apply(params['backbone'], x, t, h, y, g)

  def _features(self, backbone, x: jax.Array, t: jax.Array,
                labels: jax.Array | None) -> jax.Array:
    """The backbone's last hidden activation (`features`), t [B], h = 0."""
    return self.net.bind(backbone).features(x, t, jnp.zeros_like(t), labels)

  def representation(self, params, xt: jax.Array, t: jax.Array,
                     labels: jax.Array | None) -> jax.Array:
    """One backbone pass: X_τ, t [B] -> the head's input per token [B, n, r].

    head_input='hidden' (paper §2.5: the head replaces the final layer): the
    backbone's last hidden activation, grouped per head token (MLP: its last
    hidden layer; U-Net: the last decoder map, head_patch² pixels of it; DiT:
    its final tokens). 'output': the rep_dim-channel output, patchified.
    """
    if self.mcfg.head_input == 'output':
      return self.to_tokens(self.apply(params, xt, t, 0.0, labels))
    feats = self._features(params['backbone'], xt, t, labels)
    return self.to_tokens(feats, self.mcfg.head_patch // self.feature_stride)

  def kernel_context(self, params, xt: jax.Array, tau: jax.Array,
                     labels: jax.Array | None) -> Any:
    """Backbone once + the head's per-transition condition, [B, n, w]."""
    t = jnp.broadcast_to(1.0 - jnp.asarray(tau, jnp.float32), xt.shape[:1])
    rep = self.representation(params, xt, t, labels)
    return self.head.context(params['head'], rep, t)

  def supervising_pair(self, x1: jax.Array, x0: jax.Array, tau: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """(X_τ, Y) = ((1 - τ) X_0 + τ X_1, X_1 - X_0); τ [B]."""
    tb = tau.reshape(tau.shape + (1,) * (x1.ndim - 1))
    return (1 - tb) * x0 + tb * x1, x1 - x0

  def sample_tau(self, key: jax.Array, n: int) -> jax.Array:
    """τ ~ U[0, 1) or uniform on {0, 1/T, ..., (T-1)/T}; [n] float32."""
    if self.mcfg.train_T:
      k = jax.random.randint(key, (n,), 0, self.mcfg.train_T)
      return k.astype(jnp.float32) / self.mcfg.train_T
    return jax.random.uniform(key, (n,))

  def loss(self, params, batch, key, state):
    """Head FM loss at one τ per example, one (s, Y_0) per token (§2.3)."""
    del state
    x1, labels = batch['x'], batch.get('y')
    kt, k0, ks, ky, kd = jax.random.split(key, 5)
    tau = self.sample_tau(kt, x1.shape[0])
    xt, y = self.supervising_pair(x1, jax.random.normal(k0, x1.shape), tau)
    if labels is not None and self.spec.num_classes:
      drop = jax.random.bernoulli(kd, self.mcfg.class_dropout, labels.shape)
      labels = jnp.where(drop, self.spec.num_classes, labels)
    ctx = self.kernel_context(params, xt, tau, labels)
    ytok = self.to_tokens(y)
    mul = self.mcfg.head_batch_mul
    if mul > 1:  # more head draws per backbone pass (MAR's batch_mul)
      ytok, ctx = jnp.tile(ytok, (1, mul, 1)), jnp.tile(ctx, (1, mul, 1))
    s = jax.random.uniform(ks, ytok.shape[:2])
    y0 = jax.random.normal(ky, ytok.shape)
    ys = (1 - s[..., None]) * y0 + s[..., None] * ytok
    u = self.head.velocity(params['head'], ctx, ys, s)
    return jnp.mean(jnp.square(u - (ytok - y0))), {}

  # ------------------------------------------------------------- sampling
  def sample(self, params, key, n, *, nfe, labels=None, guidance=None):
    """T = nfe transitions (T backbone calls), each a head ODE solve.

    `head_steps` steps of `head_sampler` (midpoint / heun: 2 head
    evaluations per step) per transition.
    """
    self.check_nfe(nfe)
    big_t, big_n = nfe, self.mcfg.head_steps
    guided = (labels is not None and guidance is not None
              and guidance != 1.0 and self.spec.num_classes > 0)
    k0, kh = jax.random.split(key)
    x = self.noise(k0, n)
    if guided:  # one batched backbone call: [conditional; null]
      labels = jnp.concatenate(
          [labels, jnp.full_like(labels, self.spec.num_classes)])

    def velocity(ctx, y, s):
      if not guided:
        return self.head.velocity(params['head'], ctx, y, s)
      u_c, u_u = jnp.split(self.head.velocity(
          params['head'], ctx, jnp.concatenate([y, y]), s), 2)
      return u_u + guidance * (u_c - u_u)

    def transition(x, k):
      tau = k.astype(jnp.float32) / big_t
      xin = jnp.concatenate([x, x]) if guided else x
      ctx = self.kernel_context(params, xin, tau, labels)
      y = jax.random.normal(jax.random.fold_in(kh, k),
                            self.to_tokens(x).shape)
      y = integrate_head(functools.partial(velocity, ctx), y, big_n,
                         self.mcfg.head_sampler)
      return x + self.from_tokens(y) / big_t, None

    return jax.lax.scan(transition, x, jnp.arange(big_t))[0]
