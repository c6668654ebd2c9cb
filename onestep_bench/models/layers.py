"""Building blocks shared by the `unet` and `dit` backbones.

Everything here is plain XLA (einsum + softmax attention, no custom-VJP
kernels), so it is differentiable in both modes: `jax.jvp` (MeanFlow / TVM
targets), `jax.grad`, and reverse-over-forward (TVM differentiates through the
tangent). Normalizations and the softmax are computed in float32 whatever the
compute dtype (in float64 when the inputs are float64 under `jax.enable_x64`,
which finite-difference tests use; see `wide`).

TVM's "semi-Lipschitz" DiT options (docs/methods/tvm.md §2.5, implementation
notes §2b) live here: no-affine RMSNorm (`norm='rmsnorm'`), QK-norm
(`RMSNorm` with a learnable scale over head_dim on q and k), RMS-normalized
adaLN chunks (`AdaLN(rms_normalize=True)`), and spectral init
(`spectral_init`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]

NORMS = ('layernorm', 'rmsnorm')
MODULATIONS = ('adaln', 'rms_adaln')
INITS = ('dit', 'spectral')


def wide(dtype: jnp.dtype) -> jnp.dtype:
  """At least float32: float32 for bf16/f32 inputs, float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


# -------------------------------------------------------------------- norms
def rms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """RMS-normalizes the last axis, no affine, in float32 (eps 1e-6)."""
  x32 = x.astype(wide(x.dtype))
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
  return y.astype(x.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """(x - mean) / sqrt(var + eps) over the last axis, no affine; float32."""
  x32 = x.astype(wide(x.dtype))
  mu = jnp.mean(x32, -1, keepdims=True)
  xc = x32 - mu
  y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, -1, keepdims=True) + eps)
  return y.astype(x.dtype)


def affine_free_norm(kind: str) -> Callable[[jax.Array], jax.Array]:
  """'layernorm' | 'rmsnorm' -> the no-affine norm (eps 1e-6, DiT / TVM)."""
  if kind == 'layernorm':
    return layer_norm
  if kind == 'rmsnorm':
    return rms_norm
  raise ValueError(f'Unknown norm {kind!r}; valid: {NORMS}.')


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis with an optional learnable scale (init 1)."""

  def __init__(self, dim: int, *, use_scale: bool = True, eps: float = 1e-6,
               rngs: nnx.Rngs | None = None):
    del rngs  # No random state; the argument keeps the nnx convention.
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32)) if use_scale else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalizes the last axis (float32 math, x's dtype out)."""
    y = rms_norm(x, self.eps)
    if self.scale is not None:
      y = (y.astype(wide(x.dtype)) * self.scale[...]).astype(x.dtype)
    return y


def group_count(channels: int, max_groups: int = 32) -> int:
  """Largest group count <= max_groups that divides `channels`."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  return 1


# --------------------------------------------------------------- attention
def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Softmax attention, [B, N, H, Dh] each -> [B, N, H, Dh].

  Plain einsum/softmax with float32 logits: forward- and reverse-mode
  differentiable (no custom-VJP kernel, see docs/methods/tvm.md §2b).
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                      preferred_element_type=wide(q.dtype)) * scale
  w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', w, v)


class Attention(nnx.Module):
  """Multi-head self-attention on tokens [B, N, D], optional QK-norm.

  Attributes:
    qkv: fused Linear D -> 3D (DiT layout: q, k, v chunks, then heads).
    proj: output Linear D -> D.
    q_norm, k_norm: `RMSNorm(head_dim)` with learnable scale when `qk_norm`.
  """

  def __init__(self, dim: int, heads: int, *, qk_norm: bool = False,
               kernel_init: Initializer | None = None,
               proj_init: Initializer | None = None,
               dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f'Attention width {dim} is not divisible by '
                       f'heads={heads}.')
    self.heads = heads
    kernel_init = kernel_init or nnx.initializers.xavier_uniform()
    self.qkv = nnx.Linear(dim, 3 * dim, kernel_init=kernel_init, dtype=dtype,
                          rngs=rngs)
    self.proj = nnx.Linear(dim, dim, kernel_init=proj_init or kernel_init,
                           dtype=dtype, rngs=rngs)
    hd = dim // heads
    self.q_norm = RMSNorm(hd, rngs=rngs) if qk_norm else None
    self.k_norm = RMSNorm(hd, rngs=rngs) if qk_norm else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """Tokens [B, N, D] -> [B, N, D]."""
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return self.proj(attention(q, k, v).reshape(b, n, d))


# -------------------------------------------------------------- modulation
def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """DiT's x * (1 + scale) + shift, with [B, D] shift/scale over tokens."""
  return x * (1 + scale[:, None]) + shift[:, None]


class AdaLN(nnx.Module):
  """c -> SiLU -> Linear(D, n·D) (zero-init) -> n chunks of [B, D].

  With `rms_normalize` (TVM's `do_mod_norm`), each chunk is RMS-normalized
  over D (no weight, eps 1e-6) before use. This mirrors TVM exactly,
  including its caveat: with the adaLN-Zero init every chunk is exactly 0 at
  init, so the normalized chunk is 0 too and its local gain is 1/sqrt(eps)
  = 1e3 (docs/methods/tvm.md §2.5).
  """

  def __init__(self, cond_dim: int, dim: int, chunks: int, *,
               rms_normalize: bool = False, dtype: jnp.dtype | None = None,
               rngs: nnx.Rngs):
    self.chunks = chunks
    self.rms_normalize = rms_normalize
    self.lin = nnx.Linear(cond_dim, chunks * dim,
                          kernel_init=nnx.initializers.zeros, dtype=dtype,
                          rngs=rngs)

  def __call__(self, c: jax.Array) -> list[jax.Array]:
    """Conditioning [B, Dc] -> `chunks` arrays [B, D]."""
    out = jnp.split(self.lin(nnx.silu(c)), self.chunks, axis=-1)
    if self.rms_normalize:
      out = [rms_norm(o) for o in out]
    return out


# -------------------------------------------------------------------- init
def top_singular_value(w: jax.Array) -> jax.Array:
  """Exact spectral norm of `w` viewed as a [fan_in, fan_out] matrix.

  Conv / patch kernels [..., in, out] are flattened to [prod(...)·in, out].
  Computed as sqrt of the top eigenvalue of the smaller Gram matrix (cheaper
  than an SVD; exact up to float32 rounding).
  """
  m = w.reshape(-1, w.shape[-1]).astype(jnp.float32)
  gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
  return jnp.sqrt(jnp.linalg.eigvalsh(gram)[-1])


def spectral_init(target: float = 1.0) -> Initializer:
  """Spectral initialization: a weight with spectral norm exactly `target`.

  Zhou et al. 2025 (arXiv 2511.19797, official `init_type: spectral`;
  docs/methods/tvm.md §2.5) draw xavier-normal weights and divide by
  their top singular value. The xavier scale cancels in that ratio, so we
  draw N(0, 1) and rescale by `target / sigma_max`, with sigma_max computed
  exactly (Gram-matrix eigenvalue, `top_singular_value`) rather than by
  power iteration (which underestimates sigma_max for random matrices, whose
  top singular values are clustered) or by the Gaussian analytic bound
  (sqrt(m) + sqrt(n), only asymptotic). Biases stay 0 (the Linear default).

  Args:
    target: the spectral norm of the returned weight.

  Returns:
    An initializer `(key, shape, dtype) -> array`.
  """

  def init(key, shape, dtype=jnp.float32):
    w = jax.random.normal(key, shape, jnp.float32)
    return (w * (target / top_singular_value(w))).astype(dtype)

  return init


def linear_init(kind: str) -> Initializer:
  """Transformer kernel init: 'dit' (xavier-uniform) | 'spectral'."""
  if kind == 'dit':
    return nnx.initializers.xavier_uniform()
  if kind == 'spectral':
    return spectral_init(1.0)
  raise ValueError(f'Unknown init {kind!r}; valid: {INITS}.')


def compute_dtype(name: str) -> jnp.dtype | None:
  """'float32' -> None (nnx promotes: float32) | 'bfloat16' -> bfloat16.

  Params stay float32 either way. None rather than float32 lets float64
  inputs and params (finite-difference tests under `jax.enable_x64`) run in
  float64.
  """
  table = {'float32': None, 'bfloat16': jnp.bfloat16}
  if name not in table:
    raise ValueError(f'Unknown dtype {name!r}; valid: {tuple(table)}.')
  return table[name]
