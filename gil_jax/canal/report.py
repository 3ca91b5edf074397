"""results.json, report.md (tables) and the confusion-matrix PNG of an annotation run."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gil_jax.eval.report import _fmt, markdown_table, save_figure  # noqa: E402


BASELINE_NAMES = {"logistic_regression": "logistic regression", "knn_pca": "kNN (k=15) on PCA"}
EMBEDDING_KNN_NAME = "model's embedding, kNN (k=15) from every stage's training cells"
BASELINE_NOTE = ("Baselines (gil_jax/eval/baselines.py) are fitted on the same training cells "
                 "(all training stages, no bank) on the model's vocabulary genes (normalised "
                 "values, 0 where a source did not measure a gene): logistic regression on "
                 "standardised features with C=1; kNN (k=15) on 50 principal components. "
                 "Test-only sources: refitted on the genes they share with the vocabulary. No "
                 "hyperparameter is chosen on test cells.")


def plot_confusion(conf: dict, path: str, title: str) -> None:
  labels, m = conf["labels"], np.asarray(conf["matrix"], float)
  norm = m / np.maximum(m.sum(1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(0.55 * len(labels) + 3, 0.5 * len(labels) + 2.5))
  im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
  for i in range(m.shape[0]):
    for j in range(m.shape[1]):
      if m[i, j]:
        ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                color="w" if norm[i, j] > 0.5 else "k")
  ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(len(labels)), labels, fontsize=8)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, shrink=0.7, label="row fraction")
  save_figure(fig, path)


def write_outputs(workdir: str, results: dict) -> None:
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  a = results["annotation"]
  if a["confusion"] is not None:  # None: no held-out cells (config.canal.test_fraction = 0)
    plot_confusion(a["confusion"], os.path.join(workdir, "confusion.png"),
                   f"{results['experiment']} ({results['mode']}): held-out cells after last stage")
  names = a["stage_names"]
  n_rows = len(a["accuracy_matrix"])
  row_names = names if n_rows == len(names) else ["joint"]
  stage_rows = [[s["name"], s["n_train_cells"], s["n_bank_cells"], s["n_classes"],
                 s["n_active_genes"], s["steps"], s["seconds"], s["final_loss"],
                 s["train_accuracy"]] for s in results["stages"]]
  fin = a["final"]
  baselines = a.get("baselines") or {}
  parts = [f"# {results['experiment']} — continual annotation ({results['mode']})", "",
           f"Transforms: `{results['transforms']}`, example bank: {results['bank']}.", "",
           "## Stages", "",
           markdown_table(["stage", "train cells", "bank cells", "classes", "active genes",
                           "steps", "seconds", "final loss", "train acc"], stage_rows), "",
           "## Accuracy on each stage's held-out cells (rows: after stage)", "",
           markdown_table(["after \\ test of"] + names,
                          [[r] + row for r, row in zip(row_names, a["accuracy_matrix"])]), "",
           "## Held-out cells of all stages after the last stage (model and baselines)", "",
           markdown_table(["method", "accuracy", "macro-F1", "ARI", "average acc", "BWT",
                           "forgetting", "test cells"],
                          [[f"model ({results['mode']})", fin["accuracy"], fin["macro_f1"],
                            fin["ari"], a["average_accuracy"], a["bwt"], a["forgetting"],
                            a["n_test_cells"]]] +
                          [[EMBEDDING_KNN_NAME, knn["test"]["accuracy"], knn["test"]["macro_f1"],
                            knn["test"]["ari"], None, None, None, a["n_test_cells"]]
                           for knn in [a.get("embedding_knn") or {}] if knn.get("test")] +
                          [[BASELINE_NAMES[b], e["test"]["accuracy"], e["test"]["macro_f1"],
                            e["test"]["ari"], None, None, None, a["n_test_cells"]]
                           for b, e in baselines.items() if e.get("test")]), ""]
  if baselines:
    parts += [BASELINE_NOTE, ""]
  if a.get("novel"):
    n = a["novel"]
    parts += ["## Novel cell types", "",
              markdown_table(["withheld", "rule", "q", "threshold", "known acc", "unknown acc",
                              "H-score", "total acc"],
                             [[", ".join(n["withheld"]), n["rule"], n.get("quantile"),
                               n["threshold"],
                               n["known_accuracy"], n["unknown_accuracy"], n["h_score"],
                               n["total_accuracy"]]]), ""]
  if a.get("test_only"):
    rows = []
    for s, e in a["test_only"].items():
      shared = next((be["test_only"].get(s, {}).get("n_shared_genes")
                     for be in baselines.values()), None)  # the genes the model sees, too
      rows.append([s, f"model ({results['mode']})", e["n_cells"], e["n_seen_type_cells"], shared,
                   e.get("accuracy"), e.get("macro_f1"), e.get("ari"), e.get("flagged_novel")])
      knn = (a.get("embedding_knn") or {}).get("test_only", {}).get(s)
      if knn:
        rows.append([s, EMBEDDING_KNN_NAME, e["n_cells"], e["n_seen_type_cells"], shared,
                     knn["accuracy"], knn["macro_f1"], knn["ari"], None])
      for b, be in baselines.items():
        t = be["test_only"].get(s, {})
        rows.append([s, BASELINE_NAMES[b], e["n_cells"], e["n_seen_type_cells"],
                     t.get("n_shared_genes"), t.get("accuracy"), t.get("macro_f1"), t.get("ari"),
                     None])
    parts += ["## Test-only sources (accuracy on cells of seen types)", "",
              markdown_table(["source", "method", "cells", "seen-type cells", "shared genes",
                              "accuracy", "macro-F1", "ARI", "flagged novel"], rows), ""]
  if a["confusion"] is not None:
    parts += ["![confusion matrix](confusion.png)", ""]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(parts))


def console_summary(results: dict) -> str:
  a = results["annotation"]
  s = (f"final accuracy {_fmt(a['final']['accuracy'])}  macro-F1 {_fmt(a['final']['macro_f1'])}"
       f"  ARI {_fmt(a['final']['ari'])}  BWT {_fmt(a['bwt'])}")
  lr = ((a.get("baselines") or {}).get("logistic_regression") or {}).get("test")
  if lr:
    s += (f"\nlogistic regression (same cells): accuracy {_fmt(lr['accuracy'])}  "
          f"macro-F1 {_fmt(lr['macro_f1'])}")
  if a.get("novel"):
    n = a["novel"]
    s += (f"\nnovel: known {_fmt(n['known_accuracy'])}  unknown {_fmt(n['unknown_accuracy'])}"
          f"  H {_fmt(n['h_score'])}")
  return s
