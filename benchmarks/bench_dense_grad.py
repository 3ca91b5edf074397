"""Forward vs gradient of one Dense layer over [B, N, d] activations, Flax's default dot_general
vs `kernels.dense_dot_general` (the cause of the Exceiver's slow backward on CPU; kernels.py).

  python benchmarks/bench_dense_grad.py --json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import best_time, emit  # noqa: E402 (first: it may re-exec)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from gil_jax.models import kernels  # noqa: E402


def run(args) -> dict:
  x = jax.random.normal(jax.random.key(1), (args.batch, args.seq_len, args.d_in))
  out = {"shape": [args.batch, args.seq_len, args.d_in], "features": args.features}
  for name, dg in (("flax", None), ("dense_dot_general", kernels.dense_dot_general)):
    mod = nn.Dense(args.features, dot_general=dg)
    p = mod.init(jax.random.key(0), x)
    f = jax.jit(lambda p, x: mod.apply(p, x).sum())
    g = jax.jit(jax.grad(lambda p, x: (mod.apply(p, x) ** 2).sum(), argnums=(0, 1)))
    out[f"{name}_fwd_ms"] = round(best_time(lambda: f(p, x).block_until_ready(), args.reps) * 1e3, 3)
    out[f"{name}_grad_ms"] = round(
        best_time(lambda: jax.block_until_ready(g(p, x)), args.reps) * 1e3, 3)
  return out


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--seq-len", dest="seq_len", type=int, default=128)
  ap.add_argument("--d-in", dest="d_in", type=int, default=64)
  ap.add_argument("--features", type=int, default=256)
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--json", action="store_true")
  a = ap.parse_args()
  emit(run(a), a.json)
