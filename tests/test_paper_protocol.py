"""The GIL paper protocol: crucial-gene plans, gene-based classification, bad downstream input."""

import json

import jax
import numpy as np
import pytest

from gil_jax import experiment
from gil_jax.data import batching, downstream, stages
from gil_jax.data.anndata_io import DataError
from gil_jax.data.simulate import SimConfig, simulate_cell_data
from gil_jax.eval import probe
from gil_jax.tasks import gil
from tests.helpers import tiny_config


def _ranked(n: int, placed: dict[str, int], tag: str) -> list[str]:
  """A top-n list with the genes of `placed` at the given ranks, fillers unique to `tag`."""
  out = [f"{tag}_{i}" for i in range(n)]
  for g, r in placed.items():
    out[r] = g
  return out


def test_dedup_rules_on_constructed_ranks():
  l0 = _ranked(150, {"a": 5, "b": 3, "c": 60, "d": 120, "e": 121, "f": 50, "g": 25}, "x")
  l1 = _ranked(150, {"a": 10, "b": 50, "c": 30, "d": 130, "e": 40, "g": 101}, "y")
  l2 = _ranked(150, {"f": 10, "g": 19}, "z")
  out = stages.dedup_crucial([l0, l1, l2], keep_rank1=20, keep_rank2=100)
  where = {g: [i for i, lst in enumerate(out) if g in lst] for g in "abcdefg"}
  assert where["a"] == []       # rank < 20 in two lists: removed everywhere
  assert where["b"] == [0]      # rank < 20 in exactly one list: kept only there
  assert where["c"] == [0]      # min rank in [20, 100]: first list with a rank in [20, 100]
  assert where["d"] == []       # min rank > 100: removed everywhere
  assert where["e"] == [1]      # first list *with a rank in [20, 100]*, not the first list
  assert where["f"] == [2]      # three lists, rank < 20 only in list 2
  assert where["g"] == [2]      # 19 < 20 in one list wins over 25 in an earlier list
  for lst, orig in zip(out, (l0, l1, l2)):   # unique genes stay, rank order kept
    assert lst == [g for g in orig if g in lst]
    assert all(g in lst for g in orig if "_" in g)
  # thresholds are configurable: with keep_rank2=130, 'd' (min rank 120) goes to the first list
  out = stages.dedup_crucial([l0, l1, l2], keep_rank1=20, keep_rank2=130)
  assert "d" in out[0] and "d" not in out[1]
  with pytest.raises(DataError, match="keep_rank1"):
    stages.dedup_crucial([l0], keep_rank1=50, keep_rank2=10)


@pytest.fixture(scope="module")
def sim():
  return simulate_cell_data(SimConfig(n_cells=600, n_genes=120, n_cell_types=4, n_modules=8,
                                      seed=3))


def test_top_genes_and_crucial_plan(sim):
  ds = sim.subset(np.arange(200))
  ds = ds.__class__(**{**ds.__dict__, "name": "down"})
  top = downstream.top_genes(sim, ds, 20, "log1p")
  score = downstream.cumulative_expression(ds, "log1p")
  expected = list(ds.gene_ids[np.lexsort((ds.gene_ids, -score))][:20])
  assert top == expected and len(set(top)) == 20
  plan = stages.crucial_gene_plan(sim, [top, downstream.top_genes(sim, ds, 30, "none")],
                                  ["d1", "d2"], eval_fraction=0.1, seed=0)
  plan.check(sim)
  base, s1, s2 = plan.stages
  assert [s.name for s in plan.stages] == ["base", "d1", "d2"]
  crucial = set(s1.eval_genes) | set(s2.eval_genes)
  assert set(s1.eval_genes).isdisjoint(s2.eval_genes)
  assert set(base.train_genes) == set(sim.gene_ids) - crucial
  assert set(s1.train_genes) == set(base.train_genes) | set(s1.eval_genes)
  assert set(s2.train_genes).isdisjoint(s1.eval_genes)
  n_pool = sim.n_cells - len(plan.eval_cells)
  assert len(base.train_cells) == n_pool // 2
  assert abs(len(s1.train_cells) - len(s2.train_cells)) <= 1
  # two identical rankings: every shared top-20 gene is removed from both -> an empty stage
  with pytest.raises(DataError, match="'d1'.*removed by the cross-dataset de-duplication"):
    stages.crucial_gene_plan(sim, [top, top], ["d1", "d2"])


def test_probe_separates_synthetic_embeddings():
  rng = np.random.default_rng(0)
  n, e, c = 300, 16, 3
  labels = rng.integers(0, c, n).astype(np.int32)
  centers = rng.normal(0, 3.0, (c, e))
  feats = centers[labels] + rng.normal(0, 1.0, (n, e))
  cfg = probe.ProbeConfig(trials=2, epochs=20, eval_every=5)
  r = probe.evaluate_probe(feats, labels, c, "blobs", cfg)
  assert r["paper"] > 95 and r["honest"] > 90
  assert len(r["paper_trials"]) == 2 and r["paper"] >= r["honest"] - 1e-9
  # random labels: near chance, and the paper's max-over-test number is biased upwards
  shuffled = rng.permutation(labels)
  r = probe.evaluate_probe(feats, shuffled, c, "blobs", cfg)
  assert r["honest"] < 55
  a = probe.trial_splits(n, "blobs", 0, cfg)
  b = probe.trial_splits(n, "blobs", 0, cfg)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert sum(len(x) for x in a) == n and len(a[2]) == 90
  with pytest.raises(DataError, match="multiple"):
    probe.ProbeConfig(epochs=12, eval_every=5)


def test_probe_standardize_option():
  # post-LN-like features: a large shared offset, class signal of spread 0.05 -> the paper's
  # probe (Adam 5e-3, few epochs) stays near chance, the standardised one separates the classes
  rng = np.random.default_rng(1)
  n, e, c = 300, 16, 3
  labels = rng.integers(0, c, n).astype(np.int32)
  feats = 0.8 + 0.05 * (rng.normal(0, 3.0, (c, e))[labels] + rng.normal(0, 1.0, (n, e)))
  cfg = probe.ProbeConfig(trials=1, epochs=10, eval_every=5)
  raw = probe.evaluate_probe(feats, labels, c, "offset", cfg)
  std = probe.evaluate_probe(feats, labels, c, "offset",
                             probe.ProbeConfig(trials=1, epochs=10, eval_every=5, standardize=True))
  assert std["honest"] > 90 and std["honest"] > raw["honest"] + 20
  with pytest.raises(DataError, match="embed_tokens"):
    probe.ProbeConfig(embed_tokens=-1)


def test_classification_forgetting():
  m = [[50.0, 60.0], [80.0, 61.0], [75.0, 90.0]]
  f = probe.classification_forgetting(m, [1, 2])
  assert f["per_dataset"] == [-5.0, None] and f["average"] == -5.0


def _write_downstream(sim, tmp_path, name, cells, label_column="cell_type", genes=None,
                      rename=None):
  d = sim.subset(cells)
  adata = d.to_anndata()
  if genes is not None:
    adata = adata[:, genes].copy()
  if rename is not None:
    adata.var_names = [rename + g for g in adata.var_names]
  del adata.varm["gil_panel"], adata.uns["gil_dataset_names"]
  adata.obs = adata.obs[[label_column]] if label_column in adata.obs else adata.obs
  adata.write_h5ad(tmp_path / f"{name}.h5ad")


def _protocol_config(tmp_path, model="transformer", **kw):
  c = tiny_config(model, **kw)
  c.data.data_dir = str(tmp_path)
  c.downstream.datasets = ("dA:cell_type", "dB:cell_type")
  c.stages.plan = "crucial"
  c.stages.top_k = 12
  c.batch.normalisation = "log1p"
  c.eval.probe.update(trials=2, epochs=10, eval_every=5)
  return c


@pytest.fixture(scope="module")
def down_dir(tmp_path_factory):
  d = simulate_cell_data(tiny_config().data.sim and SimConfig(
      **tiny_config().data.sim.to_dict()))
  tmp = tmp_path_factory.mktemp("down")
  _write_downstream(d, tmp, "dA", np.arange(0, 160))
  _write_downstream(d, tmp, "dB", np.arange(160, 320), genes=list(d.gene_ids[::2]))
  return tmp, d


def test_classification_block_end_to_end(down_dir, tmp_path):
  tmp, _ = down_dir
  c = _protocol_config(tmp, **{"eval.stage_evaluators": ("gene_classification",),
                               "train.steps_per_stage": 3})
  results = gil.train_and_evaluate(c, str(tmp_path / "run"), progress_bar=False)
  block = results["gene_classification"]
  n = len(results["stages"])
  assert n == 3 and block["datasets"] == ["dA", "dB"]
  assert block["stage_names"] == ["base", "dA", "dB"] and block["learned_at"] == [1, 2]
  for key in ("matrix", "std", "matrix_honest", "std_honest", "baseline_logistic_regression",
              "std_logistic_regression"):
    assert np.array(block[key], float).shape == (n, 2)
    assert all(0 <= v <= 100 for row in block[key] for v in row)
  lr = np.array(block["baseline_logistic_regression"])
  assert lr.min() > 40, lr  # 4 simulated cell types: chance is 25 %
  assert len(block["forgetting"]["per_dataset"]) == 2
  assert block["forgetting"]["per_dataset"][1] is None
  assert block["forgetting"]["average"] == pytest.approx(block["matrix"][2][0]
                                                         - block["matrix"][1][0])
  on_disk = json.load(open(tmp_path / "run" / "results.json"))
  assert on_disk["gene_classification"]["matrix"] == block["matrix"]
  report = open(tmp_path / "run" / "report.md").read()
  assert report.count(probe.SECTION_TITLE) == 1 and "honest" in report
  assert "baseline: logistic regression" in report


def test_transformer_eight_devices_match_one(down_dir):
  tmp, _ = down_dir
  assert jax.device_count() == 8
  losses = {}
  for n in (1, 8):
    c = _protocol_config(tmp, **{"mesh.data": n, "mesh.model": 1, "model.use_mvc": True})
    data = experiment.load_data(c)
    plan = experiment.build_plan(c, data)
    runner = gil.Runner(c, data, plan)
    vocab = experiment.stage_vocab(plan, runner.capacity, 1)
    cols = stages.stage_columns(data, vocab, plan.stages[1])
    state = runner.set_active(runner.initial_state(), vocab.active_mask(1))
    out = []
    for _, b in batching.stage_batches(data, plan.stages[1].train_cells, cols, runner.spec, 0, 1,
                                       0, 3):
      state, metrics = runner.train_step(state, runner.put({"main": b}, runner.inputs_sharding))
      out.append(float(metrics["loss"]))
    losses[n] = out
  assert np.all(np.isfinite(losses[1]))
  np.testing.assert_allclose(losses[1], losses[8], rtol=1e-4)


def test_bad_downstream_inputs(down_dir):
  tmp, d = down_dir
  data = simulate_cell_data(SimConfig(**tiny_config().data.sim.to_dict()))
  _write_downstream(d, tmp, "nolabel", np.arange(100), label_column="batch")
  one = d.subset(np.flatnonzero(d.obs["cell_type"].astype(str).to_numpy() == "type0"))
  _write_downstream(one, tmp, "oneclass", np.arange(min(60, one.n_cells)))
  _write_downstream(d, tmp, "disjoint", np.arange(100), rename="Z_")
  cases = {
      ("dA:cell_type", "nolabel:cell_type"): r"'nolabel' has no label column 'cell_type'.*"
                                             r"config.downstream.datasets",
      ("dA:cell_type", "oneclass:cell_type"): r"'oneclass'.*'cell_type' has only 1 class.*"
                                              r"config.downstream.datasets",
      ("dA:cell_type", "disjoint:cell_type"): r"'disjoint' shares no gene.*disjoint gene panels",
  }
  for spec, msg in cases.items():
    c = _protocol_config(tmp)
    c.downstream.datasets = spec
    with pytest.raises(DataError, match=msg):
      experiment.build_plan(c, data)
  c = _protocol_config(tmp)
  c.stages.top_k = 61   # dB measures 48 of the 96 genes
  with pytest.raises(DataError, match=r"top_k=61 is larger than the \d+ genes downstream "
                                      r"dataset 'dB'.*config.stages.top_k"):
    experiment.build_plan(c, data)
  c = _protocol_config(tmp)
  c.data.data_dir = str(tmp / "missing")
  with pytest.raises(DataError, match="does not exist.*--config.data.data_dir"):
    experiment.build_plan(c, data)
  c = _protocol_config(tmp)
  c.stages.order = ("dB", "zz")
  with pytest.raises(DataError, match=r"config.stages.order names \['zz'\]"):
    experiment.build_plan(c, data)
