"""Gene replay (GIL paper Eq. 9) and the oracle (Eq. 8) as cumulative replay.

Replayed cells keep their *own* stage's gene set B ∪ T_i (gil.md §2 item 3): each step a
fixed-shape replay batch of ``batch_size`` cells is built on the host from the buffer, every cell
tokenised with the columns of the stage it came from (`stages.stage_columns` with that stage's
plan entry and the current vocabulary, whose rows for old genes never change). Batches are a pure
function of (seed, stage, step), so resumed runs are exact. Before any stage has ended the
replay batch is all padding with weight 0: the term is exactly 0 and shapes never change.

State (fixed capacity ``buffer_size``): ``cells`` int32[cap] (cell indices), ``stage`` int32[cap]
(the stage each cell was trained in), ``valid`` bool[cap]. At a stage end the buffer is refilled
with a random, seed-determined subset of that stage's cells; with ``per_stage=0`` (default) slots
are split evenly over the stored stages (older stages are trimmed, keeping their earliest picks),
with ``per_stage=n`` each stage keeps up to n cells while free slots last.

Mixing (``mode``):

* ``'batch'`` (replay default): loss + ``weight`` * (loss on the replay batch), a fixed share of
  replayed cells every step (experience replay, i.e. oversampling the buffer). The paper does not
  say how replay is mixed in (gil.md §2 item 3); its effect size (Δ 0.253 -> 0.043 with 1,000
  buffered vs ~226k current cells, seen ~5 times under plain concatenation) points to
  oversampling, so this is our paper-faithful reading.
* ``'concat'`` (oracle default; the literal "mixed into the current stage's shuffled data"): the
  loss is the pooled masked mean over current and replayed positions, with replayed cells
  weighted so that, in expectation, replayed : current positions = |buffer| : |stage data| --
  the gradient of training on the shuffled concatenation, with lower variance.

The base stage (stage 0 of any plan that has one, `StagePlan.base_stage`: random, expressed,
modules, crucial) trains only on B, which every
later stage sees anyway; it is replayed only with ``include_base=True``.

``oracle`` = replay of *all* earlier cells (no buffer; read from the plan), including the base
stage, in concat mode: at the last stage this is joint training on every stage's data with its
own gene set (Eq. 8), evaluated in the same results matrix as every other method.

List ``replay`` first in ``config.loss_transforms`` so that it wraps the task loss directly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gil_jax.batch import Batch, empty_batch
from gil_jax.data import batching, stages
from gil_jax.losses import objectives, registry
from gil_jax.losses.anchors import check_weight
from gil_jax.losses.transforms import LossTransform, StageEnd

MODES = ("concat", "batch")


def _concat(batches: list[Batch], n: int, n_tokens: int) -> Batch:
  """Stacks numpy batches along cells and pads with padding cells to exactly n cells."""
  parts = list(batches)
  have = sum(b.cell_mask.shape[0] for b in parts)
  if have < n:
    parts.append(empty_batch(n - have, n_tokens))
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)


def pooled(loss_main, n_main, loss_rep, w_rep):
  """The loss over current and replayed items: counts / weights n_main and w_rep."""
  return (n_main * loss_main + w_rep * loss_rep) / jnp.maximum(n_main + w_rep, 1e-6)


def _build(name: str, config: ml_collections.ConfigDict, replay_all: bool) -> LossTransform:
  c = config[name]
  if c.mode not in MODES:
    raise ValueError(f"unknown config.{name}.mode {c.mode!r}; known: {MODES}")
  mode, weight = c.mode, check_weight(name, c.weight)
  n_rep = int(c.batch_size) or int(config.batch.batch_size)
  if n_rep < 1:
    raise ValueError(f"config.{name}.batch_size={c.batch_size} must be >= 1 (0 = "
                     "config.batch.batch_size)")
  include_base = bool(c.include_base)
  seed = int(config.seed)
  cap = 1
  if not replay_all:
    cap = int(c.buffer_size)
    if cap < 0 or int(c.per_stage) < 0:
      raise ValueError(f"config.{name}.buffer_size={cap} and per_stage={c.per_stage} must be "
                       ">= 0 (buffer_size 0 = replay disabled, a no-op)")
  cap_state = max(cap, 1)  # arrays of size >= 1; buffer_size=0 keeps `valid` all False
  columns_cache: dict = {}

  def skip(is_base_stage: bool) -> bool:
    return is_base_stage and not include_base

  def init(params):
    del params
    return {"cells": jnp.zeros((cap_state,), jnp.int32), "stage": jnp.zeros((cap_state,), jnp.int32),
            "valid": jnp.zeros((cap_state,), bool)}

  def consolidate(own, params, end: StageEnd):
    del params
    if replay_all or cap == 0 or skip(end.base_stage):
      return own
    cells, stg, valid = (np.asarray(jax.device_get(own[k])) for k in ("cells", "stage", "valid"))
    entries = [(int(a), int(b)) for a, b, v in zip(cells, stg, valid) if v]
    rng = np.random.default_rng([seed, end.stage, 3])
    new = rng.permutation(np.asarray(end.stage_cells, np.int64))
    if int(c.per_stage) > 0:
      take = min(int(c.per_stage), cap - len(entries), len(new))
      entries += [(int(x), end.stage) for x in new[:take]]
    else:
      stored = sorted({s for _, s in entries} | {end.stage})
      quota = cap // len(stored)
      kept = []
      for s in stored[:-1]:
        kept += [e for e in entries if e[1] == s][:quota]
      entries = kept + [(int(x), end.stage) for x in new[:quota]]
    out_cells = np.zeros(cap_state, np.int32)
    out_stage = np.zeros(cap_state, np.int32)
    out_valid = np.zeros(cap_state, bool)
    if entries:
      arr = np.asarray(entries, np.int64)
      out_cells[:len(arr)], out_stage[:len(arr)], out_valid[:len(arr)] = arr[:, 0], arr[:, 1], True
    # host arrays: the loop places them with the state's sharding (several processes too)
    return {"cells": out_cells, "stage": out_stage, "valid": out_valid}

  def pool(own, feed) -> tuple[np.ndarray, np.ndarray]:
    """(cells, their stage) that may be replayed at feed.stage (host copies)."""
    if replay_all:
      ks = [k for k in range(feed.stage) if not skip(k == 0 and feed.plan.base_stage)]
      if not ks:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
      cells = np.concatenate([feed.plan.stages[k].train_cells for k in ks])
      return cells, np.concatenate([np.full(len(feed.plan.stages[k].train_cells), k) for k in ks])
    key = ("buffer", id(feed.plan), feed.stage)
    if key not in columns_cache:  # the buffer only changes at stage ends: one device read a stage
      valid = np.asarray(jax.device_get(own["valid"]))
      columns_cache[key] = (np.asarray(jax.device_get(own["cells"]))[valid].astype(np.int64),
                            np.asarray(jax.device_get(own["stage"]))[valid].astype(np.int64))
    return columns_cache[key]

  def columns(feed, k: int) -> np.ndarray:
    key = ("cols", id(feed.data), id(feed.plan), k)
    if key not in columns_cache:
      columns_cache[key] = stages.stage_columns(feed.data, feed.vocab, feed.plan.stages[k])
    return columns_cache[key]

  def extra_inputs(own, feed):
    n_tokens = feed.spec.n_tokens if feed is not None else int(config.batch.n_tokens)
    empty = {name: empty_batch(n_rep, n_tokens), f"{name}_weight": np.zeros(n_rep, np.float32)}
    if feed is None:
      return empty
    cells, stg = pool(own, feed)
    if len(cells) == 0:
      return empty
    rng = np.random.default_rng([feed.seed, feed.stage, feed.step, 4])
    pick = rng.choice(len(cells), n_rep, replace=len(cells) < n_rep)
    pick = pick[np.argsort(stg[pick], kind="stable")]
    parts = []
    for k in np.unique(stg[pick]):
      group = cells[pick][stg[pick] == k]
      spec = dataclasses.replace(feed.spec, batch_size=len(group))
      parts.append(batching.make_batch(feed.data, group, columns(feed, int(k)), spec,
                                       np.random.default_rng([feed.seed, feed.stage, feed.step, 5, k])))
    batch = _concat(parts, n_rep, n_tokens)
    if mode == "concat":
      n_current = len(feed.plan.stages[feed.stage].train_cells)
      w = len(cells) * feed.spec.batch_size / (max(n_current, 1) * n_rep)
    else:
      w = weight
    return {name: batch, f"{name}_weight": np.where(batch.cell_mask, w, 0.0).astype(np.float32)}

  def wrap(loss_fn):
    def wrapped(params, tstates, inputs, ctx):
      loss, aux = loss_fn(params, tstates, inputs, ctx)
      rep, w_cell = inputs[name], inputs[f"{name}_weight"]
      rep_ctx = dataclasses.replace(ctx, rng=jax.random.fold_in(ctx.rng, 7))
      rep_loss, _ = loss_fn(params, tstates, {**inputs, "main": rep}, rep_ctx)
      n_pos = jnp.sum(objectives.prediction_mask(rep, ctx.active_genes), axis=1)
      w_rep = jnp.sum(w_cell * n_pos)
      if mode == "concat":
        n_main = jnp.sum(objectives.prediction_mask(inputs["main"], ctx.active_genes))
        total = pooled(loss, n_main, rep_loss, w_rep)
      else:  # 'batch': mean replay-cell weight (0 while the replay batch is padding)
        total = loss + w_rep / jnp.maximum(jnp.sum(n_pos), 1.0) * rep_loss
      aux = dict(aux, metrics=dict(aux["metrics"], **{f"loss/{name}": rep_loss}))
      return total, aux
    return wrapped

  return LossTransform(init=init, consolidate=consolidate, wrap=wrap, extra_inputs=extra_inputs)


@registry.register("replay")
def replay(config: ml_collections.ConfigDict) -> LossTransform:
  return _build("replay", config, replay_all=False)


@registry.register("oracle")
def oracle(config: ml_collections.ConfigDict) -> LossTransform:
  return _build("oracle", config, replay_all=True)
