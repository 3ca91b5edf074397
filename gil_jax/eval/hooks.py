"""Stage-end evaluators chosen by name (`config.eval.stage_evaluators`).

An evaluator is `fn(runner, state, vocab, stage_index, results) -> results`: it runs after the
gene-wise regression of every stage, may add its own block to `results` (e.g.
'gene_classification'), and must be deterministic so resumed runs report the same numbers.
"""

from __future__ import annotations

from typing import Any, Callable

from gil_jax.experiment import as_names

STAGE_EVALUATORS: dict[str, Callable[..., Any]] = {}


def register(name: str):
  def deco(fn):
    STAGE_EVALUATORS[name] = fn
    return fn
  return deco


# Modules that register evaluators on import (imported lazily by `resolve`).
BUILTIN_MODULES = ("gil_jax.eval.probe",)


def resolve(names) -> list[Callable[..., Any]]:
  """The evaluators named by `names` (a tuple of names; see experiment.as_names)."""
  import importlib
  for module in BUILTIN_MODULES:
    importlib.import_module(module)
  out = []
  for n in as_names(names):
    if n not in STAGE_EVALUATORS:
      raise ValueError(f"unknown evaluator {n!r} in config.eval.stage_evaluators; known: "
                       f"{sorted(STAGE_EVALUATORS)}")
    out.append(STAGE_EVALUATORS[n])
  return out
