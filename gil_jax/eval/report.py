"""Results as JSON, a markdown report, PNG plots and a console table."""

from __future__ import annotations

import json
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _fmt(x: Any, digits: int = 4) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    return f"{x:.{digits}f}"
  return str(x)


def save_figure(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def stage_table(results: dict) -> str:
  header = ["stage", "cells", "active genes", "new genes", "steps", "seconds", "cells/s",
            "final loss"]
  rows = [[s["name"], s["n_train_cells"], s["n_active_genes"], s["n_new_genes"], s["steps"],
           f"{s['seconds']:.1f}", f"{s.get('cells_per_s') or 0.0:.0f}", s["final_train_loss"]]
          for s in results["stages"]]
  return markdown_table(header, rows)


def regression_table(results: dict) -> str:
  reg = results["gene_regression"]
  names = reg["stage_names"]
  header = ["after stage \\ genes of"] + names
  rows = [[names[i]] + row for i, row in enumerate(reg["matrix"])]
  fg = results["forgetting"]
  rows.append(["forgetting Δ"] + fg["per_stage"])
  return markdown_table(header, rows)


BASELINE_LABELS = {"gene_mean": "per-gene mean", "gene_detected_mean": "per-gene detected mean",
                   "gene_cell_offset": "gene + cell offset"}


def baseline_table(results: dict) -> str:
  """Model vs the trivial predictors on the same held-out tokens: each stage's genes right after
  that stage (diagonal) and every stage's genes after the last stage (final row)."""
  reg = results["gene_regression"]
  names, base = reg["stage_names"], reg.get("baselines", {})
  ratio = reg.get("ratio_to_best_baseline")
  if not base or ratio is None:
    return "(no trivial-predictor baselines in these results)"
  n = len(names)
  entries = [(i, i) for i in range(n)] + [(n - 1, j) for j in range(n - 1)]
  header = ["after stage", "genes of", "model"] + [BASELINE_LABELS[b] for b in base] + [
      "model / best trivial"]
  rows = [[names[i], names[j], reg["matrix"][i][j]] + [base[b][i][j] for b in base] + [ratio[i][j]]
          for i, j in entries if reg["matrix"][i][j] is not None]
  return markdown_table(header, rows)


def _heatmap(ax, m: np.ndarray, names: list[str], title: str, **imshow) -> None:
  im = ax.imshow(m, **imshow)
  for i in range(m.shape[0]):
    for j in range(m.shape[1]):
      if not np.isnan(m[i, j]):
        light = im.norm(m[i, j]) < 0.5 if imshow.get("cmap") == "viridis_r" else True
        ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", fontsize=9,
                color="k" if light else "w")
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
  ax.set_yticks(range(len(names)), names)
  ax.set_xlabel("genes of stage")
  ax.set_ylabel("model after stage")
  ax.set_title(title, fontsize=10)
  plt.colorbar(im, ax=ax, shrink=0.8)


def plot_regression_matrix(results: dict, path: str) -> None:
  """MSE matrix and, beside it, the model's MSE / the best trivial predictor's (< 1: better)."""
  reg = results["gene_regression"]
  names = reg["stage_names"]
  as_array = lambda rows: np.array([[np.nan if v is None else v for v in row] for row in rows],
                                   float)
  ratio = reg.get("ratio_to_best_baseline")
  panels = 2 if ratio is not None else 1
  fig, axes = plt.subplots(1, panels, figsize=(panels * (1.2 * len(names) + 2.5),
                                               1.0 * len(names) + 1.8), squeeze=False)
  _heatmap(axes[0, 0], as_array(reg["matrix"]), names,
           f"gene-wise regression MSE ({results['experiment']})", cmap="viridis_r")
  if ratio is not None:
    r = as_array(ratio)
    span = max(0.5, float(np.nanmax(np.abs(r - 1.0)))) if np.isfinite(r).any() else 0.5
    _heatmap(axes[0, 1], r, names, "model MSE / best trivial predictor", cmap="RdBu_r",
             vmin=1.0 - span, vmax=1.0 + span)
  save_figure(fig, path)


def plot_forgetting(results: dict, path: str) -> None:
  names = results["gene_regression"]["stage_names"]
  per = results["forgetting"]["per_stage"]
  idx = [i for i, v in enumerate(per) if v is not None]
  fig, ax = plt.subplots(figsize=(max(3.0, 1.0 * len(idx) + 2), 3))
  ax.bar([names[i] for i in idx], [per[i] for i in idx], color="tab:red")
  ax.axhline(0, color="k", lw=0.8)
  ax.set_ylabel("Δ MSE (final − just learned)")
  ax.set_title("forgetting per stage")
  save_figure(fig, path)


def write_outputs(workdir: str, results: dict) -> None:
  """Writes results.json, report.md and the PNG plots into `workdir`."""
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  plot_regression_matrix(results, os.path.join(workdir, "gene_regression.png"))
  plot_forgetting(results, os.path.join(workdir, "forgetting.png"))
  avg = results["forgetting"]["average"]
  parts = [f"# {results['experiment']}", "",
           f"Method: `{results.get('method', '?')}`. Average forgetting Δ (stage-specific "
           f"genes): **{_fmt(avg)}**.", "",
           "## Stages", "", stage_table(results), "",
           f"## Gene-wise regression (masked MSE on each stage's genes, held-out "
           f"{results.get('eval_split', 'test')} cells)", "",
           regression_table(results), "",
           "### Beside the trivial predictors (same held-out cells and hidden tokens)", "",
           "Gene statistics from the training cells of the stages trained so far; ratio < 1: the "
           "model is better than every trivial predictor.", "",
           baseline_table(results), "",
           "![gene-wise regression](gene_regression.png)", "", "![forgetting](forgetting.png)", ""]
  for extra in results.get("report_sections", []):
    parts += [extra, ""]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(parts))
