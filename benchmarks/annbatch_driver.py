"""annbatch's own loader on the same corpus, for `bench_pipeline.py --annbatch-python PY`.

annbatch needs Python >= 3.12 and this project's hosts run 3.11, so `bench_pipeline.py` runs
this script with another interpreter (a venv with `pip install "annbatch[zarrs]" jax flax`)
and reads the one JSON line it prints. It:

1. converts the corpus' `.h5ad` files once into an annbatch collection (`--collection`, a
   pre-shuffled, sharded zarr store, annbatch's recommended layout; not timed, its seconds are
   reported), skipped when the collection exists;
2. times `annbatch.Loader` (shuffled, `--chunk-size` contiguous rows per read,
   `--preload-nchunks` chunks per fetch, CPU) over `--steps` batches of `--batch` cells:
   rows only (`annbatch_rows_only_cells_per_s`), and rows plus this project's tokenisation
   (`batching.make_batch` on each returned CSR batch: the same device-ready `Batch` the project's
   loader yields, `annbatch_cells_per_s`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(a) -> dict:
  import annbatch  # noqa: PLC0415 (the 3.12 interpreter's)
  import numpy as np  # noqa: PLC0415
  import pandas as pd  # noqa: PLC0415
  import scipy.sparse as sp  # noqa: PLC0415
  import zarr  # noqa: PLC0415

  try:
    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
  except Exception:  # zarrs not installed: annbatch's slow path
    pass
  from gil_jax.data import batching  # noqa: PLC0415
  from gil_jax.data.anndata_io import CellData  # noqa: PLC0415

  out = {"annbatch_version": annbatch.__version__}
  if not os.path.exists(a.collection):
    files = sorted(glob.glob(os.path.join(a.corpus, "*.h5ad")))
    t = time.perf_counter()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      annbatch.DatasetCollection(a.collection).add_adatas(
          files, shuffle=True, dataset_size="1GB", rng=np.random.default_rng(0))
    out["annbatch_convert_s"] = round(time.perf_counter() - t, 1)
  coll = annbatch.DatasetCollection(a.collection, mode="r")

  def loader():
    return annbatch.Loader(batch_size=a.batch, chunk_size=a.chunk_size,
                           preload_nchunks=a.preload_nchunks, shuffle=True, drop_last=True,
                           preload_to_gpu=False, rng=np.random.default_rng(0)).use_collection(coll)

  spec = batching.BatchSpec(batch_size=a.batch, n_tokens=a.seq_len)

  def tokenise(x, rng):
    x = sp.csr_matrix(x)
    n, g = x.shape
    sf = np.maximum(np.asarray(x.sum(axis=1)).ravel() / 1e4, 1e-4).astype(np.float32)
    data = CellData(name="annbatch", X=x, gene_ids=np.arange(g).astype(str),
                    obs=pd.DataFrame(index=np.arange(n).astype(str)),
                    panel=np.ones((1, g), bool), dataset_index=np.zeros(n, np.int32),
                    dataset_names=["annbatch"], is_counts=True, size_factors=sf)
    return batching.make_batch(data, np.arange(n), np.arange(1, g + 1, dtype=np.int32), spec,
                               rng)

  for key, work in (("annbatch_rows_only_cells_per_s", None),
                    ("annbatch_cells_per_s", tokenise)):
    it = iter(loader())
    for _ in range(a.warmup):  # start-up (first fetches of preload_nchunks chunks): not timed
      x = next(it)["X"]
      if work is not None:
        work(x, np.random.default_rng(0))
    rng, n, t = np.random.default_rng(1), 0, time.perf_counter()
    for _ in range(a.steps):
      x = next(it)["X"]
      if work is not None:
        work(x, rng)
      n += x.shape[0]
    out[key] = round(n / (time.perf_counter() - t), 1)
  out["annbatch_chunk_size"], out["annbatch_preload_nchunks"] = a.chunk_size, a.preload_nchunks
  out["annbatch_peak_rss_mb"] = _peak_rss_mb()
  return out


def _peak_rss_mb() -> float:
  """This process's peak RSS (VmHWM: ru_maxrss would include the parent's RSS at fork)."""
  try:
    with open("/proc/self/status") as f:
      kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
  except (OSError, StopIteration):
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return round(kb / 1024, 1)


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--corpus", required=True, help="folder of .h5ad shards")
  p.add_argument("--collection", required=True, help="annbatch collection (.zarr), made once")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq-len", dest="seq_len", type=int, default=128)
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--warmup", type=int, default=200, help="untimed batches first")
  p.add_argument("--chunk-size", dest="chunk_size", type=int, default=16,
                 help="contiguous rows per read (the project's --block)")
  p.add_argument("--preload-nchunks", dest="preload_nchunks", type=int, default=64)
  print(json.dumps(main(p.parse_args())))
