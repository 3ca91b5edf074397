"""Reading single-cell data (AnnData / .h5ad) into a validated, host-side `CellData`.

A `CellData` keeps raw values as read in a CSR matrix, plus a *gene panel* per source dataset:
a gene a dataset did not measure is "not measured", which is distinct from a measured zero even
after several datasets are concatenated on the union of their genes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Any, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger(__name__)

MIN_SIZE_FACTOR = 1e-8
_PANEL_KEY = "gil_panel"            # adata.varm key: bool[genes, n_datasets]
_DATASET_NAMES_KEY = "gil_dataset_names"  # adata.uns key: list of dataset names


class DataError(ValueError):
  """The input data cannot be used; the message says what is wrong and how to fix it."""


@dataclasses.dataclass
class CellData:
  """Cells x genes raw values with per-dataset gene panels (see module docstring)."""

  name: str
  X: sp.csr_matrix            # float32[cells, genes], raw values as read, no explicit zeros
  gene_ids: np.ndarray        # str[genes]
  obs: pd.DataFrame           # index = cell names; has a 'dataset' column
  panel: np.ndarray           # bool[n_datasets, genes]: genes each source dataset measured
  dataset_index: np.ndarray   # int32[cells]: row of `panel` for each cell
  dataset_names: list[str]
  is_counts: bool             # all values are non-negative integers
  size_factors: np.ndarray    # float32[cells]: total over measured genes / 1e4

  @property
  def n_cells(self) -> int:
    return int(self.X.shape[0])

  @property
  def n_genes(self) -> int:
    return int(self.X.shape[1])

  def subset(self, cells: np.ndarray) -> "CellData":
    """The given cells (indices or bool mask), keeping all genes, panels and dataset names."""
    cells = np.asarray(cells)
    if cells.dtype == bool:
      cells = np.flatnonzero(cells)
    X = self.X[cells] if sp.issparse(self.X) else _lazy_subset(self.X, cells)
    return dataclasses.replace(
        self, X=X, obs=self.obs.iloc[cells].copy(),
        dataset_index=self.dataset_index[cells], size_factors=self.size_factors[cells])

  def select_genes(self, keep: np.ndarray) -> "CellData":
    """Only the genes where `keep` (bool[genes]) holds; cells and their depth (size factors)
    unchanged."""
    cols = np.flatnonzero(np.asarray(keep, bool))
    return dataclasses.replace(self, X=sp.csr_matrix(self.X[:, cols]),
                               gene_ids=self.gene_ids[cols], panel=self.panel[:, cols])

  def measured(self, cell_idx: int | np.ndarray) -> np.ndarray:
    """bool[genes] (or [k, genes] for an index array): genes measured for the cell(s)."""
    return self.panel[self.dataset_index[cell_idx]]

  def to_anndata(self) -> ad.AnnData:
    """AnnData with X, var_names and obs (incl. "dataset"); panels go to varm/uns (round trip)."""
    obs = self.obs.copy()
    obs["dataset"] = pd.Categorical(np.asarray(self.dataset_names, object)[self.dataset_index],
                                    categories=list(self.dataset_names))
    adata = ad.AnnData(X=self.X.copy(), obs=obs, var=pd.DataFrame(index=pd.Index(self.gene_ids)))
    adata.varm[_PANEL_KEY] = self.panel.T.copy()
    adata.uns[_DATASET_NAMES_KEY] = list(self.dataset_names)
    return adata


def _fail_missing_file(path: str) -> None:
  hint = ""
  if not os.path.isabs(path):
    hint = (f" (relative paths are resolved against the working directory {os.getcwd()!r}; "
            "set the file with `--config.data.files` and the folder with `--config.data.data_dir`)")
  raise DataError(f"h5ad file not found: {path!r}{hint}.")


def unreadable_file_error(path: str, e: Exception) -> DataError:
  return DataError(f"cannot read h5ad file {path!r} ({type(e).__name__}: {e}). The file is "
                   "corrupt or not an AnnData .h5ad file; re-create it, e.g. with "
                   "`adata.write_h5ad(path)`.")


def missing_layer_error(source: str, layer: str, layers: Sequence[str]) -> DataError:
  return DataError(f"{source}: layer {layer!r} not found; available layers: "
                   f"{sorted(layers) or 'none'}. Fix `config.data.layer` (None = use X).")


def expressing_cells(totals: np.ndarray, source: str, what: str) -> np.ndarray:
  """bool mask of cells whose total expression is > 0 (the others are dropped, with a log
  line); DataError when no cell is left."""
  keep = totals > 0
  if not keep.all():
    log.info("%s: dropped %d of %d cells whose total expression is 0", source,
             int((~keep).sum()), len(keep))
    if not keep.any():
      raise DataError(f"{source}: every cell has total expression 0 in {what}; the matrix is "
                      "empty. Check `config.data.layer` and the file.")
  return keep


def read_h5ad(path: str | os.PathLike, *, layer: str | None = None, gene_column: str | None = None,
              name: str | None = None, require_counts: bool = False,
              obs_columns: Sequence[str] | None = None) -> CellData:
  """Reads and validates an .h5ad file (see `from_anndata` for the options)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    _fail_missing_file(path)
  try:
    adata = ad.read_h5ad(path)
  except Exception as e:  # noqa: BLE001 -- any read failure means the file is unusable
    raise unreadable_file_error(path, e) from e
  if name is None:
    name = os.path.splitext(os.path.basename(path))[0]
  return from_anndata(adata, layer=layer, gene_column=gene_column, name=name,
                      require_counts=require_counts, obs_columns=obs_columns, source=path)


def _matrix(adata: ad.AnnData, layer: str | None, source: str) -> sp.csr_matrix:
  if layer is None:
    m = adata.X
    if m is None:
      raise DataError(f"{source}: X is empty (None); pass `layer=` (config.data.layer) naming one "
                      f"of the layers {sorted(adata.layers.keys())}.")
  else:
    if layer not in adata.layers:
      raise missing_layer_error(source, layer, list(adata.layers.keys()))
    m = adata.layers[layer]
  if sp.issparse(m):
    m = sp.csr_matrix(m, dtype=np.float32)
  else:
    try:
      m = sp.csr_matrix(np.asarray(m, dtype=np.float32))
    except (TypeError, ValueError) as e:
      raise DataError(f"{source}: {'X' if layer is None else 'layer ' + repr(layer)} is not a "
                      f"numeric matrix ({type(m).__name__}: {e}).") from e
  m.sum_duplicates()
  m.sort_indices()
  return m


def _gene_ids(adata: ad.AnnData, gene_column: str | None, source: str) -> np.ndarray:
  if gene_column is None:
    genes = np.asarray(adata.var_names.astype(str), dtype=object)
    where = "var_names"
  else:
    if gene_column not in adata.var.columns:
      raise DataError(f"{source}: var column {gene_column!r} not found; available var columns: "
                      f"{list(adata.var.columns) or 'none'}. Fix `config.data.gene_column` "
                      "(None = use var_names).")
    genes = np.asarray(adata.var[gene_column].astype(str), dtype=object)
    where = f"var[{gene_column!r}]"
  check_unique_genes(genes, source, where)
  return genes.astype(str)


def check_unique_genes(genes: np.ndarray, source: str, where: str) -> None:
  """Raises DataError naming (some of) the duplicate gene ids of `where` (e.g. 'var_names')."""
  dup = pd.Index(genes)
  dup = dup[dup.duplicated()].unique()
  if len(dup):
    raise DataError(f"{source}: {len(dup)} duplicate gene ids in {where}, e.g. "
                    f"{list(dup[:5])}. Make them unique (`adata.var_names_make_unique()`) or set "
                    "`config.data.gene_column` to a column with unique ids (e.g. Ensembl ids).")


@dataclasses.dataclass
class ValueStats:
  """What `check_value_stats` needs to know about a matrix's stored values."""
  n_nonfinite: int = 0
  n_negative: int = 0
  min_value: float = 0.0
  is_counts: bool = True     # every value is an integer

  @classmethod
  def of(cls, v: np.ndarray) -> "ValueStats":
    finite = np.isfinite(v)
    if not finite.all():
      return cls(n_nonfinite=int(np.sum(~finite)))
    return cls(n_negative=int(np.sum(v < 0)), min_value=float(v.min()) if v.size else 0.0,
               is_counts=bool(np.all(v == np.round(v))))

  def merge(self, o: "ValueStats") -> "ValueStats":
    return ValueStats(self.n_nonfinite + o.n_nonfinite, self.n_negative + o.n_negative,
                      min(self.min_value, o.min_value), self.is_counts and o.is_counts)


def check_value_stats(st: ValueStats, require_counts: bool, source: str, what: str) -> bool:
  """Raises DataError for NaN/inf or negative values (or non-counts when required); is_counts."""
  if st.n_nonfinite:
    raise DataError(f"{source}: {what} has {st.n_nonfinite} NaN/inf values; clean or impute them "
                    "(e.g. `np.nan_to_num`) before training.")
  if st.n_negative:
    raise DataError(f"{source}: {what} has {st.n_negative} negative values (min "
                    f"{st.min_value:g}); expression must be raw counts or non-negative "
                    "normalised values. Use another layer (`config.data.layer`), not scaled data.")
  if require_counts and not st.is_counts:
    raise DataError(f"{source}: {what} holds non-integer values but a count likelihood "
                    "(Poisson / negative binomial) needs raw counts. Point `config.data.layer` at "
                    "the raw-counts layer, or set `config.train.likelihood='mse'`.")
  return st.is_counts


def _check_values(m: sp.csr_matrix, require_counts: bool, source: str, what: str) -> bool:
  return check_value_stats(ValueStats.of(m.data), require_counts, source, what)


def _panel_from_metadata(adata: ad.AnnData, n_genes: int) -> tuple[np.ndarray, list[str]] | None:
  """Panels stored by `CellData.to_anndata`, if present and consistent."""
  if _PANEL_KEY not in adata.varm or _DATASET_NAMES_KEY not in adata.uns:
    return None
  if "dataset" not in adata.obs.columns:
    return None
  panel = np.asarray(adata.varm[_PANEL_KEY], bool).T
  names = [str(n) for n in adata.uns[_DATASET_NAMES_KEY]]
  if panel.shape != (len(names), n_genes):
    return None
  return panel, names


def from_anndata(adata: ad.AnnData, *, layer: str | None = None, gene_column: str | None = None,
                 name: str | None = None, require_counts: bool = False,
                 obs_columns: Sequence[str] | None = None, source: str | None = None) -> CellData:
  """Validates an in-memory AnnData and converts it to `CellData`.

  `layer` selects adata.layers[layer] instead of X; `gene_column` a var column instead of
  var_names; `obs_columns` restricts the kept obs columns. Cells with total 0 are dropped.
  All genes are measured for all cells unless panels written by `CellData.to_anndata` are present.
  """
  name = name or "data"
  source = source or f"AnnData {name!r}"
  if adata.n_obs == 0 or adata.n_vars == 0:
    raise DataError(f"{source}: has {adata.n_obs} cells and {adata.n_vars} genes; need at least "
                    "one of each. Check the file / filtering that produced it.")
  what = "X" if layer is None else f"layer {layer!r}"
  genes = _gene_ids(adata, gene_column, source)
  m = _matrix(adata, layer, source)
  is_counts = _check_values(m, require_counts, source, what)
  m.eliminate_zeros()

  obs = adata.obs.copy()
  obs.index = obs.index.astype(str)
  meta = _panel_from_metadata(adata, len(genes))
  if meta is not None:
    panel, names = meta
    ds = obs["dataset"].astype(str).to_numpy()
    lookup = {n: i for i, n in enumerate(names)}
    if not set(ds) <= set(lookup):
      meta = None
  if meta is not None:
    dataset_index = np.array([lookup[d] for d in ds], np.int32)
  else:
    panel, names = np.ones((1, len(genes)), bool), [name]
    dataset_index = np.zeros(adata.n_obs, np.int32)
    if "dataset" in obs.columns and not (obs["dataset"].astype(str) == name).all():
      log.info("%s: obs column 'dataset' renamed to 'orig_dataset' (CellData sets 'dataset')",
               source)
      obs = obs.rename(columns={"dataset": "orig_dataset"})

  if obs_columns is not None:
    missing = [c for c in obs_columns if c not in obs.columns]
    if missing:
      raise DataError(f"{source}: obs columns {missing} not found; available obs columns: "
                      f"{list(obs.columns) or 'none'}. Fix the obs column names in the config.")
    obs = obs[list(obs_columns)].copy()

  totals = np.asarray(m.sum(axis=1)).ravel()
  keep = expressing_cells(totals, source, what)
  if not keep.all():
    idx = np.flatnonzero(keep)
    m, obs, dataset_index, totals = m[idx], obs.iloc[idx], dataset_index[idx], totals[idx]
  obs = obs.copy()
  obs["dataset"] = pd.Categorical(np.asarray(names, object)[dataset_index], categories=names)
  return CellData(
      name=name, X=m, gene_ids=genes, obs=obs, panel=panel, dataset_index=dataset_index,
      dataset_names=list(names), is_counts=is_counts,
      size_factors=np.maximum(totals / 1e4, MIN_SIZE_FACTOR).astype(np.float32))


def _lazy_subset(X, cells: np.ndarray):
  """A lazy X (`pipeline.LazyCSRRows`) restricted to `cells`, in increasing order: the rows
  stay on disk (a copy of the reader with fewer rows; the original is unchanged)."""
  if not hasattr(X, "select"):
    raise DataError("this lazily read dataset cannot be subset; read it into memory "
                    "(config.data.lazy=False).")
  if np.any(np.diff(cells) <= 0):
    raise DataError("a lazily read dataset can only be subset to cells in increasing order.")
  keep = np.zeros(X.shape[0], bool)
  keep[cells] = True
  out = copy.copy(X)
  out.select(keep)  # (drops the cached column statistics: they were of the other rows)
  return out


def concat(datas: Sequence[CellData], name: str) -> CellData:
  """Stacks cells on the union of genes (first-appearance order); panels keep 'not measured'.
  Lazy (on-disk) X's stay on disk: the result reads rows from the files (`corpus.py`)."""
  if not datas:
    raise DataError(f"concat({name!r}): no datasets given; list at least one data file.")
  names = [n for d in datas for n in d.dataset_names]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise DataError(f"concat({name!r}): dataset names {dup} occur more than once; give every "
                    "file a distinct `name=` (default: the file name).")
  union: dict[str, int] = {}
  for d in datas:
    for g in d.gene_ids:
      union.setdefault(g, len(union))
  n_genes = len(union)
  lazy = not all(sp.issparse(d.X) for d in datas)
  mats, col_maps, panels, dsi, obs, offset = [], [], [], [], [], 0
  for d in datas:
    cols = np.array([union[g] for g in d.gene_ids], np.int64)
    col_maps.append(cols)
    if not lazy:
      x = d.X.tocsr()
      mats.append(sp.csr_matrix((x.data, cols[x.indices], x.indptr),
                                shape=(x.shape[0], n_genes)))
    p = np.zeros((len(d.dataset_names), n_genes), bool)
    p[:, cols] = d.panel
    panels.append(p)
    dsi.append(d.dataset_index + offset)
    offset += len(d.dataset_names)
    o = d.obs.copy()
    o["dataset"] = np.asarray(d.dataset_names, object)[d.dataset_index]
    obs.append(o)
  obs = pd.concat(obs, axis=0)
  if obs.index.has_duplicates:
    obs.index = (obs["dataset"].astype(str) + ":" + obs.index.astype(str)).to_numpy()
  obs["dataset"] = pd.Categorical(obs["dataset"].astype(str), categories=names)
  if lazy:
    from gil_jax.data.corpus import LazyCorpusRows  # noqa: PLC0415 -- corpus imports this module
    X = LazyCorpusRows([d.X for d in datas], col_maps, n_genes)
  else:
    X = sp.vstack(mats, format="csr").astype(np.float32)
    X.sort_indices()
  return CellData(
      name=name, X=X, gene_ids=np.array(list(union), dtype=str), obs=obs,
      panel=np.concatenate(panels, 0), dataset_index=np.concatenate(dsi).astype(np.int32),
      dataset_names=names, is_counts=all(d.is_counts for d in datas),
      size_factors=np.concatenate([d.size_factors for d in datas]).astype(np.float32))


def gene_means(data: CellData) -> np.ndarray:
  """float32[genes]: each gene's mean raw value over all cells (unmeasured = 0).

  Works for an in-memory X (scipy) and a lazy one (`pipeline.LazyCSRRows.col_means`, streaming,
  same float32 arithmetic as scipy's `X.mean(axis=0)`, so plans built from it agree exactly).
  """
  if sp.issparse(data.X):
    return np.asarray(data.X.mean(axis=0)).ravel()
  return data.X.col_means()


def gene_nnz(data: CellData) -> np.ndarray:
  """int64[genes]: number of cells with a non-zero value of each gene (in-memory or lazy X)."""
  if sp.issparse(data.X):
    return np.asarray((data.X != 0).sum(axis=0), np.int64).ravel()
  return data.X.col_nnz()


def describe(data: CellData) -> dict[str, Any]:
  """A small JSON-able summary (for logs and run metadata)."""
  return {"name": data.name, "cells": data.n_cells, "genes": data.n_genes,
          "datasets": list(data.dataset_names), "is_counts": data.is_counts,
          "density": float(data.X.nnz / max(1, data.n_cells * data.n_genes)),
          "genes_per_dataset": [int(p.sum()) for p in data.panel]}
