"""The tasks that plug into the shared stage loop (gil_jax/train/loop.py), by `config.task`.

A third task adds a module here with a `gil_jax.train.loop.Runner` subclass (params, task loss,
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


def summary(results: dict) -> str:
  """A console summary of a results dict of any task."""
  if results.get("task") == "annotation":
    from gil_jax.canal import report as canal_report
    return canal_report.console_summary(results)
  from gil_jax.eval import report
  return "\n\n".join([report.stage_table(results), report.regression_table(results),
                      report.baseline_table(results),
                      f"average forgetting Δ: {results['forgetting']['average']}"])
