"""GIL paper backbone: scGPT-style gene-token transformer (gil.md §1.3, JAX/Flax mapping notes).

token = value-encoded gene embedding (``value_encoding.py``; the paper's is ``additive``:
gene_emb + MLP(value)), value = -1 at pred positions and 0 at padding (clamped at 512);
a learned CLS token is prepended (plus the depth token, the cell's log library size, when
``depth_token``) (its own param, not a gene row); no positional encoding, no input
LayerNorm/dropout; post-LN encoder layers (LN eps 1e-5, ReLU FFN of width ``ffn_dim``, dropout on
attention probabilities, attention output and FFN as in PyTorch); key padding mask from
``token_mask`` (CLS always valid). cell_emb = CLS output (E = d_model).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gil_jax.models.common import (GENES, LN_EPS, MLP, Array, Attention, Dense, Dropout, Dtype,
                                   GeneTable)
from gil_jax.models.value_encoding import DepthToken, ValueEncoder, check_encoding, log_depth

VALUE_CLIP = 512.0
MASK_VALUE = -1.0


class PostLNLayer(nn.Module):
  """PyTorch ``TransformerEncoderLayer`` (post-LN, ReLU): x = LN(x + SA(x)); x = LN(x + FFN(x))."""
  num_heads: int
  ffn_dim: int
  dropout_rate: float
  dtype: Dtype
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: Array, key_mask: Array, train: bool) -> Array:
    d = x.shape[-1]
    drop = Dropout(self.dropout_rate, deterministic=not train)
    h = Attention(self.num_heads, self.dropout_rate, self.dtype, self.attention, name="attn")(
        x, None, key_mask, train)
    x = nn.LayerNorm(LN_EPS, dtype=self.dtype, name="ln_attn")(x + drop(h))
    h = nn.relu(Dense(self.ffn_dim, dtype=self.dtype, name="ffn_in")(x))
    h = Dense(d, dtype=self.dtype, name="ffn_out")(drop(h))
    return nn.LayerNorm(LN_EPS, dtype=self.dtype, name="ln_ffn")(x + drop(h))


class Transformer(nn.Module):
  """GIL transformer. Returns {'pred', 'cell_emb', ('mvc' if use_mvc), ('log_theta' for nb)}."""
  capacity: int
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  ffn_dim: int = 64
  dropout: float = 0.1
  use_mvc: bool = False
  value_encoding: str = "additive"
  n_bins: int = 16
  depth_token: bool = False
  gene_cell_offset: bool = False
  likelihood: str = "mse"
  dtype: Dtype = jnp.float32
  attention: str = "auto"  # models/attention.py IMPLEMENTATIONS

  @nn.compact
  def __call__(self, gene_ids: Array, values: Array, token_mask: Array, pred_mask: Array,
               train: bool, size_factors: Array | None = None) -> dict[str, Array]:
    check_encoding(self.value_encoding)
    d, dt = self.d_model, self.dtype
    leaky = lambda x: nn.leaky_relu(x, 0.01)
    genes = GeneTable(self.capacity, d, with_theta=self.likelihood == "nb",
                      with_bias=self.gene_cell_offset, name=GENES)
    emb = genes.embed(gene_ids)                                   # [B, N, d] float32
    visible = token_mask & ~pred_mask
    level = (genes.gene_cell_offset(gene_ids, jnp.where(visible, values, 0.0), visible)
             if self.gene_cell_offset else 0.0)
    v = jnp.where(pred_mask, MASK_VALUE, jnp.where(token_mask, values, 0.0))
    v = jnp.minimum(v, VALUE_CLIP)
    x = ValueEncoder(self.value_encoding, self.n_bins, act="relu", dtype=dt,
                     name="value_encoder")(emb, v)

    b = gene_ids.shape[0]
    cls = self.param("cls_token", nn.initializers.normal(0.02), (d,), jnp.float32)
    cls = jnp.broadcast_to(cls.astype(dt), (b, d))
    if self.depth_token:
      cls = cls + DepthToken(d, dtype=dt, name="depth_token")(log_depth(size_factors, b))
    x = jnp.concatenate([cls[:, None, :], x], axis=1)
    key_mask = jnp.concatenate([jnp.ones((b, 1), bool), token_mask], axis=1)
    for i in range(self.n_layers):
      x = PostLNLayer(self.n_heads, self.ffn_dim, self.dropout, dt, self.attention,
                      name=f"layer_{i}")(
          x, key_mask, train)

    cell_emb = x[:, 0]
    pred = MLP((d, d, 1), act=leaky, dtype=dt, name="value_head")(x[:, 1:])[..., 0]
    result = {"pred": pred.astype(jnp.float32) + level, "cell_emb": cell_emb.astype(jnp.float32)}
    if self.use_mvc:
      query = MLP((d, d, d), act=leaky, dtype=dt, name="mvc_head")(
          jax.lax.stop_gradient(emb).astype(dt))
      result["mvc"] = jnp.einsum("bnd,bd->bn", query, cell_emb,
                                 preferred_element_type=jnp.float32)
    if self.likelihood == "nb":
      result["log_theta"] = genes.theta(gene_ids)
    return result
