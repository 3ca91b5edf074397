"""Compares continual-learning methods over seeds on one config; writes compare.{md,json,png}.

  python benchmarks/compare_methods.py --config configs/gil_synthetic.py \
      --methods baseline,replay,distill,ewc,oracle --seeds 0,1,2 --workdir runs/compare

Any `--config.a.b=value` override applies to every run (e.g. a real dataset stream:
`--config.data.source=h5ad --config.data.files=pbmc_3chem_symphony,kang_pbmc_muscat
--config.stages.plan=dataset_stream`). Each (method, seed) runs in
`<workdir>/<method>/seed<k>` and is resumed / reused when rerun. `config.seed` drives the stage
plan, the initialisation and the batches; the simulated data stay fixed (`config.data.sim.seed`).

Columns: forgetting Δ per stage (MSE on stage j's genes after the last stage − right after stage
j; only stages whose genes are not trained on in the last stage), average Δ, final average MSE
over all seen genes (mean of the last row of the results matrix over stages), the same for the
best trivial predictor on the same held-out tokens (per-gene mean, per-gene detected mean or
gene + cell offset, whichever is lowest per entry), the model's worst ratio to it on the
diagonal (each stage's genes right after that stage) and in the final row, wall time of the run
(training, consolidation and evaluation, including compilation). Mean ± std over seeds; every
number is on the held-out cells (`config.stages.eval_fraction`). A closing line says which
effects exceed the seed spread (baseline Δ > 2 s.d.; a method's Δ below baseline's by more than
the two s.d. added).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gil_jax import hostenv  # noqa: E402

hostenv.use_huge_pages()  # see gil_jax/hostenv.py


from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

from gil_jax import checkpoint  # noqa: E402
from gil_jax.eval import report  # noqa: E402
from gil_jax.tasks import gil  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("methods", "baseline,replay,distill,ewc,oracle", "Comma-separated presets.")
flags.DEFINE_string("seeds", "0,1,2", "Comma-separated config.seed values.")
flags.DEFINE_string("workdir", None, "Output directory.")
flags.DEFINE_bool("aggregate_only", False, "Tabulate the finished (method, seed) runs in "
                  "--workdir without training the missing ones (they are listed as missing).")
flags.mark_flags_as_required(["config", "workdir"])


def run_one(config, workdir: str) -> dict:
  """results.json of one run plus its wall time (reused when the run already finished)."""
  timing = os.path.join(workdir, "wall_time.json")
  fp = checkpoint.fingerprint(config)
  if os.path.exists(os.path.join(workdir, "results.json")) and os.path.exists(timing):
    with open(timing) as f:
      saved = json.load(f)
    if saved.get("fingerprint") == fp:
      with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
      results["wall_s"] = saved["wall_s"]
      return results
  t0 = time.time()
  results = gil.train_and_evaluate(config, workdir, progress_bar=False)
  wall = time.time() - t0
  with open(timing, "w") as f:
    json.dump({"wall_s": wall, "fingerprint": fp}, f)
  results["wall_s"] = wall
  return results


def finished(workdir: str) -> dict:
  """results.json and wall time of a finished run, as it was (no config check: --aggregate_only
  tabulates runs made by earlier revisions too)."""
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  with open(os.path.join(workdir, "wall_time.json")) as f:
    results["wall_s"] = json.load(f)["wall_s"]
  return results


def _ratio(results: dict, i: int, j: int) -> float:
  v = results["gene_regression"]["ratio_to_best_baseline"][i][j]
  return np.nan if v is None else v


def seeds_of(runs: list[dict]) -> list[int]:
  return [r["seed"] for r in runs]


def summarise(per_run: dict[str, list[dict]]) -> dict:
  out = {}
  for method, runs in per_run.items():
    names = runs[0]["gene_regression"]["stage_names"]
    per_stage = np.array([[np.nan if v is None else v for v in r["forgetting"]["per_stage"]]
                          for r in runs], float)
    avg = np.array([np.nan if r["forgetting"]["average"] is None else r["forgetting"]["average"]
                    for r in runs], float)
    final = np.array([np.nanmean([np.nan if v is None else v
                                  for v in r["gene_regression"]["matrix"][-1]]) for r in runs])
    wall = np.array([r["wall_s"] for r in runs], float)
    trivial_final, diag_ratio, final_ratio = [], [], []
    for r in runs:
      reg = r["gene_regression"]
      n = len(reg["matrix"])
      best = [[min((b[i][j] for b in reg["baselines"].values() if b[i][j] is not None),
                   default=np.nan) for j in range(n)] for i in range(n)]
      trivial_final.append(np.nanmean([best[-1][j] for j in range(n)]))
      ratio = np.array([[np.nan if v is None else v for v in row]
                        for row in reg["ratio_to_best_baseline"]], float)
      diag_ratio.append(np.nanmax(np.diag(ratio)))
      final_ratio.append(np.nanmax(ratio[-1]))
    stat = lambda x: {"mean": float(np.nanmean(x)), "std": float(np.nanstd(x)),
                      "values": [None if np.isnan(v) else float(v) for v in np.atleast_1d(x)]}
    out[method] = {
        "stage_names": names,
        "forgetting_per_stage": {n: stat(per_stage[:, j]) for j, n in enumerate(names)
                                 if not np.all(np.isnan(per_stage[:, j]))},
        "average_forgetting": stat(avg), "final_average_mse": stat(final), "wall_s": stat(wall),
        "trivial_final_average_mse": stat(np.array(trivial_final)),
        "max_diagonal_ratio": stat(np.array(diag_ratio)),
        "max_final_row_ratio": stat(np.array(final_ratio)),
        "final_row": [list(r["gene_regression"]["matrix"][-1]) for r in runs],
        "seeds": seeds_of(runs),
        "ratio_diagonal": {n: stat(np.array([_ratio(r, j, j) for r in runs]))
                           for j, n in enumerate(names)},
        "ratio_final_row": {n: stat(np.array([_ratio(r, len(names) - 1, j) for r in runs]))
                            for j, n in enumerate(names[:-1])},
    }
    if all("gene_classification" in r for r in runs):
      out[method]["classification"] = classification_summary(runs, stat)
  return out


def classification_summary(runs: list[dict], stat) -> dict:
  """Gene-based classification over seeds: last-row accuracy % per downstream dataset (probe,
  paper and honest numbers, and the logistic-regression baseline on the same genes and splits)
  and the probe's Δ per dataset (after the last stage − right after the stage that learned it)."""
  blk = runs[0]["gene_classification"]
  out: dict = {"datasets": blk["datasets"]}
  for key in ("matrix", "matrix_honest", "baseline_logistic_regression"):
    if not all(key in r["gene_classification"] for r in runs):
      continue
    last = np.array([[np.nan if v is None else v for v in r["gene_classification"][key][-1]]
                     for r in runs], float)
    out[key] = {d: stat(last[:, j]) for j, d in enumerate(blk["datasets"])}
  for key in ("forgetting", "forgetting_honest"):
    per = np.array([[np.nan if v is None else v
                     for v in r["gene_classification"][key]["per_dataset"]] for r in runs], float)
    out[key] = {d: stat(per[:, j]) for j, d in enumerate(blk["datasets"])
                if not np.all(np.isnan(per[:, j]))}
  return out


def classification_markdown(summary: dict) -> list[str]:
  methods = [m for m in summary if "classification" in summary[m]]
  if not methods:
    return []
  datasets = summary[methods[0]]["classification"]["datasets"]
  cols = [("matrix", "probe, paper"), ("matrix_honest", "probe, honest"),
          ("baseline_logistic_regression", "logistic regression")]
  header = ["method (seeds)"] + [f"{d}: {label}" for d in datasets for _, label in cols] + [
      f"Δ {d}: {label}" for d in datasets for label in ("paper", "honest")
      if d in summary[methods[0]]["classification"].get("forgetting", {})]
  rows = []
  for m in methods:
    c = summary[m]["classification"]
    row = [f"{m} ({', '.join(map(str, summary[m]['seeds']))})"]
    row += [_pm(c[key][d], 1) if key in c else "–" for d in datasets for key, _ in cols]
    row += [_pm(c[key][d], 1) for d in datasets for key in ("forgetting", "forgetting_honest")
            if d in c.get("forgetting", {})]
    rows.append(row)
  return ["Gene-based classification after the last stage (test accuracy %, mean ± s.d. over "
          "seeds; each seed's figure is the mean of the probe's trials): the linear probe on the "
          "frozen embeddings beside logistic regression on the values of the same genes, fitted "
          "and scored on the same splits.", "", report.markdown_table(header, rows), ""]


def _pm(s: dict, digits: int = 4) -> str:
  return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def markdown(summary: dict, seeds: list[int], config) -> str:
  methods = list(summary)
  stage_cols = list(summary[methods[0]]["forgetting_per_stage"])
  header = ["method (seeds)"] + [f"Δ {n}" for n in stage_cols] + [
      "average Δ", "final avg MSE", "best trivial, final avg MSE", "max model/trivial, diagonal",
      "max model/trivial, final row", "wall s"]
  rows = []
  for m in methods:
    s = summary[m]
    rows.append([f"{m} (seeds {', '.join(map(str, s['seeds']))})"] + [_pm(s["forgetting_per_stage"][n]) for n in stage_cols]
                + [_pm(s["average_forgetting"]), _pm(s["final_average_mse"]),
                   _pm(s["trivial_final_average_mse"]), _pm(s["max_diagonal_ratio"]),
                   _pm(s["max_final_row_ratio"]), f"{s['wall_s']['mean']:.0f}"])
  base = summary.get("baseline")
  lines = [f"# Method comparison: {config.experiment}", "",
           f"Seeds {seeds} (mean ± std). Data: `{config.data.source}`, plan "
           f"`{config.stages.plan}`. Δ = MSE on a stage's genes after the last stage − right "
           "after that stage (lower is better).", "", report.markdown_table(header, rows), ""]
  if base is not None and base["average_forgetting"]["mean"]:
    b = base["average_forgetting"]["mean"]
    lines += ["Average Δ relative to baseline: " + ", ".join(
        f"{m} {summary[m]['average_forgetting']['mean'] / b:.2f}×" for m in methods), ""]
  names = summary[methods[0]]["stage_names"]
  header = (["method (seeds)"] + [f"{n} after {n}" for n in names]
            + [f"{n} after {names[-1]}" for n in names[:-1]])
  rows = [[f"{m} ({', '.join(map(str, summary[m]['seeds']))})"]
          + [_pm(summary[m]["ratio_diagonal"][n]) for n in names]
          + [_pm(summary[m]["ratio_final_row"][n]) for n in names[:-1]] for m in methods]
  lines += ["Model MSE / best trivial predictor, per entry (genes of a stage after a stage; < 1: "
            "the model beats all three):", "", report.markdown_table(header, rows), "",
            *classification_markdown(summary),
            significance(summary), "", "![comparison](compare.png)", ""]
  return "\n".join(lines)


def significance(summary: dict) -> str:
  """Which forgetting effects exceed the seed spread (needs the baseline and >= 2 seeds)."""
  base = summary.get("baseline")
  if base is None or len(base["average_forgetting"]["values"]) < 2:
    return "Seed spread: needs the baseline method and at least 2 seeds."
  b = base["average_forgetting"]
  out = [f"baseline Δ {b['mean']:.4f} is {'above' if b['mean'] > 2 * b['std'] else 'within'} "
         f"2 s.d. of its seed spread ({2 * b['std']:.4f})"]
  for m, s in summary.items():
    if m == "baseline":
      continue
    a = s["average_forgetting"]
    gap = b["mean"] - a["mean"]
    out.append(f"{m} {'below' if gap > b['std'] + a['std'] else 'not clearly below'} baseline "
               f"(gap {gap:.4f} vs summed s.d. {b['std'] + a['std']:.4f})")
  return "Seed spread: " + "; ".join(out) + "."


def plot(summary: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  methods = list(summary)
  stage_cols = list(summary[methods[0]]["forgetting_per_stage"])
  fig, axes = plt.subplots(1, 2, figsize=(4 + 1.4 * len(methods), 3.6))
  width = 0.8 / max(len(stage_cols), 1)
  x = np.arange(len(methods))
  for j, n in enumerate(stage_cols):
    axes[0].bar(x + j * width, [summary[m]["forgetting_per_stage"][n]["mean"] for m in methods],
                width, yerr=[summary[m]["forgetting_per_stage"][n]["std"] for m in methods],
                label=f"genes of {n}")
  axes[0].axhline(0, color="k", lw=0.8)
  axes[0].set_xticks(x + width * (len(stage_cols) - 1) / 2, methods, rotation=30, ha="right")
  axes[0].set_ylabel("forgetting Δ (MSE)")
  axes[0].legend(fontsize=8)
  axes[1].bar(x, [summary[m]["final_average_mse"]["mean"] for m in methods],
              yerr=[summary[m]["final_average_mse"]["std"] for m in methods], color="tab:gray")
  axes[1].set_xticks(x, methods, rotation=30, ha="right")
  axes[1].set_ylabel("final average MSE (all seen genes)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  methods = [m.strip() for m in FLAGS.methods.split(",") if m.strip()]
  seeds = [int(s) for s in FLAGS.seeds.split(",") if s.strip()]
  os.makedirs(FLAGS.workdir, exist_ok=True)
  per_run: dict[str, list[dict]] = {}
  for m in methods:
    for s in seeds:
      config = FLAGS.config.copy_and_resolve_references()
      config.unlock()
      config.method, config.seed = m, s
      workdir = os.path.join(FLAGS.workdir, m, f"seed{s}")
      if FLAGS.aggregate_only and not os.path.exists(os.path.join(workdir, "wall_time.json")):
        print(json.dumps({"method": m, "seed": s, "missing": workdir}), flush=True)
        continue
      results = finished(workdir) if FLAGS.aggregate_only else run_one(config, workdir)
      results["seed"] = s
      per_run.setdefault(m, []).append(results)
      print(json.dumps({"method": m, "seed": s, "average_forgetting":
                        results["forgetting"]["average"], "wall_s": round(results["wall_s"], 1)}),
            flush=True)
  summary = summarise(per_run)
  seeds = sorted({int(sd) for m in per_run for sd in seeds_of(per_run[m])}) or seeds
  with open(os.path.join(FLAGS.workdir, "compare.json"), "w") as f:
    json.dump({"methods": methods, "seeds": seeds, "summary": summary}, f, indent=1)
  with open(os.path.join(FLAGS.workdir, "compare.md"), "w") as f:
    f.write(markdown(summary, seeds, FLAGS.config))
  plot(summary, os.path.join(FLAGS.workdir, "compare.png"))
  print(json.dumps({m: {"average_forgetting": summary[m]["average_forgetting"]["mean"],
                        "final_average_mse": summary[m]["final_average_mse"]["mean"]}
                    for m in summary}, indent=1))


if __name__ == "__main__":
  app.run(main)
