"""Tests for gil_jax.data.anndata_io."""

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from gil_jax.data.anndata_io import DataError, concat, from_anndata, read_h5ad


def _adata(X, genes=None, **obs):
  X = np.asarray(X, np.float32) if not sp.issparse(X) else X
  n, g = X.shape
  genes = genes or [f"g{i}" for i in range(g)]
  obs_df = pd.DataFrame({k: v for k, v in obs.items()}, index=[f"c{i}" for i in range(n)])
  return ad.AnnData(X=X, obs=obs_df, var=pd.DataFrame(index=genes))


X0 = np.array([[1, 0, 3], [0, 2, 0], [4, 5, 6]], np.float32)


def test_round_trip_keeps_values_genes_obs():
  a = _adata(X0, cell_type=["a", "b", "a"])
  d = from_anndata(a, name="toy")
  assert d.n_cells == 3 and d.n_genes == 3 and d.is_counts
  np.testing.assert_allclose(d.size_factors, X0.sum(1) / 1e4, rtol=1e-6)
  b = d.to_anndata()
  np.testing.assert_array_equal(b.X.toarray(), X0)
  assert list(b.var_names) == ["g0", "g1", "g2"]
  assert list(b.obs_names) == ["c0", "c1", "c2"]
  assert list(b.obs["cell_type"]) == ["a", "b", "a"]
  assert set(b.obs["dataset"]) == {"toy"}
  d2 = from_anndata(b)
  assert d2.dataset_names == ["toy"] and np.array_equal(d2.panel, d.panel)


def test_csr_csc_dense_identical():
  ds = [from_anndata(_adata(m)) for m in (X0, sp.csr_matrix(X0), sp.csc_matrix(X0))]
  for d in ds[1:]:
    np.testing.assert_array_equal(d.X.toarray(), ds[0].X.toarray())
    np.testing.assert_array_equal(d.X.indices, ds[0].X.indices)
    np.testing.assert_array_equal(d.size_factors, ds[0].size_factors)
    assert d.is_counts == ds[0].is_counts


def test_layer_and_gene_column():
  a = _adata(X0)
  a.layers["counts"] = X0 * 2
  a.var["symbol"] = ["A", "B", "C"]
  d = from_anndata(a, layer="counts", gene_column="symbol")
  np.testing.assert_array_equal(d.X.toarray(), X0 * 2)
  assert list(d.gene_ids) == ["A", "B", "C"]


def test_zero_cells_dropped(caplog):
  X = np.vstack([X0, np.zeros((1, 3), np.float32)])
  with caplog.at_level(logging.INFO):
    d = from_anndata(_adata(X))
  assert d.n_cells == 3 and list(d.obs.index) == ["c0", "c1", "c2"]
  assert "dropped 1 of 4 cells" in caplog.text


def test_obs_columns():
  a = _adata(X0, cell_type=["a", "b", "a"], batch=["x", "y", "x"])
  d = from_anndata(a, obs_columns=["batch"])
  assert set(d.obs.columns) == {"batch", "dataset"}
  with pytest.raises(DataError, match="not_there.*available obs columns"):
    from_anndata(a, obs_columns=["not_there"])


@pytest.mark.parametrize("X,kw,pattern", [
    (np.array([[1, np.nan], [1, 2]]), {}, "NaN/inf"),
    (np.array([[1, np.inf], [1, 2]]), {}, "NaN/inf"),
    (np.array([[1, -1], [1, 2]]), {}, "negative"),
    (np.array([[1.5, 0], [1, 2]]), {"require_counts": True}, "likelihood='mse'"),
    (np.zeros((0, 2)), {}, "0 cells"),
    (np.zeros((2, 0)), {}, "0 genes"),
    (np.zeros((2, 2)), {}, "total expression 0"),
])
def test_bad_values_raise(X, kw, pattern):
  a = ad.AnnData(X=np.asarray(X, np.float32),
                 obs=pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])]),
                 var=pd.DataFrame(index=[f"g{i}" for i in range(X.shape[1])]))
  with pytest.raises(DataError, match=pattern):
    from_anndata(a, **kw)


def test_non_integer_ok_without_require_counts():
  d = from_anndata(_adata(X0 + 0.5))
  assert not d.is_counts


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicate_genes_raise():
  a = ad.AnnData(X=X0, var=pd.DataFrame(index=["A", "B", "A"]))
  with pytest.raises(DataError, match=r"duplicate gene ids.*'A'.*var_names_make_unique"):
    from_anndata(a)


def test_missing_file(tmp_path, monkeypatch):
  with pytest.raises(DataError, match="not found.*nope.h5ad"):
    read_h5ad(tmp_path / "nope.h5ad")
  monkeypatch.chdir(tmp_path)
  with pytest.raises(DataError, match="--config.data.files"):
    read_h5ad("rel/nope.h5ad")


def test_corrupt_file(tmp_path):
  p = tmp_path / "bad.h5ad"
  p.write_bytes(b"this is not hdf5 \x00\x01\x02" * 50)
  with pytest.raises(DataError, match="cannot read h5ad file.*bad.h5ad"):
    read_h5ad(p)


def test_file_missing_layer_and_column(tmp_path):
  a = _adata(X0)
  a.layers["counts"] = X0
  a.var["symbol"] = ["A", "B", "C"]
  p = tmp_path / "ok.h5ad"
  a.write_h5ad(p)
  d = read_h5ad(p, layer="counts", gene_column="symbol")
  assert d.name == "ok" and list(d.gene_ids) == ["A", "B", "C"]
  with pytest.raises(DataError, match=r"layer 'raw' not found.*\['counts'\].*config.data.layer"):
    read_h5ad(p, layer="raw")
  with pytest.raises(DataError, match=r"var column 'ENSEMBL' not found.*symbol.*gene_column"):
    read_h5ad(p, gene_column="ENSEMBL")


def test_concat_keeps_not_measured_distinct():
  a = from_anndata(_adata(np.array([[1, 0], [2, 3]], np.float32), genes=["A", "B"]), name="d1")
  b = from_anndata(_adata(np.array([[0, 5], [7, 1]], np.float32), genes=["B", "C"]), name="d2")
  c = concat([a, b], name="both")
  assert list(c.gene_ids) == ["A", "B", "C"]
  np.testing.assert_array_equal(c.X.toarray(), [[1, 0, 0], [2, 3, 0], [0, 0, 5], [0, 7, 1]])
  np.testing.assert_array_equal(c.panel, [[True, True, False], [False, True, True]])
  np.testing.assert_array_equal(c.dataset_index, [0, 0, 1, 1])
  # cell 2 (d2): gene B is a measured zero, gene A is not measured
  assert c.measured(2).tolist() == [False, True, True]
  assert c.X[2, 1] == 0 and c.X[2, 0] == 0
  assert list(c.obs["dataset"]) == ["d1", "d1", "d2", "d2"]
  assert not c.obs.index.has_duplicates
  np.testing.assert_allclose(c.size_factors, [1e-4, 5e-4, 5e-4, 8e-4], rtol=1e-6)
  rt = from_anndata(c.to_anndata())
  np.testing.assert_array_equal(rt.panel, c.panel)
  assert rt.dataset_names == ["d1", "d2"]
  sub = c.subset(np.array([3, 0]))
  assert sub.n_cells == 2 and sub.dataset_index.tolist() == [1, 0]
  with pytest.raises(DataError, match="more than once"):
    concat([a, a], name="dup")


def test_raw_values_without_normalisation_warn(caplog):
  import logging
  from gil_jax import experiment
  from gil_jax.data.simulate import SimConfig, simulate_cell_data
  data = simulate_cell_data(SimConfig(n_cells=50, n_genes=20, n_modules=2))
  data.X.data[:] = 1e9
  with caplog.at_level(logging.WARNING):
    assert experiment.check_value_scale(data, "none") == 1e9
    assert experiment.check_value_scale(data, "log1p_cp10k") is None
  assert "far above log-normalised expression" in caplog.text
