"""The training input pipeline on `grain`: step-indexed batches, built ahead, optionally in
worker processes.

A stage's batches are a pure function of the step (`batching.StageBatchMaker`), so the pipeline
is a grain ``MapDataset`` over the step range: resuming at step s builds exactly the batches an
uninterrupted run would have built from s on (the checkpointed step is the iterator's whole
state: grain's ``next_index``), and the number of workers never changes a batch.

* ``workers=0``: batches are built in one background thread, ``prefetch`` steps ahead.
* ``workers=W>0``: W processes (grain ``mp_prefetch``) each build groups of ``group`` consecutive
  steps (one inter-process transfer per group, not per batch: on a small host the transfer, not
  the batch, dominates), unpacked in order in the consumer.

In both cases ``post`` (e.g. a sharded ``jax.device_put`` plus a transform's extra inputs) runs
in a consumer-side thread ``prefetch`` steps ahead, so host work overlaps the device step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import grain
import grain.experimental as grain_exp
from absl import flags


def _grain_ready() -> None:
  # grain reads absl flags; a library user (a notebook, pytest) may never parse them
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass(frozen=True)
class _Group:
  """Steps [g * size, (g + 1) * size) ∩ [start, end) of `make`, as one list (one transfer)."""
  make: Callable[[int], Any]
  size: int
  start: int
  end: int

  def __call__(self, g: int) -> list:
    lo, hi = max(self.start, g * self.size), min(self.end, (g + 1) * self.size)
    return [self.make(s) for s in range(lo, hi)]


class _Ungroup(grain_exp.FlatMapTransform):
  def __init__(self, size: int):
    self.max_fan_out = size

  def flat_map(self, element: Sequence) -> Sequence:
    return element


class StepIterator:
  """Iterates post(make(step)) for step in [start, start + n) (see module docstring)."""

  def __init__(self, make: Callable[[int], Any], start: int, n: int, *, workers: int = 0,
               group: int = 8, prefetch: int = 2, post: Callable[[Any], Any] | None = None):
    _grain_ready()
    end = start + n
    if workers > 0:
      ds = grain.MapDataset.range(start // group, -(-end // group)).map(
          _Group(make, group, start, end)).to_iter_dataset()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                      per_worker_buffer_size=max(1, prefetch)))
      ds = grain_exp.FlatMapIterDataset(ds, _Ungroup(group))
    else:
      ds = grain.MapDataset.range(start, end).map(make).to_iter_dataset(
          grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(1, prefetch)))
    if post is not None:
      ds = ds.map(post)
    self._it = iter(grain_exp.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=max(1, prefetch)))

  def __iter__(self) -> Iterator:
    return self

  def __next__(self):
    if self._it is None:
      raise StopIteration
    return next(self._it)

  def close(self) -> None:
    """Stops the threads and worker processes (also done when garbage-collected)."""
    if self._it is not None:
      self._it.close()
      self._it = None  # freed now, not at interpreter exit (grain's __del__ fails there)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
