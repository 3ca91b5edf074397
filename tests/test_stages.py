"""Tests for gil_jax.data.stages."""

import json

import numpy as np
import pytest

from gil_jax.data.anndata_io import DataError
from gil_jax.data.simulate import SimConfig, simulate_cell_data
from gil_jax.data.stages import (Stage, StagePlan, dataset_stream_plan, eval_columns,
                                 explicit_plan, random_gene_plan, stage_columns, validation_plan)
from gil_jax.data.vocab import GeneVocab


@pytest.fixture(scope="module")
def data():
  return simulate_cell_data(SimConfig(n_cells=800, n_genes=120, n_modules=6, n_batches=3, seed=1))


def test_random_plan_protocol(data):
  plan = random_gene_plan(data, n_stages=3, base_fraction=0.5, eval_fraction=0.1, seed=0)
  plan.check(data)
  base, *inc = plan.stages
  assert [s.name for s in plan.stages] == ["base", "stage1", "stage2", "stage3"]
  B = set(base.train_genes)
  assert len(B) == 60 and base.eval_genes == base.train_genes == base.new_genes
  Ts = [set(s.new_genes) for s in inc]
  assert sum(len(t) for t in Ts) == 60 and set().union(*Ts).isdisjoint(B)
  for i, s in enumerate(inc):
    assert set(s.train_genes) == B | Ts[i] and set(s.eval_genes) == Ts[i]
    for j, t in enumerate(Ts):
      if j != i:
        assert set(s.train_genes).isdisjoint(t)  # earlier (and later) T's not visible
  for i, t in enumerate(Ts):
    for t2 in Ts[i + 1:]:
      assert t.isdisjoint(t2)
  train = np.concatenate([s.train_cells for s in plan.stages])
  assert len(np.unique(train)) == len(train)
  assert np.intersect1d(train, plan.eval_cells).size == 0
  assert len(plan.eval_cells) == 80 and len(train) == 720
  assert len(base.train_cells) == 360 and [len(s.train_cells) for s in inc] == [120, 120, 120]


def test_validation_plan_never_touches_the_test_cells(data):
  plan = random_gene_plan(data, n_stages=2, base_fraction=0.5, eval_fraction=0.1, seed=0)
  val = validation_plan(plan, 0.1, seed=0)
  val.check(data)
  train = np.concatenate([s.train_cells for s in val.stages])
  assert np.intersect1d(plan.eval_cells, train).size == 0  # test cells: neither trained on
  assert np.intersect1d(plan.eval_cells, val.eval_cells).size == 0  # nor evaluated on
  assert np.intersect1d(val.eval_cells, train).size == 0
  for before, after in zip(plan.stages, val.stages):  # each stage gives ~10 % of its cells
    held = np.intersect1d(before.train_cells, val.eval_cells)
    assert len(held) == round(0.1 * len(before.train_cells))
    np.testing.assert_array_equal(np.sort(np.concatenate([after.train_cells, held])),
                                  np.sort(before.train_cells))
    assert after.train_genes == before.train_genes
  np.testing.assert_array_equal(validation_plan(plan, 0.1, seed=0).eval_cells, val.eval_cells)
  with pytest.raises(DataError, match="config.stages.validation"):
    validation_plan(plan, 0.0, seed=0)


def test_plan_deterministic_and_seeded(data):
  a = random_gene_plan(data, 2, seed=5).to_json()
  assert a == random_gene_plan(data, 2, seed=5).to_json()
  assert a != random_gene_plan(data, 2, seed=6).to_json()


def test_json_round_trip(data):
  plan = random_gene_plan(data, 2, base_stage=False, cell_ratios=[0.3, 0.7])
  d = json.loads(json.dumps(plan.to_json()))
  back = StagePlan.from_json(d)
  assert back.to_json() == plan.to_json()
  assert back.stages[0].train_cells.dtype.kind == "i"
  # without a base stage, the first stage introduces B and T_1
  s1 = plan.stages[0]
  assert set(s1.new_genes) == set(s1.train_genes) and len(s1.eval_genes) < len(s1.train_genes)


def test_empty_stage_raises(data):
  plan = random_gene_plan(data, 2)
  plan.stages[1].train_cells = np.zeros(0, np.int64)
  with pytest.raises(DataError, match="stage 'stage1'.*0 training cells"):
    plan.check(data)
  with pytest.raises(DataError, match="stage 'x'.*no training genes"):
    StagePlan([Stage("x", [], [], [], np.arange(3))], np.arange(0)).check(data)
  with pytest.raises(DataError, match="stage 'y'.*not in data"):
    StagePlan([Stage("y", ["nope"], [], [], np.arange(3))], np.arange(0)).check(data)


def test_explicit_plan_and_obs_partition(data):
  g = list(data.gene_ids)
  plan = explicit_plan(data, [g[10:20], g[20:25]], g[:10], stage_names=["a", "b"],
                       obs_partition=("batch", ["batch0", "batch1", "batch2"]), eval_fraction=0.2)
  plan.check(data)
  batch = data.obs["batch"].astype(str).to_numpy()
  for s, v in zip(plan.stages, ["batch0", "batch1", "batch2"]):
    assert set(batch[s.train_cells]) == {v}
  assert plan.stages[2].eval_genes == g[20:25]
  with pytest.raises(DataError, match="disjoint"):
    explicit_plan(data, [g[10:20], g[15:25]], g[:10])
  with pytest.raises(DataError, match="stage 'stage1'.*not in data"):
    explicit_plan(data, [["nope"]], g[:10])
  with pytest.raises(DataError, match="one value"):
    explicit_plan(data, [g[10:20]], g[:10], obs_partition={"column": "batch"})


def test_dataset_stream_plan():
  d = simulate_cell_data(SimConfig(n_cells=600, n_genes=100, n_modules=5, n_datasets=3,
                                   panel_fraction=0.5, seed=2))
  plan = dataset_stream_plan(d, order=["sim2", "sim0", "sim1"], eval_fraction=0.2)
  plan.check(d)
  seen = set()
  for s in plan.stages:
    di = d.dataset_names.index(s.name)
    assert set(s.train_genes) == set(d.gene_ids[d.panel[di]])
    assert set(s.new_genes) == set(s.train_genes) - seen and s.eval_genes == s.new_genes
    seen |= set(s.train_genes)
    assert np.all(d.dataset_index[s.train_cells] == di)
    assert np.any(d.dataset_index[plan.eval_cells] == di)
  with pytest.raises(DataError, match="available"):
    dataset_stream_plan(d, order=["zzz"])


def test_stage_columns(data):
  plan = random_gene_plan(data, 2)
  vocab = GeneVocab(capacity=200)
  with pytest.raises(DataError, match="vocab.activate"):
    stage_columns(data, vocab, plan.stages[0])
  for i, s in enumerate(plan.stages):
    vocab.activate(s.new_genes, i)
  s = plan.stages[1]
  cols = stage_columns(data, vocab, s)
  assert cols.dtype == np.int32 and cols.shape == (data.n_genes,)
  keep = np.isin(data.gene_ids, s.train_genes)
  assert np.all(cols[~keep] == 0) and np.all(cols[keep] > 0)
  np.testing.assert_array_equal(cols[keep], vocab.rows(list(data.gene_ids[keep])))
  ev = eval_columns(data, vocab, plan.stages[2].eval_genes)
  assert set(data.gene_ids[ev > 0]) == set(plan.stages[2].eval_genes)


def test_cells_outside_every_stage_are_reported(caplog):
  """Cells whose split value is missing (NaN) or not listed are not trained on, and a warning
  says how many."""
  import logging
  from gil_jax.data import stages
  data = simulate_cell_data(SimConfig(n_cells=300, n_genes=40, n_modules=4, n_batches=3))
  data.obs["batch"] = data.obs["batch"].astype(object)
  data.obs.iloc[:10, data.obs.columns.get_loc("batch")] = np.nan
  with caplog.at_level(logging.WARNING):
    stages.random_gene_plan(data, n_stages=2, base_fraction=0.5, eval_fraction=0.1, seed=0,
                            base_stage=False,
                            obs_partition=stages.ObsPartition("batch", ["batch0", "batch1"]))
  msg = " ".join(r.getMessage() for r in caplog.records)
  assert "match no stage's values" in msg and "have a missing value" in msg
