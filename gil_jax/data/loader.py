"""The training input pipeline: step-indexed batches built ahead, in a thread or in worker
processes, on the standard library's `concurrent.futures` executors.

A stage's batches are a pure function of the step (`batching.StageBatchMaker`), so the pipeline
maps `make` over the step range, in order: resuming at step s builds exactly the batches an
uninterrupted run would have built from s on (the checkpointed step is the iterator's whole
state), and the number of workers never changes a batch.

* ``workers=0``: batches are built in one background thread, ``prefetch`` steps ahead (a group
  is one step).
* ``workers=W>0``: W spawned processes each build groups of ``group`` consecutive steps (one
  pickled transfer per group), ``W * prefetch`` groups ahead; `make` is sent to each worker once.

In both cases ``post`` (e.g. a sharded ``jax.device_put`` plus a transform's extra inputs) runs
in one consumer-side thread, a whole group per task (with workers, one thread hand-off per
group of steps instead of per step: 0.47-0.52 against 0.58-0.71 ms of main-process CPU per
64-cell batch), at least ``prefetch`` steps ahead, so host work overlaps the device step.
Posted items alive: the group being consumed plus ceil(prefetch / group) groups ahead (with
workers, group 8 and prefetch <= 8: up to 15 device batches). An error raised while building
or posting step s is raised by ``next`` when step s is due, after the steps before it; no work
is submitted once it has arrived (what is already running finishes, queued work is cancelled).

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


def _post_group(post: Callable[[Any], Any] | None, built: cf.Future
                ) -> tuple[list, BaseException | None]:
  """(post(item) for a built group's items until the first failure, that failure or None)."""
  try:
    items, error = built.result()
  except BaseException as e:  # noqa: BLE001 (the pool itself failed, e.g. a worker died)
    return [], e
  if post is None:
    return items, error
  out = []
  for item in items:
    try:
      out.append(post(item))
    except Exception as e:  # noqa: BLE001 (re-raised by the consumer when its step is due)
      return out, e
  return out, error


class StepIterator:
  """Iterates post(make(step)) for step in [start, start + n) (see module docstring)."""

  def __init__(self, make: Callable[[int], Any], start: int, n: int, *, workers: int = 0,
               group: int = 8, prefetch: int = 2, post: Callable[[Any], Any] | None = None):
    end = start + n
    if workers > 0:
      self._pool: cf.Executor = cf.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
          initargs=(make,))
      self._submit = lambda u: self._pool.submit(_build_in_worker, *u)
      ahead = workers * max(1, prefetch)
    else:
      self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="batches")
      self._submit = lambda u: self._pool.submit(_build, make, *u)
      ahead, group = max(1, prefetch), 1
    self._units = collections.deque((lo, min(end, lo + group)) for lo in range(start, end, group))
    self._post = post
    self._post_pool = cf.ThreadPoolExecutor(1, thread_name_prefix="post") if post else None
    self._building: collections.deque[cf.Future] = collections.deque()  # groups, in step order
    self._posting: collections.deque[cf.Future] = collections.deque()   # their posted items
    self._current: collections.deque = collections.deque()  # the group being consumed
    self._error: BaseException | None = None  # raised once the items before it are consumed
    self._ahead, self._post_ahead = ahead, max(1, -(-prefetch // group))
    self._fill()

  def _fill(self) -> None:
    while True:
      while self._units and len(self._building) < self._ahead:
        unit = self._units.popleft()
        try:
          self._building.append(self._submit(unit))
        except Exception as e:  # noqa: BLE001 (e.g. a dead worker): raised when its step is due
          failed: cf.Future = cf.Future()
          failed.set_exception(e)
          self._building.append(failed)
          self._units.clear()
      if not self._building or len(self._posting) >= self._post_ahead:
        return
      built = self._building.popleft()
      self._posting.append(built if self._post_pool is None  # then consumed as built
                           else self._post_pool.submit(_post_group, self._post, built))

  def __iter__(self) -> Iterator:
    return self

  def __next__(self):
    while not self._current:
      if self._error is not None:
        error, self._error = self._error, None
        self._units.clear()  # nothing after a failed step
        for f in (*self._building, *self._posting):
          f.cancel()
        self._building.clear()
        self._posting.clear()
        raise error
      if self._pool is None or not self._posting:
        raise StopIteration
      fut = self._posting.popleft()
      items, self._error = (_post_group(None, fut) if self._post_pool is None
                            else fut.result())
      self._current.extend(items)
      if self._error is None:  # after a failure nothing more is built or posted
        self._fill()
    return self._current.popleft()

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
      self._posting.clear()
      self._current.clear()

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown: the executors may be gone already
      pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
