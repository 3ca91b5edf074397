"""Honest annotation baselines: standardised logistic regression and kNN on PCA (scikit-learn).

Both are fitted on the training cells only (fixed hyperparameters, no selection on test data) and
predict labels for the test cells. `annotation_baselines` applies them to a CANAL stream: features
are the stream's normalised values (log1p-CP10k, or the source's own normalised values) on the
given vocabulary columns, as the model sees them; a gene a source did not measure is 0 for it.
Test-only sources get baselines refitted on the genes they share with the training vocabulary.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from gil_jax.canal import metrics

BASELINES = ("logistic_regression", "knn_pca")


def _check(x_train, y_train, x_test) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  x_train = x_train.toarray() if sp.issparse(x_train) else np.asarray(x_train)
  x_test = x_test.toarray() if sp.issparse(x_test) else np.asarray(x_test)
  y_train = np.asarray(y_train)
  if x_train.ndim != 2 or x_test.ndim != 2:
    raise ValueError(f"features must be 2-D (cells x genes); got {x_train.shape} and "
                     f"{x_test.shape}")
  if x_train.shape[1] != x_test.shape[1]:
    raise ValueError(f"train and test features differ in width ({x_train.shape[1]} vs "
                     f"{x_test.shape[1]} genes); use the same gene columns for both.")
  if len(y_train) != len(x_train):
    raise ValueError(f"{len(y_train)} labels for {len(x_train)} training cells.")
  if len(np.unique(y_train)) < 2:
    raise ValueError("a baseline classifier needs at least 2 cell types in the training cells.")
  return x_train.astype(np.float32, copy=False), y_train, x_test.astype(np.float32, copy=False)


def logistic_regression_baseline(x_train, y_train, x_test, *, c: float = 1.0,
                                 max_iter: int = 1000) -> np.ndarray:
  """Labels of `x_test` from multinomial logistic regression (L2, fixed C) on standardised
  features (scaler fitted on the training cells)."""
  x_train, y_train, x_test = _check(x_train, y_train, x_test)
  model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
  return model.fit(x_train, y_train).predict(x_test)


def knn_pca_baseline(x_train, y_train, x_test, *, n_components: int = 50,
                     k: int = 15) -> np.ndarray:
  """Labels of `x_test` by majority vote of the k nearest training cells (Euclidean) in the
  space of the first `n_components` principal components of the training cells."""
  x_train, y_train, x_test = _check(x_train, y_train, x_test)
  n = max(1, min(n_components, x_train.shape[0] - 1, x_train.shape[1]))
  pca = PCA(n_components=n, random_state=0).fit(x_train)
  knn = KNeighborsClassifier(n_neighbors=min(k, len(x_train)))
  return knn.fit(pca.transform(x_train), y_train).predict(pca.transform(x_test))


def knn_label_transfer(x_train, y_train, x_test, *, k: int = 15) -> np.ndarray:
  """Labels of `x_test` by majority vote of the k nearest training cells by cosine similarity,
  e.g. in a model's embedding (reference mapping's usual readout)."""
  x_train, y_train, x_test = _check(x_train, y_train, x_test)
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  knn = KNeighborsClassifier(n_neighbors=min(k, len(x_train)))
  return knn.fit(unit(x_train), y_train).predict(unit(x_test))


def _run(name: str, x_train, y_train, x_test, y_test) -> dict:
  fn = {"logistic_regression": logistic_regression_baseline, "knn_pca": knn_pca_baseline}[name]
  t0 = time.time()
  with threadpool_limits(1):  # small problems: one BLAS thread is ~5x faster on a busy 2-core host
    pred = fn(x_train, y_train, x_test)
  return dict(metrics.classification(y_test, pred), seconds=round(time.time() - t0, 3))


def annotation_baselines(stream, columns: np.ndarray, train_cells: np.ndarray,
                         test_cells: np.ndarray, test_only: dict[str, np.ndarray] | None = None,
                         names: Sequence[str] = BASELINES) -> dict:
  """Baseline figures beside a CANAL run's.

  stream: gil_jax.canal.stream.Stream (normalised values in stream.data.X, labels, panels).
  columns: int[genes] column indices of stream.data: the model's active vocabulary genes, plus
    those it leaves out as class-confounded (the baselines keep every usable gene).
  train_cells / test_cells: the model's training cells and held-out test cells (known types).
  test_only: source -> cells of seen types; refitted on the columns the source measured.
  Returns {name: {"test": metrics, "test_only": {source: metrics + n_shared_genes}}}.
  """
  x, y = stream.data.X, stream.labels
  columns = np.asarray(columns, np.int64)
  out = {n: {"features": "normalised values, standardised" if n == "logistic_regression" else
             "normalised values, PCA", "n_genes": int(len(columns)), "test": None,
             "test_only": {}} for n in names}
  for n in names:
    if len(test_cells):
      out[n]["test"] = _run(n, x[train_cells][:, columns], y[train_cells],
                            x[test_cells][:, columns], y[test_cells])
  for src, cells in (test_only or {}).items():
    if not len(cells):
      continue
    measured = stream.data.panel[np.unique(stream.data.dataset_index[cells])].any(0)
    shared = columns[measured[columns]]
    for n in names:
      entry = {"n_shared_genes": int(len(shared)), "n_cells": int(len(cells))}
      if len(shared):
        entry.update(_run(n, x[train_cells][:, shared], y[train_cells], x[cells][:, shared],
                          y[cells]))
      out[n]["test_only"][src] = entry
  return out
