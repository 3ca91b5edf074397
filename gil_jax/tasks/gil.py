"""Gene-incremental learning as a task of the shared loop: `train_and_evaluate(config, workdir)`.

What this task supplies (gil_jax/core/loop.py runs the rest): a self-supervised expression model
over a growing gene table, stages from a gene plan (`experiment.build_plan`), gene-table masks
per stage, the masked-expression loss with the configured loss transforms, and after every stage
the gene-wise regression row beside the trivial predictors on the held-out cells.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gil_jax import checkpoint, experiment, guards, integrity, parallel, surgery
from gil_jax.batch import empty_batch
from gil_jax.data import batching, stages
from gil_jax.data.vocab import GeneVocab
from gil_jax.eval import hooks, regression, report
from gil_jax.losses import objectives, registry
from gil_jax.models import GENES, build_model
from gil_jax.core import loop
from gil_jax.core.loop import Feed, StageData
from gil_jax.core.state import TrainState, init_state, make_optimizer
from gil_jax.core.step import make_regression_eval_step

__all__ = ["Feed", "Runner", "train_and_evaluate"]

MIN_SHARED_GENES = 20  # an extension's dataset shares at least this many genes with the run


class Runner(loop.Runner):
  """The gene-incremental task: compiled functions and static pieces of one experiment."""

  task = "gil"
  final_needs_state = False  # a finished run's report comes from the saved results

  def __init__(self, config: ml_collections.ConfigDict, data, plan: stages.StagePlan):
    self.config, self.data, self.plan = config, data, plan
    self.capacity = config.genes.capacity
    self._vocabs: dict[int, GeneVocab] = {}
    self._gene_stats: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self.reset_opt_state = bool(config.train.reset_opt_state)
    self.spec = batching.spec_from_config(config.batch)  # value_scale: 'none' (train_gil)
    self.eval_spec = dataclasses.replace(self.spec, batch_size=config.eval.batch_size)
    self.likelihood = config.train.likelihood
    self.model = build_model(config.model, self.capacity, self.likelihood)
    self.tx = make_optimizer(config.train, max(self.steps_for(s) for s in plan.stages))
    self.transform = registry.build(config)
    self.task_loss = objectives.make_task_loss(self.model, self.likelihood)
    self.compile()
    eval_batch = empty_batch(self.eval_spec.batch_size, self.spec.n_tokens)
    self.eval_batch_sharding = parallel.batch_shardings(self.mesh, eval_batch)
    self.eval_step = jax.jit(
        make_regression_eval_step(self.model, self.likelihood, self.spec.normalisation,
                                  len(plan.stages)),
        in_shardings=(self.state_sharding.params, self.eval_batch_sharding, self.repl,
                      self.repl),
        out_shardings=(self.repl, self.repl))

  def init_state(self, key) -> TrainState:
    init_key, dropout_key, state_key = jax.random.split(key, 3)
    b = empty_batch(self.spec.batch_size, self.spec.n_tokens)
    params = self.model.init({"params": init_key, "dropout": dropout_key}, b.gene_ids, b.values,
                             b.token_mask, b.pred_mask, False)["params"]
    return init_state(params, self.tx, self.transform.init(params), state_key, self.capacity)

  # ------------------------------------------------------------------------------- stages

  @property
  def stage_names(self) -> list[str]:
    return [s.name for s in self.plan.stages]

  def vocab(self, k: int) -> GeneVocab:
    """The gene vocabulary after stage k (rows of every gene seen so far), built once."""
    if k not in self._vocabs:
      self._vocabs[k] = experiment.stage_vocab(self.plan, self.capacity, k)
    return self._vocabs[k]

  def stage_masks(self, k: int) -> dict[str, np.ndarray]:
    return {"active_genes": self.vocab(k).active_mask(k)}

  def begin_stage(self, state: TrainState, k: int) -> TrainState:
    """Stage k's masks; with the gene + cell offset head, the levels of the genes the stage
    introduces start at their detected mean over the stage's training cells."""
    state = super().begin_stage(state, k)
    if not self.config.model.get("gene_cell_offset", False):
      return state
    stage = self.plan.stages[k]
    rows = np.zeros(self.capacity, bool)
    levels = np.zeros(self.capacity, np.float32)
    c2r = stages.stage_columns(self.data, self.vocab(k), stage)
    new = np.isin(np.arange(self.capacity), self.vocab(k).rows(stage.new_genes))
    _, detected_mean = regression.gene_statistics(self.data, stage.train_cells,
                                                  self.spec.normalisation)
    cols = np.flatnonzero((c2r > 0) & new[c2r] & np.isfinite(detected_mean))
    rows[c2r[cols]] = True
    levels[c2r[cols]] = detected_mean[cols]
    bias = self._set_rows(state.params[GENES]["bias"], self.put(jnp.asarray(rows), self.repl),
                          self.put(jnp.asarray(levels), self.repl))
    params = dict(state.params, **{GENES: dict(state.params[GENES], bias=bias)})
    return state.replace(params=params)

  @functools.cached_property
  def _set_rows(self):
    sharding = self.state_sharding.params[GENES]["bias"]
    return jax.jit(lambda old, rows, new: jnp.where(rows, new, old), out_shardings=sharding)

  def stage_data(self, k: int, state: TrainState) -> StageData:
    stage = self.plan.stages[k]
    return StageData(cells=stage.train_cells,
                     columns_to_rows=stages.stage_columns(self.data, self.vocab(k), stage))

  def steps_for(self, stage: stages.Stage) -> int:
    return self.stage_steps(len(stage.train_cells))

  def check_steps(self) -> None:
    for k, s in enumerate(self.plan.stages):
      guards.check_steps(self.steps_for(s), k, s.name, len(s.train_cells))

  def feed(self, k: int, start: int) -> Feed:
    return Feed(self.data, self.plan, self.vocab(k), self.spec, self.config.seed, k, start)

  def stage_end(self, k, state, data):
    return dataclasses.replace(super().stage_end(k, state, data),
                               base_stage=k == 0 and self.plan.base_stage)

  # ------------------------------------------------------------------------------- results

  def new_results(self) -> dict:
    n = len(self.plan.stages)
    return {"experiment": self.config.experiment, "method": self.config.method,
            "eval_split": "validation" if self.config.stages.validation else "test",
            "versions": integrity.package_versions(),
            "transforms": registry.transform_names(self.config), "stages": [],
            "gene_regression": {"stage_names": self.stage_names,
                                "matrix": [[None] * n for _ in range(n)]},
            "forgetting": {"per_stage": [None] * n, "average": None}}

  def stage_record(self, k, state, data, n_steps, timing, last) -> dict:
    stage = self.plan.stages[k]
    return {"name": stage.name, "n_train_cells": int(len(stage.train_cells)),
            "n_active_genes": int(self.vocab(k).active_mask(k).sum()),
            "n_new_genes": len(stage.new_genes), "steps": n_steps, **timing,
            "final_train_loss": last.get("loss")}

  def evaluate(self, k: int, state: TrainState, results: dict) -> dict:
    plan, n = self.plan, len(self.plan.stages)
    vocab = self.vocab(k)
    row, trivial = self.regression_row(state.params, vocab, k, state.active_genes)
    reg = results["gene_regression"]
    reg["matrix"][k] = row
    for name, trivial_row in trivial.items():
      reg.setdefault("baselines", {}).setdefault(name, [[None] * n for _ in range(n)])[k] = \
          trivial_row
    reg["ratio_to_best_baseline"] = regression.ratio_to_best(reg["matrix"], reg["baselines"])
    for evaluate in hooks.resolve(self.config.eval.stage_evaluators):
      results = evaluate(self, state, vocab, k, results)
    if k == n - 1:
      final_visible = [set(s.eval_genes) <= set(plan.stages[-1].train_genes)
                       for s in plan.stages]
      results["forgetting"] = regression.forgetting(reg["matrix"], final_visible)
    return results

  def regression_row(self, params, vocab: GeneVocab, upto: int, active
                     ) -> tuple[list[float | None], dict[str, list[float | None]]]:
    """MSE on each stage's genes (stages 0..upto) after training stage `upto`, and the trivial
    predictors' MSE (`regression.BASELINES`) on exactly the same held-out tokens."""
    cols = stages.eval_columns(self.data, vocab, experiment.seen_genes(self.plan, upto))
    stage_rows = [vocab.rows(s.eval_genes) for s in self.plan.stages[:upto + 1]]
    row_group = regression.stage_row_groups(self.capacity, stage_rows)
    n = len(self.plan.stages)
    trivial = regression.TrivialBaselines(*self.gene_statistics(upto), cols, self.capacity,
                                          np.asarray(jax.device_get(active)), row_group, n)

    def batches():
      for b in batching.eval_batches(self.data, self.plan.eval_cells, cols, self.eval_spec,
                                     self.config.eval.mask_seed):
        trivial.add(b)
        yield self.put(b, self.eval_batch_sharding)

    mse = regression.pooled_mse(self.eval_step, params, batches(), active,
                                self.put(jnp.asarray(row_group), self.repl), n)
    upto_only = lambda row: [row[j] if j <= upto else None for j in range(n)]
    return upto_only(mse), {name: upto_only(row) for name, row in trivial.mse().items()}

  def gene_statistics(self, upto: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene (mean, detected mean) over the training cells of stages 0..upto: the cells the
    model has trained on after stage `upto`, no later stage's (host side, once per stage)."""
    if upto not in self._gene_stats:
      cells = np.concatenate([s.train_cells for s in self.plan.stages[:upto + 1]])
      self._gene_stats[upto] = regression.gene_statistics(self.data, cells,
                                                          self.spec.normalisation)
    return self._gene_stats[upto]

  def eval_step_batch_sharding(self):
    return self.eval_batch_sharding

  def meta(self, k: int) -> dict:
    return {"plan": self.plan.to_json(), "vocab": self.vocab(k).to_json(),
            "datasets": list(self.data.dataset_names)}

  def grow_results(self, results: dict) -> dict:
    reg, n = results["gene_regression"], len(self.plan.stages)
    m = len(reg["matrix"])
    if m < n:
      reg["stage_names"] = self.stage_names
      reg["matrix"] = loop.grow_matrix(reg["matrix"], n)
      for name in reg.get("baselines", {}):
        reg["baselines"][name] = loop.grow_matrix(reg["baselines"][name], n)
      results["forgetting"] = {"per_stage": [None] * n, "average": None}
      results.setdefault("extensions", []).append(
          {"first_stage": m, "stages": self.stage_names[m:]})
    return results

  def write_outputs(self, workdir: str, results: dict) -> None:
    report.write_outputs(workdir, results)

  def input_files(self) -> list[str]:
    config = self.config
    if config.data.source != "h5ad":
      return []
    return experiment.data_files(config)[0]


def extend_config(config: ml_collections.ConfigDict, meta: dict, files: list[str],
                  names: list[str] | None = None) -> ml_collections.ConfigDict:
  """The run's config with `files` appended to config.data.files (files already in it are left
  as they are, so rerunning an interrupted extension resumes it); `train_and_evaluate` with
  `extending=True` appends one stage per new dataset to the saved plan."""
  del names  # a GIL stage is named after its file
  d = config.data
  if d.source != "h5ad" or d.lazy:
    raise loop.ExtensionError(
        f"this run reads config.data.source={d.source!r} (lazy={d.lazy}); extend appends .h5ad "
        "files to a run on in-memory .h5ad data (config.data.source='h5ad', data.lazy=False).")
  have = experiment.as_names(d.files)
  paths = {os.path.abspath(f) for f in experiment.data_files(config)[0]}
  new = [os.path.abspath(f) for f in files if os.path.abspath(f) not in paths]
  from gil_jax.data import anndata_io  # noqa: PLC0415
  known = GeneVocab.from_json(meta["vocab"]).gene_ids if meta.get("vocab") else []
  for f in new:  # a dataset of other gene ids would train a disconnected stage
    if known:
      loop.check_shared_genes(f, anndata_io.read_h5ad(f, gene_column=d.gene_column or None)
                              .gene_ids, known, MIN_SHARED_GENES, "gil_jax.tasks.gil."
                              "MIN_SHARED_GENES; ids from config.data.gene_column")
  out = config.to_dict()
  out["data"]["files"] = tuple(have + new)
  return ml_collections.ConfigDict(out)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_steps: int | None = None, progress_bar: bool = True,
                       extending: bool = False) -> dict:
  """Runs (or resumes) every stage of a gene-incremental experiment; returns results.json.

  `stop_after_steps` stops (after checkpointing) once that many train steps ran in this call;
  tests use it to simulate an interruption. Holds the workdir lock while running; SIGTERM /
  SIGINT checkpoint at the next step boundary and raise `guards.Interrupted`; a non-finite loss
  raises `guards.NonFiniteError` before anything non-finite is checkpointed.
  """
  with loop.open_workdir(workdir) as preempt:
    with guards.user_errors("invalid config or data"):
      if config.batch.value_scale != "none":
        raise ValueError(f"config.batch.value_scale={config.batch.value_scale!r} replaces "
                         "expression values by ranks; masked-expression regression predicts "
                         "values: use 'none' (value_scale is for annotation runs).")
      registry.transform_names(config)  # unknown names fail before any work
      hooks.resolve(config.eval.stage_evaluators)
      data = experiment.load_data(config)
      experiment.check_value_scale(data, config.batch.normalisation)
    ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    try:
      ckpt.check_same_experiment(config, extending=extending)
      latest, meta = ckpt.latest_meta()
      with guards.user_errors("invalid config or data"):
        if latest is None:
          plan = experiment.build_plan(config, data)
          experiment.check_capacity(plan, config.genes.capacity)
        else:
          plan = stages.StagePlan.from_json(meta["plan"])
        if latest is not None and extending:
          if config.stages.validation:
            raise ValueError("config.stages.validation=True holds out training cells to choose "
                             "a recipe on a fresh run; extend a run trained without it.")
          n_run = int((meta.get("data") or {}).get("n_cells") or data.n_cells)
          known = meta.get("datasets") or [data.dataset_names[i] for i in
                                           np.unique(data.dataset_index[:n_run])]
          plan = experiment.extend_plan(plan, data, [d for d in data.dataset_names
                                                     if d not in known],
                                        config.stages.eval_fraction, config.seed)
          config.genes.capacity = surgery.capacity_for(
              sum(len(s.new_genes) for s in plan.stages), config.genes.capacity)
        if not len(plan.eval_cells):
          loop.log.warning(
              "no held-out cells (config.stages.eval_fraction=%s): the gene-wise regression "
              "matrix and forgetting will be null; set --config.stages.eval_fraction > 0",
              config.stages.eval_fraction)
        runner = Runner(config, data, plan)
    except BaseException:
      ckpt.close()
      raise
    return loop.run(runner, workdir, ckpt, preempt, stop_after_steps, progress_bar,
                    extending=extending)
