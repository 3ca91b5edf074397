"""Large data: a lazy (row-on-demand) `.h5ad` reader and a host-side prefetching batch pipeline.

* ``open_lazy_h5ad(path)`` returns a ``CellData`` whose ``X`` reads only the requested rows from
  disk (the CSR ``indptr`` is read once; per batch, the rows' ``indices``/``data`` ranges).
  Size factors come from one streaming pass in chunks, so memory is O(chunk), not O(file).
  ``batching.make_batch`` works on it unchanged.
* ``batching.stage_batches(..., shard, n_shards)`` yields this process's part of every global batch: the epoch order and the
  step's cell chunk are the same on every process (a pure function of seed, stage, step), and
  process ``p`` of ``P`` builds rows ``[p*B/P, (p+1)*B/P)`` only, reading only those cells. With
  ``n_shards > 1`` each shard's random choices (gene sampling, masks) come from
  ``default_rng([seed, stage, step, 1, shard])``, so a one-process run that builds all shards
  and concatenates them sees exactly the multi-process global batch.
* ``Prefetcher`` runs any (step, batch) iterator in a background thread, ``depth`` batches
  ahead, and applies ``put`` (e.g. a sharded ``jax.device_put``) there, so host batch building
  overlaps the device step. Order is the iterator's order, so resuming at a step is exact.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from gil_jax.data.anndata_io import MIN_SIZE_FACTOR, CellData, DataError


class LazyCSRRows:
  """Row access to an on-disk CSR matrix (an `.h5ad` group with data/indices/indptr)."""

  def __init__(self, path: str, key: str = "X"):
    self.path, self.key = path, key
    self._file = h5py.File(path, "r")
    g = self._file[key]
    if not isinstance(g, h5py.Group) or g.attrs.get("encoding-type") != "csr_matrix":
      raise DataError(f"{path}: {key} is not a CSR matrix; lazy reading supports CSR only. "
                      "Convert with `adata.X = scipy.sparse.csr_matrix(adata.X)` and rewrite, or "
                      "read it eagerly (anndata_io.read_h5ad).")
    self.shape = tuple(int(s) for s in g.attrs["shape"])
    self.indptr = g["indptr"][:].astype(np.int64)
    self._data, self._indices = g["data"], g["indices"]

  def __getitem__(self, rows) -> sp.csr_matrix:
    rows = np.asarray(rows, np.int64).reshape(-1)
    starts, ends = self.indptr[rows], self.indptr[rows + 1]
    counts = ends - starts
    # one read of the covering range when rows are dense in the file, else one read per row
    lo, hi = (int(starts.min()), int(ends.max())) if len(rows) else (0, 0)
    if hi - lo <= 4 * max(int(counts.sum()), 1):
      data, idx = self._data[lo:hi], self._indices[lo:hi]
      take = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) - lo \
          if len(rows) else np.zeros(0, np.int64)
      data, idx = data[take], idx[take]
    else:
      data = np.concatenate([self._data[s:e] for s, e in zip(starts, ends)])
      idx = np.concatenate([self._indices[s:e] for s, e in zip(starts, ends)])
    indptr = np.concatenate([[0], np.cumsum(counts)])
    m = sp.csr_matrix((data.astype(np.float32), idx.astype(np.int32), indptr),
                      shape=(len(rows), self.shape[1]))
    m.sum_duplicates()
    return m

  def row_sums(self, chunk: int = 4096) -> np.ndarray:
    """Per-row sums by streaming `chunk` rows at a time."""
    out = np.zeros(self.shape[0], np.float64)
    for r0 in range(0, self.shape[0], chunk):
      r1 = min(r0 + chunk, self.shape[0])
      s, e = self.indptr[r0], self.indptr[r1]
      seg = self._data[s:e].astype(np.float64)
      owner = np.repeat(np.arange(r1 - r0), np.diff(self.indptr[r0:r1 + 1]))
      out[r0:r1] = np.bincount(owner, weights=seg, minlength=r1 - r0)
    return out

  def close(self) -> None:
    self._file.close()


def _read_index(f: h5py.File, group: str) -> np.ndarray:
  g = f[group]
  key = g.attrs.get("_index", "_index")
  col = g[key]
  return np.asarray([x.decode() if isinstance(x, bytes) else str(x) for x in col[:]])


def open_lazy_h5ad(path: str, name: str | None = None) -> CellData:
  """A `CellData` over `path` whose X rows are read on demand (see module docstring).

  One dataset panel (all genes measured); obs holds only the cell names and 'dataset'.
  """
  X = LazyCSRRows(path)
  with h5py.File(path, "r") as f:
    genes = _read_index(f, "var")
    cells = _read_index(f, "obs")
  if len(genes) != X.shape[1] or len(cells) != X.shape[0]:
    raise DataError(f"{path}: var/obs sizes {len(genes)}/{len(cells)} do not match X {X.shape}")
  sf = np.maximum(X.row_sums() / 1e4, MIN_SIZE_FACTOR).astype(np.float32)
  name = name or path.rsplit("/", 1)[-1].removesuffix(".h5ad")
  obs = pd.DataFrame({"dataset": name}, index=pd.Index(cells))
  return CellData(name=name, X=X, gene_ids=genes, obs=obs,
                  panel=np.ones((1, X.shape[1]), bool),
                  dataset_index=np.zeros(X.shape[0], np.int32), dataset_names=[name],
                  is_counts=False, size_factors=sf)


class Prefetcher:
  """Iterates `source` in a background thread, `depth` items ahead, applying `put` there.

  Exceptions in the producer are re-raised in the consumer. Use as an iterator; `close()` (or
  leaving a `with` block) stops the thread early.
  """

  _END = object()

  def __init__(self, source: Iterator[Any], put: Callable[[Any], Any] | None = None,
               depth: int = 2):
    self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._put = put or (lambda x: x)
    self._thread = threading.Thread(target=self._run, args=(source,), daemon=True)
    self._thread.start()

  def _offer(self, item) -> bool:
    """Blocks until `item` is queued (True) or close() was called (False)."""
    while not self._stop.is_set():
      try:
        self._q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self, source):
    try:
      for item in source:
        if self._stop.is_set() or not self._offer(self._put(item)):
          return
      self._offer(self._END)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      self._offer(e)

  def __iter__(self):
    return self

  def __next__(self):
    item = self._q.get()
    if item is self._END:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
