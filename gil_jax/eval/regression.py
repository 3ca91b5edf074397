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


# ------------------------------------------------------------------ trivial predictors

BASELINES = ("gene_mean", "gene_detected_mean", "gene_cell_offset")


def gene_statistics(data: Any, cells: np.ndarray, normalisation: str,
                    chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
  """Per data column, over `cells`: (mean of the normalised value over the cells whose dataset
  measured the gene, zeros included; mean over the cells where it was detected). NaN where a
  gene was never measured / never detected."""
  from gil_jax.data.batching import normalise  # host-side data layer; no cycle at import time
  n_genes = data.n_genes
  total = np.zeros(n_genes, np.float64)
  detected = np.zeros(n_genes, np.float64)
  measured = np.zeros(n_genes, np.float64)
  cells = np.sort(np.asarray(cells, np.int64))
  for i in range(0, len(cells), chunk):
    part = cells[i:i + chunk]
    sub = data.X[part]
    owner = np.repeat(np.arange(len(part)), np.diff(sub.indptr))
    vals = normalise(sub.data.astype(np.float32), data.size_factors[part][owner], normalisation)
    total += np.bincount(sub.indices, weights=vals, minlength=n_genes)
    detected += np.bincount(sub.indices, weights=(vals != 0), minlength=n_genes)
    per_dataset = np.bincount(data.dataset_index[part], minlength=data.panel.shape[0])
    measured += per_dataset @ np.asarray(data.panel, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return total / np.where(measured > 0, measured, np.nan), total / np.where(detected > 0,
                                                                              detected, np.nan)


def trivial_predictions(batch: Any, row_mean: np.ndarray,
                        row_detected_mean: np.ndarray) -> dict[str, np.ndarray]:
  """The trivial predictors of every token of a host batch, by name (`BASELINES`):

  * ``gene_mean``: the gene's mean over training cells (zeros included);
  * ``gene_detected_mean``: the gene's mean over the training cells where it was detected;
  * ``gene_cell_offset``: the detected mean plus the cell's mean offset of its *visible* genes
    from their detected means (how much higher or lower this cell sits, e.g. from its depth).
  """
  ids = np.asarray(batch.gene_ids)
  visible = np.asarray(batch.token_mask) & ~np.asarray(batch.pred_mask)
  dmean = row_detected_mean[ids]
  resid = np.where(visible, np.asarray(batch.values) - dmean, 0.0)
  offset = resid.sum(1) / np.maximum(visible.sum(1), 1)
  return {"gene_mean": row_mean[ids], "gene_detected_mean": dmean,
          "gene_cell_offset": dmean + offset[:, None]}


class TrivialBaselines:
  """Pools the trivial predictors' squared errors on exactly the positions the evaluator scores
  (hidden, real, active genes of real cells), per stage group, batch by batch."""

  def __init__(self, col_mean: np.ndarray, col_detected_mean: np.ndarray,
               columns_to_rows: np.ndarray, capacity: int, active: np.ndarray,
               row_group: np.ndarray, n_groups: int):
    c2r = np.asarray(columns_to_rows)
    fallback = float(np.nanmean(col_detected_mean)) if np.isfinite(col_detected_mean).any() else 0.0
    self.row_mean = np.zeros(capacity, np.float64)
    self.row_dmean = np.full(capacity, fallback, np.float64)
    cols = np.flatnonzero(c2r > 0)
    self.row_mean[c2r[cols]] = np.nan_to_num(col_mean[cols], nan=0.0)
    self.row_dmean[c2r[cols]] = np.nan_to_num(col_detected_mean[cols], nan=fallback)
    self.active, self.row_group, self.n_groups = np.asarray(active), np.asarray(row_group), n_groups
    self.sum_sq = {name: np.zeros(n_groups, np.float64) for name in BASELINES}
    self.count = np.zeros(n_groups, np.float64)

  def add(self, batch: Any) -> None:
    ids = np.asarray(batch.gene_ids)
    mask = (np.asarray(batch.pred_mask) & np.asarray(batch.token_mask) & self.active[ids]
            & np.asarray(batch.cell_mask)[:, None])
    group = np.where(mask, self.row_group[ids], -1)
    scored = group >= 0
    g = group[scored]
    self.count += np.bincount(g, minlength=self.n_groups)
    target = np.asarray(batch.targets, np.float64)[scored]
    for name, pred in trivial_predictions(batch, self.row_mean, self.row_dmean).items():
      self.sum_sq[name] += np.bincount(g, weights=(pred[scored] - target) ** 2,
                                       minlength=self.n_groups)

  def mse(self) -> dict[str, list[float | None]]:
    return {name: [float(s / c) if c > 0 else None for s, c in zip(self.sum_sq[name], self.count)]
            for name in BASELINES}


def ratio_to_best(model: list[list[float | None]],
                  baselines: dict[str, list[list[float | None]]]) -> list[list[float | None]]:
  """Model MSE / the lowest trivial-predictor MSE, entry by entry (None where either is missing)."""
  out = []
  for i, row in enumerate(model):
    out_row = []
    for j, m in enumerate(row):
      best = [b[i][j] for b in baselines.values() if b[i][j] is not None]
      out_row.append(float(m / min(best)) if m is not None and best and min(best) > 0 else None)
    out.append(out_row)
  return out
