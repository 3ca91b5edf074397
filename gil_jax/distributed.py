"""Multi-host setup: `jax.distributed.initialize` from flags / environment, process-local data.

Environment (or the same-named keyword arguments): GIL_COORDINATOR ('host:port'),
GIL_NUM_PROCESSES, GIL_PROCESS_ID. With none set and no cluster JAX can detect, this is a
single-process run and nothing is initialised. On CPU the cross-process collectives use gloo.

Each process builds only its rows of every global batch (``data.batching.stage_batches`` with
``shard=jax.process_index(), n_shards=jax.process_count()``) and ``global_batch`` assembles the
global, data-sharded array with ``jax.make_array_from_process_local_data``. Orbax's
CheckpointManager is multi-process safe: every process calls save/restore on the same directory.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from jax.sharding import Mesh

from gil_jax import parallel


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> tuple[int, int]:
  """Initialises JAX's multi-process runtime when asked to; returns (process index, count)."""
  coordinator = coordinator or os.environ.get("GIL_COORDINATOR")
  n = num_processes if num_processes is not None else int(os.environ.get("GIL_NUM_PROCESSES", 1))
  pid = process_id if process_id is not None else int(os.environ.get("GIL_PROCESS_ID", 0))
  if n > 1:
    if not coordinator:
      raise ValueError("multi-process run needs a coordinator address: set GIL_COORDINATOR="
                       "host:port (or pass coordinator=)")
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=pid)
  return jax.process_index(), jax.process_count()


def global_batch(local: Any, mesh: Mesh) -> Any:
  """Global data-sharded arrays from each process's rows (leading axis = cells)."""
  sh = parallel.data_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sh, x), local)
