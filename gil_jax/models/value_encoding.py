"""Gene token = gene embedding combined with the cell's expression value, and the depth token.

Encodings (``model.value_encoding``), every one shared by both backbones:

* ``additive`` -- ``e_g + MLP(v)`` (scGPT's value encoder).
* ``film``     -- ``e_g * (1 + gamma(v)) + beta(v)``: the value modulates each embedding feature.
* ``softbin``  -- ``e_g + sum_b softmax(MLP(v))_b * bin_b``: a learned soft assignment of the value
  to ``n_bins`` bin embeddings (scFoundation's auto-discretisation; scGPT's hard bins made
  differentiable).
* ``scale``    -- ``(v + 1) * e_g`` (the released Exceiver). **Value-blind** behind the Exceiver's
  pre-attention LayerNorm: LayerNorm(c * x) = LayerNorm(x) for every c > 0, so for v >= 0 only
  *which* genes are present survives. Kept to reproduce old runs; never the default.

The depth token carries what a cell's scale needs: its log library size (``log(size_factor)``,
size factor = total counts / 1e4), which the log1p-CP10k values of detected genes depend on
strongly (a gene seen once in a shallow cell has a large normalised value).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gil_jax.models.common import MLP, Array, Dtype

VALUE_ENCODINGS = ("additive", "film", "softbin", "scale")
VALUE_BLIND = ("scale",)  # encodings that cannot carry magnitude behind a LayerNorm


def check_encoding(name: str) -> None:
  if name not in VALUE_ENCODINGS:
    hint = " ('mlp' is now called 'additive')" if name == "mlp" else ""
    raise ValueError(f"unknown value_encoding {name!r}{hint}; known: {VALUE_ENCODINGS} "
                     "(config.model.value_encoding)")


class ValueEncoder(nn.Module):
  """(gene embeddings float32[B, N, d], values float32[B, N]) -> tokens [B, N, d] in ``dtype``."""
  kind: str = "additive"
  n_bins: int = 16
  act: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, emb: Array, values: Array) -> Array:
    check_encoding(self.kind)
    d = emb.shape[-1]
    act = {"gelu": nn.gelu, "relu": nn.relu}[self.act]
    v = values.astype(jnp.float32)[..., None]
    if self.kind == "scale":
      return ((v + 1.0) * emb).astype(self.dtype)
    e = emb.astype(self.dtype)
    v = v.astype(self.dtype)
    if self.kind == "additive":
      return e + MLP((d, d), act=act, dtype=self.dtype, name="value_mlp")(v)
    if self.kind == "film":
      gamma_beta = MLP((d, 2 * d), act=act, dtype=self.dtype, name="film_mlp")(v)
      gamma, beta = jnp.split(gamma_beta, 2, axis=-1)
      return e * (1.0 + gamma) + beta
    # softbin
    logits = MLP((d, self.n_bins), act=act, dtype=self.dtype, name="bin_mlp")(v)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    bins = self.param("bin_embedding", nn.initializers.normal(0.02), (self.n_bins, d),
                      jnp.float32)
    return e + weights @ bins.astype(self.dtype)


class DepthToken(nn.Module):
  """float32[B] log library size -> one token [B, d] (a small MLP on the scalar)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, log_depth: Array) -> Array:
    x = log_depth.astype(jnp.float32)[:, None].astype(self.dtype)
    return MLP((self.features, self.features), dtype=self.dtype, name="depth_mlp")(x)


def log_depth(size_factors: Array | None, batch: int) -> Array:
  """log(size factor) per cell; zeros (a 10k-count cell) when none is given, e.g. at init."""
  if size_factors is None:
    return jnp.zeros((batch,), jnp.float32)
  return jnp.log(jnp.maximum(size_factors.astype(jnp.float32), 1e-6))
