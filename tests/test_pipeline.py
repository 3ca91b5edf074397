"""Lazy .h5ad reader and sharded batches (no shared data needed)."""

import numpy as np
import pytest

from gil_jax.data import batching, pipeline, simulate
from gil_jax.data.anndata_io import read_h5ad


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
  data = simulate.simulate_cell_data(simulate.SimConfig(n_cells=120, n_genes=40, n_cell_types=3,
                                                        n_modules=4, n_batches=1, seed=3))
  path = str(tmp_path_factory.mktemp("d") / "sim.h5ad")
  data.to_anndata().write_h5ad(path)
  return path


def test_lazy_rows_match_eager(h5ad):
  eager = read_h5ad(h5ad)
  lazy = pipeline.open_lazy_h5ad(h5ad)
  rows = np.array([5, 0, 77, 5, 119])
  np.testing.assert_array_equal(lazy.X[rows].toarray(), eager.X[rows].toarray())
  np.testing.assert_allclose(lazy.size_factors, eager.size_factors, rtol=1e-6)
  spec = batching.BatchSpec(batch_size=8, n_tokens=16)
  c2r = np.arange(1, 41, dtype=np.int32)
  cells = np.arange(120)
  a = list(batching.stage_batches(eager, cells, c2r, spec, 0, 0, 0, 3))
  b = list(batching.stage_batches(lazy, cells, c2r, spec, 0, 0, 0, 3))
  for (_, x), (_, y) in zip(a, b):
    np.testing.assert_array_equal(x.gene_ids, y.gene_ids)
    np.testing.assert_array_equal(x.values, y.values)


def test_shards_partition_the_global_batch(h5ad):
  lazy = pipeline.open_lazy_h5ad(h5ad)
  spec = batching.BatchSpec(batch_size=8, n_tokens=16)
  c2r = np.arange(1, 41, dtype=np.int32)
  cells = np.arange(120)
  s0 = list(batching.stage_batches(lazy, cells, c2r, spec, 0, 0, 4, 2, shard=0, n_shards=2))
  s1 = list(batching.stage_batches(lazy, cells, c2r, spec, 0, 0, 4, 2, shard=1, n_shards=2))
  order = batching.epoch_order(cells, 0, 0, 0)
  for (st, x), (_, y) in zip(s0, s1):
    assert x.gene_ids.shape == (4, 16)
    glob = order[st * 8:(st + 1) * 8]
    # the two shards' cells are the two halves of the global chunk (size factors identify them)
    np.testing.assert_allclose(np.concatenate([x.size_factors, y.size_factors]),
                               lazy.size_factors[glob])
