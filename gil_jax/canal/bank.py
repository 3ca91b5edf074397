"""CANAL's class-balanced example bank: replay of labelled cells, as a loss transform.

`example_bank` is a `LossTransform` like gene replay (gil_jax/losses/replay.py): its state is the
bank (fixed-size arrays in the train state's transforms), it is refilled when a stage ends, and
every step adds a fixed-shape batch of banked cells (tokenised with the current stage's genes,
their labels, the current class mask) whose loss is pooled with the stage's batch, weighted so
that in expectation banked : stage cells = |bank| : |stage cells| -- the gradient of training on
the stage's data concatenated with the bank, as CANAL does.

Budget ⌊L / classes seen⌋ per class. After a stage, the cells of each class present in it are
ranked by the dot product of their representation h with the class prototype (the class's row
of the classifier, in the model's global label order -- the fixed version of the reference
code's row-index bug) and the top-k get ranks 1..k. Merging keeps, per class, the entries with
the best (lowest) ranks over all stages; ties go to the earlier stage. Unlike the reference
(strict `rank < r*`), exactly min(budget, available) entries are kept per class.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gil_jax.batch import empty_batch
from gil_jax.data import batching
from gil_jax.losses import registry
from gil_jax.losses.replay import pooled
from gil_jax.losses.transforms import LossTransform, StageEnd

NAME = "example_bank"

FIELDS = ("cells", "labels", "rank", "stage")


def empty(size: int) -> dict[str, np.ndarray]:
  """An empty bank of `size` slots (cells = -1 marks a free slot)."""
  return {"cells": np.full(size, -1, np.int32), "labels": np.full(size, -1, np.int32),
          "rank": np.zeros(size, np.int32), "stage": np.full(size, -1, np.int32)}


def occupied(bank: dict) -> np.ndarray:
  return np.asarray(bank["cells"]) >= 0


def per_class_budget(size: int, n_classes_seen: int) -> int:
  return int(size // max(1, n_classes_seen))


def select(h: np.ndarray, labels: np.ndarray, cells: np.ndarray, protos: np.ndarray,
           budget: int, stage: int) -> dict[str, np.ndarray]:
  """Per class of `labels`: the `budget` cells with the largest h·prototype, ranked 1..k."""
  h, labels, cells = np.asarray(h), np.asarray(labels), np.asarray(cells)
  out = {f: [] for f in FIELDS}
  for c in np.unique(labels[labels >= 0]):
    idx = np.flatnonzero(labels == c)
    score = h[idx] @ np.asarray(protos)[c]
    top = idx[np.argsort(-score, kind="stable")[:budget]]
    out["cells"].append(cells[top])
    out["labels"].append(np.full(len(top), c))
    out["rank"].append(np.arange(1, len(top) + 1))
    out["stage"].append(np.full(len(top), stage))
  return {f: np.concatenate(v).astype(np.int32) if v else np.zeros(0, np.int32)
          for f, v in out.items()}


def merge(bank: dict, new: dict, budget: int, size: int) -> dict[str, np.ndarray]:
  """Old bank ∪ new selection, per class the `budget` best-ranked entries, padded to `size`."""
  occ = occupied(bank)
  allf = {f: np.concatenate([np.asarray(bank[f])[occ], np.asarray(new[f])]) for f in FIELDS}
  keep = []
  for c in np.unique(allf["labels"]):
    idx = np.flatnonzero(allf["labels"] == c)
    order = np.lexsort((allf["stage"][idx], allf["rank"][idx]))  # rank, then earlier stage
    keep.append(idx[order[:budget]])
  keep = np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
  if len(keep) > size:
    raise ValueError(f"bank overflow: {len(keep)} entries for size {size}")
  out = empty(size)
  for f in FIELDS:
    out[f][:len(keep)] = allf[f][keep]
  return out


def update(bank: dict, h: np.ndarray, labels: np.ndarray, cells: np.ndarray, protos: np.ndarray,
           n_classes_seen: int, stage: int) -> dict[str, np.ndarray]:
  """The bank after a stage: select from the stage's cells, merge, rebalance to the budget."""
  size = len(bank["cells"])
  budget = per_class_budget(size, n_classes_seen)
  return merge(bank, select(h, labels, cells, protos, budget, stage), budget, size)


def class_counts(bank: dict) -> dict[int, int]:
  occ = occupied(bank)
  labs, n = np.unique(np.asarray(bank["labels"])[occ], return_counts=True)
  return {int(a): int(b) for a, b in zip(labs, n)}


@registry.register(NAME)
def example_bank(config: ml_collections.ConfigDict) -> LossTransform:
  """The example bank of `config.canal.bank_size` cells, replayed in batches of
  `config.batch.batch_size` (bank_size 0: a no-op)."""
  size, n_rep = int(config.canal.bank_size), int(config.batch.batch_size)
  if size < 0:
    raise ValueError(f"config.canal.bank_size={size} must be >= 0 (0 = no bank)")

  def init(params):
    del params
    return {k: jnp.asarray(v) for k, v in empty(max(1, size)).items()}

  def consolidate(own, params, end: StageEnd):
    if size == 0 or end.predict is None or end.labels is None:
      return own
    cells = np.asarray(end.stage_cells, np.int64)
    h = end.predict(cells)["h"]
    protos = np.asarray(jax.device_get(params["head"]["cls"]["w"])).T
    # host arrays: the loop places them with the state's sharding (several processes too)
    return update(jax.device_get(own), h, np.asarray(end.labels)[cells], cells, protos,
                  int(np.sum(end.active_classes)), end.stage)

  def extra_inputs(own, feed):
    n_tokens = feed.spec.n_tokens if feed is not None else int(config.batch.n_tokens)
    out = {NAME: empty_batch(n_rep, n_tokens), f"{NAME}_weight": np.zeros(n_rep, np.float32)}
    if feed is None or feed.columns_to_rows is None:
      return out
    cells = np.asarray(own["cells"])[occupied(own)].astype(np.int64)
    if len(cells) == 0:
      return out
    rng = np.random.default_rng([feed.seed, feed.stage, feed.step, 6])
    pick = cells[rng.choice(len(cells), n_rep, replace=len(cells) < n_rep)]
    batch = batching.make_batch(feed.data, pick, feed.columns_to_rows,
                                dataclasses.replace(feed.spec, batch_size=n_rep), rng,
                                labels=feed.labels)
    w = len(cells) * feed.spec.batch_size / (max(feed.n_stage_cells, 1) * n_rep)
    return {NAME: batch, f"{NAME}_weight": np.where(batch.cell_mask, w, 0.0).astype(np.float32)}

  def wrap(loss_fn):
    def wrapped(params, tstates, inputs, ctx):
      loss, aux = loss_fn(params, tstates, inputs, ctx)
      rep_ctx = dataclasses.replace(ctx, rng=jax.random.fold_in(ctx.rng, 11))
      w_rep = jnp.sum(inputs[f"{NAME}_weight"])
      rep_loss = jax.lax.cond(  # an empty bank (the first stage) costs no forward pass
          w_rep > 0,
          lambda: loss_fn(params, tstates, {**inputs, "main": inputs[NAME]}, rep_ctx)[0],
          lambda: jnp.zeros((), loss.dtype))
      n_main = jnp.sum(inputs["main"].cell_mask & (inputs["main"].labels >= 0))
      total = pooled(loss, n_main, rep_loss, w_rep)
      return total, dict(aux, metrics=dict(aux["metrics"], **{f"loss/{NAME}": rep_loss}))
    return wrapped

  return LossTransform(init=init, consolidate=consolidate, wrap=wrap, extra_inputs=extra_inputs)
