"""The tasks that plug into the shared stage loop (gil_jax/core/loop.py), by `config.task`.

A third task adds a module here with a `gil_jax.core.loop.Runner` subclass (params, task loss,
stage masks and cells, what is evaluated after a stage, the report) and a `train(config,
workdir)` function that builds it and calls `loop.run`, then one line in `TASKS`.
"""

from __future__ import annotations

from typing import Callable

import ml_collections

TASKS = ("gil", "annotation")


def trainer(task: str) -> Callable[..., dict]:
  """The train function of `task` (imported on demand: each task loads only its own modules)."""
  if task == "gil":
    from gil_jax.tasks.gil import train_and_evaluate
    return train_and_evaluate
  if task == "annotation":
    from gil_jax.tasks.annotation import train_annotation
    return train_annotation
  raise ValueError(f"unknown config.task {task!r}; known tasks: {list(TASKS)}")


def train(config: ml_collections.ConfigDict, workdir: str, progress_bar: bool = True) -> dict:
  """Trains (or resumes) the experiment `config` describes, in `workdir`; returns results."""
  return trainer(config.get("task", "gil"))(config, workdir, progress_bar=progress_bar)


def saved_config(workdir: str, data_dir: str | None = None
                 ) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, meta) of the newest checkpoint in `workdir`: the run as it was configured.

  Checkpoints written before the full config was saved (`run_config`) give the fingerprinted
  fields over `base_config()`; pass `data_dir` (config.data.data_dir, not fingerprinted) then.
  """
  import os
  from gil_jax import checkpoint
  from gil_jax.config_base import base_config
  from gil_jax.core.loop import ExtensionError
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ExtensionError(f"workdir {workdir!r} has no checkpoints/ folder; train a run there "
                         "first (gil-jax train), or pass the right --workdir.")
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    step, meta = ckpt.latest_meta()
  finally:
    ckpt.close()
  if step is None:
    raise ExtensionError(f"workdir {workdir!r} holds no checkpoint; train a run there first.")
  # over the defaults (runs that did not save `run_config`: the fingerprinted fields);
  # JSON lists and the comma strings of earlier revisions back to tuples
  saved = meta.get("run_config") or meta["config"]
  base = base_config(saved.get("model", {}).get("name", "exceiver")).to_dict()
  config = ml_collections.ConfigDict(_merge(base, saved))
  if data_dir is not None:
    config.data.data_dir = data_dir
  return config, meta


def _merge(base: dict, saved: dict) -> dict:
  """`saved` over `base`; a comma string saved where `base` holds a tuple (runs of earlier
  revisions) becomes the tuple."""
  from gil_jax.canal.labels import label_map_entries
  from gil_jax.experiment import as_names
  out = dict(base)
  for k, v in saved.items():
    b = base.get(k)
    if isinstance(b, dict) and isinstance(v, dict):
      out[k] = _merge(b, v)
    elif isinstance(b, tuple) and isinstance(v, str):
      out[k] = tuple(label_map_entries(v) if k == "label_map" else as_names(v))
    elif isinstance(b, tuple) and isinstance(v, list):
      out[k] = tuple(v)
    else:
      out[k] = v
  return out


def extend(workdir: str, files: str | list[str], *, label_key: str = "",
           normalisation: str = "auto", layer: str = "", names: list[str] | None = None,
           overrides: dict | None = None, progress_bar: bool = True) -> dict:
  """Appends one training stage per `.h5ad` file to the run in `workdir` and trains them.

  The run's state, method transforms, example bank / replay buffer, vocabularies and results
  carry on as at any stage boundary: new genes are activated, new cell types join the label
  vocabulary and class head, the results matrices gain a row and a column per stage. Rerunning
  the same call resumes an interrupted extension (a finished one returns its results).
  `overrides`: config fields to change for the new stages (dotted names, e.g.
  {'train.epochs_per_stage': 5}); only data and training fields may change.
  """
  from gil_jax import guards
  from gil_jax.core.loop import ExtensionError
  files = [files] if isinstance(files, str) else list(files)
  with guards.user_errors("invalid extension"):
    config, meta = saved_config(workdir, (overrides or {}).get("data.data_dir"))
    task = config.get("task", "gil")
    for key, value in (overrides or {}).items():
      config.update_from_flattened_dict({key: value})
    if config.get("method") == "joint":
      raise ExtensionError(
          f"{workdir!r} was trained with config.method='joint' (every stage at once); a joint "
          "run is retrained, not extended: list the new dataset in the config and train a new "
          "workdir.")
    if task == "annotation":
      from gil_jax.tasks.annotation import extend_config
      config = extend_config(config, meta, files, label_key, normalisation, layer, names)
    elif task == "gil":
      from gil_jax.tasks.gil import extend_config
      config = extend_config(config, meta, files, names)
    else:
      raise ValueError(f"unknown config.task {task!r}; known tasks: {list(TASKS)}")
  config.lock()
  return trainer(task)(config, workdir, progress_bar=progress_bar, extending=True)


def summary(results: dict) -> str:
  """A console summary of a results dict of any task."""
  if results.get("task") == "annotation":
    from gil_jax.canal import report as canal_report
    return canal_report.console_summary(results)
  from gil_jax.eval import report
  return "\n\n".join([report.stage_table(results), report.regression_table(results),
                      report.baseline_table(results),
                      f"average forgetting Δ: {results['forgetting']['average']}"])
