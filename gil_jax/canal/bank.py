"""CANAL's class-balanced example bank as fixed-size arrays (kept in the train state).

Budget ⌊L / classes seen⌋ per class. After a stage, the cells of each class present in it are
ranked by the dot product of their representation h with the class prototype (the class's row
of the classifier, in the model's global label order -- the fixed version of the reference
code's row-index bug) and the top-k get ranks 1..k. Merging keeps, per class, the entries with
the best (lowest) ranks over all stages; ties go to the earlier stage. Unlike the reference
(strict `rank < r*`), exactly min(budget, available) entries are kept per class.
"""

from __future__ import annotations

import numpy as np

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
