"""Which attention implementation a model runs: `config.model.attention`.

* ``cpu_tiled`` -- the CPU kernels of ``kernels.py``: packed projections read in place, tiles of
  (cell, head group) sized for the cache, probabilities recomputed in the backward pass, dropout
  masks from a counter hash.
* ``xla`` -- the same math as one whole-batch einsum / softmax / einsum left to autodiff (stores
  the probabilities); any backend, any dropout.
* ``auto`` (default) -- ``cpu_tiled`` on CPU. On GPU / TPU ``jax.nn.dot_product_attention`` with
  XLA choosing the fastest correct kernel (cuDNN's fused flash attention where shapes and dtypes
  allow) when no attention dropout is in effect (eval, or ``dropout=0``), else ``xla`` (the fused
  kernels take no dropout).

Every path returns exactly 0 for a query without a valid key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gil_jax.models import kernels

IMPLEMENTATIONS = ("auto", "xla", "cpu_tiled")


def check(name: str) -> str:
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"unknown config.model.attention {name!r}; known: {list(IMPLEMENTATIONS)}")
  return name


def resolve(name: str, dropout_in_effect: bool, backend: str | None = None) -> str:
  """The concrete path of `name` on `backend` (default: JAX's default backend)."""
  check(name)
  if name != "auto":
    return name
  if (backend or jax.default_backend()) == "cpu":
    return "cpu_tiled"
  return "xla" if dropout_in_effect else "fused"


def attend(q: jax.Array | None, kv: jax.Array, key_mask: jax.Array | None, rate: float,
           seed: jax.Array | None, implementation: str = "auto",
           backend: str | None = None) -> jax.Array:
  """Softmax attention of q [B, Q, H, D] (None: self-attention, q packed in kv) over packed
  kv [B, K, 3 | 2, H, D]; key_mask bool [B, K] or None; dropout `rate` on the probabilities when
  `seed` is given. -> [B, Q, H, D]. `backend` (default: JAX's) only steers 'auto'."""
  path = resolve(implementation, seed is not None and rate > 0.0, backend)
  if path == "cpu_tiled":
    return (kernels.self_attention(kv, key_mask, rate, seed) if q is None else
            kernels.cross_attention(q, kv, key_mask, rate, seed))
  qt = kv[:, :, 0] if q is None else q
  k, v = kv[:, :, -2], kv[:, :, -1]
  mask = jnp.ones(k.shape[:2], bool) if key_mask is None else key_mask
  if path == "xla":
    if seed is None:
      seed, rate = jnp.zeros((2,), jnp.uint32), 0.0
    return kernels.plain_attention(qt, k, v, mask, seed, rate)
  out = jax.nn.dot_product_attention(qt, k, v, mask=mask[:, None, None, :])
  return jnp.where(jnp.any(mask, axis=1)[:, None, None, None], out, 0).astype(v.dtype)
