"""End-to-end behaviour of the train step and the stage loop on tiny synthetic experiments."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gil_jax import checkpoint, experiment
from gil_jax.data import batching, stages
from gil_jax.data.vocab import VocabularyError
from gil_jax.models.common import is_gene_param
from gil_jax.tasks import gil
from gil_jax.core.state import _path_names
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runner(config):
  data = experiment.load_data(config)
  plan = experiment.build_plan(config, data)
  return gil.Runner(config, data, plan), data, plan


def _stage_inputs(runner, data, plan, k, n):
  vocab = experiment.stage_vocab(plan, runner.capacity, k)
  cols = stages.stage_columns(data, vocab, plan.stages[k])
  batches = [b for _, b in batching.stage_batches(data, plan.stages[k].train_cells, cols,
                                                  runner.spec, 0, k, 0, n)]
  return vocab, [runner.put({"main": b}, runner.inputs_sharding) for b in batches]


def _gene_leaves(params):
  return {_path_names(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)
          if is_gene_param(_path_names(p))}


@pytest.mark.parametrize("model", ["exceiver", "transformer"])
def test_inactive_gene_rows_never_change(model):
  config = tiny_config(model, **{"train.weight_decay": 0.1, "train.optimizer": "adamw"})
  runner, data, plan = _runner(config)
  vocab, inputs = _stage_inputs(runner, data, plan, 0, 3)
  active = vocab.active_mask(0)
  assert 0 < active.sum() < runner.capacity - 1
  state = runner.set_active(runner.initial_state(), active)
  before = jax.device_get(_gene_leaves(state.params))
  for x in inputs:
    state, metrics = runner.train_step(state, x)
  after = jax.device_get(_gene_leaves(state.params))
  assert before, "model has no gene-table parameters"
  for path in before:
    np.testing.assert_array_equal(after[path][~active], before[path][~active], err_msg=str(path))
    assert not np.allclose(after[path][active], before[path][active]), path
  assert np.isfinite(float(metrics["loss"]))


def test_eight_devices_match_one():
  assert jax.device_count() == 8
  losses = {}
  for n in (1, 8):
    config = tiny_config(**{"mesh.data": n, "mesh.model": 1})
    runner, data, plan = _runner(config)
    vocab, inputs = _stage_inputs(runner, data, plan, 0, 2)
    state = runner.set_active(runner.initial_state(), vocab.active_mask(0))
    out = []
    for x in inputs:
      state, metrics = runner.train_step(state, x)
      out.append(float(metrics["loss"]))
    losses[n] = out
  np.testing.assert_allclose(losses[1], losses[8], rtol=1e-4)


def test_full_run_resume_and_outputs(tmp_path):
  config = tiny_config()
  full = gil.train_and_evaluate(config, str(tmp_path / "full"), progress_bar=False)
  n = len(full["stages"])
  assert n == 3 and full["stages"][1]["n_new_genes"] > 0
  m = full["gene_regression"]["matrix"]
  for i in range(n):
    for j in range(n):
      assert (m[i][j] is None) == (j > i)
  assert full["forgetting"]["per_stage"][-1] is None
  reg = full["gene_regression"]
  for name, b in reg["baselines"].items():  # trivial predictors on the same held-out tokens
    assert [[v is None for v in row] for row in b] == [[v is None for v in row] for row in m], name
  assert reg["ratio_to_best_baseline"][0][0] == pytest.approx(
      m[0][0] / min(b[0][0] for b in reg["baselines"].values()))
  assert full["compilations"]["train_step"] == 1  # new stage genes never recompile the step
  for f in ("results.json", "report.md", "gene_regression.png", "forgetting.png"):
    assert os.path.exists(tmp_path / "full" / f), f

  # Interrupt mid-stage 1 (after 6 + 3 steps), then resume with the same command.
  part = str(tmp_path / "part")
  gil.train_and_evaluate(config, part, stop_after_steps=9, progress_bar=False)
  assert not os.path.exists(os.path.join(part, "results.json"))
  resumed = gil.train_and_evaluate(config, part, progress_bar=False)
  np.testing.assert_allclose(np.array(resumed["gene_regression"]["matrix"], dtype=float),
                             np.array(m, dtype=float), rtol=1e-5, equal_nan=True)
  assert [s["final_train_loss"] for s in resumed["stages"]] == pytest.approx(
      [s["final_train_loss"] for s in full["stages"]], rel=1e-5)

  # A finished experiment is not retrained.
  ck = checkpoint.Checkpointer(part)
  last = ck.latest_step()
  ck.close()
  again = gil.train_and_evaluate(config, part, progress_bar=False)
  assert again["gene_regression"] == resumed["gene_regression"]
  ck = checkpoint.Checkpointer(part)
  assert ck.latest_step() == last
  ck.close()


def test_half_written_checkpoint_is_ignored(tmp_path):
  config = tiny_config()
  workdir = str(tmp_path / "w")
  gil.train_and_evaluate(config, workdir, stop_after_steps=4, progress_bar=False)
  ckdir = os.path.join(workdir, "checkpoints")
  (finished,) = [d for d in os.listdir(ckdir) if d.isdigit()]
  # What an interrupted Orbax save leaves behind: a temporary directory with partial content.
  partial = os.path.join(ckdir, "999.orbax-checkpoint-tmp-1234")
  shutil.copytree(os.path.join(ckdir, finished), partial)
  os.remove(os.path.join(partial, "meta", "metadata"))
  ck = checkpoint.Checkpointer(workdir)
  assert ck.latest_step() == int(finished)
  ck.close()
  results = gil.train_and_evaluate(config, workdir, progress_bar=False)
  assert len(results["stages"]) == 3


def test_workdir_of_another_experiment_is_refused(tmp_path):
  workdir = str(tmp_path / "w")
  gil.train_and_evaluate(tiny_config(), workdir, stop_after_steps=4, progress_bar=False)
  other = tiny_config(**{"train.learning_rate": 0.5})
  with pytest.raises(checkpoint.WorkdirMismatchError, match="train.learning_rate"):
    gil.train_and_evaluate(other, workdir, progress_bar=False)


def test_gene_table_too_small_fails_before_training(tmp_path):
  config = tiny_config(**{"genes.capacity": 40})
  with pytest.raises(VocabularyError, match="config.genes.capacity"):
    gil.train_and_evaluate(config, str(tmp_path / "w"), progress_bar=False)
  assert not os.path.exists(tmp_path / "w" / "checkpoints" / "0")


def test_unknown_method_lists_known(tmp_path):
  with pytest.raises(ValueError, match="known methods"):
    gil.train_and_evaluate(tiny_config(method="nope"), str(tmp_path / "w"), progress_bar=False)


def test_launch_rejects_unknown_config_field(tmp_path):
  proc = subprocess.run(
      [sys.executable, "launch.py", "--config", "configs/gil_synthetic.py",
       "--config.train.no_such_field=1", "--workdir", str(tmp_path / "w")],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "no_such_field" in proc.stderr


def test_launch_reports_bad_input_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "launch.py", "--config", "configs/gil_synthetic.py",
       "--config.data.source=h5ad", f"--config.data.files={tmp_path / 'missing.h5ad'}",
       "--workdir", str(tmp_path / "w")],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: ") and "missing.h5ad" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("model", ["exceiver", "transformer"])
def test_tokens_of_inactive_genes_do_not_change_outputs(model):
  from gil_jax.losses import objectives
  config = tiny_config(model)
  runner, data, plan = _runner(config)
  vocab, inputs = _stage_inputs(runner, data, plan, 1, 1)  # stage 1 sees base + T_1 genes
  batch = jax.device_get(inputs[0]["main"])
  params = runner.initial_state().params
  active = vocab.active_mask(1)
  t1_rows = vocab.rows(plan.stages[1].new_genes)
  is_t1 = np.isin(batch.gene_ids, t1_rows) & batch.token_mask
  assert is_t1.any()
  active_without_t1 = active.copy()
  active_without_t1[t1_rows] = False
  # Same batch, T_1 tokens either present-but-inactive, or removed from the token mask.
  removed = batch.replace(token_mask=batch.token_mask & ~is_t1, pred_mask=batch.pred_mask & ~is_t1)
  out_inactive = objectives.apply_model(runner.model, params, batch, jnp.asarray(active_without_t1),
                                        train=False, rng=jax.random.PRNGKey(0))
  out_removed = objectives.apply_model(runner.model, params, removed, jnp.asarray(active),
                                       train=False, rng=jax.random.PRNGKey(0))
  keep = removed.token_mask
  np.testing.assert_allclose(np.asarray(out_inactive["pred"])[keep],
                             np.asarray(out_removed["pred"])[keep], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out_inactive["cell_emb"], out_removed["cell_emb"], rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("likelihood", ["poisson", "nb"])
def test_count_likelihoods_train(likelihood):
  config = tiny_config(**{"train.likelihood": likelihood, "model.gene_cell_offset": False})
  runner, data, plan = _runner(config)
  vocab, inputs = _stage_inputs(runner, data, plan, 0, 3)
  state = runner.set_active(runner.initial_state(), vocab.active_mask(0))
  losses = []
  for x in inputs * 3:
    state, metrics = runner.train_step(state, x)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0]


def test_expressed_and_module_plans():
  config = tiny_config(**{"stages.plan": "expressed"})
  data = experiment.load_data(config)
  plan = experiment.build_plan(config, data)
  mean = np.asarray(data.X.mean(axis=0)).ravel()
  col = {g: i for i, g in enumerate(data.gene_ids)}
  base = [col[g] for g in plan.stages[0].train_genes]
  specific = [col[g] for s in plan.stages[1:] for g in s.new_genes]
  assert mean[specific].min() >= mean[base].max()  # T_k are the most expressed genes
  assert set(plan.stages[1].new_genes).isdisjoint(plan.stages[2].train_genes)

  from gil_jax.data import simulate
  config = tiny_config(**{"stages.plan": "modules"})
  plan = experiment.build_plan(config, data)
  module = simulate.gene_modules(simulate.SimConfig(**config.data.sim.to_dict()))
  for s in plan.stages[1:]:
    mods = {module[col[g]] for g in s.new_genes}
    others = {module[col[g]] for t in plan.stages if t is not s for g in t.new_genes}
    assert mods and mods.isdisjoint(others)  # whole modules per stage


def test_gene_levels_start_at_each_new_genes_detected_mean():
  """begin_stage sets the offset head's level of every gene a stage introduces to its detected
  mean over that stage's training cells, and leaves the rows of earlier stages as they were."""
  from gil_jax.eval import regression  # noqa: PLC0415
  config = tiny_config()
  runner, data, plan = _runner(config)
  state = runner.begin_stage(runner.initial_state(), 0)
  levels0 = np.asarray(state.params["genes"]["bias"]).copy()
  for k in (0, 1):
    if k:
      state = runner.begin_stage(state, 1)
    stage, vocab = plan.stages[k], experiment.stage_vocab(plan, runner.capacity, k)
    _, dmean = regression.gene_statistics(data, stage.train_cells, config.batch.normalisation)
    cols = [list(data.gene_ids).index(g) for g in stage.new_genes]
    got = np.asarray(state.params["genes"]["bias"])[vocab.rows(stage.new_genes)]
    np.testing.assert_allclose(got, np.nan_to_num(dmean[cols]), rtol=1e-6)
    assert (got > 0).mean() > 0.9
  old = experiment.stage_vocab(plan, runner.capacity, 0).rows(plan.stages[0].new_genes)
  np.testing.assert_array_equal(np.asarray(state.params["genes"]["bias"])[old], levels0[old])
