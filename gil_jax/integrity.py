"""Checksums of checkpointed arrays and fingerprints of the input data.

* `tree_checksums(tree)`: a short hash per array leaf, recorded in each checkpoint's JSON meta
  and verified on restore (`verify_tree`), so a damaged step is detected instead of silently
  giving other results.
* `data_fingerprint(files, data)`: per input file its size and a checksum of sampled blocks, and
  for the loaded cells their shape and the hashes of gene and cell ids; `check_same_data` refuses
  a resume on changed data with a message naming the file and what changed.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from gil_jax.guards import RunError

SAMPLE_BLOCKS = 16     # blocks of a file read for its content checksum
BLOCK_BYTES = 1 << 16


class CheckpointDamagedError(RunError):
  """A checkpoint's arrays do not match the checksums recorded in its metadata."""


class DataChangedError(RunError):
  """The input data differ from those the workdir's checkpoints were trained on."""


def _hash(b: bytes | memoryview) -> str:
  return hashlib.blake2b(b, digest_size=8).hexdigest()


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaf_name(path) -> str:
  """'params/encoder/kernel' for a key path; the same for a dataclass / namedtuple tree and the
  dict tree Orbax restores it as without a target."""
  return "/".join(_key_name(k) for k in path)


def tree_checksums(tree: Any) -> dict[str, str] | None:
  """{leaf name: hash of its bytes} of a pytree of arrays; None when some leaf is not fully
  addressable from this process (multi-process runs: no checksums)."""
  import jax
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if any(not getattr(x, "is_fully_addressable", True) for _, x in leaves):
    return None
  host = jax.device_get([x for _, x in leaves])
  return {leaf_name(p): _hash(np.ascontiguousarray(np.asarray(x)).tobytes())
          for (p, _), x in zip(leaves, host)}


def verify_tree(tree: Any, recorded: dict[str, str] | None, what: str) -> None:
  """CheckpointDamagedError naming the leaves whose bytes differ from `recorded` (a checkpoint
  written before checksums existed: nothing to verify)."""
  if not recorded:
    return
  current = tree_checksums(tree)
  if current is None:
    return
  bad = sorted(k for k, v in current.items() if k in recorded and recorded[k] != v)
  if bad:
    raise CheckpointDamagedError(
        f"{what}: {len(bad)} array(s) differ from the checksums recorded when it was written "
        f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}); the files are damaged.")


# ------------------------------------------------------------------ data fingerprints

def file_fingerprint(path: str) -> dict:
  """Size and a checksum of SAMPLE_BLOCKS evenly spaced blocks of a file (cheap for big files)."""
  size = os.path.getsize(path)
  h = hashlib.blake2b(str(size).encode(), digest_size=8)
  with open(path, "rb") as f:
    n = max(1, min(SAMPLE_BLOCKS, size // BLOCK_BYTES))
    for i in range(n):
      f.seek((size - BLOCK_BYTES) * i // max(1, n - 1) if n > 1 and size > BLOCK_BYTES else 0)
      h.update(f.read(BLOCK_BYTES))
  return {"name": os.path.basename(path), "path": os.path.abspath(path), "size": int(size),
          "sampled_checksum": h.hexdigest()}


def ids_hash(ids) -> str:
  """A short hash of a sequence of ids (their str forms, in order)."""
  return _hash("\n".join(map(str, ids)).encode())


VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy", "anndata",
             "scikit-learn", "gil_jax")


def package_versions() -> dict[str, str | None]:
  """Installed versions of the packages results depend on (recorded in results.json)."""
  from importlib import metadata
  out = {}
  for name in VERSIONED:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def data_fingerprint(files: list[str], data) -> dict:
  """Fingerprint of the input files and of the loaded cells (`CellData`)."""
  import scipy.sparse as sp
  obs = getattr(data, "obs", None)
  rows = None
  if sp.issparse(getattr(data, "X", None)):  # in-memory data: values of 64 spread-out cells
    x = data.X[np.linspace(0, data.n_cells - 1, min(64, data.n_cells)).astype(int)].tocsr()
    rows = _hash(b"".join(np.ascontiguousarray(a).tobytes()
                          for a in (x.indptr, x.indices, x.data.astype(np.float32))))
  return {"files": [file_fingerprint(p) for p in files if os.path.isfile(p)],
          "n_cells": int(data.n_cells), "n_genes": int(data.n_genes),
          "gene_ids": ids_hash(data.gene_ids),
          "cell_ids": ids_hash(obs.index) if obs is not None else None,
          "sampled_values": rows, "datasets": _dataset_runs(data)}


def _dataset_runs(data) -> list | None:
  """[[dataset name, cells], ...] in the order the cells are stacked (consecutive runs)."""
  idx, names = getattr(data, "dataset_index", None), getattr(data, "dataset_names", None)
  if idx is None or names is None or not len(idx):
    return None
  idx = np.asarray(idx)
  starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
  counts = np.diff(np.r_[starts, len(idx)])
  return [[str(names[idx[a]]), int(n)] for a, n in zip(starts, counts)]


def data_changes(saved: dict, current: dict) -> list[str]:
  """What differs between two fingerprints, naming files ([] when the same)."""
  out = []
  cur = {f["name"]: f for f in current.get("files", [])}
  for f in saved.get("files", []):
    c = cur.get(f["name"])
    if c is None:
      out.append(f"file {f['name']!r} is no longer an input")
    elif c["size"] != f["size"]:
      out.append(f"file {c['path']!r}: size {f['size']} -> {c['size']} bytes")
    elif c["sampled_checksum"] != f["sampled_checksum"]:
      out.append(f"file {c['path']!r}: same size, different content")
  names = ", ".join(repr(f["path"]) for f in current.get("files", [])) or "the input data"
  for key, what in (("n_cells", "cells"), ("n_genes", "genes")):
    if saved.get(key) != current.get(key):
      out.append(f"{what} of {names}: {saved.get(key)} -> {current.get(key)}")
  for key, what in (("gene_ids", "gene ids"), ("cell_ids", "cell ids"),
                    ("sampled_values", "values of sampled cells")):
    if saved.get(key) and current.get(key) and saved[key] != current[key]:
      out.append(f"{what} of {names} differ")
  return out


def check_same_data(saved: dict | None, current: dict, workdir: str) -> None:
  """DataChangedError when the data differ from those of the workdir's checkpoints (checkpoints
  written before fingerprints existed are not checked)."""
  if not saved:
    return
  changes = data_changes(saved, current)
  if changes:
    raise DataChangedError(
        f"the input data changed since the checkpoints in {workdir!r} were written: "
        f"{'; '.join(changes)}. Resuming would train later stages on other data than the earlier "
        "ones; restore the original data, or start over with a fresh --workdir.")


def check_extends_data(saved: dict | None, current: dict, data, workdir: str) -> None:
  """DataChangedError unless the current data are the saved run's data with cells appended: the
  saved files unchanged and the first cells the same cells in the same order (extending a run
  with new datasets, `gil-jax extend`)."""
  if not saved:
    return
  changes = [c for c in data_changes(saved, current) if "is no longer an input" in c
             or "bytes" in c or "different content" in c]
  n = int(saved.get("n_cells") or 0)
  runs, now = saved.get("datasets"), current.get("datasets") or []
  if runs and now[:len(runs)] != runs:
    changes.append(f"the run's datasets {runs} are not the first of the extended data's "
                   f"{now[:len(runs) + 1]}")
  obs = getattr(data, "obs", None)
  if saved.get("cell_ids") and obs is not None and (
      data.n_cells < n or saved["cell_ids"] not in _prefix_id_hashes(obs, n)):
    changes.append(f"the first {n} cells are not the run's cells in the run's order")
  if changes:
    raise DataChangedError(
        f"extending {workdir!r}: the run's own data changed ({'; '.join(changes)}). An extension "
        "appends new datasets to the run's data as they were; restore the original files.")


def _prefix_id_hashes(obs, n: int) -> set[str]:
  """Hashes of the first n cell ids, as read and without the `dataset:` prefix that
  `anndata_io.concat` adds when files share cell names."""
  ids = obs.index[:n].astype(str)
  out = {ids_hash(ids)}
  if "dataset" in obs.columns:
    prefix = obs["dataset"].astype(str).to_numpy()[:n] + ":"
    out.add(ids_hash([i[len(p):] if i.startswith(p) else i for i, p in zip(ids, prefix)]))
  return out
