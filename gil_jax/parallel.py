"""Device mesh and sharding rules, kept in one place.

The mesh has two named axes: 'data' (cells of a batch) and 'model' (rows of gene-table-shaped
arrays when the vocabulary is large). Everything not matched by a rule is replicated.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"
GENES = "genes"  # = gil_jax.models.common.GENES (not imported: parallel stays model-agnostic)


def make_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
  """Builds a ('data', 'model') mesh.

  -1 in one axis means "all remaining devices"; explicit sizes whose product is smaller than the
  device count use the first data*model devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  data, model = int(mesh_cfg["data"]), int(mesh_cfg["model"])
  if data == -1 and model == -1:
    raise ValueError("config.mesh: at most one of data/model may be -1")
  if data == -1:
    data = n // model if model > 0 and n % model == 0 else 0
  elif model == -1:
    model = n // data if data > 0 and n % data == 0 else 0
  if data < 1 or model < 1 or data * model > n:
    raise ValueError(f"config.mesh data={mesh_cfg['data']} x model={mesh_cfg['model']} does not "
                     f"fit the {n} available devices; set e.g. --config.mesh.data=-1")
  return Mesh(np.asarray(devices[:data * model]).reshape(data, model), (DATA, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (cell) axis split across the data axis."""
  return NamedSharding(mesh, P(DATA))


def batch_shardings(mesh: Mesh, batch: Any) -> Any:
  return jax.tree.map(lambda _: data_sharded(mesh), batch)


def _names(path: Any) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def is_gene_table_leaf(path: Any, shape: tuple[int, ...], capacity: int) -> bool:
  """A per-gene array: under a ``genes`` subtree (``models.is_gene_param`` for params; the same
  subtree mirrored inside optimizer moments and loss-transform states such as a Fisher or a
  teacher copy) with leading dimension ``capacity``, or the ``active_genes`` mask. The path
  decides; the leading-dim check only guards against a non-table leaf under ``genes``."""
  names = _names(path)
  if not shape or shape[0] != capacity:
    return False
  return GENES in names or (bool(names) and names[-1] == "active_genes")


# The sharding rules, in order; the first that matches a leaf decides its PartitionSpec, and a
# leaf no rule matches is replicated. (name, predicate(path, shape, capacity), spec)
RULES: tuple[tuple[str, Callable[..., bool], P], ...] = (
    ("gene-table rows on 'model'", is_gene_table_leaf, P(MODEL)),
)


def leaf_spec(path: Any, shape: tuple[int, ...], capacity: int, mesh: Mesh) -> P:
  """PartitionSpec of one state leaf under RULES (replicated when no rule applies or the
  sharded axis does not divide evenly)."""
  for _, applies, spec in RULES:
    if applies(path, shape, capacity):
      axis = spec[0]
      n = mesh.shape[axis] if axis is not None else 1
      if n == 1 or shape[0] % n:
        return P()
      return spec
  return P()


def gene_row_spec(shape: tuple[int, ...], capacity: int, mesh: Mesh) -> P:
  """Spec of an array known to be gene-table-shaped (kept for callers without a path)."""
  return leaf_spec(("genes",), shape, capacity, mesh)


def state_shardings(mesh: Mesh, abstract_state: Any, capacity: int) -> Any:
  """Sharding for every leaf of a train state (params, optimizer moments, transform states):
  gene-table rows on 'model' (see RULES), everything else replicated."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, leaf_spec(path, tuple(getattr(x, "shape", ())),
                                                    capacity, mesh)),
      abstract_state)


def describe_shardings(shardings: Any) -> dict[str, str]:
  """'path' -> PartitionSpec string for every non-replicated leaf (for logs and tests)."""
  out = {}
  for path, sh in jax.tree_util.tree_flatten_with_path(shardings)[0]:
    if sh.spec != P():
      out["/".join(_names(path))] = str(sh.spec)
  return out


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str = "config.batch.batch_size"):
  n = mesh.shape[DATA]
  if batch_size % n:
    raise ValueError(f"{field}={batch_size} must be divisible by the mesh's data axis ({n} "
                     f"devices); use a multiple of {n}")
