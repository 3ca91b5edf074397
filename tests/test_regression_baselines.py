"""Trivial predictors beside the gene-wise regression: statistics, predictions, pooling."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from gil_jax.batch import empty_batch
from gil_jax.data.anndata_io import CellData
from gil_jax.eval import regression


def two_dataset_data() -> CellData:
  """4 cells x 3 genes; dataset 1 (cells 2, 3) did not measure gene 2."""
  X = np.array([[1.0, 0.0, 2.0],
                [3.0, 1.0, 0.0],
                [5.0, 0.0, 0.0],
                [0.0, 2.0, 0.0]], np.float32)
  return CellData(name="t", X=sp.csr_matrix(X), gene_ids=np.array(["a", "b", "c"]),
                  obs=pd.DataFrame({"dataset": ["d0", "d0", "d1", "d1"]}, index=list("wxyz")),
                  panel=np.array([[True, True, True], [True, True, False]]),
                  dataset_index=np.array([0, 0, 1, 1], np.int32), dataset_names=["d0", "d1"],
                  is_counts=True, size_factors=np.ones(4, np.float32))


def test_gene_statistics_use_measured_and_detected_cells():
  data = two_dataset_data()
  mean, detected = regression.gene_statistics(data, np.array([3, 0, 1, 2]), "none", chunk=3)
  np.testing.assert_allclose(mean, [9 / 4, 3 / 4, 2 / 2])       # gene c: 2 measuring cells
  np.testing.assert_allclose(detected, [9 / 3, 3 / 2, 2 / 1])
  mean, detected = regression.gene_statistics(data, np.array([2, 3]), "none")
  assert np.isnan(mean[2]) and np.isnan(detected[2])             # never measured
  assert mean[0] == 2.5 and detected[0] == 5.0


def _batch():
  b = empty_batch(2, 4)
  ids = np.array([[1, 2, 3, 0], [3, 1, 0, 0]], np.int32)
  token = ids > 0
  pred = np.array([[True, False, False, False], [True, False, False, False]])
  targets = np.array([[4.0, 3.0, 5.0, 0.0], [1.0, 2.0, 0.0, 0.0]], np.float32)
  return b.replace(gene_ids=ids, token_mask=token, pred_mask=pred, targets=targets,
                   values=np.where(pred, 0.0, targets).astype(np.float32),
                   cell_mask=np.array([True, True]))


def test_cell_offset_is_mean_visible_residual():
  row_mean = np.array([0.0, 0.5, 1.0, 1.5])
  row_dmean = np.array([0.0, 2.0, 2.0, 4.0])
  p = regression.trivial_predictions(_batch(), row_mean, row_dmean)
  # cell 0 sees genes 2 (3 vs 2) and 3 (5 vs 4): offset +1; cell 1 sees gene 1 (2 vs 2): 0.
  assert p["gene_cell_offset"][0, 0] == pytest.approx(3.0)
  assert p["gene_cell_offset"][1, 0] == pytest.approx(4.0)
  assert p["gene_detected_mean"][0, 0] == 2.0 and p["gene_mean"][1, 0] == 1.5


def test_baselines_pool_only_scored_positions():
  col_mean, col_dmean = np.array([0.5, 1.0, 1.5]), np.array([2.0, 2.0, 4.0])
  c2r = np.array([1, 2, 3])                     # data column c -> gene-table row c + 1
  row_group = np.array([-1, 0, 1, 1], np.int32)
  active = np.array([False, True, True, True])
  tb = regression.TrivialBaselines(col_mean, col_dmean, c2r, 4, active, row_group, 2)
  tb.add(_batch())
  mse = tb.mse()
  # scored: cell 0 gene 1 (group 0, target 4, offset pred 3), cell 1 gene 3 (group 1, target 1,
  # offset pred 4); visible positions and padding are never scored.
  assert mse["gene_cell_offset"] == pytest.approx([1.0, 9.0])
  assert mse["gene_detected_mean"] == pytest.approx([4.0, 9.0])
  inactive = regression.TrivialBaselines(col_mean, col_dmean, c2r, 4,
                                         np.array([False, False, True, True]), row_group, 2)
  inactive.add(_batch())
  assert inactive.mse()["gene_mean"][0] is None


def test_ratio_to_best():
  model = [[0.5, None], [0.4, 0.9]]
  base = {"a": [[1.0, None], [0.8, 0.3]], "b": [[0.25, None], [None, 0.6]]}
  assert regression.ratio_to_best(model, base) == [[2.0, None], [0.5, 3.0]]
