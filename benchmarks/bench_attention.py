"""Attention alone, forward and forward + backward: the tiled kernel vs plain autodiff attention.

  python benchmarks/bench_attention.py --json                      # paper transformer layer
  python benchmarks/bench_attention.py --batch 8 --heads 4 --head-dim 16 --q 32 --k 2048 --json

Self-attention when --q is omitted (packed qkv, as the transformer calls it),
else cross-attention of --q queries over --k keys (the Exceiver's encoder / decoder shapes). Dropout
on the probabilities at --dropout. `kernel` is `kernels.self_attention` / `cross_attention` with
the tiled path forced (tiles of at most --tile logits, default ``TILE_ELEMENTS``), `plain` the same math as one einsum +
softmax graph differentiated by JAX (what a straightforward Flax implementation does), `auto`
what the models use. Prints ms per call (best of --reps) and the attention matmuls' GFLOP/s.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import best_time, emit  # noqa: E402  first import: it may re-exec (hostenv.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gil_jax.models import kernels  # noqa: E402


def plain(q, kv, mask, rate, seed):
  """Reference attention, one graph over the batch: einsum, masked softmax, dropout, einsum."""
  k, v = kv[:, :, -2], kv[:, :, -1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
  p = jax.nn.softmax(jnp.where(mask[:, None, None, :], logits, -jnp.inf), axis=-1)
  if rate > 0:
    p = jnp.where(jax.random.bernoulli(jax.random.key(0), 1 - rate, p.shape), p / (1 - rate), 0)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def run(args) -> dict:
  b, h, d = args.batch, args.heads, args.head_dim
  nk = args.k
  nq = args.q or nk
  packed = 2 if args.q else 3
  kv = jax.random.normal(jax.random.key(0), (b, nk, packed, h, d))
  q = jax.random.normal(jax.random.key(1), (b, nq, h, d)) if args.q else kv[:, :, 0]
  mask = jnp.ones((b, nk), bool)
  seed = kernels.seed_words(jax.random.key(2))
  w = jax.random.normal(jax.random.key(3), (b, nq, h, d))
  tile = args.tile or kernels.TILE_ELEMENTS

  def ours(q, kv):
    if args.q:
      return kernels.cross_attention(q, kv, mask, args.dropout, seed)
    return kernels.self_attention(kv, mask, args.dropout, seed)

  default = kernels.TILE_ELEMENTS
  variants = {  # name: (function, TILE_ELEMENTS while it is traced and timed)
      "kernel": (ours, min(tile, b * h * nq * nk - 1)),
      "auto": (ours, default),
      "plain": (lambda q, kv: plain(q, kv, mask, args.dropout, seed), default)}
  flops = 4.0 * b * h * nq * nk * d          # QK^T and PV, forward
  out = {"batch": b, "heads": h, "head_dim": d, "q": nq, "k": nk, "dropout": args.dropout,
         "tile_elements": tile, "backend": jax.default_backend()}
  for name, (f, tile_elements) in variants.items():
    kernels.TILE_ELEMENTS = tile_elements
    fwd = jax.jit(lambda q, kv, f=f: f(q, kv))  # a new function: no trace reused across tiles
    grad = jax.jit(jax.grad(lambda q, kv, f=f: jnp.sum(f(q, kv) * w), argnums=(0, 1)))
    t_f = best_time(lambda: jax.block_until_ready(fwd(q, kv)), args.reps)
    t_g = best_time(lambda: jax.block_until_ready(grad(q, kv)), args.reps)
    out[name] = {"fwd_ms": round(t_f * 1e3, 2), "fwd_bwd_ms": round(t_g * 1e3, 2),
                 "fwd_gflops": round(flops / t_f / 1e9, 1),
                 "fwd_bwd_gflops": round(3 * flops / t_g / 1e9, 1)}
  kernels.TILE_ELEMENTS = default
  return out


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head-dim", dest="head_dim", type=int, default=32)
  p.add_argument("--q", type=int, default=0, help="queries (cross-attention); 0 = self")
  p.add_argument("--k", type=int, default=513, help="keys (paper: 512 genes + CLS)")
  p.add_argument("--dropout", type=float, default=0.15)
  p.add_argument("--tile", type=int, default=0, help="logits per tile (0 = the default)")
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--json", action="store_true")
  return p


if __name__ == "__main__":
  a = parser().parse_args()
  emit(run(a), a.json)
