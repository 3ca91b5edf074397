"""The device batch: one fixed-shape pytree shared by data pipeline, models and losses.

Every array has a leading cell axis ``B``; token arrays have a second axis ``N`` (tokens per
cell, fixed by the config). Masks are booleans with one meaning each:

* ``token_mask``  -- the position holds a real, measured, active gene (False = padding).
* ``pred_mask``   -- the gene's value is hidden from the model and must be predicted
                     (always a subset of ``token_mask``).
* ``cell_mask``   -- the row is a real cell (False = padding cell of a short final batch).

Genes that were not measured in a cell's dataset, or that are not active in the current stage,
never appear as tokens at all. A measured zero may appear as a token with value 0.
"""

from __future__ import annotations

import numpy as np
from flax import struct
import jax.numpy as jnp


@struct.dataclass
class Batch:
  gene_ids: jnp.ndarray      # int32[B, N]  row of the gene table (0 at padding)
  values: jnp.ndarray        # float32[B, N] model input: normalised expression, 0 where pred_mask
  targets: jnp.ndarray       # float32[B, N] normalised expression to predict
  counts: jnp.ndarray        # float32[B, N] raw counts (for Poisson / NB likelihoods)
  size_factors: jnp.ndarray  # float32[B]    library size / 1e4 (for count likelihoods)
  token_mask: jnp.ndarray    # bool[B, N]
  pred_mask: jnp.ndarray     # bool[B, N]
  cell_mask: jnp.ndarray     # bool[B]
  labels: jnp.ndarray        # int32[B]      class row, -1 = unlabelled

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.gene_ids.shape)


def empty_batch(n_cells: int, n_tokens: int) -> Batch:
  """An all-padding numpy batch; useful as a fixed-shape placeholder (e.g. empty replay)."""
  return Batch(
      gene_ids=np.zeros((n_cells, n_tokens), np.int32),
      values=np.zeros((n_cells, n_tokens), np.float32),
      targets=np.zeros((n_cells, n_tokens), np.float32),
      counts=np.zeros((n_cells, n_tokens), np.float32),
      size_factors=np.ones((n_cells,), np.float32),
      token_mask=np.zeros((n_cells, n_tokens), bool),
      pred_mask=np.zeros((n_cells, n_tokens), bool),
      cell_mask=np.zeros((n_cells,), bool),
      labels=np.full((n_cells,), -1, np.int32),
  )
