"""`gil-jax` console entry: train (any task), annotate, embed and info.

  gil-jax train    --config configs/X.py --workdir RUN [--config.a.b=value ...]
  gil-jax extend   --workdir RUN --data new.h5ad [--label-key cell_type] [--config.a.b=value]
  gil-jax annotate --workdir RUN --input query.h5ad --output annotated.h5ad
  gil-jax embed    --workdir RUN --input query.h5ad --output embedded.h5ad
  gil-jax info     --workdir RUN
  gil-jax corpus   DIR | FILES... [--out DIR/manifest.json] [--layer L] [--gene-column C]
                   [--pack]

annotate / embed refuse an existing --output (unless --overwrite), an output that is the input
(also through a link) and a workdir whose training has not finished (unless --allow-partial).
Exit codes: 0 done; 2 a one-line error naming the problem and the fix (GIL_TRACEBACK=1 shows the
traceback); 3 training stopped by SIGTERM / SIGINT after a checkpoint (rerun to resume).
"""

from __future__ import annotations

import argparse
import sys

# gil_jax.data.batching.NORMALISATIONS, written out so the CLI starts without importing jax
NORMALISATIONS = ("log1p_cp10k", "log1p", "none", "from_log2_cpm")


def define_train_flags(fv, argv: list[str] | None = None) -> None:
  """The flags of a training run (`gil-jax train`, `launch.py`) on the absl FlagValues `fv`;
  `argv`: the command line they will parse (config_flags reads the overrides from it; default
  sys.argv)."""
  from absl import flags
  from ml_collections import config_flags
  _add_config_package(sys.argv if argv is None else argv)
  config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()); "
                                  "override fields with --config.a.b=value.", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, results.json, report.md, "
                      "plots.", flag_values=fv)
  flags.DEFINE_bool("quiet", False, "No progress bars.", flag_values=fv)
  flags.DEFINE_string("coordinator", None, "Multi-process: coordinator 'host:port' "
                      "(default: $GIL_COORDINATOR).", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes "
                       "(default: $GIL_NUM_PROCESSES or 1).", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "Multi-process: this process's index "
                       "(default: $GIL_PROCESS_ID or 0).", flag_values=fv)


def _config_path(argv: list[str]) -> str | None:
  """The --config file named on a command line (`--config=F` or `--config F`), or None."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None and "--config" in argv[:-1]:
    path = argv[argv.index("--config") + 1]
  return path


def _add_config_package(argv: list[str]) -> None:
  """Lets a config file import its siblings (`from configs import canal_pancreas`) from any
  entry point: the folder above a config package (a folder with `__init__.py`) goes on
  sys.path, as `python launch.py` from the repository root has it."""
  import os
  path = _config_path(argv)
  if not path or not os.path.isfile(path):
    return
  folder = os.path.dirname(os.path.abspath(path))
  root = os.path.dirname(folder) if os.path.isfile(os.path.join(folder, "__init__.py")) else folder
  if root not in sys.path:
    sys.path.insert(0, root)


def parse_flags(fv, argv: list[str], prog: str = "") -> list[str]:
  """absl flag parsing with one-line errors (exit 2) for a bad --config file or override: an
  unknown field (with the closest names, or the new spelling of a renamed one) or a value of
  the wrong type."""
  import os
  from gil_jax import guards
  try:
    rest = fv(argv)
    if fv["config"].present and fv["config"].value is not None:
      fv["config"].value.lock()  # a config file that failed to load raises here
  except Exception as e:  # noqa: BLE001 -- config_flags raises many kinds for a bad override
    if os.environ.get("GIL_TRACEBACK"):
      raise
    msg = guards.one_line(e)
    path = _config_path(argv)
    if path and not os.path.isfile(path):
      msg = f"config file not found: {path!r}"
    elif path:
      try:
        guards.check_overrides(guards.load_config(path), argv[1:])
      except Exception as e2:  # noqa: BLE001
        msg = guards.one_line(e2)
    print(f"{prog}error: {msg}", file=sys.stderr)
    sys.exit(guards.EXIT_ERROR)
  for name in ("config", "workdir"):
    if fv[name].value is None:
      print(f"{prog}error: --{name} is required", file=sys.stderr)
      sys.exit(guards.EXIT_ERROR)
  return rest


def run_training(fv, prog: str = "") -> int:
  """Trains the parsed flags' experiment (any task); the summary on process 0. Exit code."""
  import os
  from absl import logging as absl_logging
  from gil_jax import distributed, guards, tasks
  absl_logging.set_verbosity(absl_logging.WARNING)  # keep Orbax's per-save INFO lines quiet
  # before anything touches a device: jax.distributed must be initialised first
  distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id)
  try:
    results = tasks.train(fv.config, fv.workdir, progress_bar=not fv.quiet)
  except guards.Interrupted as e:
    print(e, file=sys.stderr)
    return guards.EXIT_INTERRUPTED
  except ValueError as e:  # bad input: one line naming the problem and the fix
    if not guards.is_user_error(e) or os.environ.get("GIL_TRACEBACK"):
      raise
    print(f"{prog}error: {guards.one_line(e)}", file=sys.stderr)
    return guards.EXIT_ERROR
  print_summary(results, fv.workdir)
  return 0


def print_summary(results: dict, workdir: str) -> None:
  """The console summary of a finished run (process 0 only)."""
  import jax
  from gil_jax import tasks
  if jax.process_index() == 0:
    print()
    print(tasks.summary(results))
    print(f"results: {workdir}/results.json, report: {workdir}/report.md")


def _train(argv: list[str]) -> int:
  from absl import flags
  fv = flags.FlagValues()
  argv = ["gil-jax train"] + list(argv)
  define_train_flags(fv, argv)
  prog = "gil-jax train: "
  try:
    rest = parse_flags(fv, argv, prog)
  except SystemExit as e:
    return int(e.code or 0)
  if len(rest) > 1:
    print(f"{prog}error: unexpected arguments: {rest[1:]}", file=sys.stderr)
    return 2
  return run_training(fv, prog)


def _extend(argv: list[str]) -> int:
  """`gil-jax extend`: append stages (one per --data file) to a run and train them."""
  import os
  from absl import flags
  from ml_collections import config_flags
  from gil_jax import checkpoint, distributed, guards, tasks
  prog = "gil-jax extend: "
  p = argparse.ArgumentParser(prog="gil-jax extend", description=(
      "Append one training stage per --data file to the run in --workdir and train them "
      "(either task). Override training fields for the new stages with --config.a.b=value "
      "(e.g. --config.train.epochs_per_stage=5); rerun the same command to resume."))
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", action="append", required=True,
                 help="an .h5ad file to append as a stage (repeat for several)")
  p.add_argument("--label-key", default="", help="annotation runs: obs column with cell types "
                 "(default: the run's config.data.label_column)")
  p.add_argument("--normalisation", default="auto", choices=("auto", *NORMALISATIONS),
                 help="annotation runs: auto = log1p_cp10k for integer counts, none for "
                 "ln(1 + CP10k) values, from_log2_cpm for log2(1 + CPM) values")
  p.add_argument("--layer", default="", help="annotation runs: layer with the values ('' = X)")
  p.add_argument("--data-dir", default=None,
                 help="config.data.data_dir of the run (only for runs that did not save it)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    p.error(f"unrecognised arguments: {bad}")
  try:
    config, _ = tasks.saved_config(args.workdir, args.data_dir)
    before = checkpoint.flatten(config.to_dict())  # the overrides change `config` in place
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config, flag_values=fv, lock_config=True,
                                    sys_argv=["gil-jax extend"] + rest)
    fv(["gil-jax extend"] + rest)
    overrides = {k: v for k, v in checkpoint.flatten(fv.config.to_dict()).items()
                 if before.get(k) != v}
    if args.data_dir is not None:
      overrides["data.data_dir"] = args.data_dir
    distributed.initialize()  # several processes: GIL_COORDINATOR, GIL_NUM_PROCESSES, ...
    results = tasks.extend(args.workdir, args.data, label_key=args.label_key,
                           normalisation=args.normalisation, layer=args.layer,
                           overrides=overrides, progress_bar=not args.quiet)
  except guards.Interrupted as e:
    print(e, file=sys.stderr)
    return guards.EXIT_INTERRUPTED
  except Exception as e:  # noqa: BLE001 -- bad input and bad overrides: one line
    if os.environ.get("GIL_TRACEBACK") or not (guards.is_user_error(e) or
                                               isinstance(e, (flags.Error, KeyError, TypeError,
                                                              OSError))):
      raise
    print(f"{prog}error: {guards.one_line(e)}", file=sys.stderr)
    return guards.EXIT_ERROR
  print_summary(results, args.workdir)
  return 0


def _annotate(args, embed_only: bool) -> int:
  from gil_jax.canal import annotate
  summary = annotate.annotate_file(args.workdir, args.input, args.output, embed_only=embed_only,
                                   layer=args.layer, normalisation=args.normalisation,
                                   gene_column=args.gene_column,
                                   min_shared_genes=args.min_shared_genes,
                                   novelty_rule=getattr(args, "novelty_rule", "run"),
                                   overwrite=args.overwrite, allow_partial=args.allow_partial,
                                   majority_voting=getattr(args, "majority_voting", False))
  for k, v in summary.items():
    print(f"{k}: {v}")
  return 0


def _corpus(args) -> int:
  import json
  import os
  from gil_jax.data import corpus
  paths, _ = corpus.expand_files(args.paths, ".", use_manifest=False)
  out = args.out or os.path.join(args.paths[0] if os.path.isdir(args.paths[0])
                                 else os.path.dirname(os.path.abspath(paths[0])),
                                 corpus.MANIFEST_NAME)
  manifest = corpus.write_manifest(paths, out, layer=args.layer or None,
                                   gene_column=args.gene_column or None,
                                   progress=not args.quiet)
  if args.pack:
    manifest = corpus.write_pack(out, progress=not args.quiet)
  print(json.dumps({"manifest": out, **corpus.summary(manifest)}))
  return 0


def main(argv: list[str] | None = None) -> int:
  if argv is None:  # the real command line: safe to re-execute it (see gil_jax/hostenv.py)
    from gil_jax import hostenv
    hostenv.use_huge_pages()
  parser = argparse.ArgumentParser(prog="gil-jax", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser("train", add_help=False,
                 help="train any config (config.task: gil | annotation); --helpfull for flags")
  sub.add_parser("extend", add_help=False,
                 help="append stages (new .h5ad datasets) to a trained run; --help for flags")
  c = sub.add_parser("corpus", help="validate .h5ad files and write a corpus manifest "
                     "(cells, genes, checksums, cached statistics) for config.data.files")
  c.add_argument("paths", nargs="+", help=".h5ad files, folders (their *.h5ad) or globs")
  c.add_argument("--out", default="", help="manifest path (default: DIR/manifest.json)")
  c.add_argument("--layer", default="", help="layer holding the values ('' = X)")
  c.add_argument("--gene-column", default="", help="var column with gene ids ('' = var_names)")
  c.add_argument("--pack", action="store_true",
                 help="also write the rows once more as one CSR in union-gene order "
                      "(DIR/manifest.pack/, ~8 bytes per stored value), read by training "
                      "instead of the files: faster batches, the same ones")
  c.add_argument("--quiet", action="store_true", help="no progress bar")
  i = sub.add_parser("info", help="what a trained workdir is (task, method, stages, classes)")
  i.add_argument("--workdir", required=True)
  i.add_argument("--allow-partial", action="store_true")
  for name in ("annotate", "embed"):
    p = sub.add_parser(name, help=f"{name} a query .h5ad with a trained workdir")
    p.add_argument("--workdir", required=True)
    p.add_argument("--input", required=True, help="query .h5ad (never modified)")
    p.add_argument("--output", required=True, help="output .h5ad (must differ from --input)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--allow-partial", action="store_true",
                   help="use a workdir whose training stopped before its last stage "
                        "(noted in the output's uns['gil'])")
    p.add_argument("--layer", default="", help="layer holding the values ('' = X)")
    p.add_argument("--gene-column", default="", help="var column with gene ids ('' = var_names)")
    p.add_argument("--normalisation", default="auto",
                   choices=("auto", *NORMALISATIONS),
                   help="auto: log1p_cp10k for integer counts, none for ln(1 + CP10k) values, "
                   "from_log2_cpm for log2(1 + CPM) values")
    p.add_argument("--min-shared-genes", type=int, default=None,
                   help="fail when fewer query genes are in the vocabulary "
                        "(default: config.canal.min_shared_genes of the run)")
    if name == "annotate":
      p.add_argument("--majority-voting", action="store_true",
                     help="also obs['gil_majority_voting']: the most frequent label of each "
                          "cell's cluster (kNN graph of X_gil; celltypist's convention)")
      p.add_argument("--novelty-rule", default="run", choices=("run", "canal"),
                     help="run: the run's novelty rule and saved constants; canal: CANAL's "
                          "transductive mixup rule on this query set")
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] == "train":
    return _train(argv[1:])
  if argv and argv[0] == "extend":
    return _extend(argv[1:])
  args, rest = parser.parse_known_args(argv)
  if rest:
    parser.error(f"unrecognised arguments: {rest}")
  try:
    if args.command == "corpus":
      return _corpus(args)
    if args.command == "info":
      import json
      import gil_jax
      print(json.dumps(gil_jax.load(args.workdir, args.allow_partial).info(), indent=1))
      return 0
    return _annotate(args, embed_only=args.command == "embed")
  except (ValueError, OSError) as e:
    import os
    if os.environ.get("GIL_TRACEBACK"):
      raise
    from gil_jax import guards
    print(f"gil-jax {args.command}: error: {guards.one_line(e)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
