"""Orbax checkpointing of the train state plus JSON metadata (vocabulary, plan, results).

Orbax writes each step into a temporary directory and renames it only once every item is on
disk, so a checkpoint interrupted mid-write is never listed as a finished step. No pickles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from gil_jax import guards, integrity

log = logging.getLogger("gil_jax")

# Config fields that do not change what is computed; a resumed run may change them.
# data.lazy / data.use_pack: lazy and in-memory reading, the corpus pack and its files, give the
# same cells, values and plans; model.attention: the same attention math by another kernel.
NON_SEMANTIC_FIELDS = ("train.checkpoint_every", "train.checkpoint_minutes",
                       "train.keep_checkpoints", "train.log_every",
                       "data.data_dir", "data.lazy", "data.use_pack", "data.workers", "mesh.data", "mesh.model",
                       "eval.batch_size",
                       "model.attention")


# what an extension (`gil-jax extend`) may change: the data and stage list, and the recipe
EXTENSION_FIELDS = ("canal.sources.", "canal.stage_order", "canal.test_only",
                    "canal.source_order", "data.files", "stages.order", "experiment",
                    "genes.capacity", "train.epochs_per_stage", "train.steps_per_stage",
                    "train.learning_rate", "train.warmup_steps", "train.schedule",
                    "train.decay_steps")


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


def comparable(d: dict) -> dict:
  """A config dict (`config_for_fingerprint`, or a checkpoint's saved one) with its list fields
  (config_base.LIST_FIELDS, NUMBER_LIST_FIELDS, LABEL_MAP_FIELD) written as the comma strings of
  earlier revisions ('a,b'; the label map 'x; y=z'): a tuple and the equivalent string compare,
  and hash, the same, so runs of earlier revisions keep their fingerprint."""
  from gil_jax.canal.labels import label_map_entries
  from gil_jax.config_base import LABEL_MAP_FIELD, LIST_FIELDS, NUMBER_LIST_FIELDS
  from gil_jax.experiment import as_floats, as_names

  def numbers(v):
    try:
      return ",".join(str(x) for x in as_floats(v))
    except ValueError:  # not numbers: compared as written
      return v

  d = json.loads(json.dumps(d))
  for fields, canonical in ((LIST_FIELDS, lambda v: ",".join(as_names(v))),
                            (NUMBER_LIST_FIELDS, numbers),
                            ((LABEL_MAP_FIELD,), lambda v: "; ".join(label_map_entries(v)))):
    for field in fields:
      *parents, leaf = field.split(".")
      nodes = [d]
      for p in parents:
        nodes = [c for n in nodes for c in (n.values() if p == "*" else [n.get(p)])
                 if isinstance(c, dict)]
      for n in nodes:
        if leaf in n and isinstance(n[leaf], (str, list, tuple)):
          n[leaf] = canonical(n[leaf])
  return d


def fingerprint(config: ml_collections.ConfigDict) -> str:
  blob = json.dumps(comparable(config_for_fingerprint(config)), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(d: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(saved: dict, current: dict) -> list[str]:
  """'field: saved -> current' for each differing field. A field the saved config lacks (added
  to the code since) counts only when its current value is not its default."""
  a, b = flatten(saved), flatten(current)
  defaults = None
  out = []
  for k in sorted(set(a) | set(b)):
    if a.get(k) == b.get(k):
      continue
    if k not in a and k in b:
      if defaults is None:
        from gil_jax.config_base import base_config  # noqa: PLC0415
        model = (current.get("model") or {}).get("name", "exceiver")
        defaults = flatten(comparable(config_for_fingerprint(base_config(model))))
      if k in defaults and defaults[k] == b[k]:
        continue
    out.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
  return out


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with items 'state' (arrays) and 'meta' (JSON).

  Each save records a checksum per array in the meta (plus `extra_meta`, e.g. the data
  fingerprint); `restore` verifies them and `restore_good` falls back to the newest step that
  restores and verifies, moving damaged newer steps aside to `checkpoints.damaged/`.
  """

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.extra_meta: dict = {}
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    meta = guards.finite_or_none({**self.extra_meta, **meta})  # strict JSON
    meta["checksums"] = integrity.tree_checksums(state)
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores into the shapes, dtypes and shardings of `abstract_state`; verifies the arrays'
    checksums (CheckpointDamagedError)."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    integrity.verify_tree(out["state"], out["meta"].get("checksums"),
                          f"checkpoint step {step} in {self.directory}")
    return out["state"], out["meta"]

  def latest_meta(self) -> tuple[int | None, dict | None]:
    """(step, meta) of the newest step whose JSON meta reads; damaged newer steps are logged
    and moved aside."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return step, self.read_meta(step)
      except Exception as e:  # noqa: BLE001 -- any read failure: the step is damaged
        if jax.process_count() > 1:  # processes would race to move it; report instead
          raise
        self.set_aside(step, e)
    return None, None

  def restore_good(self, abstract_state: Any) -> tuple[int | None, Any, dict | None]:
    """(step, state, meta) of the newest step that restores and verifies; damaged newer steps
    are logged and moved aside, so that the run re-does them. (None, None, None) if none."""
    names = {integrity.leaf_name(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        check_layout(self.read_meta(step), names, step, self.directory)
        state, meta = self.restore(step, abstract_state)
        return step, state, meta
      except CheckpointLayoutError:  # not damage: another code or config wrote it
        raise
      except Exception as e:  # noqa: BLE001 -- tensorstore, JSON or checksum errors alike
        if jax.process_count() > 1:
          raise
        self.set_aside(step, e)
    return None, None, None

  def set_aside(self, step: int, error: BaseException) -> None:
    """Moves a damaged step to `checkpoints.damaged/<step>` (kept for inspection)."""
    aside = os.path.join(os.path.dirname(self.directory), "checkpoints.damaged")
    os.makedirs(aside, exist_ok=True)
    target = os.path.join(aside, f"{step}")
    if os.path.exists(target):
      target += f".{len(os.listdir(aside))}"
    log.warning("checkpoint step %d in %s is damaged (%s); moved to %s, falling back to the "
                "previous step", step, self.directory, guards.one_line(error)[:300], target)
    os.replace(os.path.join(self.directory, str(step)), target)
    self.manager.reload()

  def check_same_experiment(self, config: ml_collections.ConfigDict,
                            extending: bool = False) -> None:
    """Raises WorkdirMismatchError when the latest checkpoint was made by another config
    (`extending`: one that differs from it in more than `EXTENSION_FIELDS`)."""
    step, meta = self.latest_meta()
    if step is None:
      return
    if meta.get("fingerprint") == fingerprint(config):
      return
    diff = config_diff(comparable(meta.get("config", {})),
                       comparable(config_for_fingerprint(config)))
    if not diff:  # the same config, a list field written another way ('a, b' for ('a', 'b'))
      return
    if extending:
      diff = [d for d in diff if not d.startswith(EXTENSION_FIELDS)]
      if not diff:
        return
      raise WorkdirMismatchError(
          f"cannot extend {os.path.dirname(self.directory)}: an extension may change only the "
          f"data and training fields ({', '.join(EXTENSION_FIELDS)}), but {len(diff)} other "
          f"fields differ from the run's: {'; '.join(diff[:6])}.")
    raise WorkdirMismatchError(
        f"workdir {os.path.dirname(self.directory)} holds checkpoints of experiment "
        f"{meta.get('experiment')!r} made with a different config ({len(diff)} fields differ: "
        f"{'; '.join(diff[:6])}). Use a fresh --workdir, or rerun with the original config.")

  def close(self) -> None:
    self.manager.close()


class CheckpointLayoutError(guards.RunError):
  """A checkpoint holds other state arrays than this code and config build (not damage)."""


def check_layout(meta: dict, names: set[str], step: int, directory: str) -> None:
  """CheckpointLayoutError when the arrays recorded with checkpoint `step` (their checksums'
  names) are not the state's `names`; nothing is moved."""
  saved = set(meta.get("checksums") or ())
  if not saved or saved == names:
    return
  missing, extra = sorted(names - saved), sorted(saved - names)
  raise CheckpointLayoutError(
      f"checkpoint step {step} in {directory} holds other state arrays than this code builds "
      f"(missing {missing[:3]}, unexpected {extra[:3]}): it was written by another gil_jax "
      f"version ({(meta.get('results') or {}).get('versions', {}).get('gil_jax')}) or config. "
      "Use that version, or a fresh --workdir; the checkpoints are left as they are.")


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete pytree, for restoring into its layout."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
