"""A corpus of .h5ad shards (`data/corpus.py`) and the training loader (`data/loader.py`).

Shards are simulated into tmp_path, each on its own gene panel; no shared data needed.
"""

import dataclasses
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import scipy.sparse as sp

from gil_jax import cli
from gil_jax.canal import stream
from gil_jax.data import anndata_io, batching, corpus, loader, pipeline, simulate
from gil_jax.data.anndata_io import DataError
from gil_jax.tasks import gil
from tests.helpers import tiny_config

SIM = simulate.SimConfig(n_cells=90, n_genes=120, n_cell_types=3, n_modules=6, n_batches=2,
                         seed=4)
FIELDS = ("gene_ids", "values", "targets", "counts", "token_mask", "pred_mask", "cell_mask",
          "size_factors")


def _write_shards(folder, n=3) -> list[str]:
  os.makedirs(folder, exist_ok=True)
  paths = []
  for s in range(n):
    path = os.path.join(folder, f"shard{s}.h5ad")
    simulate.simulate_shard(SIM, s, simulate.shard_panel(SIM, s)).write_h5ad(path)
    paths.append(path)
  return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("corpus"))
  paths = _write_shards(folder)
  corpus.write_manifest(paths, os.path.join(folder, corpus.MANIFEST_NAME), progress=False)
  return folder, paths


def _open(folder: str):
  files, manifest = corpus.expand_files([folder], ".")
  return corpus.open_corpus(files, manifest=manifest, progress=False)


def _assert_same_batch(a, b):
  for f in FIELDS:
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


def test_shards_have_their_own_panels(shards):
  _, paths = shards
  panels = [set(anndata_io.read_h5ad(p).gene_ids) for p in paths]
  assert len({frozenset(p) for p in panels}) == 3 and all(len(p) < SIM.n_genes for p in panels)


@pytest.mark.parametrize("with_manifest", [False, True])
def test_corpus_gives_the_batches_of_the_same_cells_loaded_eagerly(shards, with_manifest):
  folder, paths = shards
  files, manifest = corpus.expand_files([folder if with_manifest else os.path.join(
      folder, "*.h5ad")], ".")
  assert (manifest is not None) == with_manifest and files == paths
  lazy = corpus.open_corpus(files, manifest=manifest, progress=False)
  eager = anndata_io.concat([anndata_io.read_h5ad(p) for p in paths], name="eager")
  assert not sp.issparse(lazy.X) and lazy.X.shape == eager.X.shape
  np.testing.assert_array_equal(lazy.gene_ids, eager.gene_ids)
  np.testing.assert_array_equal(lazy.panel, eager.panel)       # not measured stays not measured
  assert not lazy.panel.all(axis=1).any()
  np.testing.assert_array_equal(lazy.dataset_index, eager.dataset_index)
  np.testing.assert_allclose(lazy.size_factors, eager.size_factors, rtol=1e-6)
  np.testing.assert_array_equal(lazy.X.col_nnz(), anndata_io.gene_nnz(eager))
  np.testing.assert_allclose(lazy.X.col_means(), anndata_io.gene_means(eager), rtol=1e-5)
  c2r = np.arange(1, lazy.n_genes + 1, dtype=np.int32)
  spec = batching.BatchSpec(batch_size=16, n_tokens=24)
  cells = np.arange(lazy.n_cells)
  mk = [batching.StageBatchMaker(d, cells, c2r, spec, 1, 0, block=4) for d in (lazy, eager)]
  for step in (0, 5, 17):  # 17: the second epoch
    _assert_same_batch(mk[0](step)[1], mk[1](step)[1])


def test_block_shuffle_keeps_runs_of_consecutive_cells():
  order = batching.epoch_order(np.arange(40), 0, 0, 0, block=8)
  assert sorted(order) == list(range(40))
  runs = order.reshape(5, 8)
  assert (np.diff(runs, axis=1) == 1).all() and not (np.diff(runs[:, 0]) == 8).all()
  np.testing.assert_array_equal(batching.epoch_order(np.arange(40), 0, 0, 0),
                                np.random.default_rng([0, 0, 0]).permutation(40))


def test_two_processes_read_disjoint_cells_that_cover_the_global_batch(shards, monkeypatch):
  folder, _ = shards
  data = _open(folder)
  read: list[np.ndarray] = []
  get = corpus.LazyCorpusRows.__getitem__
  monkeypatch.setattr(corpus.LazyCorpusRows, "__getitem__",
                      lambda self, rows: read.append(np.asarray(rows)) or get(self, rows))
  c2r = np.arange(1, data.n_genes + 1, dtype=np.int32)
  spec = batching.BatchSpec(batch_size=16, n_tokens=24)
  cells = np.arange(data.n_cells)
  whole = batching.epoch_order(cells, 2, 1, 0, block=4)
  for step in (0, 3):
    seen = []
    for shard in (0, 1):
      read.clear()
      batching.StageBatchMaker(data, cells, c2r, spec, 2, 1, shard=shard, n_shards=2,
                               block=4)(step)
      seen.append(np.concatenate(read))
    assert not set(seen[0]) & set(seen[1])
    np.testing.assert_array_equal(np.concatenate(seen), whole[step * 16:(step + 1) * 16])


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_loader_gives_the_steps_batches_in_order_for_any_worker_count(shards, workers):
  folder, _ = shards
  data = _open(folder)
  make = batching.StageBatchMaker(data, np.arange(data.n_cells),
                                  np.arange(1, data.n_genes + 1, dtype=np.int32),
                                  batching.BatchSpec(batch_size=8, n_tokens=16), 0, 0, block=2)
  with loader.StepIterator(make, 3, 10, workers=workers, group=4,
                           post=lambda sb: (sb[0] * 10, sb[1])) as it:
    got = list(it)
    pids = it.worker_pids()  # the benchmark reads their CPU times
  assert len(pids) == workers and os.getpid() not in pids
  assert [s for s, _ in got] == [10 * s for s in range(3, 13)]   # a resume at step 3
  for s, b in got:
    _assert_same_batch(b, make(s // 10)[1])


@dataclasses.dataclass
class _FailsAt:
  """A picklable `make` (worker processes) whose step `step` raises."""
  step: int

  def __call__(self, s: int) -> int:
    if s == self.step:
      raise DataError(f"bad batch {s}")
    return s


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_raises_a_build_error_when_its_step_is_due(workers):
  # built ahead (prefetch 4, groups of 2), but the steps before the bad one still arrive first
  with loader.StepIterator(_FailsAt(5), 0, 9, workers=workers, group=2, prefetch=4) as it:
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="bad batch 5"):
      next(it)


@dataclasses.dataclass
class _DiesAt:
  """A picklable `make` whose worker process dies at step `step`."""
  step: int

  def __call__(self, s: int) -> int:
    if s == self.step:
      os._exit(1)
    return s


def test_loader_raises_a_dead_worker_in_step_order():
  from concurrent.futures.process import BrokenProcessPool  # noqa: PLC0415
  with loader.StepIterator(_DiesAt(5), 0, 40, workers=1, group=2, prefetch=2) as it:
    assert [next(it) for _ in range(4)] == [0, 1, 2, 3]  # the groups before the dead one
    with pytest.raises(BrokenProcessPool):
      next(it)
    with pytest.raises(StopIteration):
      next(it)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_raises_a_post_error_when_its_step_is_due(workers):
  # posted a whole group at a time, but the steps before the bad one still arrive first
  def post(s):
    if s == 5:
      raise ValueError("bad device batch 5")
    return -s
  with loader.StepIterator(_FailsAt(-1), 0, 9, workers=workers, group=4, prefetch=2,
                           post=post) as it:
    assert [next(it) for _ in range(5)] == [0, -1, -2, -3, -4]
    with pytest.raises(ValueError, match="bad device batch 5"):
      next(it)
    with pytest.raises(StopIteration):  # nothing after a failed step
      next(it)


def test_loader_reraises_a_batch_error():
  def make(step):
    if step == 2:
      raise DataError("bad batch")
    return step
  with loader.StepIterator(make, 0, 5) as it:
    assert next(it) == 0 and next(it) == 1
    with pytest.raises(DataError, match="bad batch"):
      list(it)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("packed"))
  _write_shards(folder)
  a = simulate.simulate_shard(SIM, 3, simulate.shard_panel(SIM, 3))  # stored as files come:
  x = sp.csr_matrix(a.X)
  x.data[:3] = 0                                    # explicit zeros,
  x.data[x.indptr[5]:x.indptr[6]] = 0               # a cell without counts (dropped),
  x.indices[x.indptr[7] + 1] = x.indices[x.indptr[7]]  # and a duplicate entry
  x.has_sorted_indices = False
  a.X = x
  a.write_h5ad(os.path.join(folder, "shard3.h5ad"))
  assert cli.main(["corpus", folder, "--pack", "--quiet"]) == 0
  return folder


def test_a_pack_holds_exactly_the_rows_the_files_give(packed):
  files, manifest = corpus.expand_files([packed], ".")
  data = corpus.open_corpus(files, manifest=manifest, progress=False)
  plain = corpus.open_corpus(files, manifest=manifest, progress=False, use_pack=False)
  assert isinstance(data.X, corpus.PackedRows) and isinstance(plain.X, corpus.LazyCorpusRows)
  assert data.X.shape == plain.X.shape and data.X.nnz == plain.X.nnz
  assert data.X.indptr[-1] == manifest["pack"]["nnz"] < plain.X.nnz  # zeros and duplicate gone
  rng = np.random.default_rng(0)
  for rows in (np.arange(data.n_cells), rng.permutation(data.n_cells)[:40], [7, 7, 3, 8, 9],
               np.arange(60, 20, -1), []):
    a, b = data.X[rows], plain.X[rows]
    assert a.shape == b.shape
    for f in ("indptr", "indices", "data"):
      np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
  np.testing.assert_array_equal(data.X.col_nnz(), plain.X.col_nnz())
  c2r = np.arange(1, data.n_genes + 1, dtype=np.int32)
  spec = batching.BatchSpec(batch_size=16, n_tokens=24)
  cells = np.arange(data.n_cells)
  for block in (1, 4):
    mk = [batching.StageBatchMaker(d, cells, c2r, spec, 1, 0, block=block) for d in (data, plain)]
    for step in (0, 5, 17):
      _assert_same_batch(mk[0](step)[1], mk[1](step)[1])
  with loader.StepIterator(mk[0], 0, 4, workers=1, group=2) as it:  # pickled into a worker
    for s, b in it:
      _assert_same_batch(b, mk[1](s)[1])
  worker = pickle.loads(pickle.dumps(data.X))  # a worker's copy opens no .h5ad file
  assert worker.stats is None and np.array_equal(worker[[3, 1]].data, plain.X[[3, 1]].data)
  with pytest.raises(RuntimeError, match="reads rows only"):
    worker.col_nnz()
  worker.close()
  data.X.close()
  with pytest.raises(ValueError, match="closed file"):  # never another file's bytes
    data.X.read([0])


def test_a_changed_missing_stale_or_unfinished_pack_is_refused_or_unused(tmp_path, monkeypatch):
  folder = str(tmp_path / "c")
  _write_shards(folder, 2)
  manifest_path = os.path.join(folder, corpus.MANIFEST_NAME)
  corpus.write_manifest(sorted(corpus.expand_files([folder], ".", use_manifest=False)[0]),
                        manifest_path, progress=False)
  monkeypatch.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
  with pytest.raises(OSError, match="disk full"):  # interrupted: no pack recorded, none used
    corpus.write_pack(manifest_path, progress=False)
  monkeypatch.undo()
  files, manifest = corpus.expand_files([folder], ".")
  assert "pack" not in manifest and not os.path.exists(os.path.join(folder, "manifest.pack"))
  assert not os.path.exists(os.path.join(folder, "manifest.pack.tmp"))
  assert isinstance(corpus.open_corpus(files, manifest=manifest, progress=False).X,
                    corpus.LazyCorpusRows)
  corpus.write_pack(manifest_path, progress=False)
  values = os.path.join(folder, "manifest.pack", "values.f32")
  with open(values, "r+b") as f:
    f.write(b"\xff\xff\xff\x7f")
  files, manifest = corpus.expand_files([folder], ".")
  with pytest.raises(DataError, match=r"values.f32 changed since it was written.*rewrite it "
                     r"\(`gil-jax corpus .* --pack`\)"):
    corpus.open_corpus(files, manifest=manifest, progress=False)
  assert corpus.open_corpus(files, manifest=manifest, progress=False, use_pack=False).n_cells
  os.remove(values)
  with pytest.raises(DataError, match=r"values.f32 is missing.*use_pack=False"):
    corpus.open_corpus(files, manifest=manifest, progress=False)
  corpus.write_manifest(files, manifest_path, progress=False)  # files rewritten: pack is stale
  assert "pack" not in corpus.read_manifest(manifest_path)
  assert not os.path.exists(os.path.join(folder, "manifest.pack"))
  one = os.path.join(folder, "one.json")
  corpus.write_manifest(files[:1], one, progress=False)
  with pytest.raises(DataError, match="lists one file.*Drop --pack"):
    corpus.write_pack(one, progress=False)


# ------------------------------------------------------------------ bad input

def test_manifest_refuses_a_changed_or_missing_file(tmp_path):
  paths = _write_shards(tmp_path / "c")
  corpus.write_manifest(paths, str(tmp_path / "c" / "manifest.json"), progress=False)
  a = anndata_io.read_h5ad(paths[1]).to_anndata()
  a.X = a.X * 2
  a.write_h5ad(paths[1])
  with pytest.raises(DataError, match=r"shard1.h5ad changed since the manifest.*gil-jax corpus"):
    corpus.expand_files([str(tmp_path / "c")], ".")
  os.remove(paths[1])
  with pytest.raises(DataError, match=r"shard1.h5ad .*is missing"):
    corpus.expand_files([str(tmp_path / "c")], ".")


def _bad_shard(folder, kind: str) -> str:
  a = simulate.simulate_shard(SIM, 0, simulate.shard_panel(SIM, 0))
  if kind in ("nan", "negative"):
    a.X.data[5] = np.nan if kind == "nan" else -1.0
  elif kind == "duplicate genes":
    names = list(a.var_names)
    names[1] = names[0]
    a.var_names = names
  elif kind == "csc":
    a.X = sp.csc_matrix(a.X)
  path = os.path.join(folder, f"bad_{kind.replace(' ', '_')}.h5ad")
  a.write_h5ad(path)
  if kind == "truncated":
    shutil.copy(_write_shards(os.path.join(folder, "ok"), 1)[0], path)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  return path


@pytest.mark.parametrize("kind,message", [
    ("nan", "NaN/inf values"), ("negative", "negative values"),
    ("duplicate genes", "duplicate gene ids"), ("csc", "not as a CSR matrix"),
    ("truncated", "cannot read h5ad file")])
def test_a_bad_shard_is_named_in_a_one_line_error(tmp_path, capsys, kind, message):
  good = _write_shards(tmp_path / "c", 2)
  bad = _bad_shard(str(tmp_path / "c"), kind)
  assert cli.main(["corpus", str(tmp_path / "c"), "--quiet"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err and os.path.basename(bad) in err
  assert not os.path.exists(tmp_path / "c" / "manifest.json")
  assert good


def test_file_entries_are_checked(tmp_path):
  with pytest.raises(DataError, match="matches no file"):
    corpus.expand_files([str(tmp_path / "*.h5ad")], ".")
  with pytest.raises(DataError, match="holds no .h5ad file"):
    corpus.expand_files([str(tmp_path)], ".")
  (tmp_path / "m.json").write_text(json.dumps({"format": "other"}))
  with pytest.raises(DataError, match="not a gil_jax corpus manifest"):
    corpus.expand_files([str(tmp_path / "m.json")], ".")


# ------------------------------------------------------------------ training from a corpus

def _corpus_config(folder: str):
  c = tiny_config(**{"data.source": "h5ad", "data.files": (folder,), "data.lazy": True,
                     "data.shuffle_block": 4, "stages.plan": "dataset_stream",
                     "stages.base_stage": False, "train.steps_per_stage": 6,
                     "genes.capacity": 128, "mesh.data": 1})
  c.stages.order = ("shard0", "shard1", "shard2")
  return c


def test_dataset_stream_on_a_corpus_interrupted_and_resumed_matches_uninterrupted(shards,
                                                                                  tmp_path):
  folder, _ = shards
  config = _corpus_config(folder)
  full = gil.train_and_evaluate(config, str(tmp_path / "full"), progress_bar=False)
  part = str(tmp_path / "part")
  gil.train_and_evaluate(config, part, stop_after_steps=9, progress_bar=False)  # mid stage 1
  assert not os.path.exists(os.path.join(part, "results.json"))
  resumed = gil.train_and_evaluate(config, part, progress_bar=False)
  assert len(full["stages"]) == 3
  np.testing.assert_allclose(np.array(resumed["gene_regression"]["matrix"], dtype=float),
                             np.array(full["gene_regression"]["matrix"], dtype=float),
                             rtol=1e-5, equal_nan=True)
  assert [s["final_train_loss"] for s in resumed["stages"]] == pytest.approx(
      [s["final_train_loss"] for s in full["stages"]], rel=1e-5)


def test_training_from_a_pack_equals_training_from_the_files(packed, tmp_path):
  config = _corpus_config(packed)
  config.train.steps_per_stage = 3
  got = [gil.train_and_evaluate(config, str(tmp_path / str(use)), progress_bar=False)
         for use in (True, False) if not config.data.update(use_pack=use)]
  np.testing.assert_array_equal(np.array(got[0]["gene_regression"]["matrix"], dtype=float),
                                np.array(got[1]["gene_regression"]["matrix"], dtype=float))
  assert [s["final_train_loss"] for s in got[0]["stages"]] == [
      s["final_train_loss"] for s in got[1]["stages"]]


@pytest.mark.parametrize("plan", ["random", "expressed", "dataset_stream"])
def test_stage_plans_on_a_corpus_equal_those_on_the_same_cells_in_memory(shards, plan):
  from gil_jax import experiment  # noqa: PLC0415
  folder, _ = shards
  plans = []
  for lazy in (True, False):
    c = _corpus_config(folder)
    c.data.lazy, c.stages.plan, c.stages.order = lazy, plan, ()
    if plan == "expressed":
      c.stages.obs_column, c.stages.order = "batch", ("batch0", "batch1")
    data = experiment.load_data(c)
    assert sp.issparse(data.X) != lazy
    plans.append(experiment.build_plan(c, data))
  a, b = plans
  np.testing.assert_array_equal(a.eval_cells, b.eval_cells)
  assert len(a.stages) == len(b.stages) >= 2
  for x, y in zip(a.stages, b.stages):
    assert list(x.train_genes) == list(y.train_genes) and list(x.new_genes) == list(y.new_genes)
    assert list(x.eval_genes) == list(y.eval_genes)
    np.testing.assert_array_equal(x.train_cells, y.train_cells)


def _drop_timings(tree):
  if isinstance(tree, dict):
    return {k: _drop_timings(v) for k, v in tree.items()
            if k not in ("seconds", "first_step_seconds", "cells_per_s")}
  if isinstance(tree, list):
    return [_drop_timings(v) for v in tree]
  return tree


def test_annotation_from_lazily_read_sources_equals_in_memory(tmp_path):
  from gil_jax.tasks import annotation  # noqa: PLC0415
  from tests.helpers import sim_h5ad, tiny_canal_config  # noqa: PLC0415
  path, _ = sim_h5ad(tmp_path, n_batches=3)
  results = []
  for lazy in (False, True):
    c = tiny_canal_config(path)
    c.data.lazy = lazy
    results.append(annotation.train_annotation(c, str(tmp_path / f"w{lazy}"),
                                               progress_bar=False))
  assert _drop_timings(results[0]) == _drop_timings(results[1])
  c.canal.gene_panel = path
  with pytest.raises(DataError, match="gene_panel needs the sources in memory"):
    annotation.train_annotation(c, str(tmp_path / "panel"), progress_bar=False)


def test_annotation_from_a_packed_corpus_reads_the_pack_and_equals_the_files(packed, tmp_path,
                                                                           monkeypatch):
  from gil_jax.tasks import annotation  # noqa: PLC0415
  from tests.helpers import tiny_canal_config  # noqa: PLC0415
  got = []
  for use_pack in (False, True):
    c = tiny_canal_config(os.path.join(packed, "shard0.h5ad"))
    c.canal.sources = {}
    c.data.update(files=(packed,), label_column="cell_type", lazy=True, use_pack=use_pack)
    with monkeypatch.context() as m:
      if use_pack:  # (a shard with explicit zeros, a duplicate entry and a cell without counts)
        m.setattr(pipeline.LazyCSRRows, "read", lambda *a: pytest.fail("read from a file"))
      got.append(annotation.train_annotation(c, str(tmp_path / str(use_pack)),
                                             progress_bar=False))
  assert _drop_timings(got[0]) == _drop_timings(got[1])
  c.canal.sources = stream.corpus_sources(c)
  c.canal.source_order = ("shard3", "shard0")  # another gene order: the files are read
  with monkeypatch.context() as m:
    m.setattr(corpus.PackedRows, "read", lambda *a: pytest.fail("read from the pack"))
    assert not isinstance(stream.build_stream(c).data.X, corpus.PackedRows)


def test_annotation_from_a_labelled_corpus_equals_the_same_sources_listed(shards, tmp_path,
                                                                         monkeypatch):
  from gil_jax.tasks import annotation  # noqa: PLC0415
  from tests.helpers import tiny_canal_config  # noqa: PLC0415
  folder, paths = shards
  listed = tiny_canal_config(paths[0])
  listed.canal.sources = {os.path.splitext(os.path.basename(p))[0]: dict(
      file=p, label_column="cell_type", layer="", normalisation="log1p_cp10k", gene_column="",
      split_column="", split_values=()) for p in paths}
  from_corpus = tiny_canal_config(paths[0])
  from_corpus.canal.sources = {}
  from_corpus.data.update(files=(folder,), label_column="cell_type", lazy=True)
  listed.data.lazy = True
  got = [annotation.train_annotation(listed, str(tmp_path / "0"), progress_bar=False)]

  def no_value_pass(self):
    raise AssertionError(f"{self.path}: values read again; the manifest caches this pass")

  with monkeypatch.context() as m:
    m.setattr(pipeline.LazyCSRRows, "scan", no_value_pass)
    got.append(annotation.train_annotation(from_corpus, str(tmp_path / "1"), progress_bar=False))
  assert [s["name"] for s in got[1]["stages"]] == ["shard0", "shard1", "shard2"]
  assert _drop_timings(got[0]) == _drop_timings(got[1])
  assert not len(from_corpus.canal.sources)  # the caller's config is left as it was
  again = annotation.train_annotation(from_corpus, str(tmp_path / "1"), progress_bar=False)
  assert _drop_timings(again) == _drop_timings(got[1])  # the same run: same sources found again
  unlabelled = tiny_canal_config(paths[0])
  unlabelled.canal.sources = {}
  unlabelled.data.files = (folder,)
  with pytest.raises(DataError, match="labelled by config.data.label_column, which is empty"):
    annotation.train_annotation(unlabelled, str(tmp_path / "x"), progress_bar=False)
  bad = tmp_path / "bad"
  bad.mkdir()
  shutil.copy(paths[0], bad / "a.b.h5ad")
  unlabelled.data.update(files=(str(bad),), label_column="cell_type")
  with pytest.raises(DataError, match="has no corpus manifest.*gil-jax corpus"):
    annotation.train_annotation(unlabelled, str(tmp_path / "y"), progress_bar=False)
  corpus.write_manifest([str(bad / "a.b.h5ad")], str(bad / "manifest.json"), progress=False)
  with pytest.raises(DataError, match=r"name 'a.b' cannot name a source"):
    annotation.train_annotation(unlabelled, str(tmp_path / "z"), progress_bar=False)
