"""Model layer: backbone configs and the builder.

Every backbone is called as
``model.apply({'params': p}, gene_ids, values, token_mask, pred_mask, train, size_factors,
rngs={'dropout': k})`` (``size_factors`` float32[B], library size / 1e4, read by the depth token)
and returns a dict with float32 'pred' [B, N] and 'cell_emb' [B, E], plus 'mvc' [B, N]
(transformer with use_mvc) and 'log_theta' [B, N] (likelihood 'nb'). All per-gene params live
under the top-level submodule ``genes`` (see ``is_gene_param``).
"""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from gil_jax.models import attention
from gil_jax.models.common import GENES, compute_dtype, is_gene_param
from gil_jax.models.exceiver import Exceiver
from gil_jax.models.transformer import Transformer
from gil_jax.models.value_encoding import VALUE_BLIND, VALUE_ENCODINGS, check_encoding

LIKELIHOODS = ("mse", "poisson", "nb")

_DEFAULTS = {
    "exceiver": dict(name="exceiver", d_model=64, n_latents=32, n_layers=2, n_heads=4,
                     ffn_mult=4, dropout=0.0, value_encoding="softbin", n_bins=16,
                     depth_token=True, gene_cell_offset=True, dtype="float32",
                     attention="auto"),
    "transformer": dict(name="transformer", d_model=64, n_layers=2, n_heads=4, ffn_dim=64,
                        dropout=0.1, use_mvc=False, value_encoding="additive", n_bins=16,
                        depth_token=True, gene_cell_offset=False, dtype="float32",
                        attention="auto"),
}
MODEL_NAMES = tuple(_DEFAULTS)


def model_config(name: str) -> ml_collections.ConfigDict:
  """Complete default config (small, CPU-friendly) of backbone `name`."""
  if name not in _DEFAULTS:
    raise ValueError(f"unknown model {name!r}; known: {list(MODEL_NAMES)}")
  return ml_collections.ConfigDict(dict(_DEFAULTS[name]))


def paper_transformer_config() -> ml_collections.ConfigDict:
  """The GIL paper transformer: d=256, 6 layers, 8 heads, FFN 256, dropout 0.15, MVC head,
  additive value encoding, no depth token."""
  cfg = model_config("transformer")
  cfg.update(d_model=256, n_layers=6, n_heads=8, ffn_dim=256, dropout=0.15, use_mvc=True,
             depth_token=False)
  return cfg


def build_model(model_cfg: ml_collections.ConfigDict, capacity: int,
                likelihood: str = "mse") -> nn.Module:
  """The backbone named by `model_cfg.name`, with a gene table of `capacity` rows."""
  if likelihood not in LIKELIHOODS:
    raise ValueError(f"unknown likelihood {likelihood!r}; known: {list(LIKELIHOODS)}")
  c = model_cfg
  offset = bool(c.get("gene_cell_offset", False))  # absent in configs of older runs
  if offset and likelihood != "mse":
    raise ValueError(f"config.model.gene_cell_offset=True predicts log1p values and needs "
                     f"config.train.likelihood='mse' (got {likelihood!r}); set "
                     "--config.model.gene_cell_offset=False for count likelihoods.")
  common = dict(capacity=int(capacity), d_model=c.d_model, n_layers=c.n_layers,
                n_heads=c.n_heads, dropout=float(c.dropout), likelihood=likelihood,
                dtype=compute_dtype(c.dtype), value_encoding=c.get("value_encoding", "additive"),
                n_bins=int(c.get("n_bins", 16)), depth_token=bool(c.get("depth_token", False)),
                gene_cell_offset=offset,
                attention=attention.check(c.get("attention", "auto")))
  check_encoding(common["value_encoding"])
  if c.name == "exceiver":
    return Exceiver(n_latents=c.n_latents, ffn_mult=c.ffn_mult, **common)
  if c.name == "transformer":
    return Transformer(ffn_dim=c.ffn_dim, use_mvc=bool(c.use_mvc), **common)
  raise ValueError(f"unknown model {c.name!r}; known: {list(MODEL_NAMES)}")


__all__ = ["GENES", "LIKELIHOODS", "MODEL_NAMES", "VALUE_BLIND", "VALUE_ENCODINGS", "build_model", "is_gene_param",
           "model_config", "paper_transformer_config", "Exceiver", "Transformer"]
