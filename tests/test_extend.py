"""Extending a finished run with new datasets (`gil-jax extend`, `gil_jax.tasks.extend`)."""

import json
import os

import numpy as np
import pytest

import gil_jax
from gil_jax import cli, tasks
from gil_jax.canal.labels import LabelVocab
from gil_jax.data.vocab import GeneVocab
from gil_jax.tasks import annotation
from tests.helpers import sim_h5ad, tiny_canal_config, tiny_config


@pytest.fixture(scope="module")
def canal_files(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("extend")
  old, _ = sim_h5ad(tmp, "old.h5ad", n_genes=80)
  # the new dataset: a fifth cell type and 16 genes the run has never seen; its name sorts
  # before the run's source ('sim'), and it shares the run's cell names: its cells must still
  # be stacked after the run's, which keep their indices
  new, _ = sim_h5ad(tmp, "a_new.h5ad", n_genes=96, n_cell_types=5, seed=7)
  return tmp, old, new


def _meta(workdir):
  from gil_jax import checkpoint
  ck = checkpoint.Checkpointer(workdir)
  try:
    return ck.latest_meta()[1]
  finally:
    ck.close()


def test_extended_annotation_run_equals_training_the_longer_stream(canal_files):
  """Extending a 2-stage run with a third dataset gives exactly the results of training the
  3-stage stream in one go: the extension forgets nothing an ordinary stage boundary does not."""
  tmp, old, new = canal_files
  short = str(tmp / "short")
  before = annotation.train_annotation(tiny_canal_config(old), short)
  meta_before = _meta(short)
  results = tasks.extend(short, [new], progress_bar=False)

  c = tiny_canal_config(old)
  c.canal.sources.a_new = dict(file=new, label_column="cell_type",
                               normalisation="log1p_cp10k", layer="", gene_column="",
                               split_column="", split_values=())
  c.canal.stage_order = ("sim:batch0", "sim:batch1", "a_new")
  c.canal.source_order = ("sim", "a_new")
  full = annotation.train_annotation(c, str(tmp / "full"))

  acc = results["accuracy_matrix"]
  assert len(acc) == 3 and all(len(r) == 3 for r in acc)
  assert acc[:2] == [r + [None] for r in before["accuracy_matrix"]]  # the run's rows kept
  np.testing.assert_allclose(np.asarray(acc, float), np.asarray(full["accuracy_matrix"], float),
                             atol=1e-6)
  assert results["extensions"] == [{"first_stage": 2, "stages": ["a_new"]}]
  assert results["stages"][-1]["n_bank_cells"] > 0  # the example bank carried on
  meta = _meta(short)
  old_genes = GeneVocab.from_json(meta_before["vocab"]).gene_ids
  genes = GeneVocab.from_json(meta["vocab"]).gene_ids
  assert genes[:len(old_genes)] == old_genes and len(genes) == len(old_genes) + 16
  classes = LabelVocab.from_json(meta["label_vocab"]).names
  assert classes[:4] == LabelVocab.from_json(meta_before["label_vocab"]).names
  assert "type4" in classes
  assert results["compilations"]["train_step"] == 1

  # rerunning the same extension resumes / returns the finished run; nothing is appended twice
  again = tasks.extend(short, [new], progress_bar=False)
  assert again["accuracy_matrix"] == acc and len(again["extensions"]) == 1

  # the extended model annotates the new type
  model = gil_jax.load(short)
  assert "type4" in model.classes and model.info()["datasets"][-1] == "a_new"
  # a CANAL-rule run saved its constants from validation cells: by default a cell's label and
  # novelty flag do not depend on the other cells of the query
  import anndata as ad
  query = ad.read_h5ad(new)
  whole = model.annotate(query, majority_voting=True)
  alone = model.annotate(query[:100].copy())
  assert whole.uns["gil"]["novelty_rule"] == "canal_fixed"
  for col in ("gil_cell_type", "gil_novel", "gil_confidence"):
    np.testing.assert_array_equal(alone.obs[col].to_numpy(), whole.obs[col].to_numpy()[:100])
  # majority voting: one label per over-cluster, beside (not instead of) the cell's own label
  voted = whole.obs.groupby("gil_over_clustering", observed=True)["gil_majority_voting"]
  assert (voted.nunique() == 1).all() and whole.obs["gil_over_clustering"].nunique() > 1
  assert set(whole.obs["gil_majority_voting"]) <= set(whole.obs["gil_cell_type"])


def test_extend_errors_before_training(canal_files, tmp_path, capsys):
  tmp, old, new = canal_files
  workdir = str(tmp_path / "run")
  annotation.train_annotation(tiny_canal_config(old, method="joint"), workdir)
  with pytest.raises(ValueError, match="joint"):
    tasks.extend(workdir, [new], progress_bar=False)
  missing_labels = str(tmp_path / "run2")
  annotation.train_annotation(tiny_canal_config(old), missing_labels)
  code = cli.main(["extend", "--workdir", missing_labels, "--data", new, "--label-key", "nope",
                   "--quiet"])
  assert code == 2 and "no obs column 'nope'" in capsys.readouterr().err
  code = cli.main(["extend", "--workdir", missing_labels, "--data", new,
                   "--config.model.d_model=8", "--quiet"])
  err = capsys.readouterr().err
  assert code == 2 and "model.d_model" in err and "extension may change only" in err
  import anndata as ad
  other = ad.read_h5ad(new)
  other.var_names = [f"ENSG{i:011d}" for i in range(other.n_vars)]  # another kind of gene id
  other_path = str(tmp_path / "ensembl.h5ad")
  other.write_h5ad(other_path)
  code = cli.main(["extend", "--workdir", missing_labels, "--data", other_path, "--quiet"])
  assert code == 2 and "0 of its 96 genes are in the run's" in capsys.readouterr().err
  code = cli.main(["extend", "--workdir", str(tmp_path / "nothing"), "--data", new])
  assert code == 2 and "no checkpoints" in capsys.readouterr().err


def test_extended_gil_run_gains_a_stage_and_grows_the_gene_table(tmp_path, capsys):
  old, _ = sim_h5ad(tmp_path, "a.h5ad", n_genes=64)
  new, _ = sim_h5ad(tmp_path, "b.h5ad", n_genes=80, seed=3)
  # 64 genes fill a 72-row table: the 16 new genes grow it (gil_jax/surgery.py) to 256 rows
  c = tiny_config(**{"data.source": "h5ad", "data.files": (old,), "stages.n_stages": 1,
                     "stages.base_stage": True, "mesh.data": 1, "genes.capacity": 72})
  workdir = str(tmp_path / "gil")
  before = gil_jax.train(c, workdir, progress_bar=False)
  n = len(before["gene_regression"]["matrix"])
  assert cli.main(["extend", "--workdir", workdir, "--data", new, "--quiet",
                   "--config.stages.validation=True"]) != 0  # refused, nothing trained
  assert "stages.validation: False -> True" in capsys.readouterr().err
  # through the command line, with a training override for the new stage
  assert cli.main(["extend", "--workdir", workdir, "--data", new, "--quiet",
                   "--config.train.steps_per_stage=4"]) == 0
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  reg = results["gene_regression"]
  assert len(reg["matrix"]) == n + 1 and all(len(r) == n + 1 for r in reg["matrix"])
  assert reg["matrix"][:n] == [r + [None] for r in before["gene_regression"]["matrix"]]
  assert reg["matrix"][n][n] is not None and reg["stage_names"][-1] == "b"
  assert reg["baselines"]["gene_cell_offset"][n][n] is not None
  assert results["stages"][-1]["n_new_genes"] == 16 and results["stages"][-1]["steps"] == 4
  assert results["compilations"]["train_step"] == 1
  assert len(results["forgetting"]["per_stage"]) == n + 1
  assert results["extensions"] == [{"first_stage": n, "stages": ["b"]}]
  assert gil_jax.load(workdir).info()["gene_capacity"] == 256


def test_a_checkpoint_of_another_layout_is_refused_not_moved_aside(tmp_path):
  """Restoring a checkpoint whose arrays differ from the state this code builds (another
  version or config) is an error that names the arrays; the checkpoint is not taken for damaged
  and stays where it is."""
  import jax.numpy as jnp
  from gil_jax import checkpoint
  ck = checkpoint.Checkpointer(str(tmp_path))
  ck.save(1, {"params": {"w": jnp.ones(3)}, "extras": {"bank": jnp.zeros(2)}}, {})
  with pytest.raises(checkpoint.CheckpointLayoutError, match="extras/bank"):
    ck.restore_good(checkpoint.abstract_like(
        {"params": {"w": jnp.ones(3)}, "transforms": {"example_bank": jnp.zeros(2)}}))
  assert ck.latest_step() == 1
  assert not os.path.exists(tmp_path / "checkpoints.damaged")
  ck.close()
