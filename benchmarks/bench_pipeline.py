"""Data pipeline throughput: lazy .h5ad rows -> numpy Batches -> device arrays (cells/s).

  python benchmarks/bench_pipeline.py --file ../shared/data/pbmc_3chem_10x_scWGParis_nolabels.h5ad \
      --batch 32 --seq-len 512 --steps 50 --json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit  # noqa: E402 (first: it may re-exec)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gil_jax import parallel  # noqa: E402
from gil_jax.data import batching, pipeline  # noqa: E402


def run(args) -> dict:
  t = time.perf_counter()
  data = pipeline.open_lazy_h5ad(args.file)
  open_s = time.perf_counter() - t
  spec = batching.BatchSpec(batch_size=args.batch, n_tokens=args.seq_len)
  c2r = np.arange(1, data.n_genes + 1, dtype=np.int32)
  mesh = parallel.make_mesh({"data": -1, "model": 1})
  sh = parallel.data_sharded(mesh)
  src = batching.stage_batches(data, np.arange(data.n_cells), c2r, spec, 0, 0, 0, args.steps)
  put = lambda sb: (sb[0], jax.device_put(sb[1], sh))
  t = time.perf_counter()
  n = 0
  with pipeline.Prefetcher(src, put=put, depth=args.depth) as p:
    for _, b in p:
      jax.block_until_ready(b.values)
      n += int(np.sum(np.asarray(b.cell_mask)))
  dt = time.perf_counter() - t
  return {"file": os.path.basename(args.file), "cells": data.n_cells, "genes": data.n_genes,
          "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
          "open_s": round(open_s, 3), "cells_per_s": round(n / dt, 1),
          "batches_per_s": round(args.steps / dt, 2)}


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--file", default="../shared/data/pbmc_3chem_10x_scWGParis_nolabels.h5ad")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq-len", dest="seq_len", type=int, default=512)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--json", action="store_true")
  a = p.parse_args()
  emit(run(a), a.json)
