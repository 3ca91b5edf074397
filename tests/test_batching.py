"""Tests for gil_jax.data.batching."""

import numpy as np
import pytest

from gil_jax.data.batching import BatchSpec, eval_batches, make_batch, stage_batches
from gil_jax.data.simulate import SimConfig, simulate_cell_data
from gil_jax.data.stages import random_gene_plan, stage_columns
from gil_jax.data.vocab import GeneVocab


@pytest.fixture(scope="module")
def setup():
  data = simulate_cell_data(SimConfig(n_cells=400, n_genes=150, n_modules=6, seed=0))
  plan = random_gene_plan(data, 2, base_fraction=0.5)
  vocab = GeneVocab(capacity=200)
  for i, s in enumerate(plan.stages):
    vocab.activate(s.new_genes, i)
  return data, plan, vocab


def _check_batch(b, data, cells, c2r, spec):
  B, N = spec.batch_size, spec.n_tokens
  for f in ("gene_ids", "values", "targets", "counts", "token_mask", "pred_mask"):
    assert getattr(b, f).shape == (B, N), f
  assert b.size_factors.shape == b.cell_mask.shape == b.labels.shape == (B,)
  assert b.gene_ids.dtype == np.int32 and b.labels.dtype == np.int32
  assert not np.any(b.pred_mask & ~b.token_mask)
  pad = ~b.token_mask
  for f in ("gene_ids", "values", "targets", "counts"):
    assert np.all(getattr(b, f)[pad] == 0), f
  assert np.all(b.values[b.pred_mask] == 0)
  np.testing.assert_array_equal(b.values[b.token_mask & ~b.pred_mask],
                                b.targets[b.token_mask & ~b.pred_mask])
  assert np.all(b.gene_ids[b.token_mask] > 0)
  assert set(np.unique(b.gene_ids[b.token_mask])) <= set(c2r[c2r > 0])
  nc = len(cells)
  assert b.cell_mask.tolist() == [True] * nc + [False] * (B - nc)
  assert not b.token_mask[nc:].any()
  n_real = b.token_mask.sum(1)
  n_pred = b.pred_mask.sum(1)
  many = n_real >= 2
  assert np.all(n_pred[many] >= 1) and np.all(n_pred[many] <= n_real[many] - 1)
  # values agree with the data
  inv = {int(r): c for c, r in enumerate(c2r) if r > 0}
  X = data.X
  for i, c in enumerate(cells[:5]):
    for j in np.flatnonzero(b.token_mask[i]):
      col = inv[int(b.gene_ids[i, j])]
      x = X[c, col]
      assert b.counts[i, j] == x
      np.testing.assert_allclose(b.targets[i, j], np.log1p(x / data.size_factors[c]), rtol=1e-5)


@pytest.mark.parametrize("sampling", ["paper", "uniform", "weighted"])
def test_make_batch_invariants(setup, sampling):
  data, plan, vocab = setup
  c2r = stage_columns(data, vocab, plan.stages[1])
  spec = BatchSpec(batch_size=16, n_tokens=24, sampling=sampling)
  cells = np.arange(11)
  b = make_batch(data, cells, c2r, spec, np.random.default_rng(0))
  _check_batch(b, data, cells, c2r, spec)
  # tokens are exactly the non-zero stage genes when they fit, N when they do not
  nz = np.array([(c2r[data.X[c].indices] > 0).sum() for c in cells])
  np.testing.assert_array_equal(b.token_mask[:11].sum(1), np.minimum(nz, 24))
  assert (nz > 24).any() and (nz < 24).any()


def test_dropped_genes_never_appear(setup):
  data, plan, vocab = setup
  c2r = stage_columns(data, vocab, plan.stages[2])
  dropped_rows = set(vocab.rows(plan.stages[1].new_genes))
  spec = BatchSpec(batch_size=32, n_tokens=200)
  b = make_batch(data, np.arange(32), c2r, spec, np.random.default_rng(1))
  assert dropped_rows.isdisjoint(set(b.gene_ids[b.token_mask].tolist()))
  assert np.all(b.token_mask.sum(1) == [(c2r[data.X[c].indices] > 0).sum() for c in range(32)])


def test_detection_floor_keeps_only_values_at_or_above_it(setup):
  """min_value: a cell's tokens are exactly its kept genes whose normalised value reaches the
  floor (counts here: ln(1 + CP10k)); 0 leaves the batch bit-identical; negative is refused."""
  data, plan, vocab = setup
  c2r = stage_columns(data, vocab, plan.stages[2])
  cells = np.arange(32)
  sub = data.X[cells]
  floor = float(np.median(np.log1p(sub.data / np.repeat(data.size_factors[cells],
                                                        np.diff(sub.indptr)))))  # cuts half
  b = make_batch(data, cells, c2r, BatchSpec(32, 400, min_value=floor), np.random.default_rng(1))
  assert b.token_mask.any() and (b.targets[b.token_mask] >= floor).all()
  for c in cells:
    row = data.X[c]
    value = np.log1p(row.data / data.size_factors[c])
    expected = {int(g) for g in c2r[row.indices[value >= floor]] if g > 0}
    assert set(b.gene_ids[c][b.token_mask[c]].tolist()) == expected
  full = BatchSpec(32, 400)
  a0 = make_batch(data, cells, c2r, full, np.random.default_rng(1))
  a1 = make_batch(data, cells, c2r, BatchSpec(32, 400, min_value=0.0), np.random.default_rng(1))
  _eq(a0, a1)
  assert a0.token_mask.sum() > b.token_mask.sum()
  with pytest.raises(ValueError, match="min_value=-1.0 must be >= 0"):
    BatchSpec(32, 400, min_value=-1.0)


def test_zero_tokens_and_labels(setup):
  data, plan, vocab = setup
  c2r = stage_columns(data, vocab, plan.stages[0])
  spec = BatchSpec(batch_size=8, n_tokens=100, zero_tokens=5)
  labels = np.arange(data.n_cells, dtype=np.int32) % 3
  cells = np.arange(4)
  b = make_batch(data, cells, c2r, spec, np.random.default_rng(0), labels=labels)
  _check_batch(b, data, cells, c2r, spec)
  assert b.labels.tolist() == [0, 1, 2, 0, -1, -1, -1, -1]
  zero_tok = b.token_mask & (b.counts == 0)
  assert np.all(zero_tok.sum(1)[:4] == 5)
  assert len(set(b.gene_ids[0][b.token_mask[0]].tolist())) == b.token_mask[0].sum()


def test_log1p_and_none_normalisation(setup):
  data, plan, vocab = setup
  c2r = stage_columns(data, vocab, plan.stages[0])
  for norm, f in [("log1p", np.log1p), ("none", lambda x: x)]:
    b = make_batch(data, np.arange(3), c2r, BatchSpec(4, 50, normalisation=norm),
                   np.random.default_rng(0))
    np.testing.assert_allclose(b.targets[b.token_mask], f(b.counts[b.token_mask]), rtol=1e-6)


def _eq(a, b):
  for f in ("gene_ids", "values", "targets", "counts", "size_factors", "token_mask", "pred_mask",
            "cell_mask", "labels"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


def test_stage_batches_resume_equals_uninterrupted(setup):
  data, plan, vocab = setup
  c2r = stage_columns(data, vocab, plan.stages[1])
  spec = BatchSpec(batch_size=32, n_tokens=16)
  cells = plan.stages[1].train_cells[:70]  # 70 cells -> 3 steps / epoch, the last padded
  full = list(stage_batches(data, cells, c2r, spec, seed=3, stage_index=1, n_steps=7))
  assert [s for s, _ in full] == list(range(7))
  resumed = list(stage_batches(data, cells, c2r, spec, seed=3, stage_index=1, start_step=5,
                               n_steps=2))
  assert [s for s, _ in resumed] == [5, 6]
  for (_, a), (_, b) in zip(full[5:], resumed):
    _eq(a, b)
  # every epoch covers each cell exactly once; epochs are reshuffled
  assert [int(b.cell_mask.sum()) for _, b in full[:4]] == [32, 32, 6, 32]
  first_epoch = np.concatenate([b.size_factors[b.cell_mask] for _, b in full[:3]])
  np.testing.assert_array_equal(np.sort(first_epoch), np.sort(data.size_factors[cells]))
  assert not np.array_equal(full[0][1].size_factors, full[3][1].size_factors)
  other = next(stage_batches(data, cells, c2r, spec, seed=4, stage_index=1, n_steps=1))[1]
  assert not np.array_equal(other.gene_ids, full[0][1].gene_ids)


def _pred_by_gene(batches, cells, vocab):
  out = {}
  for b, chunk in zip(batches, np.array_split(cells, len(batches))):
    for i, c in enumerate(chunk):
      for j in np.flatnonzero(b.token_mask[i]):
        out[(int(c), vocab.gene_ids[b.gene_ids[i, j] - 1])] = bool(b.pred_mask[i, j])
  return out


def test_eval_masks_independent_of_stage_genes(setup):
  data, plan, vocab = setup
  cells = plan.eval_cells
  spec = BatchSpec(batch_size=len(cells), n_tokens=150)  # no sampling: all genes fit
  masks = []
  for s in plan.stages[1:]:
    c2r = stage_columns(data, vocab, s)
    bs = list(eval_batches(data, cells, c2r, spec, mask_seed=11))
    assert len(bs) == 1
    masks.append(_pred_by_gene(bs, cells, vocab))
  shared = set(masks[0]) & set(masks[1])
  assert len(shared) > 100 and len(set(masks[0]) - shared) > 0
  diff = [k for k in shared if masks[0][k] != masks[1][k]]
  # only the at-least-one / not-all fix-up of tiny cells may differ
  assert len(diff) <= 0.02 * len(shared), len(diff)
  again = _pred_by_gene(list(eval_batches(data, cells, stage_columns(data, vocab, plan.stages[1]),
                                          spec, mask_seed=11)), cells, vocab)
  assert again == masks[0]
  other = _pred_by_gene(list(eval_batches(data, cells, stage_columns(data, vocab, plan.stages[1]),
                                          spec, mask_seed=12)), cells, vocab)
  assert other != masks[0]


def test_eval_batches_cover_cells_in_order(setup):
  data, plan, vocab = setup
  c2r = stage_columns(data, vocab, plan.stages[0])
  spec = BatchSpec(batch_size=16, n_tokens=8)
  cells = plan.eval_cells
  bs = list(eval_batches(data, cells, c2r, spec, mask_seed=0))
  assert len(bs) == int(np.ceil(len(cells) / 16))
  sf = np.concatenate([b.size_factors[b.cell_mask] for b in bs])
  np.testing.assert_array_equal(sf, data.size_factors[cells])
  again = list(eval_batches(data, cells, c2r, spec, mask_seed=0))
  for a, b in zip(bs, again):
    _eq(a, b)


def test_cell_rank_values_ignore_how_a_study_normalised():
  from gil_jax.data import batching
  """value_scale='cell_rank': each value becomes its quantile rank among the cell's detected
  genes (ties share the top rank), so any per-cell monotone transform of the input (another
  log base, size factor or pseudo-count) gives the same tokens."""
  import dataclasses
  from gil_jax.data import simulate
  d = simulate.simulate_cell_data(simulate.SimConfig(n_cells=20, n_genes=50, n_cell_types=2,
                                                     n_modules=4, n_batches=1))
  spec = batching.BatchSpec(batch_size=4, n_tokens=64, mask_ratio=0.0, value_scale="cell_rank")
  c2r = np.arange(1, 51, dtype=np.int32)
  b = batching.make_batch(d, np.arange(4), c2r, spec, np.random.default_rng(0))
  other = dataclasses.replace(d, X=d.X.copy())
  other.X.data = 3.0 * np.log2(other.X.data + 1.0) + 1.0
  b2 = batching.make_batch(other, np.arange(4), c2r, spec, np.random.default_rng(0))
  np.testing.assert_array_equal(b.values, b2.values)
  raw = batching.make_batch(d, np.arange(4), c2r, dataclasses.replace(spec, value_scale="none"),
                            np.random.default_rng(0))
  for i in range(4):
    m = b.token_mask[i] & ~b.pred_mask[i]
    v, w = b.values[i][m], raw.values[i][m]
    assert 0.0 < v.min() and v.max() <= 1.0
    assert np.all((v[:, None] < v[None, :]) == (w[:, None] < w[None, :]))  # order kept
  with pytest.raises(Exception, match="value_scale"):
    batching.BatchSpec(batch_size=4, n_tokens=8, value_scale="zscore")


def test_top_n_picks_each_cells_largest_keys_even_with_ties():
  from gil_jax.data.batching import _segment_count, _top_n
  rng = np.random.default_rng(0)
  for trial in range(60):
    counts = rng.integers(0, 300, rng.integers(1, 20))
    n = int(rng.integers(1, 150))
    owner = np.repeat(np.arange(len(counts)), counts)
    # few distinct values -> many ties at each cell's boundary; or continuous keys
    keys = (rng.integers(0, 4, counts.sum()) if trial % 2 else rng.random(counts.sum())
            ).astype(np.float32)
    sel = _top_n(keys, counts, n, owner)
    np.testing.assert_array_equal(_segment_count(sel, counts), np.minimum(counts, n))
    for c in np.flatnonzero(counts > n):
      seg, chosen = keys[owner == c], sel[owner == c]
      assert seg[chosen].min() >= seg[~chosen].max()  # no unchosen key beats a chosen one
      reference = np.zeros(counts[c], bool)  # the per-cell argpartition it replaces
      reference[np.argpartition(seg, counts[c] - n)[counts[c] - n:]] = True
      np.testing.assert_array_equal(chosen, reference)
