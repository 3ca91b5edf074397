"""Shared model parts: the per-gene parameter table, attention and small MLP helpers.

Conventions: masks are booleans (True = valid key); params are float32, activations use the
module's compute ``dtype``; softmax always runs in float32.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gil_jax.models import attention, kernels

GENES = "genes"   # name of the one top-level submodule holding every per-gene parameter
LN_EPS = 1e-5     # PyTorch's LayerNorm eps (both reference implementations are PyTorch)

Dtype = Any
Array = jax.Array


def _key_name(k: Any) -> str:
  """A path entry as a string: plain str, or a jax DictKey / GetAttrKey."""
  for attr in ("key", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def is_gene_param(path: Sequence[Any]) -> bool:
  """True for params under the top-level ``genes`` submodule (leading dim = gene capacity).

  Accepts a tuple of names (``flax.traverse_util.flatten_dict``) or a jax key path
  (``jax.tree_util.tree_map_with_path``); a leading ``'params'`` collection name is skipped.
  """
  names = [_key_name(k) for k in path]
  if names and names[0] == "params":
    names = names[1:]
  return bool(names) and names[0] == GENES


def compute_dtype(name: str) -> Dtype:
  """'float32' | 'bfloat16' -> jnp dtype."""
  table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if name not in table:
    raise ValueError(f"unknown model dtype {name!r}; known: {sorted(table)}")
  return table[name]


class GeneTable(nn.Module):
  """All per-gene parameters; every one has leading dimension ``capacity``.

  ``embedding`` [capacity, features] (N(0, init_std)); ``log_theta`` [capacity] (NB
  inverse-dispersion, init 0 = theta 1) when ``with_theta``; ``bias`` [capacity] (the gene's
  level in the gene + cell offset head, init 0, set from data when a gene is first activated)
  when ``with_bias``. Lookups are plain gathers, so rows
  absent from a batch get exactly zero gradient; out-of-range ids give NaN (bug, not silence).
  """
  capacity: int
  features: int
  with_theta: bool = False
  with_bias: bool = False
  init_std: float = 0.02

  def setup(self):
    self.embedding = self.param("embedding", nn.initializers.normal(self.init_std),
                                (self.capacity, self.features), jnp.float32)
    if self.with_theta:
      self.log_theta = self.param("log_theta", nn.initializers.zeros, (self.capacity,),
                                  jnp.float32)
    if self.with_bias:
      self.bias = self.param("bias", nn.initializers.zeros, (self.capacity,), jnp.float32)

  def embed(self, ids: Array) -> Array:
    """float32[..., features] rows for int ``ids``."""
    return jnp.take(self.embedding, ids, axis=0, mode="fill")

  def theta(self, ids: Array) -> Array:
    """float32[...] NB log-theta for ``ids`` (requires ``with_theta``)."""
    return jnp.take(self.log_theta, ids, axis=0, mode="fill")

  def gene_cell_offset(self, ids: Array, values: Array, visible: Array) -> Array:
    """float32[B, N]: the gene's bias plus the cell's mean offset of its *visible* values from
    their genes' biases -- the trivial 'gene + cell offset' predictor (eval/regression.py) with
    learned levels, which a backbone's head then corrects (requires ``with_bias``)."""
    bias = jnp.take(self.bias, ids, axis=0, mode="fill")
    resid = jnp.where(visible, values - bias, 0.0)
    offset = resid.sum(-1, keepdims=True) / jnp.maximum(visible.sum(-1, keepdims=True), 1)
    return bias + offset


class Dropout(nn.Module):
  """Inverted dropout like ``nn.Dropout``, with a counter-hash mask (``kernels.dropout``): the
  same keep probability, ~30x cheaper on CPU than ``jax.random.bernoulli``."""
  rate: float
  deterministic: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.deterministic or self.rate <= 0.0:
      return x
    return kernels.dropout(x, self.rate, kernels.seed_words(self.make_rng("dropout")))


class Attention(nn.Module):
  """Multi-head softmax attention with fused projections (one matmul for qkv, or q and one for
  kv): float32 logits and softmax as in ``jax.nn.dot_product_attention``'s XLA path, q
  pre-scaled by 1/sqrt(D) in the compute dtype.

  Self-attention when ``kv`` is None. ``key_mask`` bool [B, K] (True = attend); a query with no
  valid key returns exactly 0. Dropout (``dropout_rate``) is applied to the attention
  probabilities, as in PyTorch's ``nn.MultiheadAttention``. The kernels (``kernels.py``) read the
  packed projections in place, tile by (cell, head group) on CPU, recompute probabilities in the
  backward pass and derive dropout masks from a counter hash instead of storing them.
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  implementation: str = "auto"  # attention.IMPLEMENTATIONS (config.model.attention)

  @nn.compact
  def __call__(self, x: Array, kv: Array | None, key_mask: Array | None, train: bool) -> Array:
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"d_model {d} not divisible by n_heads {self.num_heads}")
    heads = (self.num_heads, d // self.num_heads)
    dense = lambda feats, name: nn.DenseGeneral(feats, dtype=self.dtype, name=name,
                                                dot_general=kernels.dense_dot_general)
    use_dropout = train and self.dropout_rate > 0.0
    rate = self.dropout_rate if use_dropout else 0.0
    seed = kernels.seed_words(self.make_rng("dropout")) if use_dropout else None
    if kv is None:
      out = attention.attend(None, dense((3,) + heads, "qkv")(x), key_mask, rate, seed,
                             self.implementation)
    else:
      out = attention.attend(dense(heads, "q")(x), dense((2,) + heads, "kv")(kv), key_mask,
                             rate, seed, self.implementation)
    return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, name="out",
                           dot_general=kernels.dense_dot_general)(out)


def Dense(features: int, **kw) -> nn.Dense:  # noqa: N802 - a module constructor
  """``nn.Dense`` (same params and math) with ``kernels.dense_dot_general``: a flat 2-D matmul
  whose backward avoids XLA:CPU's slow transposed kernel-gradient dot (kernels.py)."""
  return nn.Dense(features, dot_general=kernels.dense_dot_general, **kw)


class MLP(nn.Module):
  """Dense stack: ``features[:-1]`` hidden layers with ``act``, then a linear output layer."""
  features: Sequence[int]
  act: Callable[[Array], Array] = nn.gelu
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i, f in enumerate(self.features):
      x = Dense(f, dtype=self.dtype, name=f"dense_{i}")(x)
      if i < len(self.features) - 1:
        x = self.act(x)
    return x
