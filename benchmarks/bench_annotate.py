"""Annotation throughput of a trained run: load time, cells/s on a query, and many small queries.

  python benchmarks/bench_annotate.py --workdir runs/canal_pancreas \
      --query ../shared/data/pancreas_xin_scClassify.h5ad [--normalisation from_log2_cpm] \
      [--repeats 3] [--small 100] [--json]

Measures, in one process: `gil_jax.load(workdir)` (restore + vocabulary), the first
`model.annotate` of the query (includes compiling the eval step), then `--repeats` more calls
(median cells/s), and `--n_small` queries of `--small` cells each in a loop (what a notebook
user annotating many small AnnData objects sees; compiled functions are reused).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import anndata as ad  # noqa: E402

import gil_jax  # noqa: E402


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--query", required=True)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--small", type=int, default=100, help="cells per small query")
  p.add_argument("--n_small", type=int, default=10, help="number of small queries")
  p.add_argument("--normalisation", default="auto",
                 help="how the query's values enter the model (annotate's --normalisation); "
                 "small slices of a log2(1 + CPM) file need it said: auto refuses to guess there")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)

  query = ad.read_h5ad(args.query)
  t0 = time.perf_counter()
  model = gil_jax.load(args.workdir)
  load_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  model.annotate(query, normalisation=args.normalisation)
  first_s = time.perf_counter() - t0
  rates = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    model.annotate(query, normalisation=args.normalisation)
    rates.append(query.n_obs / (time.perf_counter() - t0))
  small = [query[i * args.small % query.n_obs:][:args.small].copy() for i in range(args.n_small)]
  t0 = time.perf_counter()
  for q in small:
    model.annotate(q, normalisation=args.normalisation)
  small_s = (time.perf_counter() - t0) / args.n_small
  out = {"workdir": args.workdir, "query": os.path.basename(args.query), "cells": query.n_obs,
         "genes": query.n_vars, "load_s": round(load_s, 2),
         "first_annotate_s": round(first_s, 2),
         "cells_per_s": round(statistics.median(rates), 1),
         "small_query_cells": args.small, "small_query_s": round(small_s, 3)}
  print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
