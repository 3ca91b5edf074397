"""Device mesh and sharding rules, kept in one place.

The mesh has two named axes: 'data' (cells of a batch) and 'model' (rows of gene-table-shaped
arrays when the vocabulary is large). Everything not matched by a rule is replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"


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


def gene_row_spec(shape: tuple[int, ...], capacity: int, mesh: Mesh) -> P:
  """Rows of a gene-table-shaped array go on the 'model' axis when it divides the capacity."""
  n_model = mesh.shape[MODEL]
  if n_model > 1 and len(shape) >= 1 and shape[0] == capacity and capacity % n_model == 0:
    return P(MODEL)
  return P()


def state_shardings(mesh: Mesh, abstract_state: Any, capacity: int) -> Any:
  """Sharding for every leaf of a train state: gene-row arrays on 'model', the rest replicated."""
  return jax.tree.map(
      lambda x: NamedSharding(mesh, gene_row_spec(tuple(getattr(x, "shape", ())), capacity, mesh)),
      abstract_state)


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str = "config.batch.batch_size"):
  n = mesh.shape[DATA]
  if batch_size % n:
    raise ValueError(f"{field}={batch_size} must be divisible by the mesh's data axis ({n} "
                     f"devices); use a multiple of {n}")
