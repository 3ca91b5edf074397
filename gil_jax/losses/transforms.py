"""Loss transforms: continual-learning regularisers composed like optax transformations.

A `LossTransform` is a small record of pure functions:

* ``init(params) -> state``                    state created once, at the start of the experiment
* ``consolidate(state, params, end) -> state`` host-side update when a stage ends (snapshot a
                                               teacher, estimate a Fisher, refill a buffer)
* ``wrap(loss_fn) -> loss_fn``                 a new pure LossFn that adds the transform's term
* ``extra_inputs(state, feed) -> dict``        optional host-side extra batches for a step
                                               (e.g. a replay batch), fixed shapes every step

`chain(**named)` composes transforms; each keeps its own state under its name in the train
state's ``transforms`` dict, and reports its own term as ``loss/<name>`` in the metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional


LossFn = Callable[..., Any]  # (params, tstates, inputs, ctx) -> (loss, aux)


@dataclasses.dataclass(frozen=True)
class LossContext:
  """Per-step values a loss needs besides params and inputs (all traced arrays)."""
  rng: Any
  active_genes: Any  # bool[capacity]
  step: Any
  active_classes: Any = None  # bool[class capacity] for tasks with a class head, else None


@dataclasses.dataclass
class StageEnd:
  """What a transform may use when a stage ends (host side)."""
  stage: int
  params: Any
  active_genes: Any
  task_loss: LossFn                 # the un-wrapped task loss (e.g. for Fisher gradients)
  batches: Callable[[int], Any]     # batches(n) -> iterator of `inputs` dicts of the stage's data
  stage_cells: Any = None           # cell indices trained on in this stage
  stage_rows: Any = None            # gene-table rows visible in this stage
  base_stage: bool = False          # this stage is a plan's base stage (base genes B only)
  active_classes: Any = None        # bool[class capacity] at the stage end (class-head tasks)
  seed: int = 0                     # config.seed: keys of stage-end estimates derive from it
  labels: Any = None                # per-cell label rows (class-head tasks)
  predict: Optional[Callable[[Any], dict]] = None  # cells -> eval-mode outputs (e.g. 'h')


class LossTransform(NamedTuple):
  init: Callable[[Any], Any]
  consolidate: Callable[[Any, Any, StageEnd], Any]
  wrap: Callable[[LossFn], LossFn]
  extra_inputs: Optional[Callable[[Any, Any], dict]] = None


def identity() -> LossTransform:
  """The baseline: no state, no added term."""
  return LossTransform(init=lambda params: {}, consolidate=lambda s, p, e: s,
                       wrap=lambda loss_fn: loss_fn)


def add_term(loss_fn: LossFn, name: str, term_fn: Callable[..., Any]) -> LossFn:
  """Helper for transforms: loss + term_fn(params, own_state, inputs, ctx, aux), logged."""

  def wrapped(params, tstates, inputs, ctx):
    loss, aux = loss_fn(params, tstates, inputs, ctx)
    term = term_fn(params, tstates[name], inputs, ctx, aux)
    aux = dict(aux, metrics=dict(aux["metrics"], **{f"loss/{name}": term}))
    return loss + term, aux

  return wrapped


def chain(named: list[tuple[str, LossTransform]]) -> LossTransform:
  """Composes transforms in list order: the first wraps the task loss innermost."""
  names = [n for n, _ in named]
  if len(set(names)) != len(names):
    raise ValueError(f"loss transforms listed twice: {names}")

  def init(params):
    return {n: t.init(params) for n, t in named}

  def consolidate(states, params, end):
    return {n: t.consolidate(states[n], params, end) for n, t in named}

  def wrap(loss_fn):
    for _, t in named:
      loss_fn = t.wrap(loss_fn)
    return loss_fn

  def extra_inputs(states, feed):
    out = {}
    for n, t in named:
      if t.extra_inputs is not None:
        out.update(t.extra_inputs(states[n], feed))
    return out

  return LossTransform(init, consolidate, wrap, extra_inputs)

