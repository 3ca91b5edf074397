"""`gil-jax` console entry: train (annotation), annotate and embed.

  gil-jax train    --config configs/canal_pancreas.py --workdir RUN [--config.canal.mode=...]
  gil-jax annotate --workdir RUN --input query.h5ad --output annotated.h5ad
  gil-jax embed    --workdir RUN --input query.h5ad --output embedded.h5ad

annotate / embed refuse an existing --output (unless --overwrite), an output that is the input
(also through a link) and a workdir whose training has not finished (unless --allow-partial).
Exit codes: 0 done; 2 a one-line error naming the problem and the fix (GIL_TRACEBACK=1 shows the
traceback); 3 training stopped by SIGTERM / SIGINT after a checkpoint (rerun to resume).
"""

from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
  import os
  from gil_jax import guards
  from gil_jax.canal import loop, report
  try:
    config = _load_config(args.config, args.overrides)
    results = loop.train_annotation(config, args.workdir, progress_bar=not args.quiet)
  except guards.Interrupted as e:
    print(e, file=sys.stderr)
    return guards.EXIT_INTERRUPTED
  except ValueError as e:  # bad input: one line naming the problem and the fix
    if not guards.is_user_error(e) or os.environ.get("GIL_TRACEBACK"):
      raise
    print(f"gil-jax train: error: {guards.one_line(e)}", file=sys.stderr)
    return guards.EXIT_ERROR
  print(report.console_summary(results))
  print(f"results: {args.workdir}/results.json, report: {args.workdir}/report.md")
  return 0


def _load_config(path: str, overrides: list[str]):
  """get_config() of a config file, with `--config.a.b=value` overrides (unknown fields fail)."""
  from gil_jax import guards
  return guards.load_config(path, overrides)


def _annotate(args, embed_only: bool) -> int:
  from gil_jax.canal import annotate
  summary = annotate.annotate_file(args.workdir, args.input, args.output, embed_only=embed_only,
                                   layer=args.layer, normalisation=args.normalisation,
                                   gene_column=args.gene_column,
                                   min_shared_genes=args.min_shared_genes,
                                   novelty_rule=getattr(args, "novelty_rule", "run"),
                                   overwrite=args.overwrite, allow_partial=args.allow_partial)
  for k, v in summary.items():
    print(f"{k}: {v}")
  return 0


def main(argv: list[str] | None = None) -> int:
  if argv is None:  # the real command line: safe to re-execute it (see gil_jax/hostenv.py)
    from gil_jax import hostenv
    hostenv.use_huge_pages()
  parser = argparse.ArgumentParser(prog="gil-jax", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="continual annotation training (configs/canal_*.py)")
  t.add_argument("--config", required=True)
  t.add_argument("--workdir", required=True)
  t.add_argument("--quiet", action="store_true")
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
                   choices=("auto", "log1p_cp10k", "log1p", "none"),
                   help="auto: log1p_cp10k for integer counts, else none (pre-normalised)")
    p.add_argument("--min-shared-genes", type=int, default=None,
                   help="fail when fewer query genes are in the vocabulary "
                        "(default: config.canal.min_shared_genes of the run)")
    if name == "annotate":
      p.add_argument("--novelty-rule", default="run", choices=("run", "canal"),
                     help="run: the run's novelty rule and saved constants; canal: CANAL's "
                          "transductive mixup rule on this query set")
  args, rest = parser.parse_known_args(argv)
  if args.command == "train":
    args.overrides = rest
    return _train(args)
  if rest:
    parser.error(f"unrecognised arguments: {rest}")
  try:
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
