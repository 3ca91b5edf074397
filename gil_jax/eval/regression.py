"""Gene-wise regression (GIL paper Eq. 11) and forgetting Δ."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np


def stage_row_groups(capacity: int, stage_rows: list[np.ndarray]) -> np.ndarray:
  """int32[capacity]: for each gene row, the index of the stage whose genes it scores (-1: none).

  When a row belongs to several stages' evaluation sets, the earliest stage wins.
  """
  group = np.full(capacity, -1, np.int32)
  for j in reversed(range(len(stage_rows))):
    group[np.asarray(stage_rows[j], np.int64)] = j
  return group


def pooled_mse(eval_step: Callable[..., Any], params: Any, batches: Iterable[Any],
               active_genes: Any, row_group: Any, n_groups: int) -> list[float | None]:
  """Pooled masked MSE per group over all batches (None where a group had no scored position)."""
  sum_sq = np.zeros(n_groups, np.float64)
  count = np.zeros(n_groups, np.float64)
  for batch in batches:
    s, c = eval_step(params, batch, active_genes, row_group)
    sum_sq += np.asarray(s, np.float64)
    count += np.asarray(c, np.float64)
  return [float(s / c) if c > 0 else None for s, c in zip(sum_sq, count)]


def forgetting(matrix: list[list[float | None]], final_visible: list[bool]) -> dict:
  """Forgetting Δ_j = MSE on stage j's genes after the last stage − right after stage j.

  `final_visible[j]` says whether stage j's genes are still trained on in the last stage (e.g.
  the base genes B); those are not forgotten in the GIL sense and are left out of the average,
  matching the paper's Δ over stage-specific genes. The last stage's entry is None.
  """
  n = len(matrix)
  last = n - 1
  per_stage: list[float | None] = []
  for j in range(n):
    if j == last or matrix[last][j] is None or matrix[j][j] is None:
      per_stage.append(None)
    else:
      per_stage.append(float(matrix[last][j] - matrix[j][j]))
  scored = [d for j, d in enumerate(per_stage) if d is not None and not final_visible[j]]
  return {"per_stage": per_stage,
          "average": float(np.mean(scored)) if scored else None}
