"""Annotation metrics: accuracy, macro-F1, ARI, the stage × stage matrix, BWT, forgetting, H."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn import metrics as skm


def classification(y_true: Sequence, y_pred: Sequence) -> dict[str, float]:
  """Accuracy, macro-F1 (over the union of true and predicted labels, as CANAL) and ARI."""
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  if len(y_true) == 0:
    return {"accuracy": None, "macro_f1": None, "ari": None}
  return {"accuracy": float(skm.accuracy_score(y_true, y_pred)),
          "macro_f1": float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0)),
          "ari": float(skm.adjusted_rand_score(y_true, y_pred))}


def _matrix(acc: Sequence[Sequence[float | None]]) -> np.ndarray:
  return np.array([[np.nan if v is None else v for v in row] for row in acc], float)


def _nanmean(values) -> float | None:
  """Mean of the finite entries; None when there are none (no held-out cells were scored)."""
  v = np.asarray(values, float)
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else None


def bwt(acc: Sequence[Sequence[float | None]]) -> float | None:
  """Backward transfer: mean_j<T (A[T-1, j] − A[j, j]); negative = forgetting."""
  a = _matrix(acc)
  t = a.shape[0]
  if t < 2:
    return None
  return _nanmean([a[-1, j] - a[j, j] for j in range(t - 1)])


def forgetting(acc: Sequence[Sequence[float | None]]) -> float | None:
  """Average forgetting: mean_j<T (max_{t<T} A[t, j] − A[T-1, j])."""
  a = _matrix(acc)
  t = a.shape[0]
  if t < 2:
    return None
  return _nanmean([np.max(a[j:-1, j], initial=-np.inf, where=np.isfinite(a[j:-1, j])) - a[-1, j]
                   for j in range(t - 1)])


def average_accuracy(acc: Sequence[Sequence[float | None]]) -> float | None:
  """Mean of the last row (accuracy on every stage's held-out cells after the final stage)."""
  return _nanmean(_matrix(acc)[-1])


def h_score(known: float, unknown: float) -> float:
  return 0.0 if known + unknown == 0 else float(2 * known * unknown / (known + unknown))


def novel_metrics(y_true: Sequence[str], y_pred: Sequence[str], novel: Sequence[str],
                  unassigned: str = "Unassigned") -> dict[str, float]:
  """Known accuracy (exact type on known cells), unknown accuracy (novel flagged), H-score."""
  y_true, y_pred = np.asarray(y_true, object), np.asarray(y_pred, object)
  is_novel = np.isin(y_true, list(novel))
  known = float(np.mean(y_pred[~is_novel] == y_true[~is_novel])) if (~is_novel).any() else 0.0
  unknown = float(np.mean(y_pred[is_novel] == unassigned)) if is_novel.any() else 0.0
  total = float(np.mean(np.where(is_novel, unassigned, y_true) == y_pred))
  return {"known_accuracy": known, "unknown_accuracy": unknown,
          "h_score": h_score(known, unknown), "total_accuracy": total}
