"""Cross-study annotation: leave one study out, train on the others, annotate the held-out study.

  python benchmarks/cross_study.py --data_dir ../shared/data --out runs/cross_study \
      [--seeds 0,1,2] [--modes joint,canal] [--tissues pancreas,pbmc] [--quick] \
      [--config.a.b=value ...]   # applied to every run's CANAL config

Studies (the shared .h5ad files, grouped by the study their cells come from, found from the cell
names: the Cepo file's three batches are Baron (inDrop), Segerstolpe (Smart-seq2) and Lawlor
(Fluidigm C1) cells, and panc8's `tech` values are Grün, Muraro, Lawlor, Baron and Segerstolpe):

  pancreas  grun: panc8:celseq | muraro: panc8:celseq2 | lawlor: panc8:fluidigmc1, cepo:batch 5 |
            segerstolpe: panc8:smartseq2, cepo:batch 4 | baron: panc8:indrop, baron (CIDER,
            human+mouse), cepo:batch 1 | xin | wang
  pbmc      symphony (10x 3'v1/3'v2/5') | kang (10x, muscat) | ding: dropseq, indrops

Each run holds one study out: all its parts are test-only sources (never trained on), the other
studies' parts are the training stages. Figures per held-out part ("split"): accuracy and macro-F1
on its cells whose (harmonised) type occurs in the training studies, and the fraction of all its
cells the run's novelty rule flags "Unassigned" (split by seen / unseen type), for
  (a) the annotator trained jointly on the other studies (config.method=joint),
  (b) the continual stream over the other studies' parts in the fixed order below (mode canal),
  (c) logistic regression (standardised, C=1) and (d) kNN (k=15) on 50 principal components,
      both fitted on the same training cells on the genes the held-out part shares with the
      training data (the model's vocabulary plus any genes it leaves out as class-confounded,
      config.canal.min_gene_class_coverage; gil_jax/eval/baselines.py).
Training cells: the training split of every training part (config.canal.test_fraction /
val_fraction held out per part, stratified, seeded by the run seed). Models: mean ± s.d. over
seeds; the baselines are deterministic given the training cells, which differ by seed only.

Parts that are subsets of a file (panc8 by `tech`, Cepo by `batch`) are written to a temporary
folder outside the repository for the duration of the run and deleted afterwards. Nothing is
downloaded. Writes <out>/cross_study.json and <out>/cross_study.md; a finished run
(<out>/runs/.../results.json) is reused when rerun with the same --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from gil_jax import hostenv  # noqa: E402

hostenv.use_huge_pages()  # see gil_jax/hostenv.py

import anndata as ad  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import canal_pancreas, canal_pbmc  # noqa: E402
from configs.canal_pancreas import _src  # noqa: E402
from gil_jax import guards  # noqa: E402
from gil_jax.tasks import annotation  # noqa: E402
from gil_jax.eval.report import markdown_table  # noqa: E402

# part -> (file, label column, normalisation, layer, (obs column, value) subset or None)
PARTS = {
    "pancreas": {
        "panc8_celseq": ("pancreas_panc8_small_bbknnR", "celltype", "none", "lognorm",
                         ("tech", "celseq")),
        "panc8_celseq2": ("pancreas_panc8_small_bbknnR", "celltype", "none", "lognorm",
                          ("tech", "celseq2")),
        "panc8_fluidigmc1": ("pancreas_panc8_small_bbknnR", "celltype", "none", "lognorm",
                             ("tech", "fluidigmc1")),
        "panc8_indrop": ("pancreas_panc8_small_bbknnR", "celltype", "none", "lognorm",
                         ("tech", "indrop")),
        "panc8_smartseq2": ("pancreas_panc8_small_bbknnR", "celltype", "none", "lognorm",
                            ("tech", "smartseq2")),
        "baron": ("pancreas_baron_hs_mm_CIDER", "Group", "log1p_cp10k", "", None),
        "cepo_b1": ("pancreas_3batch_Cepo", "cellTypes", "log1p_cp10k", "", ("batch", "batch 1")),
        "cepo_b4": ("pancreas_3batch_Cepo", "cellTypes", "log1p_cp10k", "", ("batch", "batch 4")),
        "cepo_b5": ("pancreas_3batch_Cepo", "cellTypes", "log1p_cp10k", "", ("batch", "batch 5")),
        "xin": ("pancreas_xin_scClassify", "cell_type", "from_log2_cpm", "", None),
        "wang": ("pancreas_wang_scClassify", "cell_type", "from_log2_cpm", "", None),
    },
    "pbmc": {
        "symphony": ("pbmc_3chem_symphony", "cell_type", "log1p_cp10k", "", None),
        "kang": ("kang_pbmc_muscat", "cluster_id", "log1p_cp10k", "", None),
        "dropseq": ("pbmc_dropseq_scAnnotate", "cell_type", "none", "", None),
        "indrops": ("pbmc_indrops_scAnnotate", "cell_type", "none", "", None),
    },
}
# study -> its parts; the dict order is the fixed stage order of the continual stream (b)
STUDIES = {
    "pancreas": {"grun": ["panc8_celseq"], "muraro": ["panc8_celseq2"],
                 "lawlor": ["panc8_fluidigmc1", "cepo_b5"],
                 "segerstolpe": ["panc8_smartseq2", "cepo_b4"],
                 "baron": ["panc8_indrop", "baron", "cepo_b1"], "xin": ["xin"], "wang": ["wang"]},
    "pbmc": {"symphony": ["symphony"], "kang": ["kang"], "ding": ["dropseq", "indrops"]},
}
# Label maps (gil_jax/canal/labels.py syntax). Pancreas: Wang's 'stellate' is counted as Baron's
# 'activated_stellate' (the only stellate type elsewhere). PBMC: Ding's 'Cytotoxic T cell' as
# CD8 T; Symphony's MK (7 cells) and HSC (3 cells) occur in no other study and are dropped.
LABEL_MAPS = {"pancreas": canal_pancreas.PANCREAS_LABELS, "pbmc": canal_pbmc.PBMC_LABELS}
DROP = {"pancreas": (), "pbmc": ("MK", "HSC")}
BASE = {"pancreas": canal_pancreas.get_config, "pbmc": canal_pbmc.get_config}
WITHIN = "(within-study test split of the training studies)"
METHODS = ("joint", "canal", "joint_embedding_knn", "canal_embedding_knn", "logistic_regression",
           "knn_pca")
METHOD_NAMES = {"joint": "model, joint", "canal": "model, continual (canal)",
                "joint_embedding_knn": "model, joint: kNN (k=15) on its embedding",
                "canal_embedding_knn": "model, continual: kNN (k=15) on its embedding (reference: "
                                       "every stage's training cells)",
                "logistic_regression": "logistic regression", "knn_pca": "kNN (k=15) on PCA"}


def write_parts(data_dir: str, tmp: str) -> dict[str, str]:
  """part -> .h5ad path: whole files in data_dir, subsets written to `tmp` (not the repo)."""
  paths = {}
  for tissue in PARTS:
    for part, (file, _, _, _, subset) in PARTS[tissue].items():
      path = os.path.join(data_dir, file + ".h5ad")
      if not os.path.isfile(path):
        raise SystemExit(f"missing {path}; pass --data_dir (the shared data folder)")
      if subset is not None:
        a = ad.read_h5ad(path)
        col, val = subset
        a = a[a.obs[col].astype(str) == val].copy()
        path = os.path.join(tmp, f"{part}.h5ad")
        a.write_h5ad(path)
      paths[part] = path
  return paths


def make_config(tissue: str, held_out: str, mode: str, seed: int, paths: dict[str, str],
                epochs: int) -> ml_collections.ConfigDict:
  """The tissue's CANAL config with the other studies as training stages and `held_out`'s parts
  test-only."""
  c = BASE[tissue]()
  train = [p for s, parts in STUDIES[tissue].items() if s != held_out for p in parts]
  test = STUDIES[tissue][held_out]
  c.experiment = f"cross_study_{tissue}_{held_out}"
  c.seed = seed
  c.canal.sources = ml_collections.ConfigDict({
      p: _src(paths[p], PARTS[tissue][p][1], PARTS[tissue][p][2], layer=PARTS[tissue][p][3])
      for p in train + test})
  c.canal.stage_order = tuple(train)
  c.canal.test_only = tuple(test)
  c.canal.label_map = LABEL_MAPS[tissue]
  c.canal.drop_labels = DROP[tissue]
  c.method = mode
  c.canal.novelty_rule = "validation_auto"  # threshold from validation cells of training studies
  c.canal.test_fraction = 0.1
  c.canal.val_fraction = 0.1
  c.train.epochs_per_stage = epochs
  return c


def query_panel(tissue: str, study: str, paths: dict[str, str], tmp: str) -> str:
  """A text file with the genes the held-out study's parts measure (their union)."""
  path = os.path.join(tmp, f"panel_{tissue}_{study}.txt")
  if not os.path.exists(path):
    genes: dict[str, None] = {}
    for part in STUDIES[tissue][study]:
      genes.update(dict.fromkeys(ad.read_h5ad(paths[part], backed="r").var_names.astype(str)))
    with open(path, "w") as f:
      f.write("\n".join(genes))
  return path


def run_one(config, workdir: str, commit: str) -> dict:
  path = os.path.join(workdir, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  t0 = time.time()
  results = annotation.train_annotation(config, workdir)
  results["wall_s"] = round(time.time() - t0, 1)
  results["commit"] = commit
  with open(path, "w") as f:  # with wall time
    json.dump(results, f, indent=1)
  return results


def figures(results: dict) -> dict:
  """part -> method -> {accuracy, macro_f1, flagged_novel*, n_*} of one run."""
  a = results["annotation"]
  mode = results["mode"]
  out = {}
  for part, e in a["test_only"].items():
    row = {"n_cells": e["n_cells"], "n_seen_type_cells": e["n_seen_type_cells"],
           mode: {k: e.get(k) for k in ("accuracy", "macro_f1", "flagged_novel",
                                        "flagged_novel_seen", "flagged_novel_unseen")}}
    for b, be in a["baselines"].items():
      t = be["test_only"].get(part, {})
      row["n_shared_genes"] = t.get("n_shared_genes")
      row[b] = {"accuracy": t.get("accuracy"), "macro_f1": t.get("macro_f1")}
    if "embedding_knn" in a:  # runs of earlier revisions lack it
      t = a["embedding_knn"]["test_only"].get(part, {})
      row[f"{mode}_embedding_knn"] = {k: t.get(k) for k in ("accuracy", "macro_f1")}
    out[part] = row
  # context: the within-study test split of the training studies (same run, same cells for all)
  within = {"n_cells": a["n_test_cells"], "n_seen_type_cells": a["n_test_cells"],
            mode: {k: a["final"][k] for k in ("accuracy", "macro_f1")}}
  for b, be in a["baselines"].items():
    within["n_shared_genes"] = be.get("n_genes")
    within[b] = {k: (be.get("test") or {}).get(k) for k in ("accuracy", "macro_f1")}
  if "embedding_knn" in a:
    within[f"{mode}_embedding_knn"] = {k: (a["embedding_knn"]["test"] or {}).get(k)
                                       for k in ("accuracy", "macro_f1")}
  out[WITHIN] = within
  return out


def _stats(values: list) -> tuple[float | None, float | None]:
  v = [x for x in values if x is not None]
  if not v:
    return None, None
  return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None


def _pm(mean_sd: tuple, digits: int = 3) -> str:
  m, s = mean_sd
  if m is None:
    return "–"
  return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def aggregate(per_seed: dict) -> dict:
  """tissue -> study -> part -> method -> metric -> (mean, sd) over seeds, plus counts."""
  agg = {}
  for tissue, studies in per_seed.items():
    for study, by_mode in studies.items():
      for mode, by_seed in by_mode.items():
        for seed, parts in by_seed.items():
          for part, row in parts.items():
            dst = agg.setdefault(tissue, {}).setdefault(study, {}).setdefault(part, {
                "n_cells": row["n_cells"], "n_seen_type_cells": row["n_seen_type_cells"],
                "n_shared_genes": row.get("n_shared_genes"), "values": {}})
            for method in METHODS:
              if method not in row:
                continue
              for k, v in row[method].items():
                dst["values"].setdefault(method, {}).setdefault(k, {})[(mode, seed)] = v
  for tissue in agg:
    for study in agg[tissue]:
      for part, dst in agg[tissue][study].items():
        vals = dst.pop("values")
        dst["methods"] = {}
        for method, metrics in vals.items():
          # baselines are fitted once per (mode, seed) run on identical training cells: one
          # value per seed (they do not depend on the mode)
          dst["methods"][method] = {
              k: _stats(list({s: v for (m, s), v in sorted(by.items())}.values()))
              for k, by in metrics.items()}
  return agg


def markdown(agg: dict, meta: dict) -> str:
  lines = ["# Cross-study annotation (leave one study out)", "",
           f"Command: `{meta['command']}`", "",
           f"Runs trained at commit(s) {', '.join(f'`{c}`' for c in meta['run_commits'])} "
           "('+dirty': uncommitted changes under gil_jax/ or configs/); "
           f"seeds {meta['seeds']} (continual mode: {meta['canal_seeds']}); modes "
           f"{meta['modes']}; {meta['epochs']} epochs per stage; "
           f"{meta['wall_s']:.0f} s of training runs in all.", "",
           "Split: every row is one held-out part of the held-out study (all its cells are "
           "test-only, none trained on); the model and baselines are trained on the training "
           "split of all other studies. Accuracy / macro-F1: cells of the held-out part whose type "
           "occurs in the training studies (argmax, no novelty rejection). Flagged novel: share of "
           "all the part's cells the run's novelty rule (validation_auto) marks Unassigned, "
           "seen-type cells / unseen-type cells. Mean ± s.d. over seeds. For context, the row "
           f"{WITHIN!r} of each held-out study is the same run scored on the held-out cells of its "
           "training studies (config.canal.test_fraction of each, never trained on; shared genes = "
           "every training gene the baselines use).", ""]
  n_seeds = {"joint": len(meta["seeds"]), "canal": len(meta["canal_seeds"]),
             "joint_embedding_knn": len(meta["seeds"]),
             "canal_embedding_knn": len(meta["canal_seeds"]),
             "logistic_regression": len(set(meta["seeds"]) | set(meta["canal_seeds"])),
             "knn_pca": len(set(meta["seeds"]) | set(meta["canal_seeds"]))}
  methods = [m for m in METHODS if any(m in p["methods"] for t in agg.values()
                                       for s in t.values() for p in s.values())]
  for metric, title in (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1")):
    rows = []
    for tissue, studies in agg.items():
      for study, parts in studies.items():
        for part, p in sorted(parts.items(), key=lambda kv: kv[0] == WITHIN):
          rows.append([tissue, study, part, p["n_cells"], p["n_seen_type_cells"],
                       p["n_shared_genes"]] +
                      [_pm(p["methods"].get(m, {}).get(metric, (None, None))) for m in methods])
    lines += [f"## {title}", "",
              markdown_table(["tissue", "held-out study", "held-out part", "cells",
                              "seen-type cells", "shared genes"] +
                             [f"{METHOD_NAMES[m]} ({n_seeds[m]} seeds)" for m in methods],
                             rows), ""]
  models = [m for m in methods if m in ("joint", "canal")]
  header_models = [f"{METHOD_NAMES[m]} ({n_seeds[m]} seeds)" for m in models]
  rows = []
  for tissue, studies in agg.items():
    for study, parts in studies.items():
      for part, p in parts.items():
        if part == WITHIN:
          continue
        row = [tissue, study, part]
        for m in models:
          f = p["methods"].get(m, {})
          row += [_pm(f.get("flagged_novel_seen", (None, None)), 2),
                  _pm(f.get("flagged_novel_unseen", (None, None)), 2)]
        rows.append(row)
  header = ["tissue", "held-out study", "held-out part"]
  for m in header_models:
    header += [f"{m}: seen types", f"{m}: unseen types"]
  lines += ["## Fraction flagged novel", "", markdown_table(header, rows), "",
            "Dropped labels: " + "; ".join(f"{t}: {', '.join(DROP[t]) or 'none'}" for t in DROP) +
            ". Label maps: " + "; ".join(f"{t}: `{'; '.join(LABEL_MAPS[t])}`" for t in LABEL_MAPS),
            ""]
  return "\n".join(lines)


def git_commit() -> tuple[str, bool]:
  """(commit, dirty); CROSS_STUDY_COMMIT names it for a tree exported with `git archive`."""
  if os.environ.get("CROSS_STUDY_COMMIT"):
    return os.environ["CROSS_STUDY_COMMIT"], False
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "gil_jax", "configs"],
                                cwd=ROOT, capture_output=True, text=True).stdout.strip())
    return commit, dirty
  except (OSError, subprocess.CalledProcessError):
    return "unknown", False


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", default=os.path.join(ROOT, "..", "shared", "data"))
  p.add_argument("--out", default=os.path.join(ROOT, "runs", "cross_study"))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--modes", default="joint,canal", help="config.method values: joint,canal")
  p.add_argument("--tissues", default="pancreas,pbmc")
  p.add_argument("--studies", default="", help="comma-separated held-out studies (default all)")
  p.add_argument("--epochs", type=int, default=0, help="epochs per stage (0 = the config's)")
  p.add_argument("--canal_seeds", default="",
                 help="seeds of the continual mode (default: --seeds); it costs ~2x joint")
  p.add_argument("--gene_panel", default="none", choices=("none", "query"),
                 help="query: train on the genes the held-out study measures only "
                      "(config.canal.gene_panel; the union over its parts), as the baselines "
                      "are fitted on the shared genes")
  p.add_argument("--value_scale", default="", choices=("", "none", "cell_rank"),
                 help="config.batch.value_scale of the model ('' = the config's)")
  p.add_argument("--aggregate_only", action="store_true",
                 help="only tabulate the finished runs under --out; train nothing")
  p.add_argument("--quick", action="store_true",
                 help="smoke test: first seed, 1 epoch per stage, first two studies per tissue")
  args, overrides = p.parse_known_args(argv)
  for tissue in PARTS:  # --config.a.b=value applies to every run; checked before any training
    try:
      guards.apply_overrides(BASE[tissue](), overrides)
    except guards.ConfigError as e:
      p.error(str(e))
  command = " ".join(["python benchmarks/cross_study.py"] +
                     list(argv if argv is not None else sys.argv[1:]))
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  tissues = [t.strip() for t in args.tissues.split(",") if t.strip()]
  bad = [m for m in modes if m not in ("joint", "canal")] + [t for t in tissues if t not in PARTS]
  if bad:
    p.error(f"unknown modes/tissues {bad}")
  only = [s.strip() for s in args.studies.split(",") if s.strip()]
  canal_seeds = [int(x) for x in args.canal_seeds.split(",") if x.strip()] or seeds
  if args.quick:
    seeds, canal_seeds = seeds[:1], canal_seeds[:1]
  os.makedirs(args.out, exist_ok=True)
  # one compilation per tissue and mode, reused by the runs of every held-out study and seed
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.out, ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  commit, dirty = git_commit()
  run_s, run_commits = 0.0, set()
  per_seed: dict = {}
  tmp = tempfile.mkdtemp(prefix="cross_study_parts_")
  try:
    paths = write_parts(os.path.abspath(args.data_dir), tmp)
    for mode in modes:  # all joint runs first: the continual runs are the optional part (b)
      for seed in (canal_seeds if mode == "canal" else seeds):
        for tissue in tissues:
          studies = [s for s in STUDIES[tissue] if not only or s in only]
          studies = studies[:2] if args.quick else studies
          epochs = 1 if args.quick else (args.epochs or BASE[tissue]().train.epochs_per_stage)
          for study in studies:
            config = make_config(tissue, study, mode, seed, paths, epochs)
            if args.value_scale:
              config.batch.value_scale = args.value_scale
            guards.apply_overrides(config, overrides)
            if args.gene_panel == "query":
              config.canal.gene_panel = query_panel(tissue, study, paths, tmp)
            workdir = os.path.join(args.out, "runs", tissue, mode, f"seed{seed}", study)
            if args.aggregate_only and not os.path.exists(os.path.join(workdir, "results.json")):
              continue
            res = run_one(config, workdir, commit + ("+dirty" if dirty else ""))
            run_s += res.get("wall_s") or 0.0
            run_commits.add(res.get("commit", "unknown"))
            fig = figures(res)
            per_seed.setdefault(tissue, {}).setdefault(study, {}).setdefault(mode, {})[seed] = fig
            print(json.dumps({"tissue": tissue, "held_out": study, "mode": mode, "seed": seed,
                              "wall_s": res.get("wall_s"),
                              **{part: {m: r[m]["accuracy"] for m in METHODS if m in r}
                                 for part, r in fig.items()}}), flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  meta = {"command": command, "commit": commit, "dirty": dirty, "seeds": seeds,
          "canal_seeds": canal_seeds if "canal" in modes else [], "modes": modes,
          "epochs": "1 (quick)" if args.quick else (args.epochs or "config (15)"),
          "wall_s": run_s, "run_commits": sorted(run_commits), "studies": STUDIES, "parts": PARTS,
          "label_maps": LABEL_MAPS, "dropped_labels": DROP}
  agg = aggregate(per_seed)
  with open(os.path.join(args.out, "cross_study.json"), "w") as f:
    json.dump({"meta": meta, "aggregate": agg,
               "per_seed": {t: {s: {m: {str(k): v for k, v in by.items()}
                                    for m, by in ms.items()} for s, ms in st.items()}
                            for t, st in per_seed.items()}}, f, indent=1)
  md = markdown(agg, meta)
  with open(os.path.join(args.out, "cross_study.md"), "w") as f:
    f.write(md)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
