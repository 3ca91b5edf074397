"""Growing the gene table past its capacity: pad params, optimizer state and transform state.

Every gene-table-shaped leaf of a train state (``parallel.is_gene_table_leaf``: under a ``genes``
subtree, leading dim = capacity, or the ``active_genes`` mask) gets new rows; everything else is
kept as is. New rows of the params come from a fresh init of the model at the new capacity (so
they look like rows that were never trained); new rows of optimizer moments, transform states
(Fisher, teacher copies, anchors) and the active mask are zero / False, which is exactly what
padded capacity would have held had it been allocated from the start. Old rows are copied
bit-for-bit, so a batch that only uses old genes gives the same loss and update after growth.

The compiled train step must be rebuilt for the new shapes: one recompilation.

When to use it: a run was started with ``config.genes.capacity`` too small for the genes of a
later stage (``check_capacity`` fails before training, so this arises when the stage plan is
extended, e.g. a new dataset is appended to a finished or interrupted run). Gene rows are assigned
in activation order (``experiment.stage_vocab``), so every old gene keeps its row at the larger
capacity. Growing a workdir OLD into a new workdir NEW, from Python::

  import jax
  from gil_jax import checkpoint, experiment, surgery
  from gil_jax.data import stages
  from gil_jax.tasks import gil

  ck = checkpoint.Checkpointer(OLD)
  step = ck.latest_step()
  meta = ck.read_meta(step)
  plan = stages.StagePlan.from_json(meta["plan"])
  data = experiment.load_data(config)
  old = gil.Runner(config, data, plan)             # config = the run's config
  state, _ = ck.restore(step, checkpoint.abstract_like(old.initial_state()))
  ck.close()
  big = config.copy_and_resolve_references(); big.genes.capacity = NEW_CAPACITY
  new = gil.Runner(big, data, plan)                # its init = the fresh rows
  grown = surgery.grow_state(state, config.genes.capacity, NEW_CAPACITY,
                             new.initial_state().params)
  grown = jax.device_put(grown, new.state_sharding)
  vocab = experiment.stage_vocab(plan, NEW_CAPACITY, meta["progress"]["stage"])
  out = checkpoint.Checkpointer(NEW)
  out.save(step, grown, gil._meta(big, plan, vocab, meta["results"], meta["progress"]))
  out.close()

then resume with ``python launch.py --config ... --workdir NEW --config.genes.capacity=N``
(the new capacity is part of the config fingerprint, hence the new workdir). The train step
compiles once for the new shapes and never again while new genes are activated (checked on
tests.helpers.tiny_config: grown 160 -> 256 rows mid-stage 0, resumed to the end, one
compilation of the train step).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gil_jax.parallel import is_gene_table_leaf


def _pad_rows(x: jax.Array, new_capacity: int) -> jax.Array:
  pad = [(0, new_capacity - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
  return jnp.pad(x, pad)


def grow_tree(tree: Any, old_capacity: int, new_capacity: int) -> Any:
  """Zero-pads the rows of every gene-table-shaped leaf of ``tree`` to ``new_capacity``."""
  if new_capacity < old_capacity:
    raise ValueError(f"new capacity {new_capacity} < current {old_capacity}: the gene table "
                     "only grows (config.genes.capacity)")
  return jax.tree_util.tree_map_with_path(
      lambda p, x: _pad_rows(x, new_capacity)
      if is_gene_table_leaf(p, tuple(jnp.shape(x)), old_capacity) else x, tree)


def grow_params(params: Any, fresh_params: Any, old_capacity: int) -> Any:
  """``fresh_params`` (a new init at the larger capacity) with the old rows / leaves copied in."""
  def merge(path, old, new):
    if is_gene_table_leaf(path, tuple(old.shape), old_capacity):
      return new.at[:old_capacity].set(old)
    if old.shape != new.shape:
      raise ValueError(f"param {jax.tree_util.keystr(path)} changed shape {old.shape} -> "
                       f"{new.shape} but is not a gene-table leaf; only the gene table can grow")
    return old
  return jax.tree_util.tree_map_with_path(merge, params, fresh_params)


def grow_state(state: Any, old_capacity: int, new_capacity: int, fresh_params: Any) -> Any:
  """A TrainState with a ``new_capacity``-row gene table (see module docstring).

  ``fresh_params``: ``model.init`` of the same backbone built with ``new_capacity`` rows.
  """
  grown = grow_tree(state, old_capacity, new_capacity)
  return grown.replace(params=grow_params(state.params, fresh_params, old_capacity))


def shrink_abstract(abstract: Any, capacity: int, old_capacity: int) -> Any:
  """The abstract (ShapeDtypeStruct) state of ``capacity`` rows as it was at ``old_capacity``:
  restore a checkpoint of the smaller table into it, then `grow_state`."""
  def shrink(path, x):
    if not is_gene_table_leaf(path, tuple(x.shape), capacity):
      return x
    return jax.ShapeDtypeStruct((old_capacity, *x.shape[1:]), x.dtype,
                                sharding=getattr(x, "sharding", None))
  return jax.tree_util.tree_map_with_path(shrink, abstract)


def capacity_for(n_genes: int, capacity: int, multiple: int = 256) -> int:
  """`capacity` if `n_genes` genes (+ the padding row) fit, else the next multiple of
  `multiple` that holds them (a multiple that the mesh's 'model' axis divides)."""
  if n_genes + 1 <= capacity:
    return capacity
  return -(-(n_genes + 1) // multiple) * multiple
