"""Annotation baselines (gil_jax/eval/baselines.py) and their place in the CANAL report."""

import types

import numpy as np
import pytest
import scipy.sparse as sp

from gil_jax.canal import report
from gil_jax.eval import baselines


def _blobs(n_per: int = 60, n_genes: int = 40, n_types: int = 3, seed: int = 0, shift: float = 3.0):
  """Log-expression-like features: each type has 5 marker genes raised by `shift`."""
  rng = np.random.default_rng(seed)
  y = np.repeat([f"type{t}" for t in range(n_types)], n_per)
  x = rng.gamma(1.0, 0.5, size=(len(y), n_genes))
  for t in range(n_types):
    x[y == f"type{t}", 5 * t:5 * t + 5] += shift
  return np.log1p(x).astype(np.float32), y


@pytest.mark.parametrize("fn", [baselines.logistic_regression_baseline, baselines.knn_pca_baseline,
                                baselines.knn_label_transfer])
def test_baselines_beat_chance_on_separable_types(fn):
  x, y = _blobs()
  xt, yt = _blobs(n_per=30, seed=1)
  pred = fn(x, y, xt)
  assert pred.shape == yt.shape and set(pred) <= set(y)
  assert np.mean(pred == yt) > 0.9  # chance is 1/3
  assert np.mean(fn(sp.csr_matrix(x), y, sp.csr_matrix(xt)) == pred) == 1.0  # sparse == dense


def test_baselines_near_chance_without_signal():
  x, y = _blobs(shift=0.0)
  xt, yt = _blobs(n_per=100, seed=1, shift=0.0)
  assert np.mean(baselines.logistic_regression_baseline(x, y, xt) == yt) < 0.5


def test_baselines_fail_clearly_on_mismatch():
  x, y = _blobs()
  for fn in (baselines.logistic_regression_baseline, baselines.knn_pca_baseline,
             baselines.knn_label_transfer):
    with pytest.raises(ValueError, match="differ in width"):
      fn(x, y, x[:, :-1])
    with pytest.raises(ValueError, match="labels for"):
      fn(x, y[:-1], x)
    with pytest.raises(ValueError, match="at least 2 cell types"):
      fn(x, np.full(len(y), "a"), x)


def test_knn_label_transfer_votes_by_direction_not_length():
  x, y = _blobs()
  xt, _ = _blobs(n_per=30, seed=1)
  pred = baselines.knn_label_transfer(x, y, xt)
  scale = np.random.default_rng(0).uniform(0.1, 10.0, (len(xt), 1)).astype(np.float32)
  np.testing.assert_array_equal(baselines.knn_label_transfer(x, y, xt * scale), pred)
  one = baselines.knn_label_transfer(x, y, xt, k=1)  # k=1: the label of the most similar cell
  cos = (xt / np.linalg.norm(xt, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1,
                                                                             keepdims=True)).T
  np.testing.assert_array_equal(one, y[cos.argmax(1)])


def _stream():
  """A stand-in Stream: 2 training datasets and a test-only one measuring 30 of 40 genes."""
  x, y = _blobs(n_per=60)
  xq, yq = _blobs(n_per=20, seed=2)
  xq[:, 30:] = 0.0
  panel = np.ones((3, x.shape[1]), bool)
  panel[2, 30:] = False
  data = types.SimpleNamespace(X=sp.csr_matrix(np.concatenate([x, xq])), panel=panel,
                               dataset_index=np.repeat([0, 1, 2], [90, 90, 60]).astype(np.int32))
  return types.SimpleNamespace(data=data, labels=np.concatenate([y, yq]).astype(object))


def test_annotation_baselines_keys_and_shared_genes():
  s = _stream()
  rng = np.random.default_rng(0)
  cells = rng.permutation(180)
  train, test, query = np.sort(cells[:140]), np.sort(cells[140:]), np.arange(180, 240)
  out = baselines.annotation_baselines(s, np.arange(40), train, test, {"query": query})
  assert set(out) == set(baselines.BASELINES)
  for name, e in out.items():
    assert e["n_genes"] == 40
    assert set(e["test"]) >= {"accuracy", "macro_f1", "ari", "seconds"}
    assert e["test"]["accuracy"] > 0.9, name
    q = e["test_only"]["query"]
    assert q["n_shared_genes"] == 30 and q["n_cells"] == 60 and q["accuracy"] > 0.9, name


def _results(with_baselines: bool) -> dict:
  a = {"stage_names": ["s0", "s1"], "accuracy_matrix": [[0.9, None], [0.8, 0.85]],
       "final": {"accuracy": 0.8, "macro_f1": 0.7, "ari": 0.6}, "average_accuracy": 0.825,
       "bwt": -0.1, "forgetting": 0.1, "n_test_cells": 50, "classes": ["a", "b"], "novel": None,
       "confusion": {"labels": ["a", "b"], "matrix": [[20, 5], [5, 20]]},
       "test_only": {"q": {"n_cells": 30, "n_seen_type_cells": 25, "accuracy": 0.6,
                           "macro_f1": 0.5, "ari": 0.3, "flagged_novel": 0.2}}}
  if with_baselines:
    m = {"accuracy": 0.77, "macro_f1": 0.66, "ari": 0.55, "seconds": 0.1}
    a["baselines"] = {n: {"test": m, "test_only": {"q": dict(m, n_shared_genes=12)}}
                      for n in baselines.BASELINES}
  stages = [{"name": n, "n_train_cells": 10, "n_bank_cells": 0, "n_classes": 2,
             "n_active_genes": 20, "steps": 3, "seconds": 0.1, "final_loss": 0.5,
             "train_accuracy": 0.9} for n in a["stage_names"]]
  return {"experiment": "t", "mode": "canal", "transforms": [], "bank": True, "stages": stages,
          "annotation": a}


def test_report_puts_baselines_beside_the_model(tmp_path):
  report.write_outputs(str(tmp_path), _results(True))
  md = (tmp_path / "report.md").read_text()
  assert md.count("| logistic regression | 0.7700 |") == 1
  assert "| q | logistic regression | 30 | 25 | 12 | 0.7700 |" in md
  assert "kNN (k=15) on PCA" in md and "| q | model (canal) | 30 | 25 | 12 | 0.6000 |" in md
  assert "logistic regression (same cells): accuracy 0.7700" in report.console_summary(
      _results(True))
  report.write_outputs(str(tmp_path), _results(False))  # runs without baselines still report
  assert "logistic regression" not in (tmp_path / "report.md").read_text()
