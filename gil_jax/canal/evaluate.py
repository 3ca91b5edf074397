"""What an annotation run reports at its end: novelty calibration on validation cells, the
final evaluation (accuracy matrix summary, per-class metrics, novel-type detection, test-only
sources, logistic-regression / kNN baselines, the model's embedding read out by kNN label
transfer from its training cells) and the confusion matrix."""

from __future__ import annotations

import jax
import numpy as np
from threadpoolctl import threadpool_limits

from gil_jax.canal import metrics, novelty
from gil_jax.canal.labels import UNASSIGNED
from gil_jax.canal.stream import Stream
from gil_jax.eval import baselines

EMBEDDING_K = 15               # as the kNN-on-PCA baseline
MAX_REFERENCE_CELLS = 20_000   # training cells the embedding kNN votes with


def novelty_calibration(runner, state, stream: Stream, label_rows: np.ndarray,
                        c2r: np.ndarray) -> dict | None:
  """Constants of the run's novelty rule from all stages' validation cells (known types only),
  saved so that `annotate` flags each query cell on its own: the validation rule's with q fixed
  (config.canal.novelty_quantile) or chosen on them ('validation_auto'); for CANAL's rule, its
  energy range and mixup threshold computed once on the validation cells ('canal_fixed'; the
  run's own figures keep the transductive rule). None for 'canal' without validation cells."""
  c = runner.config.canal
  val = np.concatenate([s.val_cells for s in stream.stages])
  if not len(val):
    if c.novelty_rule == "canal":
      return None
    raise ValueError(f"config.canal.novelty_rule={c.novelty_rule!r} needs validation cells "
                     "(config.canal.val_fraction > 0).")
  active = np.asarray(state.active_classes)
  out = runner.predict(state.params, state.active_genes, state.active_classes, val, c2r)
  logits = out["logits"]
  if c.novelty_rule == "canal":
    calib = novelty.calibrate_canal(
        logits, out["m"], jax.device_get(state.params["head"]), active,
        temperature=c.novelty_temperature, n_mix=c.novelty_mix,
        key=jax.random.PRNGKey(int(runner.config.seed)))
    return dict(calib, rule="canal_fixed", n_val_cells=int(len(val)), selection=None)
  if c.novelty_rule == "mahalanobis":
    # class statistics from every stage's training cells (the example bank alone, 300 cells
    # chosen as the most typical, gave a poorer estimate: README, "Novelty")
    ref = np.concatenate([s.train_cells for s in stream.stages])
    ref_m = runner.predict(state.params, state.active_genes, state.active_classes, ref, c2r)["m"]
    calib = novelty.calibrate_mahalanobis(ref_m, label_rows[ref], out["m"], active,
                                          quantile=float(c.novelty_quantile))
    return dict(calib, n_val_cells=int(len(val)), selection=None)
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
  """CANAL's transductive rule (calib None or 'canal_fixed': the run's figures use CANAL's rule
  as published) or the saved validation-rule constants."""
  if calib is not None and calib.get("rule") != "canal_fixed":
    return novelty.apply_calibration(out["logits"], np.asarray(state.active_classes), calib,
                                     m=out["m"])
  c = config.canal
  return novelty.canal_rule(out["logits"], out["m"], state.params["head"],
                            np.asarray(state.active_classes), temperature=c.novelty_temperature,
                            n_mix=c.novelty_mix, key=key)


def final_evaluation(runner, state, stream, labels, label_rows, c2r, stage_names, acc, joint,
                     calib=None):
  names = np.asarray(labels.names + [UNASSIGNED], object)
  withheld = stream.withheld
  test = np.concatenate([s.test_cells for s in stream.stages])
  known = test[~np.isin(stream.labels[test], withheld)]
  y_true = stream.labels[known]
  if len(known):
    out = runner.predict(state.params, state.active_genes, state.active_classes, known, c2r)
    y_pred = names[np.argmax(out["logits"], -1)]
  else:  # config.canal.test_fraction = 0: every cell trained on, nothing held out to score
    out, y_pred = {}, np.zeros(0, object)
  res = {"stage_names": stage_names, "accuracy_matrix": acc,
         "final": metrics.classification(y_true, y_pred),
         "average_accuracy": metrics.average_accuracy(acc),
         "bwt": None if joint else metrics.bwt(acc),
         "forgetting": None if joint else metrics.forgetting(acc),
         "n_test_cells": int(len(known)), "classes": labels.names, "novel": None,
         "confusion": _confusion(y_true, y_pred) if len(known) else None}
  if withheld and len(test):
    out_all = runner.predict(state.params, state.active_genes, state.active_classes, test, c2r)
    nov = detect_novel(runner.config, state, out_all, calib,
                       key=jax.random.PRNGKey(runner.config.seed))
    pred = np.where(nov.unassigned, UNASSIGNED, names[np.argmax(out_all["logits"], -1)])
    sel = (calib or {}).get("selection") or {}
    res["novel"] = dict(metrics.novel_metrics(stream.labels[test], pred, withheld),
                        withheld=list(withheld), rule=runner.config.canal.novelty_rule,
                        threshold=nov.threshold, quantile=(calib or {}).get("quantile"),
                        quantile_selection=sel or None)
    if calib is not None and calib.get("rule") == "canal_fixed":  # what `annotate` applies
      fixed = novelty.apply_calibration(out_all["logits"], np.asarray(state.active_classes), calib)
      pred_fixed = np.where(fixed.unassigned, UNASSIGNED, names[np.argmax(out_all["logits"], -1)])
      res["novel"]["per_cell_constants"] = dict(
          metrics.novel_metrics(stream.labels[test], pred_fixed, withheld),
          threshold=fixed.threshold)
    truth = np.where(np.isin(stream.labels[test], withheld), UNASSIGNED, stream.labels[test])
    res["confusion"] = _confusion(truth, pred)
  train = np.concatenate([s.train_cells for s in stream.stages])
  ref = _reference_cells(train, int(runner.config.seed))
  ref_m = runner.predict(state.params, state.active_genes, state.active_classes, ref, c2r)["m"]

  def transfer(m):
    with threadpool_limits(1):
      return baselines.knn_label_transfer(ref_m, stream.labels[ref], m, k=EMBEDDING_K)

  res["embedding_knn"] = {
      "features": "the final model's manifold vectors m (cosine)", "k": EMBEDDING_K,
      # a continual run no longer holds earlier stages' cells: this reads out what the final
      # representation separates, it is not a readout a continual learner could deploy
      "reference": "training cells of every stage", "reference_cells": int(len(ref)),
      "test_only": {},
      "test": metrics.classification(y_true, transfer(out["m"])) if len(known) else None}
  res["test_only"], seen_only = {}, {}
  for src, cells in stream.test_only.items():
    is_seen = np.isin(stream.labels[cells], labels.names)
    seen_only[src] = cells[is_seen]
    entry = {"n_cells": int(len(cells)), "n_seen_type_cells": int(is_seen.sum())}
    if len(cells):
      o = runner.predict(state.params, state.active_genes, state.active_classes, cells, c2r)
      pred = names[np.argmax(o["logits"], -1)]
      entry.update(metrics.classification(stream.labels[cells][is_seen], pred[is_seen]))
      if is_seen.any():
        entry["confusion"] = _confusion(stream.labels[cells][is_seen], pred[is_seen])
        res["embedding_knn"]["test_only"][src] = metrics.classification(
            stream.labels[cells][is_seen], transfer(o["m"][is_seen]))
      # the run's novelty rule on the whole test-only source (CANAL's rule: transductive on it)
      flag = detect_novel(runner.config, state, o, calib,
                          key=jax.random.PRNGKey(runner.config.seed)).unassigned
      entry.update(flagged_novel=float(np.mean(flag)),
                   flagged_novel_seen=float(np.mean(flag[is_seen])) if is_seen.any() else None,
                   flagged_novel_unseen=float(np.mean(flag[~is_seen])) if (~is_seen).any()
                   else None)
    res["test_only"][src] = entry
  # the baselines keep the genes the model leaves out as class-confounded (the stronger baseline)
  left_out = stream.confounded.copy()
  if runner.gil_init is not None:  # a pre-trained gene table: only its genes were usable
    left_out &= np.isin(stream.data.gene_ids, runner.gene_vocab.gene_ids)
  res["baselines"] = baselines.annotation_baselines(
      stream, np.flatnonzero((c2r > 0) | left_out), train, known, seen_only)
  res["n_confounded_genes"] = int(stream.confounded.sum())
  return res


def _reference_cells(train: np.ndarray, seed: int) -> np.ndarray:
  """The training cells the embedding kNN votes with (at most MAX_REFERENCE_CELLS, drawn with
  the run's seed)."""
  if len(train) <= MAX_REFERENCE_CELLS:
    return train
  return np.sort(np.random.default_rng(seed).choice(train, MAX_REFERENCE_CELLS, replace=False))


def _confusion(y_true, y_pred) -> dict:
  from sklearn.metrics import confusion_matrix
  classes = sorted(set(map(str, y_true)) | set(map(str, y_pred)))
  return {"labels": classes,
          "matrix": confusion_matrix(list(map(str, y_true)), list(map(str, y_pred)),
                                     labels=classes).tolist()}
