"""Tests for gil_jax.data.simulate."""

import time

import numpy as np

from gil_jax.data import simulate as simulate_mod
from gil_jax.data.simulate import SimConfig, gene_modules, simulate, simulate_cell_data

SMALL = SimConfig(n_cells=1500, n_genes=200, n_modules=10, seed=3)


def test_deterministic_and_seed_dependent():
  a, b = simulate_cell_data(SMALL), simulate_cell_data(SMALL)
  assert (a.X != b.X).nnz == 0
  c = simulate_cell_data(SimConfig(**{**SMALL.__dict__, "seed": 4}))
  assert c.X.shape != a.X.shape or (a.X != c.X).nnz > 0


def test_anndata_format():
  cfg = SimConfig(n_cells=600, n_genes=100, n_modules=5, n_datasets=3, panel_fraction=0.6)
  ads = simulate(cfg)
  assert len(ads) == 3
  for a in ads:
    assert a.n_vars == 60 and a.var_names[0].startswith("G")
    assert {"cell_type", "batch", "dataset"} <= set(a.obs.columns)
    x = a.X.data
    assert a.X.dtype == np.float32 and np.all(x == np.round(x)) and x.min() >= 0
  assert len({tuple(a.var_names) for a in ads}) == 3  # own panels
  d = simulate_cell_data(cfg)
  assert d.panel.shape == (3, d.n_genes) and d.panel.sum(1).tolist() == [60, 60, 60]
  assert d.is_counts


def test_sparsity_and_module_covariation():
  d = simulate_cell_data(SMALL)
  X = d.X.toarray()
  zeros = (X == 0).mean()
  assert 0.6 <= zeros <= 0.9, zeros
  L = np.log1p(X / d.size_factors[:, None])
  C = np.corrcoef(L.T)
  mod = gene_modules(SMALL)
  same = mod[:, None] == mod[None, :]
  np.fill_diagonal(same, False)
  other = ~(mod[:, None] == mod[None, :])
  within, between = np.nanmean(C[same]), np.nanmean(C[other])
  assert within > between + 0.05, (within, between)


def test_fast():
  t = time.perf_counter()
  simulate_cell_data(SimConfig(n_cells=6000, n_genes=600))
  assert time.perf_counter() - t < 2.0


def test_true_means_are_the_means_of_the_simulated_counts():
  cfg = SimConfig(n_cells=400, n_genes=50, n_modules=5, seed=2)
  mu = simulate_mod.true_means(cfg)
  counts = simulate_mod._counts(cfg)[0]
  assert mu.shape == counts.shape and (mu > 0).all()
  # per gene, the average count matches the average mean (NB noise averages out over cells)
  np.testing.assert_allclose(counts.mean(0), mu.mean(0), rtol=0.25, atol=0.05)
  assert np.corrcoef(np.log1p(counts).ravel(), np.log1p(mu).ravel())[0, 1] > 0.5
