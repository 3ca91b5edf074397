"""Orbax checkpointing of the train state plus JSON metadata (vocabulary, plan, results).

Orbax writes each step into a temporary directory and renames it only once every item is on
disk, so a checkpoint interrupted mid-write is never listed as a finished step. No pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from gil_jax import guards

# Config fields that do not change what is computed; a resumed run may change them.
# data.lazy: lazy and in-memory reading give the same cells, values and plans.
NON_SEMANTIC_FIELDS = ("train.checkpoint_every", "train.checkpoint_minutes",
                       "train.keep_checkpoints", "train.log_every",
                       "data.data_dir", "data.lazy", "mesh.data", "mesh.model", "eval.batch_size")


class WorkdirMismatchError(ValueError):
  """The workdir holds checkpoints of a different experiment."""


def config_for_fingerprint(config: ml_collections.ConfigDict) -> dict:
  d = json.loads(config.to_json_best_effort(sort_keys=True))
  for field in NON_SEMANTIC_FIELDS:
    *parents, leaf = field.split(".")
    node = d
    for p in parents:
      node = node.get(p, {})
    node.pop(leaf, None)
  return d


def fingerprint(config: ml_collections.ConfigDict) -> str:
  blob = json.dumps(config_for_fingerprint(config), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(saved: dict, current: dict) -> list[str]:
  a, b = _flat(saved), _flat(current)
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)]


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with items 'state' (arrays) and 'meta' (JSON)."""

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    meta = guards.finite_or_none(meta)  # strict JSON
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores into the shapes, dtypes and shardings of `abstract_state`."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def check_same_experiment(self, config: ml_collections.ConfigDict) -> None:
    """Raises WorkdirMismatchError when the latest checkpoint was made by another config."""
    step = self.latest_step()
    if step is None:
      return
    meta = self.read_meta(step)
    if meta.get("fingerprint") == fingerprint(config):
      return
    diff = config_diff(meta.get("config", {}), config_for_fingerprint(config))
    raise WorkdirMismatchError(
        f"workdir {os.path.dirname(self.directory)} holds checkpoints of experiment "
        f"{meta.get('experiment')!r} made with a different config ({len(diff)} fields differ: "
        f"{'; '.join(diff[:6])}). Use a fresh --workdir, or rerun with the original config.")

  def close(self) -> None:
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete pytree, for restoring into its layout."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
