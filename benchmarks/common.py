"""Shared benchmark helpers: timing (best of several repetitions), matmul peak, peak memory."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gil_jax import hostenv  # noqa: E402

hostenv.use_huge_pages()  # benchmarks measure what launch.py runs (see gil_jax/hostenv.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def best_time(fn: Callable[[], object], reps: int, warmup: int = 1,
              min_time: float = 0.0, max_reps: int = 200) -> float:
  """Best wall time (s) of at least `reps` calls of fn (which must block on its result), and
  more (up to `max_reps`) until `min_time` seconds were timed: short steps get enough
  repetitions to find a quiet moment on a shared machine."""
  for _ in range(warmup):
    fn()
  times = []
  while len(times) < reps or (sum(times) < min_time and len(times) < max_reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def matmul_peak(n: int = 1024, dtype=jnp.float32, reps: int = 10, chain: int = 8) -> float:
  """Measured matmul FLOP/s of this machine's default device (best of `reps`).

  A jitted chain of `chain` dependent n x n matmuls (big enough to amortise dispatch, small
  enough to stay in cache), best repetition: the practical ceiling for dense f32 math here.
  """
  a = jax.random.normal(jax.random.key(0), (n, n), dtype) / n ** 0.5
  b = jax.random.normal(jax.random.key(1), (n, n), dtype) / n ** 0.5

  @jax.jit
  def f(a, b):
    for _ in range(chain):
      a = a @ b
    return a

  t = best_time(lambda: f(a, b).block_until_ready(), reps, warmup=2)
  return 2.0 * n ** 3 * chain / t


def minor_faults() -> int:
  """Minor page faults of this process so far (fresh memory touched for the first time)."""
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def peak_rss_bytes() -> int:
  """Peak resident memory of this process (host; CPU backend buffers live here)."""
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def device_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def emit(result: dict, as_json: bool) -> None:
  if as_json:
    print(json.dumps(result))
  else:
    for k, v in result.items():
      print(f"{k:>28}: {v}")
