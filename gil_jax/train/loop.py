"""The stage loop: `train_and_evaluate(config, workdir)` runs, checkpoints and resumes."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from gil_jax import checkpoint, distributed, experiment, guards, integrity, parallel
from gil_jax.batch import Batch, empty_batch
from gil_jax.data import batching, pipeline, stages
from gil_jax.data.vocab import GeneVocab
from gil_jax.eval import hooks, regression, report
from gil_jax.losses import objectives, registry
from gil_jax.losses.transforms import StageEnd
from gil_jax.models import build_model
from gil_jax.train.state import TrainState, init_state, make_optimizer
from gil_jax.train.step import make_regression_eval_step, make_train_step

log = logging.getLogger("gil_jax")

PREFETCH = 2  # train batches built (and device_put) ahead of the step, in a background thread


@dataclasses.dataclass
class Feed:
  """Host-side context handed to transforms that add extra inputs (e.g. a replay batch)."""
  data: Any
  plan: stages.StagePlan
  vocab: GeneVocab
  spec: batching.BatchSpec
  seed: int
  stage: int
  step: int


class Runner:
  """Holds the compiled functions and static pieces of one experiment (no mutable train state)."""

  def __init__(self, config: ml_collections.ConfigDict, data, plan: stages.StagePlan):
    self.config, self.data, self.plan = config, data, plan
    self.capacity = config.genes.capacity
    self.mesh = parallel.make_mesh(config.mesh)
    parallel.check_batch_divisible(config.batch.batch_size, self.mesh)
    parallel.check_batch_divisible(config.eval.batch_size, self.mesh, "config.eval.batch_size")
    self.spec = batching.BatchSpec(
        batch_size=config.batch.batch_size, n_tokens=config.batch.n_tokens,
        mask_ratio=config.batch.mask_ratio, normalisation=config.batch.normalisation,
        sampling=config.batch.sampling, zero_tokens=config.batch.zero_tokens)
    self.eval_spec = dataclasses.replace(self.spec, batch_size=config.eval.batch_size)
    self.likelihood = config.train.likelihood
    self.model = build_model(config.model, self.capacity, self.likelihood)
    self.tx = make_optimizer(config.train, max(self.steps_for(s) for s in plan.stages))
    self.transform = registry.build(config)
    self.task_loss = objectives.make_task_loss(self.model, self.likelihood)
    self.loss_fn = self.transform.wrap(self.task_loss)

    state = self.init_state()
    self.state_sharding = parallel.state_shardings(self.mesh, state, self.capacity)
    self.repl = parallel.replicated(self.mesh)
    self._state0 = state
    inputs = self.inputs_for(state, empty_batch(self.spec.batch_size, self.spec.n_tokens),
                             feed=None)
    self.inputs_sharding = parallel.batch_shardings(self.mesh, inputs)
    self.train_step = jax.jit(make_train_step(self.loss_fn, self.tx),
                              in_shardings=(self.state_sharding, self.inputs_sharding),
                              out_shardings=(self.state_sharding, self.repl),
                              donate_argnums=0)
    n_groups = len(plan.stages)
    eval_batch = empty_batch(self.eval_spec.batch_size, self.spec.n_tokens)
    self.eval_batch_sharding = parallel.batch_shardings(self.mesh, eval_batch)
    self.eval_step = jax.jit(
        make_regression_eval_step(self.model, self.likelihood, self.spec.normalisation, n_groups),
        in_shardings=(self.state_sharding.params,
                      self.eval_batch_sharding, self.repl, self.repl),
        out_shardings=(self.repl, self.repl))

  def init_state(self) -> TrainState:
    key = jax.random.PRNGKey(self.config.seed)
    init_key, dropout_key, state_key = jax.random.split(key, 3)
    b = empty_batch(self.spec.batch_size, self.spec.n_tokens)
    init = jax.jit(lambda k1, k2, b: self.model.init({"params": k1, "dropout": k2}, b.gene_ids,
                                                     b.values, b.token_mask, b.pred_mask,
                                                     False)["params"])
    params = init(init_key, dropout_key, b)  # one compiled call, not hundreds of eager ops
    return init_state(params, self.tx, self.transform.init(params), state_key, self.capacity)

  def initial_state(self) -> TrainState:
    return jax.device_put(self._state0, self.state_sharding)

  def inputs_for(self, state, batch: Batch, feed: Feed | None) -> dict:
    inputs = {"main": batch}
    if self.transform.extra_inputs is not None:
      inputs.update(self.transform.extra_inputs(state.transforms, feed))
    return inputs

  def put(self, tree, sharding):
    return jax.device_put(tree, sharding)

  def put_inputs(self, inputs: dict) -> dict:
    """Host inputs of one step -> device arrays sharded on 'data'. One process: a sharded
    device_put. Several: `inputs` holds this process's rows only (see `train_inputs`) and the
    global arrays are assembled with `distributed.global_batch`."""
    if jax.process_count() == 1:
      return jax.device_put(inputs, self.inputs_sharding)
    return distributed.global_batch(inputs, self.mesh)

  def train_inputs(self, stage: stages.Stage, cols: np.ndarray, feed: Feed, transforms,
                   start: int, n: int):
    """Iterator of (step, device inputs) for steps start .. start+n-1 of stage `feed.stage`,
    built `PREFETCH` steps ahead in a background thread (`pipeline.Prefetcher`).

    Batches stay a pure function of (seed, stage, step), so resuming at `start` is exact. With
    several processes each builds only its rows of every global batch
    (`batching.stage_batches` with shard / n_shards) and of the transforms' extra inputs (computed whole, then sliced:
    they are small and deterministic). `transforms`: a host copy of the transform states (the
    step donates the device state, so the producer thread must not read it).
    """
    pid, n_proc = jax.process_index(), jax.process_count()
    source = batching.stage_batches(self.data, stage.train_cells, cols, self.spec, feed.seed,
                                    feed.stage, start, n, shard=pid, n_shards=n_proc)

    def build(item):
      step, batch = item
      extras = {}
      if self.transform.extra_inputs is not None:
        extras = self.transform.extra_inputs(transforms, dataclasses.replace(feed, step=step))
        if n_proc > 1:
          extras = jax.tree.map(lambda x: _process_rows(x, pid, n_proc), extras)
      return step, self.put_inputs({"main": batch, **extras})

    return pipeline.Prefetcher(source, put=build, depth=PREFETCH)

  def set_active(self, state: TrainState, mask: np.ndarray) -> TrainState:
    return state.replace(active_genes=jax.device_put(jnp.asarray(mask), self.state_sharding.active_genes))

  def reset_optimizer(self, state: TrainState) -> TrainState:
    opt_state = jax.device_put(self.tx.init(state.params), self.state_sharding.opt_state)
    return state.replace(opt_state=opt_state)

  def steps_for(self, stage: stages.Stage) -> int:
    t = self.config.train
    if t.steps_per_stage > 0:
      return int(t.steps_per_stage)
    return int(t.epochs_per_stage * math.ceil(len(stage.train_cells) / self.spec.batch_size))

  def regression_row(self, params, vocab: GeneVocab, upto: int, active
                     ) -> tuple[list[float | None], dict[str, list[float | None]]]:
    """MSE on each stage's genes (stages 0..upto) after training stage `upto`, and the trivial
    predictors' MSE (`regression.BASELINES`) on exactly the same held-out tokens."""
    cols = stages.eval_columns(self.data, vocab, experiment.seen_genes(self.plan, upto))
    stage_rows = [vocab.rows(s.eval_genes) for s in self.plan.stages[:upto + 1]]
    row_group = regression.stage_row_groups(self.capacity, stage_rows)
    n = len(self.plan.stages)
    trivial = regression.TrivialBaselines(*self.gene_statistics, cols, self.capacity,
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

  @functools.cached_property
  def gene_statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene (mean, detected mean) over every training cell of the plan (host side, once)."""
    cells = np.concatenate([s.train_cells for s in self.plan.stages])
    return regression.gene_statistics(self.data, cells, self.spec.normalisation)

  def eval_step_batch_sharding(self):
    return self.eval_batch_sharding


def _new_results(config, plan: stages.StagePlan) -> dict:
  n = len(plan.stages)
  names = [s.name for s in plan.stages]
  return {"experiment": config.experiment, "method": config.method,
          "versions": integrity.package_versions(),
          "transforms": registry.transform_names(config), "stages": [],
          "gene_regression": {"stage_names": names, "matrix": [[None] * n for _ in range(n)]},
          "forgetting": {"per_stage": [None] * n, "average": None}}


def _meta(config, plan, vocab, results, progress) -> dict:
  return {"experiment": config.experiment, "fingerprint": checkpoint.fingerprint(config),
          "config": checkpoint.config_for_fingerprint(config), "plan": plan.to_json(),
          "vocab": vocab.to_json(), "results": results, "progress": progress}


def _setup_logging(workdir: str) -> None:
  handler = logging.FileHandler(os.path.join(workdir, "train.log"))
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  log.handlers = [h for h in log.handlers if not isinstance(h, logging.FileHandler)] + [handler]
  log.setLevel(logging.INFO)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_steps: int | None = None, progress_bar: bool = True) -> dict:
  """Runs (or resumes) every stage of a gene-incremental experiment; returns results.json.

  `stop_after_steps` stops (after checkpointing) once that many train steps ran in this call;
  tests use it to simulate an interruption. Holds the workdir lock while running; SIGTERM /
  SIGINT checkpoint at the next step boundary and raise `guards.Interrupted`; a non-finite loss
  raises `guards.NonFiniteError` before anything non-finite is checkpointed.
  """
  guards.prepare_workdir(workdir)
  multi = jax.process_count() > 1
  with guards.WorkdirLock(workdir, enabled=jax.process_index() == 0), \
       guards.Preemption(multi_process=multi) as preempt:
    return _train_and_evaluate(config, workdir, stop_after_steps, progress_bar, preempt)


def _train_and_evaluate(config, workdir, stop_after_steps, progress_bar, preempt) -> dict:
  _setup_logging(workdir)
  with guards.user_errors("invalid config or data"):
    registry.transform_names(config)  # unknown names fail before any work
    hooks.resolve(config.eval.stage_evaluators)
    data = experiment.load_data(config)
    experiment.check_value_scale(data, config.batch.normalisation)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  ckpt.check_same_experiment(config)
  data_fp = integrity.data_fingerprint(_input_files(config), data)
  ckpt.extra_meta = {"data": data_fp}
  latest, meta = ckpt.latest_meta()
  with guards.user_errors("invalid config or data"):
    if latest is not None:
      integrity.check_same_data(meta.get("data"), data_fp, workdir)
    if latest is None:
      plan = experiment.build_plan(config, data)
      experiment.check_capacity(plan, config.genes.capacity)
      progress = {"stage": 0, "step_in_stage": 0, "stage_done": False, "seconds": 0.0}
      results = _new_results(config, plan)
    else:
      plan = stages.StagePlan.from_json(meta["plan"])
      progress, results = meta["progress"], meta["results"]
      log.info("resuming from checkpoint step %d: %s", latest, progress)
    if not len(plan.eval_cells):
      log.warning("no held-out cells (config.stages.eval_fraction=%s): the gene-wise regression "
                  "matrix and forgetting will be null; set --config.stages.eval_fraction > 0",
                  config.stages.eval_fraction)
    runner = Runner(config, data, plan)
    for k, s in enumerate(plan.stages):
      guards.check_steps(runner.steps_for(s), k, s.name, len(s.train_cells))
  state = runner.initial_state()
  finished = (latest is not None and progress["stage_done"]
              and progress["stage"] == len(plan.stages) - 1)
  if latest is not None and not finished:  # a finished run needs only the meta (its report)
    good, restored, good_meta = ckpt.restore_good(checkpoint.abstract_like(state))
    if good is None:
      raise guards.RunError(f"no checkpoint in {ckpt.directory} restores (all were damaged and "
                            "moved to checkpoints.damaged/); rerun to start over.")
    state = restored
    if good != latest:
      progress, results = good_meta["progress"], good_meta["results"]
      log.warning("resuming from checkpoint step %d instead of the damaged step %d: re-doing "
                  "stage %d from step %d", good, latest,
                  progress["stage"] + (1 if progress["stage_done"] else 0),
                  0 if progress["stage_done"] else progress["step_in_stage"])

  first = progress["stage"] + (1 if progress["stage_done"] else 0)
  steps_run = 0
  batches = bar = None
  clock = guards.CheckpointClock(config.train.checkpoint_minutes, jax.process_count() > 1,
                                 config.train.log_every)
  try:
    for k in range(first, len(plan.stages)):
      stage = plan.stages[k]
      vocab = experiment.stage_vocab(plan, config.genes.capacity, k)
      resuming = progress["stage"] == k and not progress["stage_done"] and progress["step_in_stage"] > 0
      start = progress["step_in_stage"] if resuming else 0
      stage_seconds = progress["seconds"] if resuming else 0.0
      if not resuming:
        state = runner.set_active(state, vocab.active_mask(k))
        if config.train.reset_opt_state and k > 0:
          state = runner.reset_optimizer(state)
      n_steps = runner.steps_for(stage)
      cols = stages.stage_columns(data, vocab, stage)
      feed = Feed(data, plan, vocab, runner.spec, config.seed, k, start)
      host_transforms = (jax.device_get(state.transforms)
                         if runner.transform.extra_inputs is not None else None)
      losses: list[float] = []
      cells, t_measure, t0, first_step_seconds = 0, 0.0, time.time(), 0.0
      bar = tqdm(total=n_steps, initial=start, desc=f"stage {k} {stage.name}", leave=True,
                 disable=not progress_bar, dynamic_ncols=True)
      batches = runner.train_inputs(stage, cols, feed, host_transforms, start, n_steps - start)
      for step, inputs in batches:
        t_step = time.time()
        state, metrics = runner.train_step(state, inputs)
        logged = (step + 1) % config.train.log_every == 0 or step + 1 == n_steps
        if logged:
          metrics = jax.device_get(metrics)
          guards.check_finite(metrics, config, step=step + 1, stage=k, stage_name=stage.name,
                              ckpt=ckpt)
          losses.append(float(metrics["loss"]))
          bar.set_postfix({k_.split("/")[-1]: f"{float(v):.4f}" for k_, v in metrics.items()
                           if k_.startswith("loss")} | {"cells/s": f"{cells / max(t_measure, 1e-9):.0f}"})
        jax.block_until_ready(state.step)
        if step > start:  # the first step of a stage may include compilation
          cells += int(metrics["cells"]) if "cells" in metrics else runner.spec.batch_size
          t_measure += time.time() - t_step
        else:
          first_step_seconds = time.time() - t_step
        bar.update(1)
        steps_run += 1
        done_in_stage = step + 1
        stop = preempt.should_stop(int(state.step))
        if done_in_stage < n_steps and (done_in_stage % config.train.checkpoint_every == 0 or
                                        steps_run == stop_after_steps or stop or
                                        clock.due(done_in_stage)):
          if not logged:  # never checkpoint a step whose loss was not checked
            guards.check_finite(jax.device_get(metrics), config, step=done_in_stage, stage=k,
                                stage_name=stage.name, ckpt=ckpt)
          guards.check_state_finite(state, config, step=done_in_stage, stage=k,
                                    stage_name=stage.name, ckpt=ckpt)
          progress = {"stage": k, "step_in_stage": done_in_stage, "stage_done": False,
                      "seconds": stage_seconds + time.time() - t0}
          ckpt.save(int(state.step), state, _meta(config, plan, vocab, results, progress))
          clock.reset()
          if stop:
            raise guards.Interrupted(guards.interrupted_message(
                preempt.signal, f"step {done_in_stage} of {n_steps} of stage {k} ({stage.name})",
                int(state.step), ckpt.directory))
        if steps_run == stop_after_steps and done_in_stage < n_steps:
          batches.close()
          bar.close()
          return results
      batches.close()
      bar.close()
      stage_seconds += time.time() - t0

      end = StageEnd(stage=k, params=state.params, active_genes=state.active_genes,
                     task_loss=runner.task_loss,
                     batches=lambda n, k=k, cols=cols, stage=stage: _consolidation_batches(
                         runner, stage, cols, k, n),
                     stage_cells=stage.train_cells, stage_rows=cols[cols > 0],
                     base_stage=k == 0 and plan.base_stage)
      state = state.replace(transforms=jax.device_put(
          runner.transform.consolidate(state.transforms, state.params, end),
          runner.state_sharding.transforms))

      row, trivial = runner.regression_row(state.params, vocab, k, state.active_genes)
      reg = results["gene_regression"]
      reg["matrix"][k] = row
      n_stages = len(plan.stages)
      for name, trivial_row in trivial.items():
        reg.setdefault("baselines", {}).setdefault(
            name, [[None] * n_stages for _ in range(n_stages)])[k] = trivial_row
      reg["ratio_to_best_baseline"] = regression.ratio_to_best(reg["matrix"], reg["baselines"])
      final_visible = [set(s.eval_genes) <= set(plan.stages[-1].train_genes) for s in plan.stages]
      for evaluate in hooks.resolve(config.eval.stage_evaluators):
        results = evaluate(runner, state, vocab, k, results)
      if k == len(plan.stages) - 1:
        results["forgetting"] = regression.forgetting(results["gene_regression"]["matrix"],
                                                      final_visible)
      results["stages"].append({
          "name": stage.name, "n_train_cells": int(len(stage.train_cells)),
          "n_active_genes": int(vocab.active_mask(k).sum()),
          "n_new_genes": len(stage.new_genes), "steps": n_steps,
          "seconds": round(stage_seconds, 2),
          "cells_per_s": round(cells / t_measure, 1) if t_measure > 0 else None,
          "first_step_seconds": round(first_step_seconds, 3),
          "final_train_loss": losses[-1] if losses else None})
      log.info("stage %d (%s) done: %s", k, stage.name, results["stages"][-1])
      progress = {"stage": k, "step_in_stage": n_steps, "stage_done": True, "seconds": 0.0}
      guards.check_state_finite(state, config, step=n_steps, stage=k, stage_name=stage.name,
                                ckpt=ckpt)
      ckpt.save(int(state.step), state, _meta(config, plan, vocab, results, progress))
      clock.reset()
      if k < len(plan.stages) - 1 and preempt.should_stop(int(state.step)):
        raise guards.Interrupted(guards.interrupted_message(
            preempt.signal, f"the end of stage {k} ({stage.name})", int(state.step),
            ckpt.directory))
  except KeyboardInterrupt:
    log.warning("interrupted; rerun the same command to resume from the last checkpoint")
    raise
  finally:
    if batches is not None:
      batches.close()
    if bar is not None:
      bar.close()  # before any error message, so that it starts its own line
    ckpt.close()

  if steps_run:
    results["compilations"] = {"train_step": runner.train_step._cache_size(),
                               "eval_step": runner.eval_step._cache_size()}
  else:  # a finished workdir rerun: keep the counts of the run that trained
    results.setdefault("compilations", _previous_results(workdir).get("compilations"))
  results = guards.finite_or_none(results)  # strict JSON: null, never NaN
  if jax.process_index() == 0:
    report.write_outputs(workdir, results)
  return results


def _input_files(config) -> list[str]:
  if config.data.source != "h5ad":
    return []
  return [experiment.resolve_path(f, config.data.data_dir)
          for f in experiment.split_list(config.data.files)]


def _previous_results(workdir: str) -> dict:
  try:
    with open(os.path.join(workdir, "results.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _process_rows(x, pid: int, n_proc: int):
  """Rows [pid*n/P, (pid+1)*n/P) of a host array whose leading axis is cells."""
  n = x.shape[0]
  if n % n_proc:
    raise ValueError(f"an extra input batch of {n} cells is not divisible by {n_proc} processes; "
                     "use a transform batch_size that is a multiple of the process count")
  return x[pid * n // n_proc:(pid + 1) * n // n_proc]


def _consolidation_batches(runner: Runner, stage, cols, k: int, n: int):
  """n batches of stage k's training data, for transforms that estimate statistics."""
  for _, batch in batching.stage_batches(runner.data, stage.train_cells, cols, runner.spec,
                                         runner.config.seed + 7919, k, 0, n,
                                         shard=jax.process_index(), n_shards=jax.process_count()):
    if jax.process_count() == 1:
      yield {"main": runner.put(batch, runner.inputs_sharding["main"])}
    else:
      yield {"main": distributed.global_batch(batch, runner.mesh)}
