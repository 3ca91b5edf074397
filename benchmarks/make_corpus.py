"""Writes a synthetic corpus: N `.h5ad` shards of simulated counts, each on its own gene panel.

  python benchmarks/make_corpus.py --out /tmp/corpus                       # 20 x 10,000 cells
  python benchmarks/make_corpus.py --out /tmp/small --shards 3 --cells-per-shard 500 --genes 400

Shards share the simulator's latents (a gene means the same thing everywhere), measure between
half and all of `--genes` genes each (not measured is not zero: a shard's var_names list only
its panel), and hold integer counts (CSR) with obs `cell_type`, `batch`, `dataset`. The default,
~1,000 detected genes per cell, writes ~200k cells in a few minutes, no downloads. Then
`gil-jax corpus OUT --pack` writes the corpus manifest (`OUT/manifest.json`) and its pack.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from gil_jax.canal.annotate import write_atomic  # noqa: E402
from gil_jax.data import simulate  # noqa: E402


def make_corpus(out: str, shards: int = 20, cells_per_shard: int = 10_000, genes: int = 20_000,
                base_log_mean: float = -3.7, seed: int = 0, progress: bool = True) -> dict:
  """Writes the shards to `out` (created) and returns a summary (cells, detected genes/cell)."""
  os.makedirs(out, exist_ok=True)
  cfg = simulate.SimConfig(n_cells=cells_per_shard, n_genes=genes,
                           n_modules=max(1, min(200, genes // 10)), n_batches=4,
                           base_log_mean=base_log_mean, seed=seed)
  t, nnz, size = time.perf_counter(), 0, 0
  for s in tqdm(range(shards), desc="shards", disable=not progress):
    adata = simulate.simulate_shard(cfg, s, simulate.shard_panel(cfg, s))
    path = os.path.join(out, f"shard{s:03d}.h5ad")
    write_atomic(adata, path)
    nnz += adata.X.nnz
    size += os.path.getsize(path)
  return {"out": out, "shards": shards, "cells": shards * cells_per_shard, "genes": genes,
          "detected_per_cell": round(nnz / max(1, shards * cells_per_shard), 1),
          "bytes": size, "seconds": round(time.perf_counter() - t, 1)}


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--shards", type=int, default=20)
  p.add_argument("--cells-per-shard", dest="cells", type=int, default=10_000)
  p.add_argument("--genes", type=int, default=20_000)
  p.add_argument("--base-log-mean", dest="base", type=float, default=-3.7,
                 help="log base mean count of a gene (sets the detected genes per cell)")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  print(json.dumps(make_corpus(a.out, a.shards, a.cells, a.genes, a.base, a.seed)))
