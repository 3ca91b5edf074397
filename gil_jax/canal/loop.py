"""The stage loop of continual annotation: `train_annotation(config, workdir)` -> results.

Per stage: activate the stage's genes and cell types (mask flips, no recompilation), reset the
optimizer, train on the stage's cells plus the example bank (CANAL / replay), consolidate the
loss transforms (teacher snapshot), update the bank, score every stage's held-out cells, and
checkpoint (state with the bank as arrays; label vocabulary, gene vocabulary, stage cells and
results in the JSON meta). Rerunning with the same workdir resumes after the last finished stage.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from gil_jax import checkpoint, guards, integrity
from gil_jax.canal import bank as bank_lib
from gil_jax.canal import loss as loss_lib  # registers canal_rkd / canal_lwf
from gil_jax.canal import metrics, novelty, report
from gil_jax.canal.labels import UNASSIGNED, LabelVocab
from gil_jax.canal.model import (AnnotState, eval_step_for, init_params, load_gil_params,
                                 make_train_step, make_tx)
from gil_jax.canal.stream import Stream, build_stream
from gil_jax.data import batching
from gil_jax.data.vocab import GeneVocab
from gil_jax.experiment import resolve_path
from gil_jax.eval import baselines
from gil_jax.losses import registry, transforms
from gil_jax.models import build_model

log = logging.getLogger("gil_jax")

MODES = {"canal": (True, ("canal_rkd",)), "finetune": (False, ()), "replay": (True, ()),
         "distill": (False, ("canal_rkd",)), "lwf": (False, ("canal_lwf",)),
         "ewc": (False, ("ewc",)), "joint": (False, ())}


def mode_setup(config) -> tuple[bool, tuple[str, ...]]:
  mode = config.canal.mode
  if mode not in MODES:
    raise ValueError(f"unknown config.canal.mode {mode!r}; known: {sorted(MODES)}")
  use_bank, names = MODES[mode]
  if "ewc" in names and "ewc" not in registry.TRANSFORMS:
    try:
      import gil_jax.losses.ewc  # noqa: F401  (registers itself when present)
    except ImportError:
      pass
    if "ewc" not in registry.TRANSFORMS:
      raise ValueError("config.canal.mode='ewc' needs the 'ewc' loss transform "
                       "(gil_jax/losses/ewc.py), which is not available in this tree.")
  return use_bank and config.canal.bank_size > 0, names


def build_vocabs(config, stream: Stream, gil_vocab: GeneVocab | None):
  """Gene vocabulary (stage k activates its datasets' genes) and label vocabulary."""
  joint = config.canal.mode == "joint"
  if gil_vocab is not None:
    vocab = dataclasses.replace(gil_vocab, activated_at=[0] * len(gil_vocab))
    vocab.__post_init__()
  else:
    vocab = GeneVocab(config.genes.capacity)
  labels = LabelVocab(config.canal.max_classes)
  n = len(stream.stages)
  for k in range(n):
    genes = stream.stage_genes(k)
    if gil_vocab is None:
      vocab.activate(genes, 0 if joint else k)
    labels.activate(stream.labels[stream.stages[k].train_cells], 0 if joint else k)
  return vocab, labels


def columns_to_rows(stream: Stream, vocab: GeneVocab, stage: int) -> np.ndarray:
  rows = vocab.rows(list(stream.data.gene_ids), missing="pad")
  return np.where(vocab.active_mask(stage)[rows], rows, 0).astype(np.int32)


class Annotator:
  """Compiled functions and static pieces of one annotation run."""

  def __init__(self, config, stream: Stream, init_backbone=None):
    self.config, self.stream = config, stream
    self.use_bank, self.names = mode_setup(config)
    self.spec = batching.BatchSpec(batch_size=config.batch.batch_size,
                                   n_tokens=config.batch.n_tokens, mask_ratio=0.0,
                                   normalisation="none", sampling=config.batch.sampling,
                                   zero_tokens=config.batch.zero_tokens)
    self.eval_spec = dataclasses.replace(self.spec, batch_size=config.eval.batch_size)
    self.backbone = build_model(config.model, config.genes.capacity, "mse")
    key = jax.random.PRNGKey(config.seed)
    pkey, skey = jax.random.split(key)
    params = init_params(self.backbone, config, pkey)
    if init_backbone is not None:
      params["backbone"] = jax.tree.map(jnp.asarray, init_backbone)
    self.tx = make_tx(config, params)
    self.transform = transforms.chain([(n, registry.TRANSFORMS[n](config)) for n in self.names])
    self.task_loss = loss_lib.make_task_loss(self.backbone, config.canal.label_smoothing)
    self.loss_fn = self.transform.wrap(self.task_loss)
    self.state0 = AnnotState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
        transforms=self.transform.init(params), rng=skey,
        active_genes=jnp.zeros((config.genes.capacity,), bool),
        active_classes=jnp.zeros((config.canal.max_classes,), bool),
        bank=bank_lib.empty(max(1, config.canal.bank_size)))
    # one placement for every leaf (numpy leaves would give the step a second cache entry)
    self.state0 = jax.device_put(self.state0, jax.devices()[0])
    self.train_step = jax.jit(make_train_step(self.loss_fn, self.tx), donate_argnums=0)
    self.eval_step = eval_step_for(config.model, config.genes.capacity)

  def predict(self, params, active_genes, active_classes, cells, c2r) -> dict[str, np.ndarray]:
    """Eval-mode outputs for `cells` (logits, probs, m, h, cell_emb), host numpy."""
    outs = []
    for b in batching.eval_batches(self.stream.data, cells, c2r, self.eval_spec,
                                   self.config.eval.mask_seed):
      o = jax.device_get(self.eval_step(params, b, active_genes, active_classes))
      outs.append({k: v[np.asarray(b.cell_mask)] for k, v in o.items()})
    if not outs:
      return {}
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def _inputs(annot: Annotator, batch):
  return {"main": batch}


def _meta(config, stream, vocab, labels, results, progress, gil_init, calib=None) -> dict:
  return {"kind": "canal", "experiment": config.experiment,
          "fingerprint": checkpoint.fingerprint(config),
          "config": checkpoint.config_for_fingerprint(config), "vocab": vocab.to_json(),
          "label_vocab": labels.to_json(), "withheld": stream.withheld,
          "source_normalisation": {n: config.canal.sources[n].get("normalisation", "log1p_cp10k")
                                   for n in config.canal.sources},
          "stages": [{"name": s.name, "source": s.source,
                      "n_train": int(len(s.train_cells)), "n_test": int(len(s.test_cells))}
                     for s in stream.stages],
          "gil_init": gil_init, "novelty": calib, "results": results, "progress": progress}


def _stage_batches(annot, cells, c2r, label_rows, k, n, start: int = 0):
  return batching.stage_batches(annot.stream.data, cells, c2r, annot.spec, annot.config.seed, k,
                                start, n, labels=label_rows)


def train_annotation(config: ml_collections.ConfigDict, workdir: str,
                     progress_bar: bool = False) -> dict:
  """Runs (or resumes) a continual annotation experiment; writes results.json and report.md.

  Holds the workdir lock while running; SIGTERM / SIGINT checkpoint at the next step boundary and
  raise `guards.Interrupted` (rerun to resume mid-stage); a non-finite loss raises
  `guards.NonFiniteError` before anything non-finite is checkpointed.
  """
  guards.prepare_workdir(workdir)
  with guards.WorkdirLock(workdir), guards.Preemption() as preempt:
    return _train_annotation(config, workdir, progress_bar, preempt)


def _train_annotation(config, workdir, progress_bar, preempt) -> dict:
  c = config.canal
  with guards.user_errors("invalid config or data"):
    mode_setup(config)
    check_novelty_rule(config)
    stream = build_stream(config)
    gil_vocab, init_backbone, gil_init = None, None, None
    if c.init_workdir:
      init_backbone, gil_vocab, saved = load_gil_params(c.init_workdir)
      with config.unlocked():
        config.model = ml_collections.ConfigDict(saved["model"])
        config.genes.capacity = int(gil_vocab.capacity)
      known = set(gil_vocab.gene_ids)
      n_known = sum(g in known for g in stream.data.gene_ids)
      gil_init = {"workdir": os.path.abspath(c.init_workdir), "vocab_genes": len(gil_vocab),
                  "data_genes": int(stream.data.n_genes), "mapped_genes": int(n_known),
                  "dropped_genes": int(stream.data.n_genes - n_known)}
      log.info("init from %s: %s", c.init_workdir, gil_init)
    vocab, labels = build_vocabs(config, stream, gil_vocab)
    label_rows = labels.rows(stream.labels, missing=-1)
    joint = c.mode == "joint"
    annot = Annotator(config, stream, init_backbone)

  # keep 3: the last finished stage survives a mid-stage (preemption / time) checkpoint
  ckpt = checkpoint.Checkpointer(workdir, keep=3)
  ckpt.check_same_experiment(config)
  state = annot.state0
  n_stages = len(stream.stages)
  stage_names = [s.name for s in stream.stages]
  results = {"experiment": config.experiment, "mode": c.mode, "transforms": list(annot.names),
             "versions": integrity.package_versions(),
             "bank": annot.use_bank, "stages": [],
             "accuracy_matrix": [[None] * n_stages for _ in range(1 if joint else n_stages)]}
  data_fp = integrity.data_fingerprint(
      [resolve_path(c.sources[n].file, config.data.data_dir) for n in c.sources], stream.data)
  ckpt.extra_meta = {"data": data_fp}
  _, newest = ckpt.latest_meta()
  integrity.check_same_data((newest or {}).get("data"), data_fp, workdir)
  first, start, calib, start_seconds = 0, 0, None, 0.0
  latest, restored, meta = ckpt.restore_good(checkpoint.abstract_like(state))
  if latest is not None:
    state = restored
    results, calib, progress = meta["results"], meta.get("novelty"), meta["progress"]
    if progress.get("stage_done", True):
      first = progress["stage"] + 1
      log.info("resuming after stage %d", first - 1)
    else:  # a mid-stage checkpoint (preemption / checkpoint_minutes)
      first, start = progress["stage"], int(progress["step_in_stage"])
      start_seconds = float(progress.get("seconds", 0.0))
      log.info("resuming stage %d at step %d", first, start)
  mid_steps = [s for s in ckpt.manager.all_steps()
               if not ckpt.read_meta(s)["progress"].get("stage_done", True)]
  clock = guards.CheckpointClock(config.train.checkpoint_minutes)

  def save(step: int, stage_done: bool, progress: dict) -> None:
    """Saves; drops older mid-stage checkpoints so that `keep` holds finished stages."""
    ckpt.save(step, state, _meta(config, stream, vocab, labels, results, progress, gil_init,
                                 calib))
    clock.reset()
    for old in [s for s in mid_steps if s < step]:
      ckpt.manager.delete(old)
      mid_steps.remove(old)
    if not stage_done:
      mid_steps.append(step)

  train_plan = ([("joint", np.concatenate([s.train_cells for s in stream.stages]))] if joint else
                [(s.name, s.train_cells) for s in stream.stages])
  with guards.user_errors("invalid config"):
    for k, (name, cells) in enumerate(train_plan):  # zero steps fail before any training
      guards.check_steps(config.train.steps_per_stage if config.train.steps_per_stage > 0 else
                         c.epochs_per_stage * math.ceil(len(cells) / annot.spec.batch_size),
                         k, name, len(cells))
  bar = None
  try:
    for k in range(first, len(train_plan)):
      name, cells = train_plan[k]
      c2r = columns_to_rows(stream, vocab, k)
      resuming = k == first and start > 0
      if not resuming:  # a new stage: activate its genes and types, fresh optimizer
        state = state.replace(**jax.device_put(
            dict(active_genes=vocab.active_mask(k), active_classes=labels.active_mask(k),
                 opt_state=annot.tx.init(state.params)), jax.devices()[0]))
      stage_start = start if resuming else 0
      bank_cells = np.zeros(0, np.int64)
      if annot.use_bank:
        occ = bank_lib.occupied(state.bank)
        bank_cells = np.asarray(state.bank["cells"])[occ].astype(np.int64)
      train_cells = np.concatenate([cells, bank_cells])
      n_steps = (config.train.steps_per_stage if config.train.steps_per_stage > 0 else
                 c.epochs_per_stage * math.ceil(len(train_cells) / annot.spec.batch_size))
      t0, last = time.time(), {}
      bar = tqdm(total=n_steps, initial=stage_start, desc=f"stage {k} {name}",
                 disable=not progress_bar)
      for step, batch in _stage_batches(annot, train_cells, c2r, label_rows, k,
                                        n_steps - stage_start, stage_start):
        state, m = annot.train_step(state, _inputs(annot, batch))
        bar.update(1)
        last, done = m, step + 1
        stop = preempt.should_stop(done)
        save_now = done < n_steps and (stop or clock.due(done))
        if done % config.train.log_every == 0 or done == n_steps or save_now:
          where = dict(step=done, stage=k, stage_name=name, ckpt=ckpt)
          guards.check_finite(jax.device_get(m), config, **where)
          if save_now:
            guards.check_state_finite(state, config, **where)
            save(int(state.step), False, {"stage": k, "step_in_stage": done, "stage_done": False,
                                          "seconds": time.time() - t0 +
                                          (start_seconds if resuming else 0.0)})
            if stop:
              raise guards.Interrupted(guards.interrupted_message(
                  preempt.signal, f"step {done} of {n_steps} of stage {k} ({name})",
                  int(state.step), ckpt.directory))
      bar.close()
      last = {kk: float(v) for kk, v in jax.device_get(last).items()}
      seconds = time.time() - t0 + (start_seconds if resuming else 0.0)

      active_now = state.active_classes

      def task_loss_end(p, ts, inp, ctx, active_now=active_now):
        return annot.task_loss(p, ts, inp, loss_lib.AnnotationContext(
            rng=ctx.rng, active_genes=ctx.active_genes, step=ctx.step, active_classes=active_now))

      end = loss_lib.AnnotationStageEnd(
          stage=k, params=state.params, active_genes=state.active_genes, task_loss=task_loss_end,
          batches=lambda n, cells=cells, c2r=c2r, k=k: ({"main": b} for _, b in _stage_batches(
              annot, cells, c2r, label_rows, k + 1000, n)),
          stage_cells=cells, stage_rows=c2r[c2r > 0], active_classes=active_now)
      state = state.replace(transforms=jax.device_put(
          annot.transform.consolidate(state.transforms, state.params, end), jax.devices()[0]))
      if annot.use_bank and k < len(train_plan) - 1:
        out = annot.predict(state.params, state.active_genes, state.active_classes, cells, c2r)
        protos = np.asarray(state.params["head"]["cls"]["w"]).T
        new_bank = bank_lib.update(jax.device_get(state.bank), out["h"], label_rows[cells],
                                   cells, protos, int(np.sum(labels.active_mask(k))), k)
        state = state.replace(bank=jax.device_put(new_bank, jax.devices()[0]))

      row = []
      for j, st in enumerate(stream.stages):
        if not joint and j > k:
          row.append(None)
          continue
        test = st.test_cells[~np.isin(stream.labels[st.test_cells], stream.withheld)]
        out = annot.predict(state.params, state.active_genes, state.active_classes, test, c2r)
        pred = np.argmax(out["logits"], -1) if len(test) else np.zeros(0)
        row.append(float(np.mean(pred == label_rows[test])) if len(test) else None)
      results["accuracy_matrix"][k] = row
      results["stages"].append({
          "name": name, "n_train_cells": int(len(cells)), "n_bank_cells": int(len(bank_cells)),
          "n_classes": int(np.sum(labels.active_mask(k))),
          "n_active_genes": int(vocab.active_mask(k).sum()), "steps": int(n_steps),
          "seconds": round(seconds, 2), "final_loss": last.get("loss"),
          "train_accuracy": last.get("train_accuracy"),
          "bank_per_class": {labels.names[a]: b for a, b in
                             bank_lib.class_counts(jax.device_get(state.bank)).items()}})
      log.info("stage %d (%s) done: %s", k, name, results["stages"][-1])
      if k == len(train_plan) - 1:  # the run's novelty constants, saved for `annotate`
        calib = novelty_calibration(annot, state, stream, label_rows, c2r)
      guards.check_state_finite(state, config, step=n_steps, stage=k, stage_name=name,
                                ckpt=ckpt)
      save(int(state.step), True, {"stage": k, "stage_done": True})
      if k < len(train_plan) - 1 and preempt.should_stop(int(state.step)):
        raise guards.Interrupted(guards.interrupted_message(
            preempt.signal, f"the end of stage {k} ({name})", int(state.step), ckpt.directory))
  finally:
    if bar is not None:
      bar.close()  # before any error message, so that it starts its own line
    ckpt.close()

  last_k = len(train_plan) - 1
  c2r = columns_to_rows(stream, vocab, last_k)
  results["annotation"] = final_evaluation(annot, state, stream, labels, label_rows, c2r,
                                           stage_names, results["accuracy_matrix"], joint, calib)
  results["annotation"]["gil_init"] = gil_init
  results["compilations"] = {"train_step": annot.train_step._cache_size(),
                             "eval_step": annot.eval_step._cache_size()}
  results = guards.finite_or_none(results)  # strict JSON: null, never NaN
  report.write_outputs(workdir, results)
  return results


def novelty_calibration(annot: Annotator, state, stream: Stream, label_rows: np.ndarray,
                        c2r: np.ndarray) -> dict | None:
  """Constants of the validation rule from all stages' validation cells (known types only), with
  q fixed (config.canal.novelty_quantile) or chosen on them ('validation_auto'); None for CANAL's
  transductive rule, which needs no constants."""
  c = annot.config.canal
  if c.novelty_rule == "canal":
    return None
  val = np.concatenate([s.val_cells for s in stream.stages])
  if not len(val):
    raise ValueError(f"config.canal.novelty_rule={c.novelty_rule!r} needs validation cells "
                     "(config.canal.val_fraction > 0).")
  active = np.asarray(state.active_classes)
  logits = annot.predict(state.params, state.active_genes, state.active_classes, val, c2r)["logits"]
  quantile, selection = float(c.novelty_quantile), None
  if c.novelty_rule == "validation_auto":
    selection = novelty.select_quantile(logits, label_rows[val], active,
                                        temperature=c.novelty_temperature)
    quantile = selection["quantile"]
  calib = novelty.calibrate(logits, active, temperature=c.novelty_temperature, quantile=quantile)
  return dict(calib, rule=c.novelty_rule, n_val_cells=int(len(val)), selection=selection)


def check_novelty_rule(config) -> None:
  c = config.canal
  if c.novelty_rule not in novelty.RULES:
    raise ValueError(f"unknown config.canal.novelty_rule {c.novelty_rule!r}; known: "
                     f"{novelty.RULES}")
  if c.novelty_rule != "canal" and c.val_fraction <= 0:
    raise ValueError(f"config.canal.novelty_rule={c.novelty_rule!r} needs validation cells: set "
                     "config.canal.val_fraction > 0 (or novelty_rule='canal').")


def detect_novel(config, state, out, calib: dict | None, key=None) -> novelty.Novelty:
  """CANAL's transductive rule (calib None) or the saved validation-rule constants."""
  if calib is not None:
    return novelty.apply_calibration(out["logits"], np.asarray(state.active_classes), calib)
  c = config.canal
  return novelty.canal_rule(out["logits"], out["m"], state.params["head"],
                            np.asarray(state.active_classes), temperature=c.novelty_temperature,
                            n_mix=c.novelty_mix, key=key)


def final_evaluation(annot, state, stream, labels, label_rows, c2r, stage_names, acc, joint,
                     calib=None):
  names = np.asarray(labels.names + [UNASSIGNED], object)
  withheld = stream.withheld
  test = np.concatenate([s.test_cells for s in stream.stages])
  known = test[~np.isin(stream.labels[test], withheld)]
  out = annot.predict(state.params, state.active_genes, state.active_classes, known, c2r)
  y_true, y_pred = stream.labels[known], names[np.argmax(out["logits"], -1)]
  res = {"stage_names": stage_names, "accuracy_matrix": acc,
         "final": metrics.classification(y_true, y_pred),
         "average_accuracy": metrics.average_accuracy(acc),
         "bwt": None if joint else metrics.bwt(acc),
         "forgetting": None if joint else metrics.forgetting(acc),
         "n_test_cells": int(len(known)), "classes": labels.names, "novel": None,
         "confusion": _confusion(y_true, y_pred)}
  if withheld:
    out_all = annot.predict(state.params, state.active_genes, state.active_classes, test, c2r)
    nov = detect_novel(annot.config, state, out_all, calib,
                       key=jax.random.PRNGKey(annot.config.seed))
    pred = np.where(nov.unassigned, UNASSIGNED, names[np.argmax(out_all["logits"], -1)])
    sel = (calib or {}).get("selection") or {}
    res["novel"] = dict(metrics.novel_metrics(stream.labels[test], pred, withheld),
                        withheld=list(withheld), rule=annot.config.canal.novelty_rule,
                        threshold=nov.threshold, quantile=(calib or {}).get("quantile"),
                        quantile_selection=sel or None)
    truth = np.where(np.isin(stream.labels[test], withheld), UNASSIGNED, stream.labels[test])
    res["confusion"] = _confusion(truth, pred)
  res["test_only"], seen_only = {}, {}
  for src, cells in stream.test_only.items():
    is_seen = np.isin(stream.labels[cells], labels.names)
    seen_only[src] = cells[is_seen]
    entry = {"n_cells": int(len(cells)), "n_seen_type_cells": int(is_seen.sum())}
    if len(cells):
      o = annot.predict(state.params, state.active_genes, state.active_classes, cells, c2r)
      pred = names[np.argmax(o["logits"], -1)]
      entry.update(metrics.classification(stream.labels[cells][is_seen], pred[is_seen]))
      # the run's novelty rule on the whole test-only source (CANAL's rule: transductive on it)
      flag = detect_novel(annot.config, state, o, calib,
                          key=jax.random.PRNGKey(annot.config.seed)).unassigned
      entry.update(flagged_novel=float(np.mean(flag)),
                   flagged_novel_seen=float(np.mean(flag[is_seen])) if is_seen.any() else None,
                   flagged_novel_unseen=float(np.mean(flag[~is_seen])) if (~is_seen).any()
                   else None)
    res["test_only"][src] = entry
  train = np.concatenate([s.train_cells for s in stream.stages])
  res["baselines"] = baselines.annotation_baselines(stream, np.flatnonzero(c2r > 0), train, known,
                                                    seen_only)
  return res


def _confusion(y_true, y_pred) -> dict:
  from sklearn.metrics import confusion_matrix
  classes = sorted(set(map(str, y_true)) | set(map(str, y_pred)))
  return {"labels": classes,
          "matrix": confusion_matrix(list(map(str, y_true)), list(map(str, y_pred)),
                                     labels=classes).tolist()}
