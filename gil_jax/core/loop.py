"""The one stage loop of every task: `run(runner, workdir)` trains, checkpoints and resumes.

A task (gil_jax/tasks/gil.py: gene-incremental learning; gil_jax/tasks/annotation.py: continual
annotation) is a `Runner` subclass that supplies only what differs: its params and optimizer, its
task loss, each stage's masks and training cells, what happens at a stage end besides the loss
transforms' consolidation, what is evaluated after a stage, and what goes into the report. The
`Runner` owns the mesh and shardings (from `jax.eval_shape`, so the state is created sharded),
the jitted train step, the prefetching multi-process input pipeline; `run` owns the stage loop:
resume (exact, mid-stage or at a stage end), progress bars with the loss, `train.log`,
non-finite guards, mid-stage / time-based / preemption and stage-end checkpoints, consolidation,
compile counts and results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from gil_jax import checkpoint, distributed, guards, hostenv, integrity, parallel, surgery
from gil_jax.batch import Batch, empty_batch
from gil_jax.data import batching, loader
from gil_jax.losses.transforms import LossTransform, StageEnd
from gil_jax.core.state import TrainState
from gil_jax.core.step import make_train_step

log = logging.getLogger("gil_jax")


class ExtensionError(ValueError):
  """A run cannot be extended as asked (`gil-jax extend`)."""


def check_shared_genes(path: str, genes, vocab_genes, min_shared: int, field: str) -> None:
  """ExtensionError when a dataset to append shares fewer than `min_shared` genes with the
  run's vocabulary (wrong kind of gene ids, another species); `field` names the setting."""
  shared = int(np.isin(np.asarray(genes, str), np.asarray(list(vocab_genes), str)).sum())
  if shared < min_shared:
    raise ExtensionError(
        f"{path}: {shared} of its {len(genes)} genes are in the run's {len(vocab_genes)}-gene "
        f"vocabulary (at least {min_shared} needed: {field}); check that both use the same "
        "kind of gene ids (symbols vs Ensembl) and species.")

PREFETCH = 2  # train batches built (and device_put) ahead of the step


@dataclasses.dataclass
class Feed:
  """Host-side context handed to transforms that add extra inputs (e.g. a replay batch): the
  data, the gene plan and vocabulary (gene-incremental task), or the stage's column -> row map,
  per-cell labels and number of training cells (annotation task)."""
  data: Any
  plan: Any
  vocab: Any
  spec: batching.BatchSpec
  seed: int
  stage: int
  step: int
  columns_to_rows: np.ndarray | None = None
  labels: np.ndarray | None = None
  n_stage_cells: int = 0


@dataclasses.dataclass
class StageData:
  """What stage k trains on: cells (indices into `runner.data`), data column -> gene-table row
  map, per-cell label rows (class-head tasks) and the seed offset of its batches. (Replayed cells
  are not listed here: they come from a loss transform's extra inputs.)"""
  cells: np.ndarray
  columns_to_rows: np.ndarray
  labels: np.ndarray | None = None
  seed: int = 0


class Runner:
  """Mesh, shardings and compiled step of one experiment; no mutable train state.

  A subclass sets `config`, `data`, `spec`, `eval_spec`, `capacity`, `tx`, `transform` and
  `task_loss`, implements the hooks below, and calls `self.compile()`.
  """

  task: str = ""
  reset_opt_state: bool = False     # a fresh optimizer at every stage after the first
  final_needs_state: bool = False   # `finish` reads the trained state (not only the results)
  progress_bar_default: bool = True

  config: ml_collections.ConfigDict
  spec: batching.BatchSpec
  tx: optax.GradientTransformation
  transform: LossTransform

  # ----------------------------------------------------------------------------- set-up

  def compile(self) -> None:
    """Mesh, state shardings (from the abstract state) and the jitted train step."""
    config = self.config
    self.loss_fn = self.transform.wrap(self.task_loss)
    self.mesh = parallel.make_mesh(config.mesh)
    parallel.check_batch_divisible(config.batch.batch_size, self.mesh)
    parallel.check_batch_divisible(config.eval.batch_size, self.mesh, "config.eval.batch_size")
    self.repl = parallel.replicated(self.mesh)
    self._key = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(self.init_state, self._key)
    self.state_sharding = parallel.state_shardings(self.mesh, abstract, self.capacity)
    # runs once per run: XLA's backend optimisations would only add compile time (same values)
    self._init = jax.jit(self.init_state, out_shardings=self.state_sharding).lower(
        self._key).compile({"xla_backend_optimization_level": 0})
    inputs = self.inputs_for(abstract, empty_batch(self.spec.batch_size, self.spec.n_tokens),
                             feed=None)
    self.inputs_sharding = parallel.batch_shardings(self.mesh, inputs)
    self.train_step = jax.jit(make_train_step(self.loss_fn, self.tx),
                              in_shardings=(self.state_sharding, self.inputs_sharding),
                              out_shardings=(self.state_sharding, self.repl),
                              donate_argnums=0)
    self._opt_init = jax.jit(self.tx.init, out_shardings=self.state_sharding.opt_state)

  def init_state(self, key) -> TrainState:
    """The step-0 state (traced: `compile` evaluates it abstractly, then jits it sharded)."""
    raise NotImplementedError

  def initial_state(self) -> TrainState:
    return self._init(self._key)

  # ----------------------------------------------------------------------------- task hooks

  @property
  def stage_names(self) -> list[str]:
    raise NotImplementedError

  def stage_masks(self, k: int) -> dict[str, np.ndarray]:
    """Masks active while training stage k: {'active_genes': ...[, 'active_classes': ...]}."""
    raise NotImplementedError

  def stage_data(self, k: int, state: TrainState) -> StageData:
    """What stage k trains on (may read the state at the stage start, e.g. an example bank)."""
    raise NotImplementedError

  def stage_steps(self, n_cells: int) -> int:
    t = self.config.train
    if t.steps_per_stage > 0:
      return int(t.steps_per_stage)
    return int(self.epochs_per_stage * math.ceil(n_cells / self.spec.batch_size))

  @property
  def epochs_per_stage(self) -> int:
    return int(self.config.train.epochs_per_stage)

  def check_steps(self) -> None:
    """Fails before any training when a stage would get zero steps."""

  def feed(self, k: int, start: int) -> Feed | None:
    return None

  def stage_end(self, k: int, state: TrainState, data: StageData) -> StageEnd:
    """What the loss transforms may use to consolidate after stage k."""
    return StageEnd(stage=k, params=state.params, active_genes=state.active_genes,
                    task_loss=self.task_loss,
                    batches=lambda n: self.consolidation_batches(k, data, n),
                    stage_cells=data.cells,
                    stage_rows=data.columns_to_rows[data.columns_to_rows > 0],
                    active_classes=state.active_classes, seed=int(self.config.seed),
                    labels=data.labels, predict=self.stage_predict(state, data))

  def stage_predict(self, state: TrainState, data: StageData):
    """cells -> eval-mode outputs at the stage's masks, for transforms that rank cells (None:
    the task has no such outputs)."""
    return None

  def after_consolidation(self, k: int, state: TrainState, data: StageData) -> TrainState:
    """Task state updates at a stage end (e.g. the example bank)."""
    return state

  def evaluate(self, k: int, state: TrainState, results: dict) -> dict:
    """Scores after stage k, into `results`."""
    return results

  def stage_record(self, k: int, state: TrainState, data: StageData, n_steps: int,
                   timing: dict, last: dict) -> dict:
    raise NotImplementedError

  def new_results(self) -> dict:
    raise NotImplementedError

  def grow_results(self, results: dict) -> dict:
    """Results saved by a run with fewer stages (before `extend`), padded to this runner's
    stages; the padded matrices gain a row and a column per new stage."""
    return results

  def meta(self, k: int) -> dict:
    """Task facts saved with every checkpoint (plan, vocabularies, calibration constants...)."""
    return {}

  def restore_meta(self, meta: dict) -> None:
    """Reads back what `meta` saved, when resuming."""

  def finish(self, state: TrainState | None, results: dict) -> dict:
    return results

  def write_outputs(self, workdir: str, results: dict) -> None:
    raise NotImplementedError

  def input_files(self) -> list[str]:
    return []

  def compilations(self) -> dict:
    """How often the jitted steps compiled (1 each: masks flip, shapes never change)."""
    out = {"train_step": self.train_step._cache_size()}
    if getattr(self, "eval_step", None) is not None:
      out["eval_step"] = self.eval_step._cache_size()
    return out

  # ----------------------------------------------------------------------------- inputs

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

  def put_batch(self, batch: Batch):
    """One (this process's rows of a) batch -> a device Batch sharded on 'data'."""
    if jax.process_count() == 1:
      return jax.device_put(batch, self.inputs_sharding["main"])
    return distributed.global_batch(batch, self.mesh)

  def batch_maker(self, k: int, data: StageData, seed: int) -> batching.StageBatchMaker:
    """step -> (step, this process's rows of stage k's global batch at that step)."""
    return batching.StageBatchMaker(self.data, data.cells, data.columns_to_rows, self.spec, seed,
                                    k, labels=data.labels, shard=jax.process_index(),
                                    n_shards=jax.process_count(),
                                    block=self.config.data.shuffle_block)

  def batches(self, k: int, data: StageData, seed: int, start: int, n: int
              ) -> Iterator[tuple[int, Batch]]:
    """This process's rows of the global batches of steps start .. start+n-1."""
    make = self.batch_maker(k, data, seed)
    return (make(step) for step in range(start, start + n))

  def train_inputs(self, k: int, data: StageData, transforms, start: int, n: int):
    """Iterator of (step, device inputs) for steps start .. start+n-1 of stage k, built
    `PREFETCH` steps ahead by the input pipeline (`data/loader.py`; `config.data.workers`
    processes, or a background thread).

    Batches stay a pure function of (seed, stage, step), so resuming at `start` is exact. With
    several processes each builds only its rows of every global batch and of the transforms'
    extra inputs (computed whole, then sliced: they are small and deterministic). `transforms`:
    a host copy of the transform states (the step donates the device state, so the producer
    thread must not read it).
    """
    pid, n_proc = jax.process_index(), jax.process_count()
    feed = self.feed(k, start)

    def build(item):
      step, batch = item
      extras = {}
      if self.transform.extra_inputs is not None:
        extras = self.transform.extra_inputs(
            transforms, None if feed is None else dataclasses.replace(feed, step=step))
        if n_proc > 1:
          extras = jax.tree.map(lambda x: _process_rows(x, pid, n_proc), extras)
      return step, self.put_inputs({"main": batch, **extras})

    return loader.StepIterator(self.batch_maker(k, data, self.config.seed + data.seed), start, n,
                               workers=self.config.data.workers, prefetch=PREFETCH, post=build)

  def consolidation_batches(self, k: int, data: StageData, n: int):
    """n batches of stage k's training data, for transforms that estimate statistics."""
    for _, batch in self.batches(k + self.consolidation_stage_offset, data,
                                 self.config.seed + self.consolidation_seed_offset, 0, n):
      yield {"main": self.put_batch(batch)}

  consolidation_seed_offset = 7919
  consolidation_stage_offset = 0

  # ----------------------------------------------------------------------------- state edits

  def begin_stage(self, state: TrainState, k: int) -> TrainState:
    """Stage k's masks (a flip, no recompilation) and, if configured, a fresh optimizer."""
    masks = {name: jax.device_put(jnp.asarray(m), getattr(self.state_sharding, name))
             for name, m in self.stage_masks(k).items()}
    state = state.replace(**masks)
    if self.reset_opt_state and k > 0:
      state = self.reset_optimizer(state)
    return state

  def set_active(self, state: TrainState, mask: np.ndarray) -> TrainState:
    return state.replace(active_genes=jax.device_put(jnp.asarray(mask),
                                                     self.state_sharding.active_genes))

  def reset_optimizer(self, state: TrainState) -> TrainState:
    return state.replace(opt_state=self._opt_init(state.params))


# --------------------------------------------------------------------------------- the loop

def _setup_logging(workdir: str) -> None:
  """`train.log` in the workdir gets the run's log; its first line says how the host runs."""
  handler = logging.FileHandler(os.path.join(workdir, "train.log"))
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  log.handlers = [h for h in log.handlers if not isinstance(h, logging.FileHandler)] + [handler]
  log.setLevel(logging.INFO)
  handler.emit(log.makeRecord(log.name, logging.INFO, __file__, 0, hostenv.describe(), (), None))


@contextlib.contextmanager
def open_workdir(workdir: str):
  """The workdir's lock (process 0) and SIGTERM / SIGINT handling, with `train.log` set up;
  yields the preemption handler."""
  guards.prepare_workdir(workdir)
  multi = jax.process_count() > 1
  with guards.WorkdirLock(workdir, enabled=jax.process_index() == 0), \
       guards.Preemption(multi_process=multi) as preempt:
    _setup_logging(workdir)
    yield preempt


def run(runner: Runner, workdir: str, ckpt: checkpoint.Checkpointer, preempt,
        stop_after_steps: int | None = None, progress_bar: bool = True,
        extending: bool = False) -> dict:
  """Runs (or resumes) every stage of `runner`'s experiment; returns results.json.

  `ckpt` is open on the workdir (the task read its newest meta to rebuild the runner);
  `stop_after_steps` stops (after checkpointing) once that many train steps ran in this call;
  tests use it to simulate an interruption. A non-finite loss raises `guards.NonFiniteError`
  before anything non-finite is checkpointed; a signal checkpoints at the next step boundary
  and raises `guards.Interrupted`. `extending`: the runner's stages are the workdir's run's
  stages followed by new ones (`gil_jax.tasks.extend`); the run's data must be a prefix of the
  runner's data.
  """
  config = runner.config
  data_fp = integrity.data_fingerprint(runner.input_files(), runner.data)
  ckpt.extra_meta = {"data": data_fp}
  latest, meta = ckpt.latest_meta()
  with guards.user_errors("invalid config or data"):
    if latest is not None and extending:
      integrity.check_extends_data(meta.get("data"), data_fp, runner.data, workdir)
      check_extends_stages(saved_stage_names(meta), runner.stage_names, workdir)
    elif latest is not None:
      integrity.check_same_data(meta.get("data"), data_fp, workdir)
    runner.check_steps()
  n_stages = len(runner.stage_names)
  progress = {"stage": 0, "step_in_stage": 0, "stage_done": False, "seconds": 0.0}
  results = runner.new_results()
  if latest is not None:
    progress, results = meta["progress"], runner.grow_results(meta["results"])
    runner.restore_meta(meta)
    log.info("resuming from checkpoint step %d: %s", latest, progress)
  state = runner.initial_state()
  finished = (latest is not None and progress.get("stage_done", True)
              and progress["stage"] == n_stages - 1)
  saved_capacity = int((meta or {}).get("config", {}).get("genes", {}).get("capacity")
                       or runner.capacity)
  if saved_capacity > runner.capacity:
    raise guards.RunError(f"the run in {workdir!r} has a {saved_capacity}-row gene table; "
                          f"config.genes.capacity={runner.capacity} would shrink it (it only "
                          "grows); drop the override.")
  if latest is not None and (not finished or runner.final_needs_state):
    abstract = checkpoint.abstract_like(state)
    if saved_capacity < runner.capacity:  # an extension grew the gene table (gil_jax/surgery.py)
      abstract = surgery.shrink_abstract(abstract, runner.capacity, saved_capacity)
    good, restored, good_meta = ckpt.restore_good(abstract)
    if good is None:
      raise guards.RunError(f"no checkpoint in {ckpt.directory} restores (all were damaged and "
                            "moved to checkpoints.damaged/); rerun to start over.")
    if saved_capacity < runner.capacity:
      log.info("growing the gene table from %d to %d rows", saved_capacity, runner.capacity)
      restored = jax.device_put(surgery.grow_state(restored, saved_capacity, runner.capacity,
                                                   state.params), runner.state_sharding)
    state = restored
    if good != latest:
      progress, results = good_meta["progress"], runner.grow_results(good_meta["results"])
      runner.restore_meta(good_meta)
      log.warning("resuming from checkpoint step %d instead of the damaged step %d: re-doing "
                  "stage %d from step %d", good, latest,
                  progress["stage"] + (1 if progress.get("stage_done", True) else 0),
                  0 if progress.get("stage_done", True) else progress["step_in_stage"])

  mid_steps = [s for s in ckpt.manager.all_steps()
               if not ckpt.read_meta(s).get("progress", {}).get("stage_done", True)]

  def save(k: int, progress: dict) -> None:
    """Saves; drops older mid-stage checkpoints, so that `keep` holds finished stages."""
    step = int(state.step)
    ckpt.save(step, state, _meta(runner, k, results, progress))
    clock.reset()
    for old in [s for s in mid_steps if s < step]:
      ckpt.manager.delete(old)
      mid_steps.remove(old)
    if not progress["stage_done"]:
      mid_steps.append(step)

  first = progress["stage"] + (1 if progress.get("stage_done", True) else 0)
  steps_run = 0
  batches = bar = None
  clock = guards.CheckpointClock(config.train.checkpoint_minutes, jax.process_count() > 1,
                                 config.train.log_every)
  try:
    for k in range(first, n_stages):
      name = runner.stage_names[k]
      resuming = (progress["stage"] == k and not progress.get("stage_done", True)
                  and progress["step_in_stage"] > 0)
      start = progress["step_in_stage"] if resuming else 0
      stage_seconds = progress.get("seconds", 0.0) if resuming else 0.0
      if not resuming:
        state = runner.begin_stage(state, k)
      data = runner.stage_data(k, state)
      n_steps = runner.stage_steps(len(data.cells))
      host_transforms = (jax.device_get(state.transforms)
                         if runner.transform.extra_inputs is not None else None)
      last: dict = {}
      cells, t_measure, t0, first_step_seconds = 0, 0.0, time.time(), 0.0
      bar = tqdm(total=n_steps, initial=start, desc=f"stage {k} {name}", leave=True,
                 disable=not progress_bar, dynamic_ncols=True)
      batches = runner.train_inputs(k, data, host_transforms, start, n_steps - start)
      for step, inputs in batches:
        t_step = time.time()
        state, metrics = runner.train_step(state, inputs)
        done = step + 1
        logged = done % config.train.log_every == 0 or done == n_steps
        where = dict(step=done, stage=k, stage_name=name, ckpt=ckpt)
        if logged:
          last = {key: float(v) for key, v in jax.device_get(metrics).items()}
          guards.check_finite(last, config, **where)
          bar.set_postfix({key.split("/")[-1]: f"{v:.4f}" for key, v in last.items()
                           if key.startswith("loss")}
                          | {"cells/s": f"{cells / max(t_measure, 1e-9):.0f}"})
        jax.block_until_ready(state.step)
        if step > start:  # the first step of a stage may include compilation
          cells += int(metrics["cells"]) if "cells" in metrics else runner.spec.batch_size
          t_measure += time.time() - t_step
        else:
          first_step_seconds = time.time() - t_step
        bar.update(1)
        steps_run += 1
        stop = preempt.should_stop(int(state.step))
        if done < n_steps and (done % config.train.checkpoint_every == 0 or
                               steps_run == stop_after_steps or stop or clock.due(done)):
          if not logged:  # never checkpoint a step whose loss was not checked
            guards.check_finite(jax.device_get(metrics), config, **where)
          guards.check_state_finite(state, config, **where)
          save(k, {"stage": k, "step_in_stage": done, "stage_done": False,
                   "seconds": stage_seconds + time.time() - t0})
          if stop:
            raise guards.Interrupted(guards.interrupted_message(
                preempt.signal, f"step {done} of {n_steps} of stage {k} ({name})",
                int(state.step), ckpt.directory))
        if steps_run == stop_after_steps and done < n_steps:
          return results
      batches.close()
      bar.close()
      stage_seconds += time.time() - t0

      end = runner.stage_end(k, state, data)
      state = state.replace(transforms=jax.device_put(
          runner.transform.consolidate(state.transforms, state.params, end),
          runner.state_sharding.transforms))
      state = runner.after_consolidation(k, state, data)
      timing = {"seconds": round(stage_seconds, 2),
                "cells_per_s": round(cells / t_measure, 1) if t_measure > 0 else None,
                "first_step_seconds": round(first_step_seconds, 3)}
      results["stages"].append(runner.stage_record(k, state, data, n_steps, timing, last))
      results = runner.evaluate(k, state, results)
      log.info("stage %d (%s) done: %s", k, name, results["stages"][-1])
      guards.check_state_finite(state, config, step=n_steps, stage=k, stage_name=name,
                                ckpt=ckpt)
      save(k, {"stage": k, "step_in_stage": n_steps, "stage_done": True, "seconds": 0.0})
      if jax.process_index() == 0:
        write_model_card(workdir, runner, results, k)
      if k < n_stages - 1 and preempt.should_stop(int(state.step)):
        raise guards.Interrupted(guards.interrupted_message(
            preempt.signal, f"the end of stage {k} ({name})", int(state.step), ckpt.directory))
  except KeyboardInterrupt:
    log.warning("interrupted; rerun the same command to resume from the last checkpoint")
    raise
  finally:
    if batches is not None:
      batches.close()
    if bar is not None:
      bar.close()  # before any error message, so that it starts its own line
    ckpt.close()

  results = runner.finish(state if (steps_run or runner.final_needs_state) else None, results)
  if steps_run:
    results["compilations"] = runner.compilations()
  else:  # a finished workdir rerun: keep the counts of the run that trained
    results.setdefault("compilations", _previous_results(workdir).get("compilations"))
  results = guards.finite_or_none(results)  # strict JSON: null, never NaN
  if jax.process_index() == 0:
    runner.write_outputs(workdir, results)
  return results


def write_model_card(workdir: str, runner: Runner, results: dict, k: int) -> None:
  """`model_card.md`: what the model in this workdir is, rewritten at every stage end."""
  from gil_jax import __version__
  from gil_jax.eval.report import markdown_table
  config, names = runner.config, runner.stage_names
  matrix, what = ((results["accuracy_matrix"], "accuracy on each stage's held-out cells")
                  if "accuracy_matrix" in results else
                  (results["gene_regression"]["matrix"],
                   "masked-expression MSE on each stage's genes (held-out cells)"))
  n_cols = len(matrix[0]) if matrix else 0
  columns = names if n_cols == len(names) else [f"stage {j}" for j in range(n_cols)]
  lines = [f"# Model card: {config.experiment}", "",
           f"- task: `{runner.task}`, method: `{config.method}`, loss transforms: "
           f"{', '.join(results.get('transforms') or []) or 'none'}",
           f"- trained: {k + 1} of {len(names)} stages ({', '.join(names[:k + 1])})",
           f"- backbone: `{config.model.name}`, d_model {config.model.d_model}, "
           f"{config.model.n_layers} layers, value encoding `{config.model.get('value_encoding')}`",
           f"- gil_jax {__version__}; packages: "
           + ", ".join(f"{p} {v}" for p, v in (results.get("versions") or {}).items()),
           f"- config fingerprint `{checkpoint.fingerprint(config)}`",
           f"- use: `gil_jax.load('{workdir}')`, or `gil-jax annotate|embed|info --workdir "
           f"{workdir}`",
           "", f"After each stage (rows), {what} of each stage (columns):", "",
           markdown_table(["after \\ of"] + columns,
                          [[names[i]] + list(row) for i, row in enumerate(matrix) if i <= k]),
           ""]
  with open(os.path.join(workdir, "model_card.md"), "w") as f:
    f.write("\n".join(lines))


def _meta(runner: Runner, k: int, results: dict, progress: dict) -> dict:
  config = runner.config
  return {"task": runner.task, "experiment": config.experiment,
          "fingerprint": checkpoint.fingerprint(config),
          "config": checkpoint.config_for_fingerprint(config),
          "run_config": json.loads(config.to_json_best_effort()),  # field order kept
          "stage_names": list(runner.stage_names), **runner.meta(k),
          "results": results, "progress": progress}


def saved_stage_names(meta: dict) -> list[str]:
  """The stage names of a checkpoint's run (older checkpoints: from the plan / stream)."""
  if "stage_names" in meta:
    return list(meta["stage_names"])
  stages = meta.get("stages") or meta.get("plan", {}).get("stages", [])
  return [s["name"] for s in stages]


def check_extends_stages(saved: list[str], current: list[str], workdir: str) -> None:
  """ExtensionError unless `current` is `saved` followed by new stages."""
  if current[:len(saved)] != saved:
    raise ExtensionError(
        f"extending {workdir!r}: the run's stages {saved} must come first, in order, but the "
        f"extended run has {current[:len(saved) + 2]}...; extend appends stages, it does not "
        "reorder them.")


def grow_matrix(matrix: list, n: int) -> list:
  """A (ragged-safe) stage x stage matrix of None-padded rows, grown to n x n."""
  rows = [list(r) + [None] * (n - len(r)) for r in matrix]
  return rows + [[None] * n for _ in range(n - len(rows))]


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
