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


def plot_regression_matrix(results: dict, path: str) -> None:
  reg = results["gene_regression"]
  names = reg["stage_names"]
  m = np.array([[np.nan if v is None else v for v in row] for row in reg["matrix"]], float)
  fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 1.0 * len(names) + 1.8))
  im = ax.imshow(m, cmap="viridis_r")
  for i in range(m.shape[0]):
    for j in range(m.shape[1]):
      if not np.isnan(m[i, j]):
        light = im.norm(m[i, j]) < 0.5  # viridis_r is light at the low end
        ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", fontsize=9,
                color="k" if light else "w")
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
  ax.set_yticks(range(len(names)), names)
  ax.set_xlabel("genes of stage")
  ax.set_ylabel("model after stage")
  ax.set_title(f"gene-wise regression MSE ({results['experiment']})")
  fig.colorbar(im, ax=ax, shrink=0.8)
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
           "## Gene-wise regression (masked MSE on each stage's genes, held-out cells)", "",
           regression_table(results), "",
           "![gene-wise regression](gene_regression.png)", "", "![forgetting](forgetting.png)", ""]
  for extra in results.get("report_sections", []):
    parts += [extra, ""]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(parts))
