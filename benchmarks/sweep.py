"""Train-step throughput sweeps: cells/s vs genes per cell (both backbones) and vs device count.

  python benchmarks/sweep.py --out runs/sweep            # default: ~3-5 min on 2 CPU cores

Every point is one `bench_train_step.py --json` run in a fresh subprocess (so each can have its
own `XLA_FLAGS=--xla_force_host_platform_device_count=N`), with each backbone's default config
(`models.model_config`), all tokens real, dropout as configured, full optimizer update. Writes
`sweep.json` (all points plus fitted log-log slopes of step time vs genes: ~1 = linear, ~2 =
quadratic) and `sweep.png` into --out, and prints the JSON.

On a CPU host, simulated devices share the same cores: the device sweep shows the overhead of
data-parallel sharding (collectives, smaller per-device matmuls), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(HERE, "bench_train_step.py")


def _ints(s: str) -> list[int]:
  return [int(x) for x in s.split(",") if x.strip()]


def bench_point(model: str, seq_len: int, batch: int, devices: int, reps: int, capacity: int,
                extra: list[str], timeout: int) -> dict:
  """One bench_train_step run in a subprocess with `devices` simulated host devices."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env.setdefault("JAX_PLATFORMS", "cpu")
  cmd = [sys.executable, BENCH, "--model", model, "--seq-len", str(seq_len), "--batch",
         str(batch), "--reps", str(reps), "--min-time", "2", "--capacity", str(capacity),
         "--no-peak", "--json", *extra]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    return {"model": model, "seq_len": seq_len, "batch": batch, "devices": devices,
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
  """Least-squares slope of log(y) on log(x) (None with fewer than 2 points)."""
  if len(xs) < 2:
    return None
  return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def plot(result: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
  for model, pts in result["genes_sweep"].items():
    ok = [p for p in pts if "cells_per_s" in p]
    if ok:
      a.plot([p["seq_len"] for p in ok], [p["cells_per_s"] for p in ok], "o-",
             label=f"{model} (step time ~ genes^{result['slopes'][model]:.2f})")
  a.set(xscale="log", yscale="log", xlabel="genes per cell (tokens)", ylabel="cells / s",
        title=f"train step, batch {result['args']['batch']}, {result['host']}")
  a.grid(True, which="both", alpha=0.3)
  a.legend(fontsize=8)
  ok = [p for p in result["devices_sweep"] if "cells_per_s" in p]
  if ok:
    b.plot([p["devices"] for p in ok], [p["cells_per_s"] for p in ok], "o-",
           label=f"{result['args']['devices_model']}, {result['args']['devices_genes']} genes")
  b.set(xscale="log", xlabel="simulated devices (mesh data axis)", ylabel="cells / s",
        title="data-parallel sharding on simulated CPU devices")
  b.set_xticks([p["devices"] for p in ok], [str(p["devices"]) for p in ok])
  b.grid(True, alpha=0.3)
  b.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", default="runs/sweep")
  p.add_argument("--models", default="exceiver,transformer")
  p.add_argument("--genes", default="128,256,512,1024,2048", help="genes (tokens) per cell")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--devices", default="1,2,4,8", help="simulated device counts ('' = skip)")
  p.add_argument("--devices-model", dest="devices_model", default="exceiver")
  p.add_argument("--devices-genes", dest="devices_genes", type=int, default=512)
  p.add_argument("--devices-batch", dest="devices_batch", type=int, default=16)
  p.add_argument("--reps", type=int, default=2,
                 help="timed steps per point, at least (more until 2 s are timed; best is kept)")
  p.add_argument("--capacity", type=int, default=4096, help="gene-table rows (> max genes)")
  p.add_argument("--timeout", type=int, default=300, help="seconds per point")
  args = p.parse_args(argv)
  genes = _ints(args.genes)
  if args.capacity <= max(genes):
    p.error(f"--capacity {args.capacity} must exceed the largest --genes {max(genes)}")
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  result: dict = {"args": vars(args), "host": f"{os.cpu_count()} CPU cores",
                  "genes_sweep": {}, "slopes": {}, "devices_sweep": []}
  for model in [m for m in args.models.split(",") if m]:
    pts = [bench_point(model, n, args.batch, 1, args.reps, args.capacity, [], args.timeout)
           for n in genes]
    result["genes_sweep"][model] = pts
    ok = [q for q in pts if "step_s" in q]
    result["slopes"][model] = loglog_slope([q["seq_len"] for q in ok], [q["step_s"] for q in ok])
  for d in _ints(args.devices):
    result["devices_sweep"].append(bench_point(
        args.devices_model, args.devices_genes, args.devices_batch, d, args.reps,
        args.capacity, [], args.timeout))
  sweep = result["genes_sweep"]
  if "exceiver" in sweep and "transformer" in sweep:
    ratio = {}
    for e, t in zip(sweep["exceiver"], sweep["transformer"]):
      if "cells_per_s" in e and "cells_per_s" in t:
        ratio[str(e["seq_len"])] = round(e["cells_per_s"] / t["cells_per_s"], 2)
    result["exceiver_over_transformer"] = ratio
  result["seconds"] = round(time.time() - t0, 1)
  with open(os.path.join(args.out, "sweep.json"), "w") as f:
    json.dump(result, f, indent=1)
  plot(result, os.path.join(args.out, "sweep.png"))
  summary = {"seconds": result["seconds"], "slopes": result["slopes"],
             "exceiver_over_transformer": result.get("exceiver_over_transformer"),
             "cells_per_s": {m: {q["seq_len"]: q.get("cells_per_s") for q in pts}
                             for m, pts in sweep.items()},
             "devices_cells_per_s": {q["devices"]: q.get("cells_per_s")
                                     for q in result["devices_sweep"]},
             "files": [os.path.join(args.out, "sweep.json"), os.path.join(args.out, "sweep.png")]}
  print(json.dumps(summary))
  return result


if __name__ == "__main__":
  main()
