"""Large data: a lazy (row-on-demand) `.h5ad` reader.

* ``open_lazy_h5ad(path)`` returns a ``CellData`` whose ``X`` reads only the requested rows from
  disk (the CSR ``indptr`` is read once; per batch, the rows' ``indices``/``data`` ranges).
  Validation (NaN/inf, negative values, duplicate gene ids, like ``anndata_io.read_h5ad``), size
  factors and per-gene non-zero counts come from one streaming pass in chunks, so memory is
  O(chunk + cells), not O(file); only the obs columns asked for are read. Plan 'expressed' streams
  once more for the gene means (``anndata_io.gene_means``). ``batching.make_batch`` works on it
  unchanged. Training uses it with ``--config.data.lazy=True``; several files (a corpus) are
  stacked by ``corpus.open_corpus``. Rows close together in the file are read in one run
  (block-shuffled batches read a few contiguous ranges). Picklable (loader worker processes).
* ``batching.StageBatchMaker(..., shard, n_shards)`` builds this process's part of every global
  batch: the epoch order and the step's cell chunk are the same on every process (a pure
  function of seed, stage, step), and process ``p`` of ``P`` builds rows
  ``[p*B/P, (p+1)*B/P)`` only, reading only those cells. With ``n_shards > 1`` each shard's
  random choices (gene sampling, masks) come from ``default_rng([seed, stage, step, 1, shard])``,
  so a one-process run that builds all shards and concatenates them sees exactly the
  multi-process global batch. The training loader (``loader.py``) builds them ahead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterator, Sequence

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem

from gil_jax.data import batching
from gil_jax.data.anndata_io import (_DATASET_NAMES_KEY, _PANEL_KEY, MIN_SIZE_FACTOR, CellData,
                                     DataError, ValueStats, _fail_missing_file,
                                     check_unique_genes, check_value_stats, expressing_cells,
                                     missing_layer_error, unreadable_file_error)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CSRScan:
  """One streaming pass over a `LazyCSRRows` (see `LazyCSRRows.scan`)."""
  row_sums: np.ndarray        # float32[rows] (summed like the in-memory reader)
  col_nnz: np.ndarray         # int64[genes]: rows with a non-zero value
  stats: ValueStats           # NaN/inf, negatives, integrality of the stored values
  col_sums: np.ndarray | None = None  # float64[genes]: sum of the stored values


def _sorted_within_rows(owner: np.ndarray, cols: np.ndarray) -> bool:
  """Whether each row's columns strictly increase (no unsorted or duplicate entry); `owner`
  is each entry's row, entries grouped by row."""
  return not np.any((np.diff(cols) <= 0) & (owner[1:] == owner[:-1]))


def row_runs(starts: np.ndarray, ends: np.ndarray, merge_gap: int
             ) -> tuple[np.ndarray, np.ndarray, slice | np.ndarray]:
  """How to read CSR rows whose entries are [starts[i], ends[i]) of the stored arrays: (lo, hi,
  take): read the runs [lo[k], hi[k]) one after the other, then `take` (a slice or an index
  array into what was read) gives the rows' entries in the order asked. Rows sorted by position
  are merged into one run while the gap between them is at most `merge_gap` entries (a block of
  consecutive cells is one read)."""
  counts = ends - starts
  order = np.argsort(starts, kind="stable")
  s_sorted = starts[order]
  run_end = np.maximum.accumulate(ends[order])
  new_run = np.r_[True, s_sorted[1:] > run_end[:-1] + merge_gap]
  firsts = np.flatnonzero(new_run)
  lo, hi = s_sorted[firsts], run_end[np.r_[firsts[1:] - 1, len(starts) - 1]]
  base = np.r_[0, np.cumsum(hi - lo)]
  row_run = np.empty(len(starts), np.int64)
  row_run[order] = np.cumsum(new_run) - 1
  offset = starts - lo[row_run] + base[row_run]      # each row's first entry in what was read
  indptr = np.r_[0, np.cumsum(counts)]
  if indptr[-1] == base[-1] and np.array_equal(offset, indptr[:-1]):
    return lo, hi, slice(None)  # the rows are exactly the run(s), in stored order: no gather
  return lo, hi, np.arange(indptr[-1]) + np.repeat(offset - indptr[:-1], counts)


def normalise_rows(values: np.ndarray, counts: np.ndarray, size_factors: np.ndarray | None,
                   rows: np.ndarray, how: str) -> np.ndarray:
  """Values of rows read as CSR (`counts` entries per row) normalised as the in-memory path does
  (`batching.normalise`); `size_factors[rows]` are the rows' factors (read by 'log1p_cp10k'
  only). 'none': `values` unchanged."""
  if how == "none":
    return values
  sf = np.repeat(size_factors[rows], counts) if how == "log1p_cp10k" else None
  return batching.normalise(values, sf, how)


class LazyCSRRows:
  """Row access to an on-disk CSR matrix (an `.h5ad` group with data/indices/indptr).

  Values are read as float32 with duplicates summed and explicit zeros dropped, as
  `anndata_io.read_h5ad` stores them. `select(keep)` hides file rows (e.g. cells with no counts);
  row i is then the i-th kept file row. Column statistics (`scan`, `col_means`, `col_nnz`) stream
  the stored values in chunks of at most `chunk_nnz` entries, so memory is O(chunk + rows).
  """

  def __init__(self, path: str, key: str = "X", chunk_nnz: int = 1 << 22):
    self.path, self.key, self.chunk_nnz = path, key, int(chunk_nnz)
    self._file = self._open()
    g = self._file.get(key)
    if g is None:
      layers = sorted(self._file["layers"].keys()) if "layers" in self._file else []
      self._file.close()
      if key.startswith("layers/"):
        raise missing_layer_error(path, key[7:], layers)
      raise DataError(f"{path}: has no {key}; set `config.data.layer` to one of the layers "
                      f"{layers}.")
    what = "X" if key == "X" else f"layer {key.removeprefix('layers/')!r}"
    if not isinstance(g, h5py.Group) or g.attrs.get("encoding-type") != "csr_matrix":
      kind = g.attrs.get("encoding-type", type(g).__name__)
      self._file.close()
      raise DataError(f"{path}: {what} is stored as {kind!r}, not as a CSR matrix; lazy reading "
                      "supports CSR only. Rewrite the file with a CSR matrix (`adata.X = "
                      "scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(path)`), or read it into "
                      "memory (--config.data.lazy=False).")
    n_rows, self.n_cols = (int(x) for x in g.attrs["shape"])
    self.indptr = g["indptr"][:].astype(np.int64)
    self._data, self._indices = g["data"], g["indices"]
    if (len(self.indptr) != n_rows + 1 or (n_rows and self.indptr[0] != 0)
        or np.any(np.diff(self.indptr) < 0) or self.indptr[-1] != self._data.shape[0]):
      self._file.close()
      raise DataError(f"{path}: {what} is a malformed CSR matrix (indptr does not match shape "
                      f"{(n_rows, self.n_cols)} / {self._data.shape[0]} stored values); re-create "
                      "the file, e.g. with `adata.write_h5ad(path)`.")
    self._rows: np.ndarray | None = None   # kept file rows (None = all)
    self._col_means: np.ndarray | None = None
    self._col_nnz: np.ndarray | None = None
    self.col_sums: np.ndarray | None = None  # float64[genes], set by open_lazy_h5ad's scan
    # values returned by row reads: as stored ('none'), or normalised on read (`normalise_on_read`)
    self.normalisation, self._file_size_factors = "none", None

  @property
  def shape(self) -> tuple[int, int]:
    n = len(self.indptr) - 1 if self._rows is None else len(self._rows)
    return (n, self.n_cols)

  @property
  def nnz(self) -> int:
    """Stored entries of the kept rows (explicit zeros included)."""
    if self._rows is None:
      return int(self.indptr[-1])
    return int(np.sum(self.indptr[self._rows + 1] - self.indptr[self._rows]))

  def select(self, keep: np.ndarray) -> None:
    """Keeps only the rows where bool `keep` (over the current rows) is True, in order."""
    keep = np.asarray(keep, bool)
    if keep.shape != (self.shape[0],):
      raise ValueError(f"keep has shape {keep.shape}, expected ({self.shape[0]},)")
    current = np.arange(len(self.indptr) - 1) if self._rows is None else self._rows
    self._rows = current[keep]
    self._col_means = self._col_nnz = self.col_sums = None

  def __getitem__(self, rows) -> sp.csr_matrix:
    counts, idx, data = self.read(rows)
    return sp.csr_matrix((data, idx, np.concatenate([[0], np.cumsum(counts)])),
                         shape=(len(counts), self.n_cols))

  def read(self, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(entries per row int64, column int32, value float32) of `rows`, in the order given, each
    row's entries by increasing column: CSR without the matrix object (the corpus reader
    assembles several files' reads into one)."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    if self._rows is not None:
      rows = self._rows[rows]
    starts, ends = self.indptr[rows], self.indptr[rows + 1]
    counts = ends - starts
    if not len(rows):
      return counts, np.zeros(0, np.int32), np.zeros(0, np.float32)
    lo, hi, take = row_runs(starts, ends, self.MERGE_GAP)
    if len(lo) == 1:
      data, idx = self._data[lo[0]:hi[0]], self._indices[lo[0]:hi[0]]
    else:
      data = np.concatenate([self._data[a:b] for a, b in zip(lo, hi)])
      idx = np.concatenate([self._indices[a:b] for a, b in zip(lo, hi)])
    indptr = np.r_[0, np.cumsum(counts)]
    data, idx = data[take].astype(np.float32, copy=False), idx[take].astype(np.int32, copy=False)
    # as the in-memory reader stores a matrix: duplicates summed, explicit zeros dropped (the
    # scipy passes run only when a check finds either)
    owner = np.repeat(np.arange(len(rows)), counts)
    if not _sorted_within_rows(owner, idx) or not np.all(data):
      m = sp.csr_matrix((data, idx, indptr), shape=(len(rows), self.n_cols))
      m.sum_duplicates()
      m.eliminate_zeros()
      counts, idx, data = np.diff(m.indptr).astype(np.int64), m.indices, m.data
    data = normalise_rows(data, counts, self._file_size_factors, rows, self.normalisation)
    return counts, idx, data

  def normalise_on_read(self, how: str, size_factors: np.ndarray) -> None:
    """Row reads return `batching.normalise(x, size factor, how)` from now on (e.g.
    log1p(x / size factor) for 'log1p_cp10k'); `size_factors` are those of the current rows.
    Column statistics stay on stored values."""
    rows = np.arange(len(self.indptr) - 1) if self._rows is None else self._rows
    self._file_size_factors = np.ones(len(self.indptr) - 1, np.float32)
    self._file_size_factors[rows] = size_factors
    self.normalisation = how

  def _open(self) -> h5py.File:
    try:
      # no HDF5 chunk cache: reads are whole runs of rows, and a 1 MiB cache per dataset per
      # file is most of what an opened corpus file costs in memory (53 of 76 MB for 20 files)
      return h5py.File(self.path, "r", rdcc_nbytes=0)
    except OSError as e:
      raise unreadable_file_error(self.path, e) from e

  MERGE_GAP = 1 << 14  # stored entries: rows closer than this in the file are read in one run

  def __getstate__(self) -> dict:
    """Picklable (for loader worker processes): the open HDF5 handle is reopened on load."""
    state = dict(self.__dict__)
    for k in ("_file", "_data", "_indices"):
      state.pop(k, None)
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._attach()

  def _attach(self) -> None:
    self._file = self._open()
    g = self._file[self.key]
    self._data, self._indices = g["data"], g["indices"]

  def reopen(self) -> None:
    """A fresh handle: HDF5 keeps the metadata of every object read through a handle (the obs
    and var columns read when opening: ~2.5 MB per file), which row reads do not need. Call it
    before any copy shares the handle (`open_lazy_h5ad` does)."""
    self._file.close()
    self._attach()

  def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(owner, values, columns) of the kept rows, file order, <= chunk_nnz entries per chunk
    (or one row); owner = index among the kept rows; values float32 as read."""
    n = len(self.indptr) - 1
    local = None
    if self._rows is not None:
      local = np.full(n, -1, np.int64)
      local[self._rows] = np.arange(len(self._rows))
    r0 = 0
    while r0 < n:
      r1 = int(np.searchsorted(self.indptr, self.indptr[r0] + self.chunk_nnz, side="right")) - 1
      r1 = min(max(r1, r0 + 1), n)
      s, e = int(self.indptr[r0]), int(self.indptr[r1])
      owner = np.repeat(np.arange(r0, r1), np.diff(self.indptr[r0:r1 + 1]))
      vals = self._data[s:e].astype(np.float32)
      cols = self._indices[s:e].astype(np.int64)
      if len(cols) and (cols.min() < 0 or cols.max() >= self.n_cols):
        raise DataError(f"{self.path}: {self.key} has column indices outside [0, {self.n_cols}) "
                        "(malformed CSR matrix); re-create the file, e.g. with "
                        "`adata.write_h5ad(path)`.")
      if local is not None:
        owner = local[owner]
        kept = owner >= 0
        owner, vals, cols = owner[kept], vals[kept], cols[kept]
      yield owner, vals, cols
      r0 = r1

  def scan(self) -> CSRScan:
    """One streaming pass: row sums, per-column non-zero counts and value statistics."""
    sums = np.zeros(self.shape[0], np.float32)
    nnz = np.zeros(self.n_cols, np.int64)
    col_sums = np.zeros(self.n_cols, np.float64)
    stats = ValueStats()
    for owner, vals, cols in self._chunks():
      if not len(vals):
        continue
      stats = stats.merge(ValueStats.of(vals))
      # a row never spans two chunks; float32 reduceat per row, as scipy's X.sum(axis=1)
      starts = np.flatnonzero(np.concatenate([[True], owner[1:] != owner[:-1]]))
      sums[owner[starts]] = np.add.reduceat(vals, starts)
      if not _sorted_within_rows(owner, cols):  # unsorted or duplicate entries: sum first
        lo = int(owner.min())
        m = sp.coo_matrix((vals, (owner - lo, cols)), shape=(int(owner.max()) - lo + 1,
                                                              self.n_cols))
        m.sum_duplicates()
        nnz += np.bincount(m.col[m.data != 0], minlength=self.n_cols)
      else:
        nnz += np.bincount(cols[vals != 0], minlength=self.n_cols)
      col_sums += np.bincount(cols, weights=vals, minlength=self.n_cols)
    self._col_nnz = nnz
    return CSRScan(row_sums=sums, col_nnz=nnz, stats=stats, col_sums=col_sums)

  def row_sums(self) -> np.ndarray:
    """float32[rows]: per-row sums (one streaming pass)."""
    return self.scan().row_sums

  def col_nnz(self) -> np.ndarray:
    """int64[genes]: rows with a non-zero value per column (streamed once, then cached)."""
    if self._col_nnz is None:
      self.scan()
    return self._col_nnz

  def col_means(self) -> np.ndarray:
    """float32[genes]: column means over the rows, streamed once, then cached. The arithmetic
    of scipy's float32 `X.mean(axis=0)` (each value times float32(1/rows), summed in float32 in
    row order), so lazy and in-memory data give bit-identical means (and stage plans)."""
    if self._col_means is None:
      out = np.zeros(self.n_cols, np.float32)
      scale = np.float32(1.0 / max(self.shape[0], 1))
      for _, vals, cols in self._chunks():
        np.add.at(out, cols, vals * scale)
      self._col_means = out
    return self._col_means

  def close(self) -> None:
    self._file.close()


def _read_column(f: h5py.File, group: str, column: str):
  """A var/obs column (or its index) decoded by anndata: a numpy array or pandas Categorical."""
  return read_elem(f[group][column])


def _as_str(values) -> np.ndarray:
  return pd.Series(np.asarray(values, object) if not isinstance(values, pd.Categorical)
                   else values).astype(str).to_numpy(object)


def _columns(f: h5py.File, group: str) -> list[str]:
  order = f[group].attrs.get("column-order", [])
  return [str(c) for c in np.atleast_1d(order)]


def _panel_metadata(f: h5py.File, n_genes: int, source: str):
  """(panel, names, per-cell dataset names) stored by `CellData.to_anndata`, or None."""
  try:
    if (_PANEL_KEY not in f.get("varm", {}) or _DATASET_NAMES_KEY not in f.get("uns", {})
        or "dataset" not in _columns(f, "obs")):
      return None
    panel = np.asarray(read_elem(f["varm"][_PANEL_KEY]), bool).T
    names = [str(n) for n in np.atleast_1d(read_elem(f["uns"][_DATASET_NAMES_KEY]))]
    ds = _as_str(_read_column(f, "obs", "dataset"))
  except Exception as e:  # noqa: BLE001 -- unreadable metadata: treat as one dataset, like eager
    log.info("%s: ignoring unreadable dataset panel metadata (%s)", source, e)
    return None
  if panel.shape != (len(names), n_genes) or not set(ds) <= set(names):
    return None
  return panel, names, ds


def open_lazy_h5ad(path: str | os.PathLike, name: str | None = None, *,
                   layer: str | None = None, gene_column: str | None = None,
                   require_counts: bool = False, obs_columns: Sequence[str] | None = None,
                   chunk_nnz: int = 1 << 22, scan: CSRScan | None = None) -> CellData:
  """A `CellData` over `path` whose X rows are read on demand (see module docstring).

  Same options, checks and result as `anndata_io.read_h5ad` (value and gene-id validation,
  cells with total 0 dropped, dataset panels written by `CellData.to_anndata`), done in one
  streaming pass over the stored values; X must be CSR (and so must `layer`). obs holds the
  cell names, 'dataset' and only the `obs_columns` asked for (default: none). `scan`: that pass's
  result cached earlier (a corpus manifest, `corpus.py`), so that no value is read here.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    _fail_missing_file(path)
  if name is None:
    name = os.path.splitext(os.path.basename(path))[0]
  source, what = path, ("X" if layer is None else f"layer {layer!r}")
  X = LazyCSRRows(path, "X" if layer is None else f"layers/{layer}", chunk_nnz=chunk_nnz)
  try:
    data = _lazy_cell_data(X, name, source, what, gene_column, require_counts, obs_columns, scan)
    X.reopen()
  except BaseException:
    X.close()
    raise
  return data


def _lazy_cell_data(X: LazyCSRRows, name: str, source: str, what: str, gene_column: str | None,
                    require_counts: bool, obs_columns: Sequence[str] | None,
                    scan: CSRScan | None) -> CellData:
  """`open_lazy_h5ad` after X is open: ids, obs columns, panels and the validating scan."""
  f = X._file
  var_cols, obs_cols = _columns(f, "var"), _columns(f, "obs")
  if gene_column is None:
    genes, where = _as_str(_read_column(f, "var", f["var"].attrs.get("_index", "_index"))), \
        "var_names"
  else:
    if gene_column not in var_cols:
      raise DataError(f"{source}: var column {gene_column!r} not found; available var columns: "
                      f"{var_cols or 'none'}. Fix `config.data.gene_column` (None = use var_names).")
    genes, where = _as_str(_read_column(f, "var", gene_column)), f"var[{gene_column!r}]"
  cells = _as_str(_read_column(f, "obs", f["obs"].attrs.get("_index", "_index")))
  if len(genes) != X.shape[1] or len(cells) != X.shape[0]:
    raise DataError(f"{source}: var/obs sizes {len(genes)}/{len(cells)} do not match {what} "
                    f"{X.shape}; the file is malformed, re-create it (`adata.write_h5ad(path)`).")
  if X.shape[0] == 0 or X.shape[1] == 0:
    raise DataError(f"{source}: has {X.shape[0]} cells and {X.shape[1]} genes; need at least "
                    "one of each. Check the file / filtering that produced it.")
  check_unique_genes(genes, source, where)

  meta = _panel_metadata(f, len(genes), source)
  if meta is not None:
    panel, names, ds = meta
    lookup = {n: i for i, n in enumerate(names)}
    dataset_index = np.array([lookup[d] for d in ds], np.int32)
  else:
    panel, names = np.ones((1, len(genes)), bool), [name]
    dataset_index = np.zeros(X.shape[0], np.int32)
  obs = pd.DataFrame(index=pd.Index(cells, dtype=object))
  wanted = [c for c in dict.fromkeys(obs_columns or []) if c != "dataset"]
  missing = [c for c in wanted if c not in obs_cols]
  if missing:
    raise DataError(f"{source}: obs columns {missing} not found; available obs columns: "
                    f"{obs_cols or 'none'}. Fix the obs column names in the config.")
  for c in wanted:
    obs[c] = _read_column(f, "obs", c)

  if scan is None:
    scan = X.scan()
  elif scan.row_sums.shape != (X.shape[0],) or scan.col_nnz.shape != (X.shape[1],):
    raise DataError(f"{source}: its cached statistics (corpus manifest) are for another shape "
                    f"than {what} {X.shape}; rewrite the manifest (`gil-jax corpus`).")
  X._col_nnz = scan.col_nnz
  X.col_sums = scan.col_sums
  is_counts = check_value_stats(scan.stats, require_counts, source, what)
  totals = scan.row_sums
  keep = expressing_cells(totals, source, what)
  if not keep.all():
    X.select(keep)
    X._col_nnz = scan.col_nnz  # the dropped rows hold zeros only (values are >= 0)
    X.col_sums = scan.col_sums
    obs, dataset_index, totals = obs.iloc[np.flatnonzero(keep)], dataset_index[keep], totals[keep]
  obs = obs.copy()
  obs["dataset"] = pd.Categorical(np.asarray(names, object)[dataset_index], categories=names)
  return CellData(name=name, X=X, gene_ids=genes.astype(str), obs=obs, panel=panel,
                  dataset_index=dataset_index, dataset_names=list(names), is_counts=is_counts,
                  size_factors=np.maximum(totals / 1e4, MIN_SIZE_FACTOR).astype(np.float32))
