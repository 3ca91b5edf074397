"""Fast training kernels in plain JAX: counter-hash dropout and cache-blocked attention.

Why (profiled on the 2-core CPU at the paper transformer's size, see benchmarks/):

* ``jax.random.bernoulli`` costs ~30 ns per element on CPU with every PRNG impl (threefry, rbg,
  unsafe_rbg: XLA's RNG ops are not vectorised there); the paper transformer draws ~130M dropout
  bits per step, which was over half of the step. Here a dropout mask is a counter-based hash
  (murmur3 ``fmix32`` twice, keyed by the 64 bits of a regular JAX key): ~1 ns per element,
  fused into the consumer, and re-derived in the backward pass instead of stored.
* Attention logits of a whole batch ([B, H, Q, K]) do not fit in cache; processing a few
  (cell, head) pairs at a time (``lax.map``) keeps each [g, Q, K] tile in L2. A ``custom_vjp``
  saves only the output and the row log-sum-exp and recomputes the probabilities per tile in the
  backward pass (flash-attention style): 7 tile matmuls per step instead of the 8 of a
  rematerialised forward, and no [B, H, Q, K] residuals.

* Dense layers over [B, N, d] activations: the autodiff transpose of Flax's 3-D ``dot_general``
  makes XLA:CPU materialise dy^T ([out, B*N]) and run the kernel gradient as a transposed-transposed
  Eigen dot, 20-30x slower than the forward matmul (64x128x64 -> 256: forward 1.2 ms, backward
  35 ms). ``dense_dot_general`` flattens to one 2-D matmul with a ``custom_vjp`` whose kernel
  gradient is ``x^T @ dy`` on the flat arrays (no transposed copy): backward ~6 ms. It is a
  drop-in ``dot_general`` for ``nn.Dense`` / ``nn.DenseGeneral`` (same params, same math).

The math is the usual softmax attention with float32 logits and softmax, a boolean key mask
(rows with no valid key give exactly 0), and inverted dropout on the probabilities.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

_C1, _C2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)
_GOLD, _ODD = np.uint32(0x9E3779B9), np.uint32(0x27D4EB2F)
TILE_ELEMENTS = int(os.environ.get("GIL_ATTN_TILE", 1 << 18))  # logits per CPU tile (1 MiB f32: L2)


def _fmix32(h: jax.Array) -> jax.Array:
  h = h ^ (h >> 16)
  h = h * _C1
  h = h ^ (h >> 13)
  h = h * _C2
  return h ^ (h >> 16)


def seed_words(key: jax.Array) -> jax.Array:
  """uint32[2] from a JAX PRNG key (typed key or raw uint32[2]); the hash's 64-bit seed."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  words = jnp.ravel(key).astype(jnp.uint32)
  return jnp.stack([words[0], words[-1] ^ _ODD])


def keep_mask(seed: jax.Array, shape: tuple[int, ...], rate: float,
              block: jax.Array | int = 0) -> jax.Array:
  """bool[shape], True with probability 1 - rate (to 2^-32), a pure function of (seed, block,
  element index): reproducible, so the backward pass re-derives it instead of storing it."""
  idx = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  h = _fmix32(idx * _GOLD + seed[0])
  h = _fmix32(h ^ (jnp.asarray(block, jnp.uint32) * _ODD + seed[1]))
  return h >= np.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))


def dropout(x: jax.Array, rate: float, seed: jax.Array) -> jax.Array:
  """Inverted dropout of ``x`` with a hash mask (see module docstring)."""
  if rate <= 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  keep = keep_mask(seed, x.shape, rate)
  return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


# ------------------------------------------------------------------------------------ dense

@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.matmul(x, w)


def _matmul_fwd(x, w):
  return jnp.matmul(x, w), (x, w)


def _matmul_bwd(res, dy):
  x, w = res
  f32 = jnp.float32
  dx = jnp.matmul(dy, w.T, preferred_element_type=f32).astype(x.dtype)
  dw = jnp.matmul(x.T, dy, preferred_element_type=f32).astype(w.dtype)  # [K, M] @ [M, N]
  return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> jax.Array:
  """``lax.dot_general`` for Dense layers (trailing lhs axes x leading rhs axes, no batch
  axes) as one flat 2-D matmul with a layout-friendly backward (see module docstring)."""
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc = tuple(int(a) for a in lc), tuple(int(a) for a in rc)
  n = len(lc)
  if lb or rb or lc != tuple(range(lhs.ndim - n, lhs.ndim)) or rc != tuple(range(n)):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  k = math.prod(rhs.shape[:n])
  out = _matmul(lhs.reshape(-1, k), rhs.reshape(k, -1))
  if preferred_element_type is not None:
    out = out.astype(preferred_element_type)
  return out.reshape(lhs.shape[:lhs.ndim - n] + rhs.shape[n:])


# ------------------------------------------------------------------------------------ attention

def _group_size(n_pairs: int, q: int, k: int) -> int:
  """(cell, head) pairs per tile: all of them off CPU; on CPU the largest divisor of n_pairs
  whose [g, q, k] logits stay under TILE_ELEMENTS."""
  if jax.default_backend() != "cpu":
    return n_pairs
  cap = max(1, TILE_ELEMENTS // max(q * k, 1))
  return max(d for d in range(1, min(cap, n_pairs) + 1) if n_pairs % d == 0)


def _to_tiles(x: jax.Array, g: int) -> jax.Array:
  """[B, S, H, D] -> [B*H/g, g, S, D]."""
  b, s, h, d = x.shape
  return jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h // g, g, s, d)


def _from_tiles(x: jax.Array, b: int, h: int) -> jax.Array:
  _, _, s, d = x.shape
  return jnp.transpose(x.reshape(b, h, s, d), (0, 2, 1, 3))


def _mask_tiles(mask: jax.Array, h: int, g: int) -> jax.Array:
  """bool[B, K] -> [B*H/g, g, K]."""
  b, k = mask.shape
  return jnp.broadcast_to(mask[:, None, :], (b, h, k)).reshape(b * h // g, g, k)


def _probs(q, k, m, lse, scale):
  logits = jnp.einsum("gqd,gkd->gqk", q, k, preferred_element_type=jnp.float32) * scale
  return jnp.where(m[:, None, :], jnp.exp(logits - lse[..., None]), 0.0)


def _fwd_tiles(q, k, v, m, seed, rate, g):
  n_tiles = q.shape[0]
  scale = q.shape[-1] ** -0.5
  inv = 1.0 / (1.0 - rate) if rate > 0 else 1.0

  def tile(args):
    qt, kt, vt, mt, j = args
    logits = jnp.einsum("gqd,gkd->gqk", qt, kt, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mt[:, None, :], logits, -jnp.inf)
    mx = jnp.max(logits, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    e = jnp.exp(logits - mx)                                  # masked keys: exp(-inf) = 0
    s = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.maximum(s, 1e-30)                             # all-masked rows: p = 0
    lse = (mx + jnp.log(jnp.maximum(s, 1e-30)))[..., 0]
    if rate > 0:
      p = jnp.where(keep_mask(seed, p.shape, rate, j), p * inv, 0.0)
    o = jnp.einsum("gqk,gkd->gqd", p.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
    return o.astype(vt.dtype), lse

  return jax.lax.map(tile, (q, k, v, m, jnp.arange(n_tiles, dtype=jnp.uint32)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attend_tiles(q, k, v, m, seed, rate, g):
  return _fwd_tiles(q, k, v, m, seed, rate, g)[0]


def _attend_tiles_fwd(q, k, v, m, seed, rate, g):
  o, lse = _fwd_tiles(q, k, v, m, seed, rate, g)
  return o, (q, k, v, m, seed, o, lse)


def _attend_tiles_bwd(rate, g, res, do):
  q, k, v, m, seed, _, lse = res
  scale = q.shape[-1] ** -0.5
  inv = 1.0 / (1.0 - rate) if rate > 0 else 1.0
  f32 = jnp.float32

  def tile(args):
    qt, kt, vt, mt, lt, dot, j = args
    p = _probs(qt, kt, mt, lt, scale)
    if rate > 0:
      keep = keep_mask(seed, p.shape, rate, j)
      pd = jnp.where(keep, p * inv, 0.0)
    else:
      pd = p
    dv = jnp.einsum("gqk,gqd->gkd", pd.astype(dot.dtype), dot, preferred_element_type=f32)
    dp = jnp.einsum("gqd,gkd->gqk", dot, vt, preferred_element_type=f32)
    if rate > 0:
      dp = jnp.where(keep, dp * inv, 0.0)
    ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)) * scale
    dq = jnp.einsum("gqk,gkd->gqd", ds.astype(kt.dtype), kt, preferred_element_type=f32)
    dk = jnp.einsum("gqk,gqd->gkd", ds.astype(qt.dtype), qt, preferred_element_type=f32)
    return dq.astype(qt.dtype), dk.astype(kt.dtype), dv.astype(vt.dtype)

  js = jnp.arange(q.shape[0], dtype=jnp.uint32)
  dq, dk, dv = jax.lax.map(tile, (q, k, v, m, lse, do, js))
  return dq, dk, dv, None, None


_attend_tiles.defvjp(_attend_tiles_fwd, _attend_tiles_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None,
              dropout_rate: float = 0.0, seed: jax.Array | None = None) -> jax.Array:
  """Softmax attention. q [B, Q, H, D], k/v [B, K, H, D], key_mask bool [B, K] or None ->
  [B, Q, H, D]. Dropout on the probabilities when ``seed`` (``seed_words``) is given."""
  b, nq, h, _ = q.shape
  nk = k.shape[1]
  rate = float(dropout_rate) if seed is not None else 0.0
  if seed is None:
    seed = jnp.zeros((2,), jnp.uint32)
  if key_mask is None:
    key_mask = jnp.ones((b, nk), bool)
  g = _group_size(b * h, nq, nk)
  out = _attend_tiles(_to_tiles(q, g), _to_tiles(k, g), _to_tiles(v, g),
                      _mask_tiles(key_mask, h, g), seed, rate, g)
  return _from_tiles(out, b, h)
