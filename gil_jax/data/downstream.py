"""Labelled downstream datasets of the GIL protocol (gil.md §1.2, §3.2).

Each downstream dataset (a) picks its crucial genes: the top-K genes by cumulative expression
(sum over its cells of the normalised value), among the genes the pre-training data measured and
expressed; and (b) is the linear-probe task of gene-based classification. Specs are
'name:label_column' strings (`config.downstream.datasets`, a tuple of them).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import numpy as np

from gil_jax.data import anndata_io
from gil_jax.data.anndata_io import CellData, DataError
from gil_jax.data.batching import NORMALISATIONS, normalise

log = logging.getLogger(__name__)

FIELD = "config.downstream.datasets"


@dataclasses.dataclass
class Downstream:
  """One labelled dataset: its cells, integer labels and class names."""
  name: str
  data: CellData
  label_column: str
  labels: np.ndarray        # int32[cells], index into `classes`
  classes: list[str]


def parse_specs(specs: str | Sequence[str]) -> list[tuple[str, str]]:
  """('a:col_a', 'b:col_b') (read with experiment.as_names, so 'a:col_a,b:col_b' too) ->
  [(name, column), ...]."""
  from gil_jax.experiment import as_names  # experiment imports this module
  items = as_names(specs)
  if not items:
    raise DataError(f"no downstream datasets given; set {FIELD} to a tuple of "
                    "'name:label_column' (e.g. ('pbmc_3chem_symphony:cell_type',)).")
  out = []
  for s in items:
    name, sep, col = s.rpartition(":")
    if not sep or not name or not col:
      raise DataError(f"downstream dataset spec {s!r} must be 'name:label_column' ({FIELD}).")
    out.append((name.strip(), col.strip()))
  names = [n for n, _ in out]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise DataError(f"downstream datasets {dup} are listed more than once in {FIELD}.")
  return out


def labelled(data: CellData, label_column: str) -> Downstream:
  """Validates the label column of a loaded dataset and encodes it (sorted class names)."""
  if label_column not in data.obs.columns:
    raise DataError(f"downstream dataset {data.name!r} has no label column {label_column!r} in "
                    f"obs (available: {list(data.obs.columns)}); fix the label column in {FIELD}.")
  col = data.obs[label_column]
  if col.isna().any():
    raise DataError(f"downstream dataset {data.name!r}: label column {label_column!r} has "
                    f"{int(col.isna().sum())} missing values; drop those cells or pick another "
                    f"column in {FIELD}.")
  values = col.astype(str).to_numpy()
  classes = sorted(set(values))
  if len(classes) < 2:
    raise DataError(f"downstream dataset {data.name!r}: label column {label_column!r} has only "
                    f"{len(classes)} class ({classes}); classification needs at least 2 - pick "
                    f"another column in {FIELD}.")
  lookup = {c: i for i, c in enumerate(classes)}
  labels = np.array([lookup[v] for v in values], np.int32)
  return Downstream(data.name, data, label_column, labels, classes)


def load(specs: str | Sequence[str], data_dir: str, gene_column: str = "",
         layer: str = "") -> list[Downstream]:
  """Reads and validates every downstream dataset (names resolved under data_dir)."""
  out = []
  for name, col in parse_specs(specs):
    path = name if (os.path.isabs(name) or os.path.exists(name)) else os.path.join(
        data_dir, name if name.endswith(".h5ad") else name + ".h5ad")
    if not os.path.isfile(path):
      raise DataError(f"downstream dataset {name!r} not found at {path!r}; check {FIELD} and "
                      "--config.data.data_dir.")
    data = anndata_io.read_h5ad(path, layer=layer or None, gene_column=gene_column or None)
    out.append(labelled(data, col))
  return out


def shared_genes(pretrain: CellData, ds: CellData, require_expressed: bool = True) -> list[str]:
  """Genes of `ds` the pre-training data measured (and, optionally, expressed in some cell)."""
  pool = pretrain.gene_ids
  if require_expressed:
    pool = pool[anndata_io.gene_nnz(pretrain) > 0]
  pool_set = set(pool)
  return [g for g in ds.gene_ids if g in pool_set]


def cumulative_expression(ds: CellData, normalisation: str) -> np.ndarray:
  """float64[genes]: sum over cells of the normalised value (0 for unmeasured / zero)."""
  if normalisation not in NORMALISATIONS:
    raise DataError(f"unknown normalisation {normalisation!r} (config.batch.normalisation).")
  x = ds.X.tocsr()
  owner = np.repeat(np.arange(ds.n_cells), np.diff(x.indptr))
  vals = normalise(x.data, ds.size_factors[owner], normalisation).astype(np.float64)
  return np.bincount(x.indices, weights=vals, minlength=ds.n_genes)


def top_genes(pretrain: CellData, ds: CellData, k: int, normalisation: str,
              require_expressed: bool = True) -> list[str]:
  """The K crucial genes of `ds`, in rank order (highest cumulative expression first).

  Candidates are the genes shared with (and expressed in) the pre-training data; ties are broken
  by gene id so the ranking is deterministic.
  """
  if k < 1:
    raise DataError(f"top_k={k} must be >= 1 (config.stages.top_k).")
  shared = shared_genes(pretrain, ds, require_expressed)
  if not shared:
    raise DataError(f"downstream dataset {ds.name!r} shares no gene with the pre-training data "
                    f"{pretrain.name!r} (disjoint gene panels: {ds.n_genes} vs "
                    f"{pretrain.n_genes} genes); use datasets with the same gene identifiers "
                    f"(config.data.gene_column / config.downstream.gene_column) or drop it from "
                    f"{FIELD}.")
  if k > len(shared):
    raise DataError(f"top_k={k} is larger than the {len(shared)} genes downstream dataset "
                    f"{ds.name!r} shares with the pre-training data ({ds.n_genes} genes in the "
                    f"file); lower config.stages.top_k.")
  if not ds.is_counts and normalisation == "log1p":
    log.warning("downstream dataset %r holds non-integer values but normalisation is 'log1p' "
                "(meant for counts)", ds.name)
  score = cumulative_expression(ds, normalisation)
  col = {g: i for i, g in enumerate(ds.gene_ids)}
  s = np.array([score[col[g]] for g in shared])
  order = np.lexsort((np.asarray(shared, dtype=str), -s))
  return [shared[i] for i in order[:k]]
