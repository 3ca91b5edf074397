"""Input pipeline throughput: lazy .h5ad rows (one file or a corpus) -> token Batches -> device
arrays, in cells/s, through the training loader (`gil_jax/data/loader.py`, grain).

  python benchmarks/make_corpus.py --out /tmp/corpus && gil-jax corpus /tmp/corpus --pack
  python benchmarks/bench_pipeline.py --corpus /tmp/corpus --batch 64 --seq-len 128 --json
  python benchmarks/bench_pipeline.py --corpus ../shared/data/pbmc_3chem_10x_scWGParis_nolabels.h5ad

For each worker count (`--workers 0,1,2`: 0 = one background thread) it times `--steps` steps
after `--warmup` untimed ones (worker start-up and filling queues; the first batch's seconds are
reported apart), so the rate is the steady state; with block shuffling (`--block` consecutive cells
per unit). Beside it, on the same cells in the same order, anndata's own backed mode
(`read_h5ad(backed='r')`, `X[rows]`): rows read only, no tokenisation, so an upper bound for a
reader built on it. With `--grain`, the same batches through grain's `mp_prefetch` with 2
workers (the pipeline this project used before; needs `pip install grain`). With a packed
corpus (`gil-jax corpus DIR --pack`) rows come from the pack, and the same loader reading the
.h5ad files instead is timed beside it (`files_workers{W}_cells_per_s`, the largest W).

annbatch (scverse's loader) needs Python >= 3.12; this project runs 3.11, so
`--annbatch-python PY` runs `annbatch_driver.py` with that interpreter (a venv with
`pip install "annbatch[zarrs]" jax flax`; the corpus is converted once to `--annbatch-collection`,
not timed) and merges its JSON: annbatch's loader alone (rows) and with this project's
tokenisation of its batches (device-ready `Batch`es, `annbatch_cells_per_s`), and the ratio.
Peak RSS of this process and of the worker processes is reported (ru_maxrss), and per loader the
CPU time per batch of this process and of its workers over the timed steps (Linux `/proc`),
with the cores they used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit  # noqa: E402 (first: it may re-exec)

import anndata as ad  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from gil_jax import parallel  # noqa: E402
from gil_jax.data import batching, corpus, loader  # noqa: E402


def _cpu_seconds(pid: int) -> float | None:
  """User + system CPU seconds of a process so far (Linux /proc; None elsewhere)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _time_loader(make, steps: int, workers: int, put, warmup: int) -> dict:
  """{first_batch_s, cells_per_s, and CPU ms per batch of this process and of the workers} over
  `steps` steps after `warmup` untimed ones. The warm-up covers the worker processes' start (a
  spawned worker imports jax and reopens the corpus, ~2.5 s here) and fills the prefetch
  queues, so the rate and the CPU times are the steady state (process start-up excluded; the
  batches built ahead before the timed steps start, up to (W * prefetch + 1) groups, count in
  the rate but not in the CPU times, which can therefore read up to ~7 % low). Cells
  are counted on the host side of `put` (reading a device array back per batch would time the
  transfer back too); the last batch is waited for."""
  counted = []

  def put_and_count(sb):
    counted.append(int(np.sum(sb[1].cell_mask)))
    return put(sb)

  t0 = time.perf_counter()
  with loader.StepIterator(make, 0, warmup + steps, workers=workers, prefetch=4,
                           post=put_and_count) as it:
    _, b = next(it)
    jax.block_until_ready(b.values)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
      _, b = next(it)
    jax.block_until_ready(b.values)
    pids = [os.getpid(), *it.worker_pids()]
    cpu0 = [_cpu_seconds(p) for p in pids]
    t = time.perf_counter()
    for _, b in it:
      pass
    jax.block_until_ready(b.values)
    dt = time.perf_counter() - t
    cpu1 = [_cpu_seconds(p) for p in pids]
    cpu = [None if a is None or b is None else b - a for a, b in zip(cpu0, cpu1)]
  out = {"first_batch_s": round(first, 2), "cells_per_s": round(sum(counted[warmup:]) / dt, 1)}
  if None not in cpu:
    out["main_cpu_ms_per_batch"] = round(cpu[0] / steps * 1e3, 3)
    out["workers_cpu_ms_per_batch"] = round(sum(cpu[1:]) / steps * 1e3, 3)
    out["cores_used"] = round(sum(cpu) / dt, 2)
  return out


def _anndata_backed(files: list[str], rows_per_step: list[np.ndarray]) -> float:
  """cells/s of anndata backed-mode row reads of the same cells (grouped by file)."""
  handles = [ad.read_h5ad(f, backed="r") for f in files]
  offsets = np.concatenate([[0], np.cumsum([h.n_obs for h in handles])])
  t, n = time.perf_counter(), 0
  for rows in rows_per_step:
    part = np.searchsorted(offsets, rows, side="right") - 1
    for k in np.unique(part):
      local = np.sort(rows[part == k] - offsets[k])
      handles[k].X[local]
    n += len(rows)
  dt = time.perf_counter() - t
  for h in handles:
    h.file.close()
  return n / dt


def _annbatch(args) -> dict:
  """annbatch_driver.py's JSON, run by `--annbatch-python` (or why annbatch was not timed)."""
  if not args.annbatch_python:
    return {"annbatch_cells_per_s": None,
            "annbatch_note": "not timed: pass --annbatch-python (a Python >= 3.12 with annbatch; "
                             f"this is {sys.version_info.major}.{sys.version_info.minor})"}
  driver = os.path.join(os.path.dirname(os.path.abspath(__file__)), "annbatch_driver.py")
  cmd = [args.annbatch_python, driver, "--corpus", args.corpus, "--collection",
         args.annbatch_collection, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
         "--steps", str(args.steps), "--warmup", str(args.warmup), "--chunk-size", str(args.block)]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
  if done.returncode or not lines:
    raise SystemExit(f"annbatch_driver.py failed ({done.returncode}):\n{done.stderr[-2000:]}")
  return json.loads(lines[-1])


def _time_grain(make, steps: int, put, warmup: int, workers: int = 2, group: int = 8) -> float:
  """cells/s of the same batches through grain's mp_prefetch (groups of `group` steps), after
  the groups holding the first `warmup` steps."""
  import grain  # noqa: PLC0415 (optional)
  from absl import flags  # noqa: PLC0415
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  skip = max(1, -(-warmup // group))
  n_groups = skip + -(-steps // group)
  ds = grain.MapDataset.range(n_groups).map(
      lambda g: [make(s) for s in range(g * group, (g + 1) * group)]).to_iter_dataset(
          grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
  it = iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                        per_worker_buffer_size=4)))
  for _ in range(skip):  # the same work per group as below, untimed
    for sb in next(it):
      out = put(sb)
  jax.block_until_ready(out[1].values)
  t, n = time.perf_counter(), 0
  for items in it:
    for sb in items:
      out = put(sb)
      n += int(np.sum(sb[1].cell_mask))
  jax.block_until_ready(out[1].values)
  return n / (time.perf_counter() - t)


def run(args) -> dict:
  files, manifest = corpus.expand_files([args.corpus], ".")
  t = time.perf_counter()
  data = corpus.open_corpus(files, manifest=manifest, progress=False)
  open_s = time.perf_counter() - t
  spec = batching.BatchSpec(batch_size=args.batch, n_tokens=args.seq_len)
  c2r = np.arange(1, data.n_genes + 1, dtype=np.int32)
  sh = parallel.data_sharded(parallel.make_mesh({"data": -1, "model": 1}))
  put = lambda sb: (sb[0], jax.device_put(sb[1], sh))  # noqa: E731
  make = batching.StageBatchMaker(data, np.arange(data.n_cells), c2r, spec, 0, 0,
                                  block=args.block)
  out = {"corpus": args.corpus, "files": len(files), "cells": data.n_cells,
         "genes": data.n_genes, "batch": args.batch, "seq_len": args.seq_len,
         "steps": args.steps, "warmup_steps": args.warmup, "block": args.block,
         "open_s": round(open_s, 3)}
  out["rows_from"] = "pack" if isinstance(data.X, corpus.PackedRows) else "files"
  workers = [int(x) for x in args.workers.split(",")]
  for w in workers:
    out.update({f"workers{w}_{k}": v
                for k, v in _time_loader(make, args.steps, w, put, args.warmup).items()})
  best = max(v for k, v in out.items() if k.endswith("_cells_per_s"))
  if out["rows_from"] == "pack":  # the same batches read from the .h5ad files, side by side
    plain = corpus.open_corpus(files, manifest=manifest, progress=False, use_pack=False)
    make_files = dataclasses.replace(make, data=plain)
    w = max(workers)
    out[f"files_workers{w}_cells_per_s"] = _time_loader(make_files, args.steps, w, put,
                                                        args.warmup)["cells_per_s"]
    out["ratio_pack_to_files"] = round(out[f"workers{w}_cells_per_s"]
                                       / out[f"files_workers{w}_cells_per_s"], 2)
  order = batching.epoch_order(np.arange(data.n_cells), 0, 0, 0, args.block)  # the loader's
  # the steps the loaders timed (after their warm-up), within the first epoch
  steps = range(args.warmup, min(args.warmup + args.steps,
                                 batching.steps_per_epoch(data.n_cells, args.batch)))
  backed = _anndata_backed(files, [order[s * args.batch:(s + 1) * args.batch] for s in steps])
  out["anndata_backed_rows_only_cells_per_s"] = round(backed, 1)
  workers_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # before annbatch
  if args.grain:
    out["grain_mp_prefetch_2_workers_cells_per_s"] = round(
        _time_grain(make, args.steps, put, args.warmup), 1)
  out.update(_annbatch(args))
  out["best_cells_per_s"] = best
  out["ratio_to_anndata_backed_rows_only"] = round(best / backed, 2)
  if out.get("annbatch_cells_per_s"):
    out["ratio_to_annbatch"] = round(best / out["annbatch_cells_per_s"], 2)
    out["ratio_to_annbatch_rows_only"] = round(best / out["annbatch_rows_only_cells_per_s"], 2)
  out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  out["peak_rss_workers_mb"] = round(workers_rss, 1)
  return out


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--corpus", "--file", dest="corpus",
                 default="../shared/data/pbmc_3chem_10x_scWGParis_nolabels.h5ad",
                 help="an .h5ad file, a folder of shards (with or without manifest.json), a glob "
                      "or a manifest")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq-len", dest="seq_len", type=int, default=128)
  p.add_argument("--steps", type=int, default=1000, help="timed steps per loader")
  p.add_argument("--warmup", type=int, default=200,
                 help="untimed steps first (worker start-up, queues filling)")
  p.add_argument("--workers", default="0,1,2")
  p.add_argument("--block", type=int, default=16, help="cells per shuffled unit")
  p.add_argument("--grain", action="store_true", help="also time grain's mp_prefetch")
  p.add_argument("--annbatch-python", dest="annbatch_python", default=os.environ.get(
      "ANNBATCH_PYTHON", ""), help="a Python >= 3.12 with annbatch (default: $ANNBATCH_PYTHON)")
  p.add_argument("--annbatch-collection", dest="annbatch_collection", default=None,
                 help="where annbatch's converted copy of the corpus goes (default: next to it, "
                      "CORPUS.annbatch.zarr)")
  p.add_argument("--json", action="store_true")
  a = p.parse_args()
  if a.warmup < 1 or a.steps < 1:
    p.error("--steps and --warmup must be >= 1")
  a.annbatch_collection = a.annbatch_collection or a.corpus.rstrip("/") + ".annbatch.zarr"
  emit(run(a), a.json)
