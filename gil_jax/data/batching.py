"""Cells -> fixed-shape numpy `Batch`es (host side, vectorised over the cells of a batch).

A cell's tokens are its non-zero measured genes whose data column maps to a non-zero gene-table
row (`columns_to_rows`, from `stages.stage_columns`), at or above an optional detection floor
(`min_value`); optionally some measured zeros. If there are
more than N, N are sampled without replacement (uniform, or expression-weighted via Gumbel-top-k,
i.e. the same law as `torch.multinomial(w, N, replacement=False)`).

Determinism: training batches are a pure function of (seed, stage index, step). With `mask_seed`
(evaluation), every random choice for (cell, gene column) comes from a counter-based hash of
(mask_seed, global cell index, gene column), so the pred mask of a (cell, gene) pair does not
depend on which other genes the stage keeps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np

from gil_jax.batch import Batch
from gil_jax.data.anndata_io import CellData, DataError

NORMALISATIONS = ("log1p_cp10k", "log1p", "none", "from_log2_cpm")
SAMPLINGS = ("paper", "uniform", "weighted")
VALUE_SCALES = ("none", "cell_rank")


@dataclasses.dataclass
class BatchSpec:
  batch_size: int
  n_tokens: int
  mask_ratio: float = 0.4
  normalisation: str = "log1p_cp10k"  # see `normalise` (NORMALISATIONS)
  sampling: str = "paper"             # paper (per cell 50/50 weighted|uniform), uniform, weighted
  zero_tokens: int = 0                # measured zeros to add as value-0 tokens when room allows
  # 'none': the normalised values; 'cell_rank': a value's rank among the cell's detected genes
  # as a quantile in (0, 1] (invariant to any per-cell monotone transform: log base, size
  # factors, pseudo-counts differ between studies), for classification inputs
  value_scale: str = "none"
  # a detection floor in ln(1 + CP10k) units: a value below it is not a token, as if the gene
  # were not detected (0 keeps every detected gene)
  min_value: float = 0.0

  def __post_init__(self):
    if self.normalisation not in NORMALISATIONS:
      raise DataError(f"unknown normalisation {self.normalisation!r}; use one of {NORMALISATIONS}"
                      " (config.batch.normalisation).")
    if self.value_scale not in VALUE_SCALES:
      raise DataError(f"unknown value_scale {self.value_scale!r}; use one of {VALUE_SCALES} "
                      "(config.batch.value_scale).")
    if self.sampling not in SAMPLINGS:
      raise DataError(f"unknown sampling {self.sampling!r}; use one of {SAMPLINGS} "
                      "(config.batch.sampling).")
    if self.batch_size < 1 or self.n_tokens < 1:
      raise DataError(f"batch_size={self.batch_size} and n_tokens={self.n_tokens} must be >= 1 "
                      "(config.batch.batch_size, config.batch.n_tokens).")
    if not 0.0 <= self.mask_ratio <= 1.0:
      raise DataError(f"mask_ratio={self.mask_ratio} must be in [0, 1] (config.batch.mask_ratio).")
    if self.zero_tokens < 0:
      raise DataError("zero_tokens must be >= 0 (config.batch.zero_tokens).")
    if not self.min_value >= 0.0:
      raise DataError(f"min_value={self.min_value} must be >= 0 (config.batch.min_value, in "
                      "ln(1 + CP10k) units; 0 keeps every detected gene).")


def spec_from_config(batch, **overrides) -> BatchSpec:
  """The BatchSpec of a config's `batch` section (a field a saved config of an older run lacks
  takes its default); `overrides` replace fields (e.g. batch_size for evaluation)."""
  fields = {f.name: batch[f.name] for f in dataclasses.fields(BatchSpec) if f.name in batch}
  return BatchSpec(**{**fields, **overrides})


# ---------------------------------------------------------------- counter-based hashing (eval)

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser (uint64 -> uint64, wrapping arithmetic)."""
  x = x ^ (x >> np.uint64(30))
  x = x * _M1
  x = x ^ (x >> np.uint64(27))
  x = x * _M2
  return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, cells: np.ndarray, cols: np.ndarray | int, salt: int) -> np.ndarray:
  """float64 uniforms in (0, 1), a pure function of (seed, cell, column, salt), elementwise."""
  with np.errstate(over="ignore"):
    h = _mix(np.full(1, (int(seed) * 4 + int(salt)) & 0xFFFFFFFFFFFFFFFF, np.uint64) + _GOLD)
    h = _mix(h + np.asarray(cells).astype(np.uint64) * _GOLD)
    h = _mix(h + np.asarray(cols).astype(np.uint64) + _GOLD)
  return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2**53)


# ---------------------------------------------------------------- helpers

def normalise(values: np.ndarray, size_factors: np.ndarray, normalisation: str) -> np.ndarray:
  """Per-entry normalisation to ln(1 + CP10k) units; `size_factors` aligned with `values` (units
  of 1e4). 'log1p_cp10k': counts; 'log1p': counts, no size factor; 'none': values already in
  those units; 'from_log2_cpm': values stored as log2(1 + CPM) (e.g. the scClassify pancreas
  files), converted: ln(1 + (2^v - 1) / 100)."""
  if normalisation == "log1p_cp10k":
    return np.log1p(values / size_factors).astype(np.float32)
  if normalisation == "log1p":
    return np.log1p(values).astype(np.float32)
  if normalisation == "from_log2_cpm":
    return np.log1p(np.expm1(values.astype(np.float32) * np.float32(np.log(2))) / 100).astype(
        np.float32)
  return values.astype(np.float32)


def _segment_starts(counts: np.ndarray) -> np.ndarray:
  return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _segment_count(mask: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """int64 per contiguous segment (lengths `counts`): its number of True entries of `mask`
  (an order of magnitude faster than a weighted `np.bincount`)."""
  out = np.zeros(len(counts), np.int64)
  nonempty = counts > 0
  out[nonempty] = np.add.reduceat(mask.view(np.uint8), _segment_starts(counts)[nonempty],
                                  dtype=np.int64)
  return out


def _top_n(keys: np.ndarray, counts: np.ndarray, n: int, owner: np.ndarray) -> np.ndarray:
  """bool[len(keys)]: in each contiguous cell segment (`owner`: each entry's cell), the entries
  with the n largest keys (all entries of cells with at most n). Per over-full cell its n-th
  largest key (`np.partition`, ~1.5x faster than `argpartition` here), then one vectorised
  comparison; a cell whose keys tie at that boundary takes `argpartition`'s choice, so the
  result is the same on either path."""
  starts = _segment_starts(counts)
  big = np.flatnonzero(counts > n)
  threshold = np.full(len(counts), -np.inf, keys.dtype)
  threshold[big] = [np.partition(keys[s0:s0 + m], m - n)[m - n]
                    for s0, m in zip(starts[big].tolist(), counts[big].tolist())]
  sel = ~(keys < threshold[owner])  # NaN keys or threshold: select, then the fallback
  for c in big[_segment_count(sel, counts)[big] > n].tolist():
    s0, m = int(starts[c]), int(counts[c])
    seg = sel[s0:s0 + m]
    seg[:] = False
    seg[np.argpartition(keys[s0:s0 + m], m - n)[m - n:]] = True
  return sel


def _zero_tokens(data: CellData, cells: np.ndarray, c2r: np.ndarray, present: list[np.ndarray],
                 room: np.ndarray, k: int, rng: np.random.Generator,
                 mask_seed: int | None) -> list[np.ndarray]:
  """Per cell: up to min(k, room) measured-zero columns mapping to a real row (random choice)."""
  active = c2r > 0
  out = []
  for i, c in enumerate(cells):
    m = min(k, int(room[i]))
    if m <= 0:
      out.append(np.zeros(0, np.int64))
      continue
    cand = np.flatnonzero(data.panel[data.dataset_index[c]] & active)
    cand = cand[~np.isin(cand, present[i], assume_unique=True)]
    if len(cand) > m:
      u = hash_uniform(mask_seed, c, cand, 3) if mask_seed is not None else rng.random(len(cand))
      cand = np.sort(cand[np.argpartition(u, m - 1)[:m]])
    out.append(cand)
  return out


# ---------------------------------------------------------------- batches

def make_batch(data: CellData, cells: np.ndarray, columns_to_rows: np.ndarray, spec: BatchSpec,
               rng: np.random.Generator, mask_seed: int | None = None,
               labels: np.ndarray | None = None) -> Batch:
  """A numpy `Batch` of `cells` (global indices, len <= batch_size; the rest is padding)."""
  cells = np.asarray(cells, np.int64)
  B, N = spec.batch_size, spec.n_tokens
  nc = len(cells)
  if nc > B:
    raise DataError(f"make_batch got {nc} cells for batch_size {B}.")
  c2r = np.asarray(columns_to_rows, np.int32)
  if c2r.shape != (data.n_genes,):
    raise DataError(f"columns_to_rows has shape {c2r.shape}, expected ({data.n_genes},): build it "
                    "with stages.stage_columns for this data.")
  if hasattr(data.X, "read"):  # lazy rows: their CSR arrays without building a matrix
    row_nnz, cols, raw = data.X.read(cells)
  else:
    sub = data.X[cells]
    row_nnz, cols, raw = np.diff(sub.indptr), sub.indices, sub.data
  owner = np.repeat(np.arange(nc), row_nnz)
  keep = c2r[cols] > 0
  sf = data.size_factors[cells].astype(np.float32)
  norm = spec.normalisation
  if spec.min_value > 0:
    keep &= normalise(raw, sf[owner], norm) >= spec.min_value
  counts = np.asarray(row_nnz, np.int64)
  if not keep.all():
    owner, cols, raw = owner[keep], cols[keep], raw[keep]
    counts = _segment_count(keep, counts)

  if spec.value_scale == "cell_rank":  # quantile ranks among all the cell's kept genes
    by = np.lexsort((raw, owner))
    s_owner, s_raw = owner[by], raw[by]
    new_group = np.r_[True, (s_owner[1:] != s_owner[:-1]) | (s_raw[1:] != s_raw[:-1])]
    group = np.cumsum(new_group) - 1
    last = np.r_[np.flatnonzero(new_group)[1:] - 1, len(by) - 1]  # ties share the top rank
    rank = np.empty(len(raw), np.float32)
    rank[by] = last[group] - np.repeat(_segment_starts(counts), counts)
    quantile = (rank + 1.0) / np.maximum(counts[owner], 1).astype(np.float32)

  # --- gene sampling (cells with more than N candidates): top-N of Efraimidis-Spirakis keys
  # log(u)/w (weighted, w = v - min(v) + 1e-5 on normalised v) or u (uniform) = sampling without
  # replacement, same law as torch.multinomial(w, N, replacement=False).
  big = counts > N
  if big.any():
    if mask_seed is None:
      keys = 1.0 - rng.random(len(owner), dtype=np.float32)
      coin = rng.random(nc) < 0.5
    else:
      keys = hash_uniform(mask_seed, cells[owner], cols, 1).astype(np.float32)
      coin = hash_uniform(mask_seed, cells, 0, 2) < 0.5
    weighted = {"paper": coin, "uniform": np.zeros(nc, bool), "weighted": np.ones(nc, bool)}[
        spec.sampling] & big
    if weighted.any():
      nonempty = counts > 0
      rmin = np.zeros(nc, np.float32)
      rmin[nonempty] = np.minimum.reduceat(raw, _segment_starts(counts)[nonempty])
      vmin = normalise(rmin, sf, norm)  # normalisation is monotone within a cell
      went = np.flatnonzero(weighted[owner])
      ow = owner[went]
      keys[went] = np.log(keys[went]) / (normalise(raw[went], sf[ow], norm) - vmin[ow] + 1e-5)
    sel = np.flatnonzero(_top_n(keys, counts, N, owner))  # ~N per cell of ~10N: index, not mask
    owner, cols, raw = owner[sel], cols[sel], raw[sel]
    if spec.value_scale == "cell_rank":
      quantile = quantile[sel]
    counts = np.minimum(counts, N)
  cols = cols.astype(np.int64)
  raw = raw.astype(np.float32)
  vals = quantile if spec.value_scale == "cell_rank" else normalise(raw, sf[owner], norm)

  # --- optional measured-zero tokens
  if spec.zero_tokens > 0:
    starts = _segment_starts(counts)
    present = [cols[s:s + n] for s, n in zip(starts, counts)]
    zeros = _zero_tokens(data, cells, c2r, present, N - counts, spec.zero_tokens, rng, mask_seed)
    zn = np.array([len(z) for z in zeros], np.int64)
    if zn.sum():
      zo = np.repeat(np.arange(nc), zn)
      order = np.argsort(np.concatenate([owner, zo]), kind="stable")
      owner = np.concatenate([owner, zo])[order]
      cols = np.concatenate([cols, *zeros])[order]
      raw = np.concatenate([raw, np.zeros(zn.sum(), np.float32)])[order]
      vals = np.concatenate([vals, np.zeros(zn.sum(), np.float32)])[order]
      counts = counts + zn

  # --- prediction mask: independent Bernoulli(mask_ratio), then 1 <= #pred <= n_real - 1
  if mask_seed is None:
    u = rng.random(len(vals))
  else:
    u = hash_uniform(mask_seed, cells[owner], cols, 0)
  pred = u < spec.mask_ratio
  starts = _segment_starts(counts)
  n_pred = _segment_count(pred, counts)
  # cells with no pred get the token with the smallest u; cells with all pred lose the largest.
  for c in np.flatnonzero((counts >= 2) & ((n_pred == 0) | (n_pred == counts))):
    s0 = starts[c]
    seg = u[s0:s0 + counts[c]]
    j = s0 + (int(np.argmin(seg)) if n_pred[c] == 0 else int(np.argmax(seg)))
    pred[j] = not pred[j]
  flat = owner * N + (np.arange(len(vals)) - starts[owner])  # (cell, position) in [B * N]

  def scatter(dtype, entries) -> np.ndarray:
    out = np.zeros(B * N, dtype)
    out[flat] = entries
    return out.reshape(B, N)

  gene_ids = scatter(np.int32, c2r[cols])
  targets = scatter(np.float32, vals)
  values = scatter(np.float32, np.where(pred, np.float32(0), vals))
  cnt = scatter(np.float32, raw)
  token_mask = scatter(bool, True)
  pred_mask = scatter(bool, pred)
  size_factors = np.ones(B, np.float32)
  size_factors[:nc] = sf
  cell_mask = np.zeros(B, bool)
  cell_mask[:nc] = True
  lab = np.full(B, -1, np.int32)
  if labels is not None:
    lab[:nc] = np.asarray(labels)[cells]
  return Batch(gene_ids=gene_ids, values=values, targets=targets, counts=cnt,
               size_factors=size_factors, token_mask=token_mask, pred_mask=pred_mask,
               cell_mask=cell_mask, labels=lab)


def steps_per_epoch(n_cells: int, batch_size: int) -> int:
  return math.ceil(n_cells / batch_size)


def epoch_order(cells: np.ndarray, seed: int, stage_index: int, epoch: int,
                block: int = 1) -> np.ndarray:
  """The cells in epoch `epoch`'s order. block > 1: consecutive runs of `block` cells (in the
  given order, e.g. a file's rows) are shuffled as units (block shuffling: a batch then reads a
  few contiguous row ranges from disk instead of one row per cell); 1: every cell on its own."""
  cells = np.asarray(cells)
  rng = np.random.default_rng([seed, stage_index, epoch])
  if block <= 1:
    return rng.permutation(cells)
  starts = rng.permutation(np.arange(0, len(cells), block))
  return np.concatenate([cells[s:s + block] for s in starts]) if len(cells) else cells


@dataclasses.dataclass
class StageBatchMaker:
  """step -> (step, Batch): stage `stage_index`'s training batch at `step`, a pure function of
  (seed, stage_index, step) (see `stage_batches`). Picklable, so loader worker processes can
  build batches; each caches the current epoch's order."""
  data: CellData
  cells: np.ndarray
  columns_to_rows: np.ndarray
  spec: BatchSpec
  seed: int
  stage_index: int
  labels: np.ndarray | None = None
  shard: int = 0
  n_shards: int = 1
  block: int = 1
  _order: tuple = dataclasses.field(default=(-1, None), repr=False, compare=False)

  def __post_init__(self):
    if self.spec.batch_size % self.n_shards:
      raise DataError(f"batch_size {self.spec.batch_size} is not divisible by {self.n_shards} "
                      "processes (config.batch.batch_size)")
    self._local_spec = dataclasses.replace(self.spec,
                                           batch_size=self.spec.batch_size // self.n_shards)
    self.cells = np.asarray(self.cells, np.int64)
    if len(self.cells) == 0:
      raise DataError(f"stage {self.stage_index} has no training cells; check the stage plan.")

  def __call__(self, step: int) -> tuple[int, Batch]:
    B, local = self.spec.batch_size, self._local_spec.batch_size
    e, j = divmod(int(step), steps_per_epoch(len(self.cells), B))
    if self._order[0] != e:
      self._order = (e, epoch_order(self.cells, self.seed, self.stage_index, e, self.block))
    chunk = self._order[1][j * B:(j + 1) * B][self.shard * local:(self.shard + 1) * local]
    key = [self.seed, self.stage_index, int(step), 1] + ([self.shard] if self.n_shards > 1 else [])
    return int(step), make_batch(self.data, chunk, self.columns_to_rows, self._local_spec,
                                 np.random.default_rng(key), labels=self.labels)


def stage_batches(data: CellData, cells: np.ndarray, columns_to_rows: np.ndarray, spec: BatchSpec,
                  seed: int, stage_index: int, start_step: int = 0, n_steps: int | None = None,
                  labels: np.ndarray | None = None, shard: int = 0,
                  n_shards: int = 1, block: int = 1) -> Iterator[tuple[int, Batch]]:
  """Yields (step, Batch) for the n_steps steps start_step, start_step+1, ... (None = forever).

  Batches are a pure function of (seed, stage_index, step): resuming at start_step reproduces
  an uninterrupted run exactly. The last batch of an epoch is padded. With n_shards > 1, each
  yielded Batch holds only rows [shard * B/n, (shard + 1) * B/n) of the global batch (one
  process's part in a multi-process run). `block`: see `epoch_order`.
  """
  make = StageBatchMaker(data, cells, columns_to_rows, spec, seed, stage_index, labels, shard,
                         n_shards, block)
  step = start_step
  while n_steps is None or step < start_step + n_steps:
    yield make(step)
    step += 1


def eval_batches(data: CellData, cells: np.ndarray, columns_to_rows: np.ndarray, spec: BatchSpec,
                 mask_seed: int, labels: np.ndarray | None = None) -> Iterator[Batch]:
  """All `cells` once, in order (last batch padded), with deterministic masks from mask_seed."""
  cells = np.asarray(cells, np.int64)
  rng = np.random.default_rng([mask_seed, 2])  # unused when mask_seed is given; kept for API
  for i in range(0, len(cells), spec.batch_size):
    yield make_batch(data, cells[i:i + spec.batch_size], columns_to_rows, spec, rng,
                     mask_seed=mask_seed, labels=labels)
