"""The training input pipeline: step-indexed batches built ahead, in a thread or in worker
processes, on the standard library's `concurrent.futures` executors.

A stage's batches are a pure function of the step (`batching.StageBatchMaker`), so the pipeline
maps `make` over the step range, in order: resuming at step s builds exactly the batches an
uninterrupted run would have built from s on (the checkpointed step is the iterator's whole
state), and the number of workers never changes a batch.

* ``workers=0``: batches are built in one background thread, ``prefetch`` steps ahead.
* ``workers=W>0``: W spawned processes each build groups of ``group`` consecutive steps (one
  pickled transfer per group), ``W * prefetch`` groups ahead; `make` is sent to each worker once.

In both cases ``post`` (e.g. a sharded ``jax.device_put`` plus a transform's extra inputs) runs
in one consumer-side thread ``prefetch`` steps ahead, so host work overlaps the device step. An
error raised while building step s is raised by ``next`` when step s is due, after the steps
before it.

Why not grain's ``mp_prefetch`` (this module used it until the measurements in the README's
"Training from a corpus"): on the 2-core hosts of this project its worker processes were busy
less than half of the time (a fixed ~12 ms per element and no overlap between two workers), so
2 workers delivered fewer cells/s than one thread; the same workers on a process pool deliver
2x. ``benchmarks/bench_pipeline.py --grain`` times both side by side.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import multiprocessing
from typing import Any, Callable, Iterator

_MAKE: Callable[[int], Any] | None = None  # set once in each worker process


def _init_worker(make: Callable[[int], Any]) -> None:
  global _MAKE
  _MAKE = make


def _build(make: Callable[[int], Any], lo: int, hi: int) -> tuple[list, BaseException | None]:
  """(items of steps lo.. until the first failure, that failure or None): the steps before a
  bad one in the same group still arrive."""
  out = []
  for s in range(lo, hi):
    try:
      out.append(make(s))
    except Exception as e:  # noqa: BLE001 (re-raised by the consumer when step s is due)
      return out, e
  return out, None


def _build_in_worker(lo: int, hi: int) -> tuple[list, BaseException | None]:
  return _build(_MAKE, lo, hi)


class _Failed:
  def __init__(self, error: BaseException):
    self.error = error


class StepIterator:
  """Iterates post(make(step)) for step in [start, start + n) (see module docstring)."""

  def __init__(self, make: Callable[[int], Any], start: int, n: int, *, workers: int = 0,
               group: int = 8, prefetch: int = 2, post: Callable[[Any], Any] | None = None):
    end = start + n
    if workers > 0:
      self._pool: cf.Executor = cf.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
          initargs=(make,))
      self._units = collections.deque((lo, min(end, lo + group))
                                      for lo in range(start, end, group))
      self._submit = lambda u: self._pool.submit(_build_in_worker, *u)
      ahead = workers * max(1, prefetch)
    else:
      self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="batches")
      self._units = collections.deque((s, s + 1) for s in range(start, end))
      self._submit = lambda u: self._pool.submit(_build, make, *u)
      ahead = max(1, prefetch)
    self._post = post
    self._post_pool = cf.ThreadPoolExecutor(1, thread_name_prefix="post") if post else None
    self._building: collections.deque[cf.Future] = collections.deque()
    self._items: collections.deque = collections.deque()   # built, not yet posted
    self._ready: collections.deque[cf.Future] = collections.deque()  # posted, in step order
    self._ahead, self._prefetch = ahead, max(1, prefetch)
    self._failed = False
    self._fill()

  def _fill(self) -> None:
    while self._units and len(self._building) < self._ahead:
      self._building.append(self._submit(self._units.popleft()))

  def _next_item(self) -> cf.Future | None:
    """The next step's item as a finished-or-pending future (posted when `post` is set)."""
    if not self._items:
      if not self._building or self._failed:
        return None
      fut = self._building.popleft()
      self._fill()
      try:
        items, error = fut.result()
      except BaseException as e:  # the pool itself failed (e.g. a worker process died)
        items, error = [], e
      self._items.extend(items)
      if error is not None:  # raised in order, when its step is due
        self._items.append(_Failed(error))
    item = self._items.popleft()
    if isinstance(item, _Failed):
      self._failed = True
      done: cf.Future = cf.Future()
      done.set_exception(item.error)
      return done
    if self._post_pool is not None:
      return self._post_pool.submit(self._post, item)
    done = cf.Future()
    done.set_result(item)
    return done

  def __iter__(self) -> Iterator:
    return self

  def __next__(self):
    if self._pool is None:
      raise StopIteration
    while len(self._ready) < self._prefetch:
      fut = self._next_item()
      if fut is None:
        break
      self._ready.append(fut)
    if not self._ready:
      raise StopIteration
    return self._ready.popleft().result()

  def worker_pids(self) -> list[int]:
    """Process ids of the worker processes started so far ([] with workers=0)."""
    return list(getattr(self._pool, "_processes", None) or {})

  def close(self) -> None:
    """Stops the threads and worker processes (pending work is cancelled)."""
    if self._pool is not None:
      for f in self._building:
        f.cancel()
      self._pool.shutdown(wait=True, cancel_futures=True)
      if self._post_pool is not None:
        self._post_pool.shutdown(wait=True, cancel_futures=True)
      self._pool = self._post_pool = None
      self._building.clear()
      self._items.clear()
      self._ready.clear()

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown: the executors may be gone already
      pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
