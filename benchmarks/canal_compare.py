"""Continual annotation: CANAL against its baselines on one stream; writes compare.{md,json,png}.

  python benchmarks/canal_compare.py --config configs/canal_pancreas.py \
      --workdir runs/canal_compare --data_dir ../shared/data \
      [--modes canal,finetune,replay,distill,lwf,ewc,joint] [--config.a.b=value ...]

Every mode (config.method) runs the same stream, seed and step budget in `<workdir>/<mode>`;
a finished mode (results.json + wall_time.json) is reused when rerun, an interrupted one resumes
after its last finished stage. Columns: final accuracy / macro-F1 / ARI on the held-out cells of
all training stages after the last stage, average accuracy (mean of the last row of the stage x
stage matrix), BWT and forgetting (None for joint, which has no stage sequence), accuracy on the
test-only source(s) (cells of seen types), novelty H-score (when a type is withheld), wall time
of the whole run (data loading, compilation, training, evaluation). Prints the summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from gil_jax import hostenv  # noqa: E402

hostenv.use_huge_pages()  # see gil_jax/hostenv.py


import numpy as np  # noqa: E402

from gil_jax import guards  # noqa: E402
from gil_jax.experiment import as_names  # noqa: E402
from gil_jax.losses import registry  # noqa: E402
from gil_jax.tasks import annotation  # noqa: E402
from gil_jax.eval.report import markdown_table  # noqa: E402

ALL_MODES = "canal,finetune,replay,distill,lwf,ewc,joint"
METRICS = ("accuracy", "macro_f1", "ari", "average_accuracy", "bwt", "forgetting",
           "test_only_accuracy", "h_score", "wall_s")


def run_one(config, workdir: str) -> dict:
  """results.json of one mode plus its wall time (reused when the run already finished)."""
  timing = os.path.join(workdir, "wall_time.json")
  if os.path.exists(os.path.join(workdir, "results.json")) and os.path.exists(timing):
    with open(os.path.join(workdir, "results.json")) as f:
      results = json.load(f)
    with open(timing) as f:
      results["wall_s"] = json.load(f)["wall_s"]
    return results
  t0 = time.time()
  results = annotation.train_annotation(config, workdir)
  wall = time.time() - t0
  with open(timing, "w") as f:
    json.dump({"wall_s": wall}, f)
  results["wall_s"] = wall
  return results


def row(results: dict) -> dict:
  """The compared figures of one run."""
  a = results["annotation"]
  test_only = [e.get("accuracy") for e in a.get("test_only", {}).values()]
  test_only = [v for v in test_only if v is not None]
  return {**a["final"], "average_accuracy": a["average_accuracy"], "bwt": a["bwt"],
          "forgetting": a["forgetting"],
          "test_only_accuracy": float(np.mean(test_only)) if test_only else None,
          "h_score": a["novel"]["h_score"] if a.get("novel") else None,
          "wall_s": round(float(results["wall_s"]), 1),
          "train_steps": int(sum(s["steps"] for s in results["stages"])),
          "stage_names": a["stage_names"], "accuracy_matrix": a["accuracy_matrix"]}


def markdown(summary: dict, config, command: str) -> str:
  modes = list(summary)
  header = ["mode", "accuracy", "macro-F1", "ARI", "average acc", "BWT", "forgetting",
            "test-only acc", "H-score", "steps", "wall s"]
  rows = [[m] + [summary[m][k] for k in METRICS[:-1]] + [summary[m]["train_steps"],
                                                          f"{summary[m]['wall_s']:.1f}"]
          for m in modes]
  first = summary[modes[0]]
  lines = [f"# Continual annotation, mode comparison: {config.experiment}", "",
           f"Stream: {', '.join(first['stage_names'])} (test-only: "
           f"{', '.join(as_names(config.canal.test_only)) or 'none'}; withheld: "
           f"{', '.join(as_names(config.canal.withhold)) or 'none'}). "
           f"Seed {config.seed}. Accuracy / macro-F1 / ARI: held-out cells of every training "
           "stage after the last stage; BWT = mean_j (A[T,j] − A[j,j]) (closer to 0 = less "
           "forgetting). Every mode trains the same steps (epochs over the stage's cells); modes "
           "with the example bank (canal, replay) add a replayed batch of bank cells to each "
           "step (the `example_bank` loss transform), hence a longer step.", "",
           f"Command: `{command}`", "",
           markdown_table(header, rows), "",
           "![comparison](compare.png)", ""]
  return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  modes = list(summary)
  panels = [("accuracy", "final accuracy"), ("macro_f1", "final macro-F1"),
            ("bwt", "BWT (0 = no forgetting)"), ("wall_s", "wall time (s)")]
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
  x = np.arange(len(modes))
  colors = ["tab:red" if m == "canal" else "tab:gray" for m in modes]
  for ax, (key, label) in zip(axes, panels):
    vals = [np.nan if summary[m][key] is None else summary[m][key] for m in modes]
    ax.bar(x, vals, color=colors)
    ax.set_xticks(x, modes, rotation=40, ha="right")
    ax.set_title(label, fontsize=9)
    if key == "bwt":
      ax.axhline(0, color="k", lw=0.8)
    for xi, v in zip(x, vals):
      if not np.isnan(v):
        ax.text(xi, v, f"{v:.0f}" if key == "wall_s" else f"{v:.2f}", ha="center",
                va="bottom" if v >= 0 else "top", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "canal_pancreas.py"))
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "canal_compare"))
  p.add_argument("--modes", default=ALL_MODES, help="comma-separated config.method values (annotation presets)")
  p.add_argument("--data_dir", default="", help="folder of the .h5ad files (config.data.data_dir)")
  args, overrides = p.parse_known_args(argv)
  command = " ".join(["python benchmarks/canal_compare.py"] + list(argv if argv is not None
                                                                    else sys.argv[1:]))
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  known = registry.METHODS["annotation"]
  bad = [m for m in modes if m not in known]
  if bad:
    p.error(f"unknown modes {bad}; known: {sorted(known)}")
  base = guards.load_config(args.config, overrides)
  data_dir = args.data_dir or base.data.data_dir
  if not os.path.isabs(data_dir) and not os.path.isdir(data_dir):
    data_dir = os.path.join(ROOT, data_dir)  # relative to the repo root, as the configs are
  os.makedirs(args.workdir, exist_ok=True)
  summary = {}
  for m in modes:
    config = base.copy_and_resolve_references()
    with config.unlocked():
      config.method = m
      config.data.data_dir = data_dir
    summary[m] = row(run_one(config, os.path.join(args.workdir, m)))
    print(json.dumps({"mode": m, **{k: summary[m][k] for k in METRICS}}), flush=True)
  with open(os.path.join(args.workdir, "compare.json"), "w") as f:
    json.dump({"config": args.config, "modes": modes, "command": command, "summary": summary},
              f, indent=1)
  with open(os.path.join(args.workdir, "compare.md"), "w") as f:
    f.write(markdown(summary, base, command))
  plot(summary, os.path.join(args.workdir, "compare.png"))
  print(json.dumps({m: {k: summary[m][k] for k in METRICS} for m in modes}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
