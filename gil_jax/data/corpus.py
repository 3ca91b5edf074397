"""A corpus: many `.h5ad` files read lazily as one `CellData`, described by a manifest.

* ``expand_files(items, data_dir)``: `config.data.files` entries -> .h5ad paths. An entry is a
  file (or a name under `data_dir`), a directory (its ``manifest.json`` if there is one, else its
  ``*.h5ad`` files, sorted), a glob (``shards/*.h5ad``) or a manifest ``.json``.
* ``write_manifest(paths, out)`` (``gil-jax corpus``): validates every file in one streaming pass
  (CSR, NaN/inf, negative values, duplicate gene ids, like any lazy read) and writes per file its
  cells, genes, layer, whether it holds counts, its categorical obs columns (label / batch
  candidates) and a content checksum, plus the pass's statistics (per-cell totals, per-gene
  detection counts and sums) in a side file, so that opening the corpus reads no values.
* ``open_corpus(paths, ...)``: one lazy `CellData` over all files: rows are the files' cells in
  order, columns the union of their genes, and each file keeps its own gene panel (a gene a file
  does not measure is "not measured", never a zero). With a manifest, every file is checked
  against its recorded size and checksum first; a changed file is refused.
* ``write_pack(manifest_path)`` (``gil-jax corpus --pack``): the corpus's rows written once more
  as one CSR matrix in union-gene order (``DIR/manifest.pack/``: ``indptr.npy``, ``indices.i32``,
  ``values.f32``, the exact rows `open_corpus` reads from the files). With a pack in the
  manifest, ``open_corpus`` reads training rows from it (`PackedRows`: one positional read per
  run of rows, no HDF5 and no per-batch re-ordering into union-gene order) and everything else
  (obs, panels, statistics) from the files as before; the batches are the same.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from gil_jax import integrity
from gil_jax.data import anndata_io, pipeline
from gil_jax.data.anndata_io import CellData, DataError, ValueStats

log = logging.getLogger("gil_jax")
MANIFEST_NAME = "manifest.json"
FORMAT = "gil_jax.corpus/1"
PACK_ARRAYS = {"indptr": "indptr.npy", "indices": "indices.i32", "values": "values.f32"}
PACK_FORMAT = "gil_jax.corpus_pack/1"


def resolve_path(name: str, data_dir: str) -> str:
  """A file name of `config.data.files` as a path: as given if it exists or is absolute, else
  under `data_dir` (with `.h5ad` appended when missing)."""
  if os.path.isabs(name) or os.path.exists(name):
    return name
  return os.path.join(data_dir, name if name.endswith(".h5ad") else name + ".h5ad")


def expand_files(items: Sequence[str], data_dir: str, use_manifest: bool = True
                 ) -> tuple[list[str], dict | None]:
  """(.h5ad paths, the manifest read, or None) for `config.data.files` entries (module doc).

  A manifest must be the only entry; a directory, glob or manifest that yields no file is a
  DataError naming it. `use_manifest=False`: a folder's manifest is ignored (its .h5ad files
  are listed) and a manifest entry is an error.
  """
  paths, manifest = [], None
  for item in items:
    where = item if os.path.exists(item) or os.path.isabs(item) or any(
        c in item for c in "*?[") else os.path.join(data_dir, item)
    if use_manifest and os.path.isdir(where) and os.path.isfile(os.path.join(where,
                                                                           MANIFEST_NAME)):
      where = os.path.join(where, MANIFEST_NAME)
    if where.endswith(".json"):
      if not use_manifest:
        raise DataError(f"{item} is a manifest; list the .h5ad files, folders or globs instead.")
      if len(items) != 1:
        raise DataError(f"config.data.files lists a corpus manifest ({item}) and other entries; a "
                        "manifest must be the only entry (list every file in it: `gil-jax corpus`).")
      manifest = read_manifest(where)
      return [f["abspath"] for f in manifest["files"]], manifest
    if os.path.isdir(where):
      found = sorted(glob.glob(os.path.join(where, "*.h5ad")))
      if not found:
        raise DataError(f"directory {where!r} (config.data.files) holds no .h5ad file.")
      paths += found
    elif any(c in item for c in "*?["):
      found = sorted(glob.glob(where))
      if not found:
        raise DataError(f"the pattern {item!r} (config.data.files) matches no file.")
      paths += found
    else:
      path = resolve_path(item, data_dir)
      if not os.path.exists(path):
        raise DataError(f"{item!r} (config.data.files) was not found: not a file or folder "
                        f"here ({os.getcwd()}) nor {path!r} under config.data.data_dir; give an "
                        ".h5ad file, a folder of them, a glob or a corpus manifest.")
      paths.append(path)
  dup = sorted(p for p, n in collections.Counter(paths).items() if n > 1)
  if dup:
    raise DataError(f"config.data.files names {dup} more than once; list every file once.")
  return paths, manifest


# ---------------------------------------------------------------------------- manifest

def _stats_path(manifest_path: str) -> str:
  return os.path.splitext(manifest_path)[0] + ".stats.npz"


def _file_hash(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def write_manifest(paths: Sequence[str], out: str, *, layer: str | None = None,
                   gene_column: str | None = None, progress: bool = True) -> dict:
  """Validates `paths` (one streaming pass each) and writes the manifest `out` (.json) and its
  statistics (`out` with `.stats.npz`); returns the manifest. Paths are stored relative to the
  manifest's folder, so a corpus folder can be moved as a whole."""
  if not paths:
    raise DataError("no .h5ad file given for the corpus manifest.")
  folder = os.path.dirname(os.path.abspath(out))
  files, arrays = [], {}
  for i, path in enumerate(tqdm(paths, desc="corpus", unit="file", disable=not progress)):
    path = os.path.abspath(path)
    X = _open_rows(path, layer)
    try:
      scan = X.scan()
      data = pipeline._lazy_cell_data(X, _name(path), path, _what(layer), gene_column, False,
                                      None, scan)
      nnz = X.nnz
      obs_cols = pipeline._columns(X._file, "obs")
      categorical = [c for c in obs_cols
                     if X._file["obs"][c].attrs.get("encoding-type") == "categorical"]
    finally:
      X.close()
    fp = integrity.file_fingerprint(path)
    files.append({"path": os.path.relpath(path, folder), "name": data.name,
                  "cells": int(scan.row_sums.shape[0]), "cells_used": int(data.n_cells),
                  "genes": int(data.n_genes), "nnz": int(nnz), "is_counts": bool(data.is_counts),
                  "obs_columns": obs_cols, "categorical_obs_columns": categorical,
                  "size": fp["size"], "sampled_checksum": fp["sampled_checksum"],
                  "checksum": _file_hash(path)})
    arrays.update({f"{i}/row_sums": scan.row_sums, f"{i}/col_nnz": scan.col_nnz,
                   f"{i}/col_sums": scan.col_sums})
  dup = sorted(n for n, k in collections.Counter(f["name"] for f in files).items() if k > 1)
  if dup:
    raise DataError(f"the corpus has several files named {dup} (file names must be unique).")
  stats_path = _stats_path(out)
  tmp = stats_path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, stats_path)
  manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "layer": layer, "gene_column": gene_column,
              "stats_file": os.path.basename(stats_path), "stats_checksum": _file_hash(stats_path),
              "cells": sum(f["cells_used"] for f in files), "files": files}
  for old in (_pack_folder(out), _pack_folder(out) + ".tmp"):  # a pack of the files before
    shutil.rmtree(old, ignore_errors=True)
  _write_json(out, manifest)
  return manifest


def _write_json(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _without_runtime_fields(manifest: dict) -> dict:
  """The manifest as stored: without the fields `read_manifest` adds."""
  out = {k: v for k, v in manifest.items() if k != "abspath"}
  out["files"] = [{k: v for k, v in f.items() if k not in ("abspath", "scan")}
                  for f in manifest["files"]]
  return out


def read_manifest(path: str, verify: bool = True) -> dict:
  """The manifest at `path` with each file's `abspath` and cached `scan`; with `verify`, every
  file's size and sampled checksum (and the statistics file's full checksum) must match."""
  try:
    with open(path) as f:
      m = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"cannot read the corpus manifest {path!r} ({e}); rewrite it with "
                    "`gil-jax corpus DIR`.") from e
  if not isinstance(m, dict) or m.get("format") != FORMAT:
    raise DataError(f"{path} is not a gil_jax corpus manifest (format {FORMAT!r}); write one with "
                    "`gil-jax corpus DIR`.")
  folder = os.path.dirname(os.path.abspath(path))
  m["abspath"] = os.path.abspath(path)
  stats_path = os.path.join(folder, m["stats_file"])
  fix = f"rewrite the manifest: `gil-jax corpus {folder}`"
  if not os.path.isfile(stats_path) or (verify and _file_hash(stats_path) != m["stats_checksum"]):
    raise DataError(f"{path}: its statistics file {stats_path} is missing or changed; {fix}.")
  with np.load(stats_path) as z:
    for i, f in enumerate(m["files"]):
      f["abspath"] = os.path.normpath(os.path.join(folder, f["path"]))
      f["scan"] = pipeline.CSRScan(row_sums=z[f"{i}/row_sums"], col_nnz=z[f"{i}/col_nnz"],
                                   stats=ValueStats(is_counts=f["is_counts"]),
                                   col_sums=z[f"{i}/col_sums"])
  if verify:
    for f in m["files"]:
      p = f["abspath"]
      if not os.path.isfile(p):
        raise DataError(f"corpus file {p} (listed in {path}) is missing; restore it or {fix}.")
      fp = integrity.file_fingerprint(p)
      if fp["size"] != f["size"] or fp["sampled_checksum"] != f["sampled_checksum"]:
        raise DataError(f"corpus file {p} changed since the manifest {path} was written (size "
                        f"{f['size']} -> {fp['size']}, checksum {f['sampled_checksum']} -> "
                        f"{fp['sampled_checksum']}); restore it or {fix}.")
  return m


# ---------------------------------------------------------------------------- lazy rows

class LazyCorpusRows:
  """Rows of several `LazyCSRRows` stacked, their columns mapped onto the union gene list.

  The same interface as `LazyCSRRows` (shape, nnz, rows -> CSR, col_nnz, col_means, close), so
  batching, stage plans and evaluation work on a corpus unchanged. Picklable.
  """

  def __init__(self, parts: Sequence[pipeline.LazyCSRRows], col_maps: Sequence[np.ndarray],
               n_cols: int):
    self.parts, self.col_maps, self.n_cols = list(parts), [np.asarray(c, np.int32)
                                                           for c in col_maps], int(n_cols)
    self.offsets = np.concatenate([[0], np.cumsum([p.shape[0] for p in self.parts])])

  @property
  def shape(self) -> tuple[int, int]:
    return (int(self.offsets[-1]), self.n_cols)

  @property
  def nnz(self) -> int:
    return sum(p.nnz for p in self.parts)

  def __getitem__(self, rows) -> sp.csr_matrix:
    rows = np.asarray(rows, np.int64).reshape(-1)
    part = np.searchsorted(self.offsets, rows, side="right") - 1
    where, counts, cols, data = [], [], [], []
    for k in np.unique(part):
      at = np.flatnonzero(part == k)
      c, i, v = self.parts[k].read(rows[at] - self.offsets[k])
      where.append(at)
      counts.append(c)
      cols.append(self.col_maps[k][i])
      data.append(v)
    if not where:
      return sp.csr_matrix((0, self.n_cols), dtype=np.float32)
    # the files' reads stacked (rows grouped by file) -> CSC, row labels -> output positions ->
    # CSR: two linear counting passes put the rows in the order asked and each row's entries in
    # union-gene order, as the eager `concat` stores them (no comparison sort)
    counts = np.concatenate(counts)
    grouped = sp.csr_matrix((np.concatenate(data), np.concatenate(cols),
                             np.r_[0, np.cumsum(counts)]), shape=(len(rows), self.n_cols))
    csc = grouped.tocsc()
    csc.indices = np.concatenate(where).astype(np.int32)[csc.indices]
    csc.has_sorted_indices = False
    return csc.tocsr()

  def _mapped(self, per_part) -> np.ndarray:
    out = np.zeros(self.n_cols, np.float64)
    for cols, v in zip(self.col_maps, per_part):
      out[cols] += v  # a file's columns map to distinct union columns
    return out

  def col_nnz(self) -> np.ndarray:
    return self._mapped([p.col_nnz() for p in self.parts]).astype(np.int64)

  def col_means(self) -> np.ndarray:
    """float32[genes]: mean over all rows (a file that does not measure a gene adds 0)."""
    sums = []
    for p in self.parts:
      if p.col_sums is None:
        p.col_sums = p.col_means().astype(np.float64) * p.shape[0]
      sums.append(p.col_sums)
    return (self._mapped(sums) / max(1, self.shape[0])).astype(np.float32)

  def close(self) -> None:
    for p in self.parts:
      p.close()


class PackedRows:
  """Rows of a corpus pack (`write_pack`): the interface of `LazyCorpusRows`, whose rows it holds
  bit for bit, with row reads from the pack (`read`) and column statistics from `stats` (the
  files' `LazyCorpusRows`, in the process that opened the corpus). Picklable: a loader worker
  gets the pack's files reopened and no .h5ad file (it only reads rows)."""

  def __init__(self, folder: str, stats, fix: str, rows: np.ndarray | None = None,
               normalisation: str = "none", size_factors: np.ndarray | None = None):
    self.folder, self.stats, self.fix = folder, stats, fix
    self.indptr = np.load(os.path.join(folder, PACK_ARRAYS["indptr"]))
    self.n_cols, self._nnz = stats.shape[1], stats.nnz
    # a view (`pack_view`): row i is pack row rows[i], its values normalised on read with
    # size factor size_factors[i] (`batching.normalise`), as the files' readers return them
    self.rows, self.normalisation, self.size_factors = rows, normalisation, size_factors
    self._open()

  def _open(self) -> None:
    # file objects (not raw descriptors): closed when collected, and a closed one fails loudly
    self._files = {k: open(os.path.join(self.folder, PACK_ARRAYS[k]), "rb", buffering=0)
                   for k in ("indices", "values")}

  @property
  def shape(self) -> tuple[int, int]:
    return (len(self.indptr) - 1 if self.rows is None else len(self.rows), self.n_cols)

  @property
  def nnz(self) -> int:
    """Stored entries of the files' rows (as `LazyCorpusRows.nnz`, explicit zeros included)."""
    return self._nnz

  def _pread(self, key: str, out: np.ndarray, first: int) -> None:
    """Fills `out` with entries first, first + 1, ... of the pack's `key` array."""
    view, at = memoryview(out).cast("B"), int(first) * out.itemsize
    while len(view):
      n = os.preadv(self._files[key].fileno(), [view], at)
      if n <= 0:
        raise DataError(f"{os.path.join(self.folder, PACK_ARRAYS[key])} ends early: it was "
                        f"truncated after this run opened it; {self.fix}.")
      view, at = view[n:], at + n

  def read(self, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(entries per row int64, column int32, value float32) of `rows`, in the order given (CSR
    without the matrix object): each run of rows that follow each other in the pack is read
    straight into its place in the output (one read per array)."""
    asked = np.asarray(rows, np.int64).reshape(-1)
    rows = asked if self.rows is None else self.rows[asked]
    starts, ends = self.indptr[rows], self.indptr[rows + 1]
    if not len(rows):
      return ends - starts, np.zeros(0, np.int32), np.zeros(0, np.float32)
    first = np.flatnonzero(np.r_[True, starts[1:] != ends[:-1]])
    lo, hi = starts[first], ends[np.r_[first[1:] - 1, len(rows) - 1]]
    at = np.r_[0, np.cumsum(hi - lo)]
    idx, val = np.empty(at[-1], np.int32), np.empty(at[-1], np.float32)
    for a, b, o in zip(lo.tolist(), hi.tolist(), at.tolist()):
      self._pread("indices", idx[o:o + b - a], a)
      self._pread("values", val[o:o + b - a], a)
    counts = ends - starts
    return counts, idx, pipeline.normalise_rows(val, counts, self.size_factors, asked,
                                                self.normalisation)

  def __getitem__(self, rows) -> sp.csr_matrix:
    counts, idx, val = self.read(rows)
    return sp.csr_matrix((val, idx, np.r_[0, np.cumsum(counts)]), shape=(len(counts), self.n_cols))

  def _statistics(self) -> LazyCorpusRows:
    if self.stats is None:
      raise RuntimeError("a pickled PackedRows (a loader worker's) reads rows only; take column "
                         "statistics from the corpus opened in the main process.")
    return self.stats

  def col_nnz(self) -> np.ndarray:
    return self._statistics().col_nnz()

  def col_means(self) -> np.ndarray:
    return self._statistics().col_means()

  def close(self) -> None:
    for f in self._files.values():
      f.close()
    if self.stats is not None:
      self.stats.close()

  def __getstate__(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k not in ("_files", "stats")}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state, stats=None)
    self._open()


def _pack_folder(manifest_path: str) -> str:
  return os.path.splitext(manifest_path)[0] + ".pack"


def _corpus_command(manifest: dict, pack: bool = False) -> str:
  """The `gil-jax corpus` command that rewrites `manifest` (its folder, layer, gene column)."""
  path = manifest["abspath"]
  cmd = ["gil-jax corpus", os.path.dirname(path)]
  if os.path.basename(path) != MANIFEST_NAME:
    cmd += ["--out", path]
  if manifest.get("layer"):
    cmd += ["--layer", manifest["layer"]]
  if manifest.get("gene_column"):
    cmd += ["--gene-column", manifest["gene_column"]]
  return "`" + " ".join(cmd + (["--pack"] if pack else [])) + "`"


def _sync(*files) -> None:
  """Flushes `files` to disk (before the pack is recorded as complete)."""
  for f in files:
    f.flush()
    os.fsync(f.fileno())


def write_pack(manifest_path: str, *, chunk_cells: int = 4096, progress: bool = True) -> dict:
  """Writes the pack of the corpus of `manifest_path` (module doc) and records it in the
  manifest; returns the manifest. The rows are read through `open_corpus`, so the pack holds
  exactly what training would read from the files. Written (and synced) into a temporary
  folder that is renamed when complete, and recorded in the manifest last: an interrupted pack
  is never used."""
  manifest = read_manifest(manifest_path)
  files = [f["abspath"] for f in manifest["files"]]
  if len(files) < 2:
    raise DataError(f"{manifest_path} lists one file; a pack is for a corpus of several (one "
                    "file is read directly). Drop --pack.")
  data = open_corpus(files, layer=manifest["layer"], gene_column=manifest["gene_column"],
                     manifest=manifest, progress=False, use_pack=False)
  folder = _pack_folder(manifest_path)
  tmp = folder + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  n = data.n_cells
  indptr = np.zeros(n + 1, np.int64)
  try:
    with (open(os.path.join(tmp, PACK_ARRAYS["indices"]), "wb") as fi,
          open(os.path.join(tmp, PACK_ARRAYS["values"]), "wb") as fv):
      for lo in tqdm(range(0, n, chunk_cells), desc="pack", unit="chunk", disable=not progress):
        m = data.X[np.arange(lo, min(n, lo + chunk_cells))]
        indptr[lo + 1:lo + 1 + m.shape[0]] = indptr[lo] + m.indptr[1:]
        fi.write(np.ascontiguousarray(m.indices, "<i4").tobytes())
        fv.write(np.ascontiguousarray(m.data, "<f4").tobytes())
      _sync(fi, fv)
    with open(os.path.join(tmp, PACK_ARRAYS["indptr"]), "wb") as f:
      np.save(f, indptr)
      _sync(f)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    data.X.close()
  if os.path.exists(folder):
    shutil.rmtree(folder)
  os.replace(tmp, folder)
  manifest = _without_runtime_fields(manifest)
  manifest["pack"] = {
      "format": PACK_FORMAT, "folder": os.path.basename(folder), "cells": int(n),
      "genes": int(data.n_genes), "nnz": int(indptr[-1]),
      "genes_checksum": integrity.ids_hash(data.gene_ids),
      "arrays": {k: {kk: v for kk, v in integrity.file_fingerprint(
          os.path.join(folder, name)).items() if kk in ("size", "sampled_checksum")}
          for k, name in PACK_ARRAYS.items()}}
  _write_json(manifest_path, manifest)
  return read_manifest(manifest_path, verify=False)


def _checked_pack(manifest: dict) -> tuple[str, str]:
  """(folder, fix) of the manifest's pack, its format and files checked against its record."""
  pack = manifest["pack"]
  folder = os.path.join(os.path.dirname(manifest["abspath"]), pack["folder"])
  fix = (f"rewrite it ({_corpus_command(manifest, pack=True)}) or read the files instead "
         "(config.data.use_pack=False)")
  if pack.get("format") != PACK_FORMAT:
    raise DataError(f"the corpus pack {folder} has format {pack.get('format')!r}, this version "
                    f"reads {PACK_FORMAT!r}; {fix}.")
  for k, name in PACK_ARRAYS.items():
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise DataError(f"the corpus pack file {path} is missing; {fix}.")
    fp = integrity.file_fingerprint(path)
    if (fp["size"], fp["sampled_checksum"]) != (pack["arrays"][k]["size"],
                                                pack["arrays"][k]["sampled_checksum"]):
      raise DataError(f"the corpus pack file {path} changed since it was written; {fix}.")
  return folder, fix


def _open_pack(manifest: dict, data: CellData) -> PackedRows:
  """The manifest's pack, checked against its record and the corpus just opened."""
  pack = manifest["pack"]
  folder, fix = _checked_pack(manifest)
  if (pack["cells"], pack["genes"]) != (data.n_cells, data.n_genes):
    raise DataError(f"the corpus pack {folder} holds {pack['cells']} cells x {pack['genes']} genes, "
                    f"not the {data.n_cells} x {data.n_genes} of its files; {fix}.")
  if pack["genes_checksum"] != integrity.ids_hash(data.gene_ids):
    raise DataError(f"the corpus pack {folder} was written for other gene ids (or another gene "
                    f"order) than its files give; {fix}.")
  if any(p._col_nnz is None or p.col_sums is None for p in data.X.parts):
    raise DataError(f"the corpus manifest {manifest['abspath']} lacks cached statistics; "
                    f"rewrite it ({_corpus_command(manifest, pack=True)}).")
  data.X.close()  # rows come from the pack, statistics from the manifest: no .h5ad handle kept
  return PackedRows(folder, data.X, fix)


# ---------------------------------------------------------------------------- opening

def _name(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _what(layer: str | None) -> str:
  return "X" if layer is None else f"layer {layer!r}"


def _open_rows(path: str, layer: str | None) -> pipeline.LazyCSRRows:
  if not os.path.isfile(path):
    anndata_io._fail_missing_file(path)
  return pipeline.LazyCSRRows(path, "X" if layer is None else f"layers/{layer}")


def check_manifest_reads(manifest: dict, layer: str | None, gene_column: str | None) -> None:
  """DataError unless `manifest` was written for this layer and gene column ('' = None)."""
  if (manifest.get("layer") or None, manifest.get("gene_column") or None) != (
      layer or None, gene_column or None):
    raise DataError(f"the corpus manifest was written for layer {manifest.get('layer')!r} and gene "
                    f"column {manifest.get('gene_column')!r}, the config asks for {layer!r} / "
                    f"{gene_column!r}; rewrite it (`gil-jax corpus DIR --layer ...`) or fix "
                    "config.data.layer / config.data.gene_column.")


def open_corpus(paths: Sequence[str], *, layer: str | None = None,
                gene_column: str | None = None, require_counts: bool = False,
                obs_columns: Sequence[str] | None = None, manifest: dict | None = None,
                progress: bool = True, use_pack: bool = True) -> CellData:
  """One lazy `CellData` over `paths` (module doc). With `manifest` (from `read_manifest`), its
  cached statistics replace the validating pass and its layer must be the one asked for; with
  `use_pack` and a pack in the manifest, rows are read from the pack (`PackedRows`)."""
  if manifest is not None:
    check_manifest_reads(manifest, layer, gene_column)
  scans = [f["scan"] for f in manifest["files"]] if manifest else [None] * len(paths)
  datas = []
  for path, scan in zip(tqdm(paths, desc="opening corpus", unit="file",
                             disable=not progress or len(paths) < 2), scans):
    datas.append(pipeline.open_lazy_h5ad(path, layer=layer, gene_column=gene_column,
                                         require_counts=require_counts,
                                         obs_columns=obs_columns, scan=scan))
  data = datas[0] if len(datas) == 1 else anndata_io.concat(datas,
                                                             name=f"corpus of {len(datas)} files")
  if use_pack and manifest is not None and manifest.get("pack") and len(datas) > 1:
    data = dataclasses.replace(data, X=_open_pack(manifest, data))
  return data


def pack_view(data: CellData, manifest: dict) -> CellData:
  """`data` with its rows read from the corpus pack, or `data` unchanged (logged) when the pack
  does not hold them in the same form. `data`: lazily read files of the manifest's corpus,
  stacked by `anndata_io.concat` (e.g. annotation sources, each file one source, their rows
  selected and normalised on read). The view reads the same values: its rows map to the
  pack's rows of the same cells and are normalised with the same size factors; it needs the
  pack's gene order (e.g. the files in the manifest's order), the pack's matrix and one
  normalisation. A pack that changed since it was written is refused (`_checked_pack`)."""
  X = data.X
  parts = X.parts if isinstance(X, LazyCorpusRows) else [X]
  if not manifest.get("pack") or not all(isinstance(p, pipeline.LazyCSRRows) for p in parts):
    return data
  key = f"layers/{manifest['layer']}" if manifest.get("layer") else "X"  # the pack's matrix
  why = None
  if any(p.key != key for p in parts):
    why = f"its files are read from another matrix than the pack's ({key})"
  elif integrity.ids_hash(data.gene_ids) != manifest["pack"]["genes_checksum"]:
    why = "its files are not the corpus's files in the manifest's order (another gene order)"
  elif len({p.normalisation for p in parts}) != 1:
    why = "its files are normalised differently"
  if why:
    log.info("rows are read from the files, not from the corpus pack: %s", why)
    return data
  index = {os.path.realpath(f["abspath"]): k for k, f in enumerate(manifest["files"])}
  first = np.r_[0, np.cumsum([f["cells_used"] for f in manifest["files"]])]
  rows, factors = [], []
  for p in parts:
    k = index.get(os.path.realpath(p.path))
    if k is None:
      log.info("rows are read from the files, not from the corpus pack: %s is not one of its "
               "files", p.path)
      return data
    kept = np.flatnonzero(manifest["files"][k]["scan"].row_sums > 0)  # the pack's rows of it
    file_rows = np.arange(p.shape[0]) if p._rows is None else p._rows
    at = np.minimum(np.searchsorted(kept, file_rows), len(kept) - 1)
    if len(kept) == 0 or np.any(kept[at] != file_rows):
      log.info("rows are read from the files, not from the corpus pack: %s has rows the pack "
               "does not hold", p.path)
      return data
    rows.append(first[k] + at)
    if p.normalisation != "none":
      factors.append(p._file_size_factors[file_rows])
  folder, fix = _checked_pack(manifest)
  return dataclasses.replace(data, X=PackedRows(
      folder, X, fix, rows=np.concatenate(rows), normalisation=parts[0].normalisation,
      size_factors=np.concatenate(factors) if factors else None))


def summary(manifest: dict) -> dict:
  """Totals of a manifest (for `gil-jax corpus`'s printout)."""
  files = manifest["files"]
  cells = sum(f["cells_used"] for f in files)
  return {"files": len(files), "cells": cells,
          "genes_per_file": [min(f["genes"] for f in files), max(f["genes"] for f in files)],
          "detected_per_cell": round(sum(f["nnz"] for f in files) / max(1, cells), 1),
          "bytes": sum(f["size"] for f in files),
          "counts": all(f["is_counts"] for f in files),
          "pack_bytes": sum(a["size"] for a in manifest["pack"]["arrays"].values())
          if manifest.get("pack") else 0}

