"""Exceiver (Perceiver IO over gene tokens), with boolean masks (exceiver.md §1, §5, §6).

encode: learned latents [L, d] cross-attend to the *visible* tokens (``token_mask & ~pred_mask``;
  padding and hidden genes are not keys), token = value-encoded gene embedding
  (``value_encoding.py``), plus one depth token (the cell's log library size) when ``depth_token``;
process: ``n_layers`` pre-LN latent self-attention layers + final LayerNorm (pre-LN instead of the
  reference's post-LN: stabler from scratch, no released weights are ported);
decode: queries = tied gene embeddings of all N positions (no value) cross-attend to the latents,
  then LN -> Dense(d) -> GELU -> Dense(1) gives one scalar per position; with
  ``gene_cell_offset`` that scalar is a correction added to the gene + cell offset predictor
  computed in the model from learned per-gene levels (``GeneTable.gene_cell_offset``). (A
  zero-initialised correction was tried: it stays near 0 for the genes of later stages, which
  then sit at the trivial predictor; a normally initialised one learns them.)
cell_emb = mean of the processed latents (E = d_model), not the reference's flattened latents.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from gil_jax.models.common import (GENES, LN_EPS, MLP, Array, Attention, Dropout, Dtype,
                                   GeneTable)
from gil_jax.models.value_encoding import DepthToken, ValueEncoder, check_encoding, log_depth


class CrossAttnBlock(nn.Module):
  """Pre-LN cross-attention (residual on the raw query) followed by a pre-LN MLP residual."""
  num_heads: int
  ffn_mult: int
  dropout_rate: float
  dtype: Dtype
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: Array, kv: Array, key_mask: Array | None, train: bool) -> Array:
    d = x.shape[-1]
    ln = lambda name: nn.LayerNorm(LN_EPS, dtype=self.dtype, name=name)
    drop = Dropout(self.dropout_rate, deterministic=not train)
    h = Attention(self.num_heads, self.dropout_rate, self.dtype, self.attention, name="attn")(
        ln("ln_q")(x), ln("ln_kv")(kv), key_mask, train)
    x = x + drop(h)
    h = MLP((self.ffn_mult * d, d), dtype=self.dtype, name="mlp")(ln("ln_mlp")(x))
    return x + drop(h)


class SelfAttnBlock(nn.Module):
  """Pre-LN transformer layer over the latents (no mask)."""
  num_heads: int
  ffn_mult: int
  dropout_rate: float
  dtype: Dtype
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    d = x.shape[-1]
    ln = lambda name: nn.LayerNorm(LN_EPS, dtype=self.dtype, name=name)
    drop = Dropout(self.dropout_rate, deterministic=not train)
    h = Attention(self.num_heads, self.dropout_rate, self.dtype, self.attention, name="attn")(
        ln("ln_attn")(x), None, None, train)
    x = x + drop(h)
    h = MLP((self.ffn_mult * d, d), dtype=self.dtype, name="mlp")(ln("ln_mlp")(x))
    return x + drop(h)


class Exceiver(nn.Module):
  """Exceiver backbone. Returns {'pred' [B,N], 'cell_emb' [B,d], ('log_theta' [B,N] for nb)}."""
  capacity: int
  d_model: int = 64
  n_latents: int = 32
  n_layers: int = 2
  n_heads: int = 4
  ffn_mult: int = 4
  dropout: float = 0.0
  value_encoding: str = "additive"
  n_bins: int = 16
  depth_token: bool = True
  gene_cell_offset: bool = False
  likelihood: str = "mse"
  dtype: Dtype = jnp.float32
  attention: str = "auto"  # models/attention.py IMPLEMENTATIONS

  @nn.compact
  def __call__(self, gene_ids: Array, values: Array, token_mask: Array, pred_mask: Array,
               train: bool, size_factors: Array | None = None) -> dict[str, Array]:
    check_encoding(self.value_encoding)
    d, dt = self.d_model, self.dtype
    blk = dict(num_heads=self.n_heads, ffn_mult=self.ffn_mult, dropout_rate=self.dropout, dtype=dt,
               attention=self.attention)
    genes = GeneTable(self.capacity, d, with_theta=self.likelihood == "nb",
                      with_bias=self.gene_cell_offset, name=GENES)
    emb = genes.embed(gene_ids)                                   # [B, N, d] float32
    visible = token_mask & ~pred_mask
    v = jnp.where(visible, values, 0.0)
    level = genes.gene_cell_offset(gene_ids, v, visible) if self.gene_cell_offset else 0.0
    tokens = ValueEncoder(self.value_encoding, self.n_bins, dtype=dt, name="value_encoder")(emb, v)
    if self.depth_token:
      depth = DepthToken(d, dtype=dt, name="depth_token")(log_depth(size_factors, v.shape[0]))
      tokens = jnp.concatenate([depth[:, None, :], tokens], axis=1)
      visible = jnp.concatenate([jnp.ones_like(visible[:, :1]), visible], axis=1)

    latents = self.param("latents", nn.initializers.normal(0.02), (self.n_latents, d), jnp.float32)
    lat = jnp.broadcast_to(latents.astype(dt), (gene_ids.shape[0],) + latents.shape)
    lat = CrossAttnBlock(**blk, name="encoder")(lat, tokens, visible, train)
    for i in range(self.n_layers):
      lat = SelfAttnBlock(**blk, name=f"process_{i}")(lat, train)
    lat = nn.LayerNorm(LN_EPS, dtype=dt, name="latent_norm")(lat)

    out = CrossAttnBlock(**blk, name="decoder")(emb.astype(dt), lat, None, train)
    out = nn.LayerNorm(LN_EPS, dtype=dt, name="head_norm")(out)
    pred = MLP((d, 1), dtype=dt, name="head")(out)[..., 0]
    result = {"pred": pred.astype(jnp.float32) + level,
              "cell_emb": jnp.mean(lat.astype(jnp.float32), axis=1)}
    if self.likelihood == "nb":
      result["log_theta"] = genes.theta(gene_ids)
    return result
