"""The growing class head (CANAL's `Identity` head) over a padded label space.

cell_emb -> m = ReLU(W1 e) (the 'manifold', used by novelty mixup) -> h = ReLU(W2 m) (the
representation used by distillation and the example bank) -> z = W3 h (logits, one row per class
of the padded label space). Rows of classes that are not active are masked out of the softmax, so
adding a class flips a mask entry: no shape changes, no recompilation, old rows untouched.

Optional gene-linear path (``config.canal.gene_linear``): logits += sum_g w_g · U[g], with
w_g = v_g / the mean of the cell's visible values (its expression profile over the genes it
measures, invariant to a study's multiplicative value scale, e.g. log2 vs ln) and U a
zero-initialised [gene capacity, class capacity] table in the head: a multinomial logistic
regression on the cell's values beside the deep path. Rows of genes never seen stay 0 (no
gradient reaches them), so the path is padded and masked like the gene table. It feeds the
logits only (m and h, used by novelty, distillation and the bank, are the deep path's).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gil_jax.batch import Batch
from gil_jax.core import step as step_lib
from gil_jax.losses import objectives

MASKED_LOGIT = -1e9  # finite, so 0 * log_softmax stays 0 (no NaN) for inactive classes


def _dense_init(key, n_in: int, n_out: int) -> dict:
  """PyTorch Linear default init: U(-1/sqrt(n_in), 1/sqrt(n_in)) for weight and bias."""
  kw, kb = jax.random.split(key)
  bound = 1.0 / jnp.sqrt(n_in)
  return {"w": jax.random.uniform(kw, (n_in, n_out), jnp.float32, -bound, bound),
          "b": jax.random.uniform(kb, (n_out,), jnp.float32, -bound, bound)}


def init_head(key, emb_dim: int, hidden: tuple[int, int], capacity: int,
              gene_capacity: int = 0) -> dict:
  """Head params; 'cls' has a row per class of the padded label space ([hidden, capacity]);
  with ``gene_capacity`` > 0 also the gene-linear table 'gene_linear' [gene_capacity, capacity]
  (zeros)."""
  k1, k2, k3 = jax.random.split(key, 3)
  params = {"fc1": _dense_init(k1, emb_dim, hidden[0]),
            "fc2": _dense_init(k2, hidden[0], hidden[1]), "cls": _dense_init(k3, hidden[1], capacity)}
  if gene_capacity > 0:
    params["gene_linear"] = jnp.zeros((gene_capacity, capacity), jnp.float32)
  return params


def manifold(head: dict, emb: jnp.ndarray) -> jnp.ndarray:
  return jax.nn.relu(emb @ head["fc1"]["w"] + head["fc1"]["b"])


def from_manifold(head: dict, m: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(h, raw logits) from the manifold vectors `m` (used directly by mixup)."""
  h = jax.nn.relu(m @ head["fc2"]["w"] + head["fc2"]["b"])
  return h, h @ head["cls"]["w"] + head["cls"]["b"]


def gene_linear_logits(table: jnp.ndarray, batch: Batch, active_genes: jnp.ndarray) -> jnp.ndarray:
  """[B, capacity]: sum over a cell's visible tokens of (v / the cell's mean v) · U[gene]."""
  seen = objectives.effective_token_mask(batch, active_genes)
  v = jnp.where(seen, jnp.maximum(batch.targets, 0.0), 0.0)
  n = jnp.sum(seen, axis=-1, keepdims=True)
  w = v * n / jnp.maximum(jnp.sum(v, axis=-1, keepdims=True), 1e-6)
  return jnp.einsum("bn,bnc->bc", w, table[batch.gene_ids])


def mask_logits(logits: jnp.ndarray, active: jnp.ndarray) -> jnp.ndarray:
  """Inactive classes get MASKED_LOGIT: zero probability after softmax."""
  return jnp.where(active, logits, MASKED_LOGIT)


def prototypes(head: dict) -> jnp.ndarray:
  """[capacity, hidden]: the classifier row of each class (CANAL's class prototype)."""
  return head["cls"]["w"].T


def apply(backbone, params: dict, batch: Batch, active_genes: jnp.ndarray,
          active_classes: jnp.ndarray, *, train: bool, rng) -> dict[str, Any]:
  """Runs backbone + head on a fully visible batch (no hidden genes).

  Returns 'cell_emb', 'm', 'h', 'logits' (inactive classes masked) and 'probs'.
  """
  emb = step_lib.apply_visible(backbone, params["backbone"], batch, active_genes, train=train,
                               rng=rng)["cell_emb"]
  m = manifold(params["head"], emb)
  h, z = from_manifold(params["head"], m)
  if "gene_linear" in params["head"]:
    z = z + gene_linear_logits(params["head"]["gene_linear"], batch, active_genes)
  z = mask_logits(z, active_classes)
  return {"cell_emb": emb, "m": m, "h": h, "logits": z, "probs": jax.nn.softmax(z, axis=-1)}
