"""Fast training kernels in plain JAX: counter-hash dropout and cache-blocked attention.

Why (profiled on the 2-core CPU at the paper transformer's size, see benchmarks/):

* ``jax.random.bernoulli`` costs ~30 ns per element on CPU with every PRNG impl (threefry, rbg,
  unsafe_rbg: XLA's RNG ops are not vectorised there); the paper transformer draws ~130M dropout
  bits per step, which was over half of the step. Here a dropout mask is a counter-based hash
  (murmur3 ``fmix32`` twice, keyed by the 64 bits of a regular JAX key): ~1 ns per element,
  fused into the consumer, and re-derived in the backward pass instead of stored.
* Attention logits of a whole batch ([B, H, Q, K]) do not fit in cache. On CPU a ``fori_loop``
  walks tiles of up to ``TILE_ELEMENTS`` logits (env ``GIL_ATTN_TILE``): a group of one cell's
  heads, or several whole cells when they fit (the paper size: all 8 heads of one 513-token
  cell); a batch that fits one tile skips the loop for plain autodiff attention. Tiles are
  read from the packed projections ([B, S, 3, H, D] for self-attention) and written in place:
  no [B*H, S, D] transposes before or after, and the gradient comes back packed like its input. A ``custom_vjp`` saves only the output and the
  row log-sum-exp and recomputes the probabilities per tile in the backward pass (flash-attention
  style): 7 tile matmuls, no [B, H, Q, K] residuals. Off CPU the whole batch is one tile.
* Inside a tile, XLA:CPU is sensitive to layout and fusion: a transposed-lhs matmul runs at about
  half the speed of a plain one, and a reduction fused into a matmul (as autodiff's
  ``sum(dP * P)`` was) or over a short minor axis takes up to 14 ns per element. So the backward
  pass works on the transposed [K, Q] probabilities (dV and dK become plain matmuls), takes
  ``rowsum(dP * P) = rowsum(dO * O)`` as a GEMV outside the loop, hashes each dropout mask once,
  and scales q instead of the logits. Paper transformer, one layer's attention, forward +
  backward on 32 cells: 460 ms before these changes, ~300 ms after.

* Dense layers over [B, N, d] activations: the autodiff transpose of Flax's 3-D ``dot_general``
  makes XLA:CPU materialise dy^T ([out, B*N]) and run the kernel gradient as a transposed-transposed
  Eigen dot, 20-30x slower than the forward matmul (64x128x64 -> 256: forward 1.2 ms, backward
  35 ms). ``dense_dot_general`` flattens to one 2-D matmul with a ``custom_vjp`` whose kernel
  gradient is ``x^T @ dy`` on the flat arrays (no transposed copy): backward ~6 ms. It is a
  drop-in ``dot_general`` for ``nn.Dense`` / ``nn.DenseGeneral`` (same params, same math).

The math is the usual softmax attention with float32 logits (from q pre-scaled by 1/sqrt(D) in
the compute dtype) and softmax, a boolean key mask (rows with no valid key give exactly 0), and
inverted dropout on the probabilities.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_C1, _C2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)
_GOLD, _ODD = np.uint32(0x9E3779B9), np.uint32(0x27D4EB2F)
TILE_ELEMENTS = int(os.environ.get("GIL_ATTN_TILE", 1 << 22))  # logits per CPU tile (16 MiB f32)


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
              block: jax.Array | int = 0, transposed: bool = False) -> jax.Array:
  """bool[..., *shape], True with probability 1 - rate (to 2^-32): a pure function of (seed,
  block, element index within ``shape``), so the backward pass re-derives it instead of storing
  it. ``block`` (uint32, any shape broadcastable against ``shape``) numbers independent planes.
  ``transposed``: the mask of the 2-D ``shape`` laid out as [shape[1], shape[0]]."""
  if transposed:
    rows, cols = shape
    out = (cols, rows)
    idx = (jax.lax.broadcasted_iota(jnp.uint32, out, 1) * np.uint32(cols)
           + jax.lax.broadcasted_iota(jnp.uint32, out, 0))
  else:
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
  if w.shape[1] == 1:  # a single output (value heads): a GEMV, without transposing x
    dw = jnp.matmul(dy[:, 0], x, preferred_element_type=f32)[:, None].astype(w.dtype)
  else:
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

class _Tiling(NamedTuple):
  cells: int   # cells per tile
  heads: int   # heads per tile
  n_head_groups: int

  def origin(self, i):
    """(first cell, first head) of tile ``i``."""
    return (i // self.n_head_groups) * self.cells, (i % self.n_head_groups) * self.heads

  def count(self, b: int) -> int:
    return (b // self.cells) * self.n_head_groups


def _largest_divisor(n: int, cap: int) -> int:
  return max(d for d in range(1, min(max(cap, 1), n) + 1) if n % d == 0)


def _tiling(b: int, h: int, q: int, k: int) -> _Tiling:
  """Off CPU one tile (the whole batch). On CPU as many heads, then cells, as keep a tile's
  [cells, heads, q, k] logits under TILE_ELEMENTS (at least one (cell, head) pair)."""
  if jax.default_backend() != "cpu":
    return _Tiling(b, h, 1)
  hg = _largest_divisor(h, TILE_ELEMENTS // max(q * k, 1))
  cells = _largest_divisor(b, TILE_ELEMENTS // max(hg * q * k, 1)) if hg == h else 1
  return _Tiling(cells, hg, h // hg)


def _read(x, t: _Tiling, i, head_axis: int):
  """Tile ``i`` of x [B, ..., H, ...] (``head_axis`` = H's axis): cells and heads sliced."""
  b0, h0 = t.origin(i)
  x = jax.lax.dynamic_slice_in_dim(x, b0, t.cells, 0)
  return jax.lax.dynamic_slice_in_dim(x, h0, t.heads, head_axis)


def _write(buf, x, t: _Tiling, i, head_axis: int):
  b0, h0 = t.origin(i)
  start = [0] * buf.ndim
  start[0], start[head_axis] = b0, h0
  return jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), start)


def _head_major(x):
  """[c, S, ..., hg, D] -> [c, ..., hg, S, D] in one copy: every tile matmul then runs on
  contiguous row-major operands (otherwise XLA transposes the [Q, K] probabilities instead)."""
  return jnp.moveaxis(x, 1, -2)


def _seq_major(x):
  """Inverse of ``_head_major``."""
  return jnp.moveaxis(x, -2, 1)


def _read_qkv(q, kv, t: _Tiling, i):
  """Head-major (q, k, v) tiles [c, hg, S, D]: self-attention (q is None) reads all three from
  kv [B, S, 3, H, D]; cross-attention reads q [B, Q, H, D] and kv [B, K, 2, H, D]."""
  blk = _head_major(_read(kv, t, i, 3))                        # [c, 2|3, hg, S, D]
  if q is None:
    return blk[:, 0], blk[:, 1], blk[:, 2]
  return _head_major(_read(q, t, i, 2)), blk[:, 0], blk[:, 1]


def _plane_ids(t: _Tiling, i, n_heads: int):
  """uint32[c, hg, 1, 1] global (cell, head) plane ids of tile i: dropout masks depend only on
  the global (cell, head, query, key) position, not on the tiling."""
  b0, h0 = t.origin(i)
  cells = jnp.arange(t.cells, dtype=jnp.uint32)[:, None] + jnp.asarray(b0, jnp.uint32)
  heads = jnp.arange(t.heads, dtype=jnp.uint32)[None, :] + jnp.asarray(h0, jnp.uint32)
  return (cells * np.uint32(n_heads) + heads)[..., None, None]


def _dropped(p, seed, t: _Tiling, i, n_heads: int, rate: float, transposed: bool = False):
  """Inverted dropout of the probabilities p [c, hg, Q, K] (or their transpose [c, hg, K, Q];
  the same mask either way). Identity at rate 0."""
  if rate <= 0:
    return p
  if rate >= 1:
    return jnp.zeros_like(p)
  shape = p.shape[-2:][::-1] if transposed else p.shape[-2:]
  keep = keep_mask(seed, shape, rate, _plane_ids(t, i, n_heads), transposed)
  return jnp.where(keep, p * np.float32(1.0 / (1.0 - rate)), np.float32(0.0))


def _scaled(q):
  """q / sqrt(D), applied to the small [.., Q, D] tile rather than to the [.., Q, K] logits."""
  return q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)


def _dims(q, kv):
  """(B, Q, K, H, D) of a self- (q is None) or cross-attention call."""
  b, nk, _, h, d = kv.shape
  return b, (nk if q is None else q.shape[1]), nk, h, d


def _read_mask(m, t: _Tiling, i):
  """The key mask rows [c, K] of tile ``i``."""
  return jax.lax.dynamic_slice_in_dim(m, t.origin(i)[0], t.cells, 0)


def _attn_fwd(q, kv, m, seed, rate):
  b, nq, nk, h, d = _dims(q, kv)
  t = _tiling(b, h, nq, nk)
  f32 = jnp.float32

  def body(i, carry):
    o_buf, lse_buf = carry
    qt, kt, vt = _read_qkv(q, kv, t, i)
    mt = _read_mask(m, t, i)[:, None, None, :]
    logits = jnp.einsum("chqd,chkd->chqk", _scaled(qt), kt, preferred_element_type=f32)
    logits = jnp.where(mt, logits, -jnp.inf)
    mx = jnp.max(logits, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    e = jnp.exp(logits - mx)                                  # masked keys: exp(-inf) = 0
    s = jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)
    p = _dropped(e / s, seed, t, i, h, rate)                  # all-masked rows: p = 0
    o = jnp.einsum("chqk,chkd->chqd", p.astype(vt.dtype), vt, preferred_element_type=f32)
    lse = (mx + jnp.log(s))[..., 0]
    return _write(o_buf, _seq_major(o), t, i, 2), _write(lse_buf, lse, t, i, 1)

  init = (jnp.zeros((b, nq, h, d), kv.dtype), jnp.zeros((b, h, nq), f32))
  return jax.lax.fori_loop(0, t.count(b), body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, kv, m, seed, rate):
  return _attn_fwd(q, kv, m, seed, rate)[0]


def _attention_fwd(q, kv, m, seed, rate):
  o, lse = _attn_fwd(q, kv, m, seed, rate)
  return o, (q, kv, m, seed, o, lse)


def _attention_bwd(rate, res, do):
  q, kv, m, seed, o, lse = res
  b, nq, nk, h, d = _dims(q, kv)
  t = _tiling(b, h, nq, nk)
  f32 = jnp.float32
  # rowsum(P * dP) = rowsum(dO * O), also with dropout: from the [B, Q, H, D] arrays instead of
  # the [Q, K] probabilities; as a matmul with ones (XLA:CPU's minor-axis reductions are slow).
  delta = ((do.astype(f32) * o.astype(f32)) @ jnp.ones((d,), f32)).transpose(0, 2, 1)

  def body(i, carry):
    dq_buf, dkv_buf = carry
    qt, kt, vt = _read_qkv(q, kv, t, i)
    qs = _scaled(qt)
    mt = _read_mask(m, t, i)[:, None, :, None]
    lt, dt = _read(lse, t, i, 1)[..., None, :], _read(delta, t, i, 1)[..., None, :]
    dot = _head_major(_read(do, t, i, 2))
    # Transposed probabilities [K, Q]: then dv and dk are plain (NN) matmuls, which XLA:CPU runs
    # ~1.9x faster than the transposed-lhs products of the [Q, K] layout.
    st = jnp.einsum("chkd,chqd->chkq", kt, qs, preferred_element_type=f32)
    pt = jnp.where(mt, jnp.exp(st - lt), 0.0)
    pdt = _dropped(pt, seed, t, i, h, rate, transposed=True)
    dv = jnp.einsum("chkq,chqd->chkd", pdt.astype(dot.dtype), dot, preferred_element_type=f32)
    dpt = jnp.einsum("chkd,chqd->chkq", vt, dot, preferred_element_type=f32)
    # d logits = P * (dPd * keep / (1 - rate) - delta) = Pd * dPd - P * delta: the dropout mask
    # enters only through Pd, so it is hashed once per tile.
    dst = (pdt * dpt - pt * dt).astype(kt.dtype)
    dk = jnp.einsum("chkq,chqd->chkd", dst, qs, preferred_element_type=f32)
    dq = _scaled(jnp.einsum("chkq,chkd->chqd", dst, kt, preferred_element_type=f32))
    if q is None:
      return dq_buf, _write(dkv_buf, _seq_major(jnp.stack([dq, dk, dv], 1)), t, i, 3)
    return (_write(dq_buf, _seq_major(dq), t, i, 2),
            _write(dkv_buf, _seq_major(jnp.stack([dk, dv], 1)), t, i, 3))

  init = (None if q is None else jnp.zeros_like(q), jnp.zeros_like(kv))
  dq, dkv = jax.lax.fori_loop(0, t.count(b), body, init)
  return dq, dkv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def plain_attention(q, k, v, m, seed, rate):
  """Whole-batch attention left to autodiff (stores the probabilities): faster on CPU when the
  batch's [B, H, Q, K] logits fit in one tile. Same math and dropout mask as the tiled kernel."""
  b, nq, h, d = q.shape
  logits = jnp.einsum("bqhd,bkhd->bhqk", _scaled(q), k, preferred_element_type=jnp.float32)
  logits = jnp.where(m[:, None, None, :], logits, -jnp.inf)
  mx = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  e = jnp.exp(logits - jnp.where(jnp.isfinite(mx), mx, 0.0))
  s = jnp.sum(e, axis=-1, keepdims=True)
  p = e / jnp.where(s > 0, s, 1.0)                                   # all-masked rows: p = 0
  p = _dropped(p, seed, _Tiling(b, h, 1), 0, h, rate)
  return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v,
                    preferred_element_type=jnp.float32).astype(v.dtype)


def _dispatch(q, kv, key_mask, dropout_rate, seed):
  b, nq, nk, h, _ = _dims(q, kv)
  rate = float(dropout_rate) if seed is not None else 0.0
  if seed is None:
    seed = jnp.zeros((2,), jnp.uint32)
  if key_mask is None:
    key_mask = jnp.ones((b, nk), bool)
  if jax.default_backend() == "cpu" and b * h * nq * nk <= TILE_ELEMENTS:
    qt = kv[:, :, 0] if q is None else q
    return plain_attention(qt, kv[:, :, -2], kv[:, :, -1], key_mask, seed, rate)
  return _attention(q, kv, key_mask, seed, rate)


def self_attention(qkv: jax.Array, key_mask: jax.Array | None, dropout_rate: float = 0.0,
                   seed: jax.Array | None = None) -> jax.Array:
  """Softmax self-attention of packed projections qkv [B, S, 3, H, D] (q, k, v on axis 2),
  key_mask bool [B, S] or None -> [B, S, H, D]. Dropout on the probabilities when ``seed``
  (``seed_words``) is given. The gradient comes back packed like ``qkv``. On CPU, batches whose
  logits fit in one tile skip the tiled kernel (plain autodiff is faster there)."""
  return _dispatch(None, qkv, key_mask, dropout_rate, seed)


def cross_attention(q: jax.Array, kv: jax.Array, key_mask: jax.Array | None,
                    dropout_rate: float = 0.0, seed: jax.Array | None = None) -> jax.Array:
  """Softmax attention of q [B, Q, H, D] over packed kv [B, K, 2, H, D] (k, v on axis 2),
  key_mask bool [B, K] or None -> [B, Q, H, D]; dropout as in ``self_attention``."""
  return _dispatch(q, kv, key_mask, dropout_rate, seed)

