"""Lazy `.h5ad` training (`config.data.lazy=True`): same results as eager, same validation.

Small files are written into tmp_path from simulated data; no shared data needed.
"""

import json
import types

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from gil_jax import checkpoint, experiment
from gil_jax.data import anndata_io, downstream, pipeline, simulate
from gil_jax.data.anndata_io import DataError, read_h5ad
from gil_jax.tasks import gil
from tests.helpers import tiny_config

SIM = dict(n_cells=240, n_genes=48, n_cell_types=3, n_modules=6, n_batches=3, seed=5)


def _write(adata: ad.AnnData, path) -> str:
  adata.write_h5ad(str(path))
  return str(path)


def _adata(X, genes=None, **obs) -> ad.AnnData:
  n, g = X.shape
  obs_df = pd.DataFrame(obs, index=[f"c{i}" for i in range(n)])
  return ad.AnnData(X=X, obs=obs_df, var=pd.DataFrame(index=genes or [f"g{i}" for i in range(g)]))


@pytest.fixture(scope="module")
def sim_file(tmp_path_factory):
  """Simulated counts plus two all-zero cells (dropped by both readers) and a float layer."""
  a = simulate.simulate_cell_data(simulate.SimConfig(**SIM)).to_anndata()
  X = sp.vstack([a.X[:7], sp.csr_matrix((2, a.n_vars), dtype=np.float32), a.X[7:]], format="csr")
  obs = pd.concat([a.obs.iloc[:7], a.obs.iloc[:2], a.obs.iloc[7:]])
  obs.index = [f"cell{i}" for i in range(len(obs))]
  b = ad.AnnData(X=X, obs=obs, var=a.var.copy())
  b.layers["scaled"] = (X * 0.5).tocsr()
  b.var["symbol"] = [f"SYM{i}" for i in range(b.n_vars)]
  return _write(b, tmp_path_factory.mktemp("lazy") / "sim.h5ad")


def _config(path: str, plan: str, lazy: bool):
  c = tiny_config(**{"data.source": "h5ad", "data.files": (path,), "data.lazy": lazy,
                     "stages.plan": plan, "train.steps_per_stage": 3,
                     "mesh.data": 1})  # one device: compiles twice as fast as eight
  if plan == "expressed":  # as configs/gil_synthetic.py: cells split by an obs column
    c.stages.obs_column, c.stages.order = "batch", ("batch0", "batch1", "batch2")
  return c


# ------------------------------------------------------------------ lazy run == eager run

@pytest.mark.parametrize("plan", ["random", "expressed"])
def test_lazy_training_matches_eager(sim_file, tmp_path, plan):
  results, plans = {}, {}
  for lazy in (False, True):
    config = _config(sim_file, plan, lazy)
    data = experiment.load_data(config)
    assert isinstance(data.X, pipeline.LazyCSRRows) == lazy
    plans[lazy] = experiment.build_plan(config, data).to_json()
    results[lazy] = gil.train_and_evaluate(config, str(tmp_path / f"run{int(lazy)}"),
                                            progress_bar=False)
  assert plans[True] == plans[False]
  assert results[True]["gene_regression"] == results[False]["gene_regression"]
  assert results[True]["forgetting"] == results[False]["forgetting"]
  saved = json.load(open(tmp_path / "run1" / "results.json"))
  assert saved["gene_regression"]["matrix"][-1][0] is not None
  assert [s["final_train_loss"] for s in results[True]["stages"]] == \
      [s["final_train_loss"] for s in results[False]["stages"]]


def test_lazy_flag_does_not_change_fingerprint(sim_file):
  assert checkpoint.fingerprint(_config(sim_file, "random", True)) == \
      checkpoint.fingerprint(_config(sim_file, "random", False))


# ------------------------------------------------------------------ reader == eager reader

def test_lazy_reader_matches_eager(sim_file):
  eager = read_h5ad(sim_file, obs_columns=["batch", "cell_type"])
  lazy = pipeline.open_lazy_h5ad(sim_file, obs_columns=["batch", "cell_type"], chunk_nnz=97)
  assert lazy.n_cells == eager.n_cells == SIM["n_cells"]  # the two zero cells are dropped
  assert lazy.is_counts and eager.is_counts
  np.testing.assert_array_equal(lazy.gene_ids, eager.gene_ids)
  np.testing.assert_array_equal(lazy.size_factors, eager.size_factors)
  pd.testing.assert_frame_equal(lazy.obs, eager.obs)
  rows = np.array([0, 6, 7, 8, 239, 8])
  a, b = lazy.X[rows], eager.X[rows]
  for f in ("indptr", "indices", "data"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  # gene statistics: bit-identical, and the same as scipy on the in-memory matrix
  np.testing.assert_array_equal(anndata_io.gene_means(lazy), anndata_io.gene_means(eager))
  np.testing.assert_array_equal(anndata_io.gene_means(eager),
                                np.asarray(eager.X.mean(axis=0)).ravel())
  np.testing.assert_array_equal(anndata_io.gene_nnz(lazy), anndata_io.gene_nnz(eager))
  assert lazy.X.nnz == eager.X.nnz


def test_lazy_layer_and_gene_column(sim_file):
  kw = dict(layer="scaled", gene_column="symbol")
  eager, lazy = read_h5ad(sim_file, **kw), pipeline.open_lazy_h5ad(sim_file, **kw)
  assert not lazy.is_counts and not eager.is_counts
  np.testing.assert_array_equal(lazy.gene_ids, eager.gene_ids)
  np.testing.assert_array_equal(lazy.X[np.arange(20)].toarray(), eager.X[:20].toarray())
  np.testing.assert_array_equal(lazy.size_factors, eager.size_factors)
  with pytest.raises(DataError, match="non-integer values"):
    pipeline.open_lazy_h5ad(sim_file, layer="scaled", require_counts=True)
  with pytest.raises(DataError, match="layer 'nope' not found; available layers: \\['scaled'\\]"):
    pipeline.open_lazy_h5ad(sim_file, layer="nope")
  with pytest.raises(DataError, match="var column 'nope' not found"):
    pipeline.open_lazy_h5ad(sim_file, gene_column="nope")


def test_float_values_bit_identical(tmp_path):
  """Non-integer values: size factors and gene means are summed exactly as in memory."""
  X = sp.random(300, 50, density=0.3, format="csr", dtype=np.float32, random_state=1)
  X.data *= np.float32(7.3)
  path = _write(_adata(X), tmp_path / "float.h5ad")
  eager = read_h5ad(path)
  for chunk in (7, 1000, 1 << 22):
    lazy = pipeline.open_lazy_h5ad(path, chunk_nnz=chunk)
    np.testing.assert_array_equal(lazy.size_factors, eager.size_factors)
    np.testing.assert_array_equal(anndata_io.gene_means(lazy), anndata_io.gene_means(eager))


def test_explicit_zeros_unsorted_indices_and_duplicates(tmp_path):
  m = sp.csr_matrix((np.array([3, 0, 1, 2, 5, 1], np.float32), np.array([2, 0, 1, 0, 0, 2]),
                     np.array([0, 3, 6])), shape=(2, 3))
  m.has_canonical_format = True  # written as is: unsorted, an explicit zero, a duplicate
  path = _write(_adata(m), tmp_path / "raw.h5ad")
  eager, lazy = read_h5ad(path), pipeline.open_lazy_h5ad(path)
  for rows in ([0, 1], [1, 0], [1]):
    a, b = lazy.X[np.array(rows)], eager.X[np.array(rows)]
    for f in ("indptr", "indices", "data"):
      np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  # a duplicate pair is one non-zero entry (the scan used to count it twice)
  np.testing.assert_array_equal(anndata_io.gene_nnz(lazy), anndata_io.gene_nnz(eager))
  np.testing.assert_array_equal(anndata_io.gene_nnz(lazy), [1, 1, 2])


def test_dataset_panels_and_dataset_stream_plan(tmp_path):
  data = simulate.simulate_cell_data(simulate.SimConfig(
      n_cells=120, n_genes=40, n_cell_types=2, n_modules=4, n_batches=1, n_datasets=2,
      panel_fraction=0.7, seed=1))
  path = _write(data.to_anndata(), tmp_path / "two.h5ad")
  eager, lazy = read_h5ad(path), pipeline.open_lazy_h5ad(path)
  assert lazy.dataset_names == eager.dataset_names and len(lazy.dataset_names) == 2
  np.testing.assert_array_equal(lazy.panel, eager.panel)
  np.testing.assert_array_equal(lazy.dataset_index, eager.dataset_index)
  c = tiny_config(**{"data.source": "h5ad", "data.files": (path,), "stages.plan": "dataset_stream"})
  eager_plan = experiment.build_plan(c, eager).to_json()
  c.data.lazy = True
  assert experiment.build_plan(c, experiment.load_data(c)).to_json() == eager_plan


# ------------------------------------------------------------------ validation

def _same_error(path, match, **kw):
  """Lazy and eager reading fail with the same message."""
  with pytest.raises(DataError, match=match) as lazy_err:
    pipeline.open_lazy_h5ad(path, **kw)
  with pytest.raises(DataError) as eager_err:
    read_h5ad(path, **kw)
  assert str(lazy_err.value) == str(eager_err.value)


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_bad_values_and_genes_raise_like_eager(tmp_path):
  x = np.array([[1, 0, 2], [0, 3, 1]], np.float32)
  nan, neg = x.copy(), x.copy()
  nan[1, 1] = np.nan
  neg[0, 2] = -2
  _same_error(_write(_adata(sp.csr_matrix(nan)), tmp_path / "nan.h5ad"),
              "has 1 NaN/inf values; clean or impute them")
  _same_error(_write(_adata(sp.csr_matrix(neg)), tmp_path / "neg.h5ad"),
              r"has 1 negative values \(min -2\).*not scaled data")
  dup = _adata(sp.csr_matrix(x), genes=["A", "B", "A"])
  _same_error(_write(dup, tmp_path / "dup.h5ad"),
              r"1 duplicate gene ids in var_names, e.g. \['A'\].*var_names_make_unique")


@pytest.mark.parametrize("fmt", ["dense", "csc"])
def test_non_csr_x_raises(tmp_path, fmt):
  x = np.array([[1, 0, 2], [0, 3, 1]], np.float32)
  path = _write(_adata(x if fmt == "dense" else sp.csc_matrix(x)), tmp_path / f"{fmt}.h5ad")
  with pytest.raises(DataError, match=r"not as a CSR matrix.*csr_matrix.*--config.data.lazy=False"):
    pipeline.open_lazy_h5ad(path)


def test_config_errors(sim_file, tmp_path):
  two = tiny_config(**{"data.source": "h5ad", "data.files": (sim_file, sim_file),
                       "data.lazy": True})
  with pytest.raises(DataError, match=r"names \[.*sim.h5ad'\] more than once; list every file once"):
    experiment.load_data(two)
  with pytest.raises(DataError, match=r"source='synthetic'.*--config.data.source=h5ad"):
    experiment.load_data(tiny_config(**{"data.lazy": True}))
  bad_col = _config(sim_file, "random", True)
  bad_col.stages.obs_column = "tissue"
  with pytest.raises(DataError, match=r"obs columns \['tissue'\] not found; available obs "
                                      r"columns: \['cell_type', 'batch', 'dataset'\]"):
    experiment.load_data(bad_col)
  with pytest.raises(DataError, match="h5ad file not found"):
    pipeline.open_lazy_h5ad(str(tmp_path / "missing.h5ad"))
  no_x = ad.AnnData(obs=pd.DataFrame(index=["c0", "c1"]), var=pd.DataFrame(index=["g0"]))
  no_x.layers["counts"] = sp.csr_matrix(np.ones((2, 1), np.float32))
  with pytest.raises(DataError, match=r"has no X; set `config.data.layer` to one of the layers "
                                      r"\['counts'\]"):
    pipeline.open_lazy_h5ad(_write(no_x, tmp_path / "nox.h5ad"))
  (tmp_path / "junk.h5ad").write_text("not hdf5")
  with pytest.raises(DataError, match="corrupt or not an AnnData"):
    pipeline.open_lazy_h5ad(str(tmp_path / "junk.h5ad"))


def test_lazy_crucial_top_genes_match(sim_file):
  """Plan 'crucial' ranks genes via downstream.top_genes, which needs only gene_nnz here."""
  eager, lazy = read_h5ad(sim_file), pipeline.open_lazy_h5ad(sim_file)
  ds = read_h5ad(sim_file, obs_columns=["cell_type"])
  assert downstream.top_genes(lazy, ds, 10, "log1p_cp10k") == \
      downstream.top_genes(eager, ds, 10, "log1p_cp10k")


def test_log2_cpm_values_are_converted_to_log1p_cp10k_lazily_and_in_memory(tmp_path):
  """A source stored as log2(1 + CPM) ('from_log2_cpm') enters the model in ln(1 + CP10k)
  units, the same read lazily or into memory; the other source normalisations are unchanged."""
  from gil_jax.canal import stream
  from gil_jax.data import batching
  cpm = np.array([[100.0, 0.0, 1e4], [0.0, 5e5, 1.0]], np.float32)
  stored = np.log2(1 + cpm).astype(np.float32)
  np.testing.assert_allclose(batching.normalise(stored[stored > 0], None, "from_log2_cpm"),
                             np.log1p(cpm[cpm > 0] / 100), rtol=1e-5)
  path = str(tmp_path / "log2cpm.h5ad")
  ad.AnnData(sp.csr_matrix(stored), var=pd.DataFrame(index=["a", "b", "c"]),
             obs=pd.DataFrame(index=["x", "y"])).write_h5ad(path)
  eager = stream.normalise_values(read_h5ad(path), "from_log2_cpm", "s")
  lazy = stream.normalise_values(pipeline.open_lazy_h5ad(path), "from_log2_cpm", "s")
  np.testing.assert_allclose(eager.X.toarray(), np.log1p(cpm / 100), rtol=1e-5)
  np.testing.assert_array_equal(lazy.X[np.arange(2)].toarray(), eager.X.toarray())
  with pytest.raises(DataError, match="from_log2_cpm"):
    stream.normalise_values(read_h5ad(path), "log2cpm", "s")
  counts = str(tmp_path / "counts.h5ad")  # counts named log2(1 + CPM) by mistake: refused
  ad.AnnData(sp.csr_matrix(np.array([[3, 0, 200], [0, 7, 1]], np.float32)),
             var=pd.DataFrame(index=["a", "b", "c"]), obs=pd.DataFrame(index=["x", "y"])
             ).write_h5ad(counts)
  for reader in (read_h5ad, pipeline.open_lazy_h5ad):
    with pytest.raises(DataError, match="expects log2.*integer counts.*'log1p_cp10k'"):
      stream.normalise_values(reader(counts), "from_log2_cpm", "s")


def test_auto_normalisation_recognises_log2_cpm_files():
  """'auto' (annotate, extend): counts -> log1p_cp10k, ln(1 + CP10k) values -> none, values above
  ln(1 + CP10k)'s ceiling that un-log as log2(1 + CPM) -> from_log2_cpm, others -> a clear error;
  the CLI offers every normalisation the batcher knows."""
  from gil_jax import cli
  from gil_jax.canal.annotate import QueryError, detect_normalisation
  from gil_jax.data import batching

  def data(x, counts=False):  # what detect_normalisation reads of a CellData
    return types.SimpleNamespace(X=sp.csr_matrix(np.asarray(x, np.float32)), is_counts=counts)
  cpm = np.array([[2e5, 0.0, 7e5], [0.0, 9e5, 1.0]])
  assert detect_normalisation(data([[3, 0, 1], [0, 2, 5]], counts=True), "q") == "log1p_cp10k"
  assert detect_normalisation(data(np.log1p(cpm / 100)), "q") == "none"
  assert detect_normalisation(data(np.log2(1 + cpm)), "q") == "from_log2_cpm"
  with pytest.raises(QueryError, match="they fit no usual log scale"):
    detect_normalisation(data(np.log2(1 + cpm * 3)), "q")
  # log2(1 + CP10k), ln(1 + CPM) and deeper ln(1 + x) (e.g. normalize_total to a median of
  # millions) also exceed 9.21 but fit several scales: not converted, the user says which
  with pytest.raises(QueryError, match=r"fit log2\(1 \+ CPM\) and log2\(1 \+ CP10k\)"):
    detect_normalisation(data(np.log2(1 + cpm / 100)), "q")
  for total in (1e6, 5e6):
    with pytest.raises(QueryError, match=r"fit log2\(1 \+ CPM\) and ln\(1 \+ x\)"):
      detect_normalisation(data(np.log1p(cpm / cpm.sum(1, keepdims=True) * total)), "q")
  with pytest.raises(QueryError, match="neither integer counts"):
    detect_normalisation(data(cpm), "q")
  assert cli.NORMALISATIONS == batching.NORMALISATIONS
