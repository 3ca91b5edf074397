"""Continual cell-type annotation as a task of the shared loop: `train_annotation(config, workdir)`.

What this task supplies (gil_jax/core/loop.py runs the rest): a backbone (fresh, or from a
finished workdir: `config.canal.init_workdir`) with a growing class head; stages from the labelled
dataset stream (`canal.stream`); per stage the gene and class masks (a flip, no recompilation)
and the stage's cells; label-smoothed cross-entropy with the method's loss transforms
(`config.method`: CANAL's example bank, a replay transform in gil_jax/canal/bank.py, and its
representation distillation); after every stage the accuracy row
on every stage's held-out cells; at the end novelty calibration, the final evaluation with
logistic-regression and kNN baselines, and the report.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import jax
import ml_collections
import numpy as np

from gil_jax import checkpoint, guards, integrity, surgery
from gil_jax.canal import bank as bank_lib
from gil_jax.canal import loss as loss_lib  # registers canal_rkd / canal_lwf
from gil_jax.canal import report
from gil_jax.canal.evaluate import check_novelty_rule, final_evaluation, novelty_calibration
from gil_jax.canal.labels import LabelVocab
from gil_jax.canal.model import eval_step_for, init_params, load_gil_params, trainable_labels
from gil_jax.canal.stream import (DEPTH_INPUT, Stream, build_stream, corpus_sources,
                                  warn_if_old_depth_input)
from gil_jax.data import anndata_io, batching
from gil_jax.data.vocab import NEVER, GeneVocab
from gil_jax.data.corpus import resolve_path
from gil_jax.experiment import as_names
from gil_jax.losses import registry
from gil_jax.models import build_model
from gil_jax.core import loop
from gil_jax.core.loop import StageData
from gil_jax.core.state import TrainState, init_state, make_optimizer


def build_vocabs(config, stream: Stream, gil_vocab: GeneVocab | None):
  """Gene vocabulary (stage k activates its datasets' genes) and label vocabulary."""
  joint = registry.preset(config).joint
  if gil_vocab is not None:  # every pre-trained gene active, except class-confounded ones
    left_out = set(stream.data.gene_ids[stream.confounded])
    vocab = dataclasses.replace(gil_vocab, activated_at=[
        NEVER if g in left_out else 0 for g in gil_vocab.gene_ids])
    vocab.__post_init__()
  else:
    vocab = GeneVocab(config.genes.capacity)
  labels = LabelVocab(config.canal.max_classes)
  for k in range(len(stream.stages)):
    if gil_vocab is None:
      vocab.activate(stream.stage_genes(k), 0 if joint else k)
    labels.activate(stream.labels[stream.stages[k].train_cells], 0 if joint else k)
  return vocab, labels


def columns_to_rows(stream: Stream, vocab: GeneVocab, stage: int) -> np.ndarray:
  rows = vocab.rows(list(stream.data.gene_ids), missing="pad")
  return np.where(vocab.active_mask(stage)[rows], rows, 0).astype(np.int32)


class Runner(loop.Runner):
  """The annotation task: compiled functions and static pieces of one annotation run."""

  task = "annotation"
  reset_opt_state = True      # CANAL: a fresh optimizer at every stage
  final_needs_state = True    # the final evaluation reads the trained model
  consolidation_seed_offset = 0
  consolidation_stage_offset = 1000

  def __init__(self, config, stream: Stream, vocab: GeneVocab, labels: LabelVocab,
               init_backbone=None, gil_init: dict | None = None):
    self.config, self.stream, self.data = config, stream, stream.data
    self.gene_vocab, self.labels, self.gil_init = vocab, labels, gil_init
    self.preset = registry.preset(config)
    self.use_bank = (bank_lib.NAME in registry.transform_names(config)
                     and config.canal.bank_size > 0)
    self.joint = self.preset.joint
    self.label_rows = labels.rows(stream.labels, missing=-1)
    self.capacity = config.genes.capacity
    # sources are normalised on the host (stream.normalise_values); no values are hidden
    self.spec = batching.spec_from_config(config.batch, mask_ratio=0.0, normalisation="none")
    self.eval_spec = dataclasses.replace(self.spec, batch_size=config.eval.batch_size)
    self.backbone = build_model(config.model, config.genes.capacity, "mse")
    self.init_backbone = init_backbone
    abstract = jax.eval_shape(lambda k: init_params(self.backbone, config, k),
                              jax.random.PRNGKey(0))
    self.tx = make_optimizer(config.train, trainable=trainable_labels(
        abstract, config.canal.trainable, config.canal.trainable_blocks))
    self.transform = registry.build(config)
    self.task_loss = loss_lib.make_task_loss(self.backbone, config.canal.label_smoothing,
                                            float(config.canal.get("token_dropout", 0.0)))
    self.train_plan = ([("joint", np.concatenate([s.train_cells for s in stream.stages]))]
                       if self.joint else [(s.name, s.train_cells) for s in stream.stages])
    self.calib: dict | None = None
    self.compile()
    self.eval_step = eval_step_for(config.model, config.genes.capacity)

  def init_state(self, key) -> TrainState:
    pkey, skey = jax.random.split(key)
    params = init_params(self.backbone, self.config, pkey)
    return init_state(params, self.tx, self.transform.init(params), skey, self.capacity,
                      n_classes=self.config.canal.max_classes)

  def initial_state(self) -> TrainState:
    state = super().initial_state()
    if self.init_backbone is None:
      return state
    params = dict(state.params, backbone=jax.device_put(
        self.init_backbone, self.state_sharding.params["backbone"]))
    transforms = jax.jit(self.transform.init, out_shardings=self.state_sharding.transforms)(params)
    return state.replace(params=params, opt_state=self._opt_init(params), transforms=transforms)

  def predict(self, params, active_genes, active_classes, cells, c2r) -> dict[str, np.ndarray]:
    """Eval-mode outputs for `cells` (logits, probs, m, h, cell_emb), host numpy."""
    outs = []
    for b in batching.eval_batches(self.data, cells, c2r, self.eval_spec,
                                   self.config.eval.mask_seed):
      o = jax.device_get(self.eval_step(params, b, active_genes, active_classes))
      outs.append({k: v[np.asarray(b.cell_mask)] for k, v in o.items()})
    if not outs:
      return {}
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  # ------------------------------------------------------------------------------- stages

  @property
  def stage_names(self) -> list[str]:
    return [name for name, _ in self.train_plan]

  def columns_to_rows(self, k: int) -> np.ndarray:
    return columns_to_rows(self.stream, self.gene_vocab, k)

  def stage_masks(self, k: int) -> dict[str, np.ndarray]:
    return {"active_genes": self.gene_vocab.active_mask(k),
            "active_classes": self.labels.active_mask(k)}

  def stage_data(self, k: int, state: TrainState) -> StageData:
    bank = self.bank(state)  # replayed during stage k (refilled at its end)
    self.n_banked = int(bank_lib.occupied(bank).sum()) if bank is not None else 0
    return StageData(cells=self.train_plan[k][1], columns_to_rows=self.columns_to_rows(k),
                     labels=self.label_rows)

  def feed(self, k: int, start: int) -> loop.Feed:
    return loop.Feed(self.data, None, None, self.spec, self.config.seed, k, start,
                     columns_to_rows=self.columns_to_rows(k), labels=self.label_rows,
                     n_stage_cells=len(self.train_plan[k][1]))

  def stage_predict(self, state: TrainState, data: StageData):
    return lambda cells: self.predict(state.params, state.active_genes, state.active_classes,
                                      cells, data.columns_to_rows)

  def bank(self, state: TrainState) -> dict | None:
    """The example bank (host copy), or None without one."""
    return jax.device_get(state.transforms[bank_lib.NAME]) if self.use_bank else None

  def check_steps(self) -> None:
    for k, (name, cells) in enumerate(self.train_plan):  # zero steps fail before any training
      guards.check_steps(self.stage_steps(len(cells)), k, name, len(cells))

  # ------------------------------------------------------------------------------- results

  def new_results(self) -> dict:
    n = len(self.stream.stages)
    return {"experiment": self.config.experiment, "task": self.task,
            "method": self.config.method, "mode": self.config.method,
            "transforms": registry.transform_names(self.config),
            "versions": integrity.package_versions(), "bank": self.use_bank, "stages": [],
            "accuracy_matrix": [[None] * n for _ in range(1 if self.joint else n)]}

  def grow_results(self, results: dict) -> dict:
    n, m = len(self.train_plan), len(results["accuracy_matrix"])
    if m < n:
      results["accuracy_matrix"] = loop.grow_matrix(results["accuracy_matrix"], n)
      results.setdefault("extensions", []).append(
          {"first_stage": m, "stages": self.stage_names[m:]})
    return results

  def stage_record(self, k, state, data, n_steps, timing, last) -> dict:
    bank = self.bank(state)  # after this stage's refill
    counts = bank_lib.class_counts(bank) if bank is not None else {}
    return {"name": self.train_plan[k][0], "n_train_cells": int(len(data.cells)),
            "n_bank_cells": self.n_banked,
            "n_classes": int(np.sum(self.labels.active_mask(k))),
            "n_active_genes": int(self.gene_vocab.active_mask(k).sum()), "steps": int(n_steps),
            **timing, "final_loss": last.get("loss"), "train_accuracy": last.get("train_accuracy"),
            "bank_per_class": {self.labels.names[a]: b for a, b in counts.items()}}

  def evaluate(self, k: int, state: TrainState, results: dict) -> dict:
    c2r, row = self.columns_to_rows(k), []
    for j, st in enumerate(self.stream.stages):
      if not self.joint and j > k:
        row.append(None)
        continue
      test = st.test_cells[~np.isin(self.stream.labels[st.test_cells], self.stream.withheld)]
      out = self.predict(state.params, state.active_genes, state.active_classes, test, c2r)
      pred = np.argmax(out["logits"], -1) if len(test) else np.zeros(0)
      row.append(float(np.mean(pred == self.label_rows[test])) if len(test) else None)
    results["accuracy_matrix"][k] = row
    if k == len(self.train_plan) - 1:  # the run's novelty constants, saved for `annotate`
      self.calib = novelty_calibration(self, state, self.stream, self.label_rows, c2r)
    return results

  def meta(self, k: int) -> dict:
    c, stream = self.config.canal, self.stream
    return {"kind": "canal", "vocab": self.gene_vocab.to_json(),
            "label_vocab": self.labels.to_json(), "withheld": stream.withheld,
            "source_normalisation": {n: c.sources[n].get("normalisation", "log1p_cp10k")
                                     for n in c.sources},
            "stages": [{"name": s.name, "source": s.source, "n_train": int(len(s.train_cells)),
                        "n_test": int(len(s.test_cells))} for s in stream.stages],
            "gil_init": self.gil_init, "novelty": self.calib, "depth_input": DEPTH_INPUT}

  def restore_meta(self, meta: dict) -> None:
    self.calib = meta.get("novelty")
    warn_if_old_depth_input(meta, "this run")
    if meta.get("vocab"):  # the vocabulary is rebuilt from config, data and labels: it must
      saved = GeneVocab.from_json(meta["vocab"])  # begin with the checkpointed one
      n = len(saved.gene_ids)
      if (list(self.gene_vocab.gene_ids[:n]) != list(saved.gene_ids)
          or list(self.gene_vocab.activated_at[:n]) != list(saved.activated_at)):
        raise guards.RunError(
            "the gene vocabulary rebuilt from the config and data differs from the checkpointed "
            "one (genes, their order or the stage they became active); resume with the config "
            "and files the run was trained with, or start a new workdir.")

  def finish(self, state: TrainState | None, results: dict) -> dict:
    last = len(self.train_plan) - 1
    results["annotation"] = final_evaluation(
        self, state, self.stream, self.labels, self.label_rows, self.columns_to_rows(last),
        [s.name for s in self.stream.stages], results["accuracy_matrix"], self.joint,
        self.calib)
    results["annotation"]["gil_init"] = self.gil_init
    return results

  def write_outputs(self, workdir: str, results: dict) -> None:
    report.write_outputs(workdir, results)

  def input_files(self) -> list[str]:
    c = self.config
    return [resolve_path(c.canal.sources[n].file, c.data.data_dir) for n in c.canal.sources]


def train_annotation(config: ml_collections.ConfigDict, workdir: str,
                     progress_bar: bool = False, extending: bool = False) -> dict:
  """Runs (or resumes) a continual annotation experiment; writes results.json and report.md.

  `extending`: `config` is the workdir's run with stages appended (`extend_config`); the run's
  gene and label vocabularies must be prefixes of the extended ones.

  Holds the workdir lock while running; SIGTERM / SIGINT checkpoint at the next step boundary and
  raise `guards.Interrupted` (rerun to resume mid-stage); a non-finite loss raises
  `guards.NonFiniteError` before anything non-finite is checkpointed.
  """
  c = config.canal
  with loop.open_workdir(workdir) as preempt:
    with guards.user_errors("invalid config or data"):
      registry.transform_names(config)
      check_novelty_rule(config)
      if float(c.get("min_gene_class_coverage", 0.0)) > 0 and not registry.preset(config).joint:
        raise anndata_io.DataError(
            f"config.canal.min_gene_class_coverage={c.min_gene_class_coverage} reads every "
            "training source's cell types before training, which a continual run (method "
            f"{config.method!r}) does not know yet; use it with --config.method=joint, or set "
            "it to 0.")
      if not len(c.sources) and as_names(config.data.files):  # a labelled corpus: its files
        config = copy.deepcopy(config)                         # become this run's sources
        with config.unlocked():
          config.canal.sources = corpus_sources(config)
        c = config.canal
      stream = build_stream(config)
      gil_vocab, init_backbone, gil_init = None, None, None
      if c.init_workdir:
        init_backbone, gil_vocab, saved = load_gil_params(c.init_workdir)
        with config.unlocked():
          config.model = ml_collections.ConfigDict(saved["model"])
          config.genes.capacity = int(gil_vocab.capacity)
        known = set(gil_vocab.gene_ids)
        in_table = np.isin(stream.data.gene_ids, list(known))
        n_known = int((in_table & ~stream.confounded).sum())  # mapped and used
        gil_init = {"workdir": os.path.abspath(c.init_workdir), "vocab_genes": len(gil_vocab),
                    "data_genes": int(stream.data.n_genes), "mapped_genes": int(n_known),
                    "dropped_genes": int(stream.data.n_genes - in_table.sum()),
                    "class_confounded_genes": int((in_table & stream.confounded).sum())}
        loop.log.info("init from %s: %s", c.init_workdir, gil_init)
      if extending and gil_vocab is None:  # new genes may need a larger gene table
        genes = {g for k in range(len(stream.stages)) for g in stream.stage_genes(k)}
        config.genes.capacity = surgery.capacity_for(len(genes), config.genes.capacity)
      vocab, labels = build_vocabs(config, stream, gil_vocab)
      runner = Runner(config, stream, vocab, labels, init_backbone, gil_init)
    # keep 3: the last finished stage survives a mid-stage (preemption / time) checkpoint
    ckpt = checkpoint.Checkpointer(workdir, keep=3)
    try:
      ckpt.check_same_experiment(config, extending=extending)
      if extending:
        check_extends_vocabs(ckpt.latest_meta()[1], vocab, labels, runner, workdir)
    except BaseException:
      ckpt.close()
      raise
    return loop.run(runner, workdir, ckpt, preempt, None, progress_bar, extending=extending)


def check_extends_vocabs(meta: dict | None, vocab: GeneVocab, labels: LabelVocab, runner: Runner,
                         workdir: str) -> None:
  """ExtensionError unless the run's genes and labels keep their rows in the extended run."""
  if meta is None:
    return
  if runner.joint:
    raise loop.ExtensionError(
        f"{workdir!r} was trained with config.method='joint' (every stage at once); a joint run "
        "is retrained, not extended: list the new dataset in the config and train a new workdir.")
  old_genes = GeneVocab.from_json(meta["vocab"]).gene_ids
  old_labels = LabelVocab.from_json(meta["label_vocab"]).names
  if list(vocab.gene_ids[:len(old_genes)]) != list(old_genes) or \
     list(labels.names[:len(old_labels)]) != list(old_labels):
    raise loop.ExtensionError(
        f"extending {workdir!r}: the run's gene or label vocabulary would be renumbered; the "
        "extension must keep the run's sources in their order (extend with new files only).")


def extend_config(config: ml_collections.ConfigDict, meta: dict, files: list[str],
                  label_key: str = "", normalisation: str = "auto", layer: str = "",
                  names: list[str] | None = None) -> ml_collections.ConfigDict:
  """The run's config with one training stage per file appended (a new source each; a file that
  is already one of the run's test-only sources becomes a training stage); files already trained
  on are left as they are, so rerunning an interrupted extension resumes it."""
  from gil_jax.canal.annotate import detect_normalisation  # noqa: PLC0415 -- imports this
  from gil_jax.canal.stream import source_names  # noqa: PLC0415
  d = config.to_dict()
  sources, data_dir = d["canal"]["sources"], config.data.data_dir
  source_order = source_names(config.canal)  # the run's cells keep their indices
  by_path = {os.path.abspath(resolve_path(src["file"], data_dir)): n for n, src in sources.items()}
  test_only = as_names(config.canal.test_only)
  order = loop.saved_stage_names(meta)
  for i, f in enumerate(files):
    path = os.path.abspath(f)
    name = by_path.get(path)
    if name is not None and name not in test_only:  # already a training source: resume
      continue
    if name is None:
      name = names[i] if names else os.path.splitext(os.path.basename(path))[0]
      while name in sources:
        name += "_ext"
      first = next(iter(sources.values()), {})
      col = label_key or config.data.label_column or first.get("label_column", "")
      data = anndata_io.read_h5ad(path, layer=layer or None, name=name)
      loop.check_shared_genes(path, data.gene_ids, GeneVocab.from_json(meta["vocab"]).gene_ids,
                              int(config.canal.min_shared_genes),
                              "config.canal.min_shared_genes")
      if col not in data.obs.columns:
        raise loop.ExtensionError(
            f"{path}: no obs column {col!r} with cell-type labels (obs columns: "
            f"{list(data.obs.columns)}); pass --label-key COLUMN (label_key= in Python).")
      sources[name] = dict(
          file=path, label_column=col, layer=layer,
          normalisation=(normalisation if normalisation != "auto" else
                         detect_normalisation(data, f"file {path!r}")),
          gene_column="", split_column="", split_values=())
      source_order.append(name)
      order.append(name)
    else:  # a test-only source of the run becomes training stage(s)
      test_only.remove(name)
      if label_key:
        sources[name]["label_column"] = label_key
      order += source_stage_names(name, sources[name], data_dir)
  d["canal"]["test_only"], d["canal"]["stage_order"] = tuple(test_only), tuple(order)
  d["canal"]["source_order"] = tuple(source_order)
  return ml_collections.ConfigDict(d)


def source_stage_names(name: str, src: dict, data_dir: str) -> list[str]:
  """The stage names `build_stream` gives a source: its name, or name:value per value of its
  split column."""
  col = src.get("split_column", "")
  if not col:
    return [name]
  values = as_names(src.get("split_values", ()))
  if not values:
    import anndata as ad  # noqa: PLC0415
    obs = ad.read_h5ad(resolve_path(src["file"], data_dir), backed="r").obs
    values = sorted(set(obs[col].astype(str)))
  return [f"{name}:{v}" for v in values]
