"""CANAL: head masking, bank, λ_t, novelty rule, annotate round trip and bad inputs."""

import json
import hashlib
import os

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gil_jax.canal import annotate, bank, head, labels, loss, metrics, novelty
from gil_jax.canal import stream as stream_lib
from gil_jax.tasks import annotation as loop
from gil_jax.canal.model import WorkdirError
from gil_jax.data.anndata_io import DataError, from_anndata
from tests.helpers import sim_h5ad, tiny_canal_config


_sim = sim_h5ad


def _config(path, **canal):
  return tiny_canal_config(path, **canal)


# ------------------------------------------------------------------ head

def test_inactive_classes_have_zero_probability_and_old_logits_unchanged():
  @jax.jit  # one compilation instead of a dozen op-by-op ones
  def run(key, a1, a2):
    k1, k2 = jax.random.split(key)
    hp = head.init_head(k1, 6, (5, 4), 8)
    _, z = head.from_manifold(hp, head.manifold(hp, jax.random.normal(k2, (3, 6))))
    z1, z2 = head.mask_logits(z, a1), head.mask_logits(z, a2)
    return z1, z2, jax.nn.softmax(z1), jax.nn.softmax(z2)

  a1 = np.array([True, True, True] + [False] * 5)
  a2 = a1.copy()
  a2[3:5] = True
  z1, z2, p1, p2 = map(np.asarray, run(jax.random.PRNGKey(0), a1, a2))
  assert np.all(p1[:, 3:] == 0.0)
  np.testing.assert_allclose(p1.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(z2[:, :3], z1[:, :3])
  assert np.all(p2[:, 3:5] > 0) and np.all(p2[:, 5:] == 0.0)


def _linear_batch(values, gene_ids, token_mask):
  from gil_jax.batch import empty_batch
  b = empty_batch(*values.shape)
  return b.replace(gene_ids=gene_ids, values=values, targets=values, token_mask=token_mask,
                   cell_mask=np.ones(values.shape[0], bool))


def test_gene_linear_path_uses_values_is_scale_free_and_leaves_unseen_rows_alone():
  rng = np.random.default_rng(0)
  cap, classes = 12, 5
  table = jnp.asarray(rng.normal(size=(cap, classes)), jnp.float32)
  gene_ids = np.tile(np.arange(6, dtype=np.int32), (3, 1))
  token_mask = np.ones((3, 6), bool)
  token_mask[0, 4:] = False
  values = rng.uniform(0.5, 3.0, size=(3, 6)).astype(np.float32)
  active = np.zeros(cap, bool)
  active[:5] = True  # gene 5 is not active: ignored like padding
  z = head.gene_linear_logits(table, _linear_batch(values, gene_ids, token_mask), active)
  changed = values.copy()
  changed[:, 1] *= 4.0
  z_changed = head.gene_linear_logits(table, _linear_batch(changed, gene_ids, token_mask), active)
  assert float(jnp.min(jnp.max(jnp.abs(z_changed - z), axis=-1))) > 0.1  # values are used
  z_scaled = head.gene_linear_logits(table, _linear_batch(values * 1.4427, gene_ids, token_mask),
                                     active)  # ln -> log2 units: the same profile
  np.testing.assert_allclose(np.asarray(z_scaled), np.asarray(z), rtol=1e-5, atol=1e-5)
  masked = values.copy()
  masked[0, 4:] = 100.0  # padding and an inactive gene carry no weight
  masked[:, 5] = 100.0
  np.testing.assert_allclose(
      np.asarray(head.gene_linear_logits(table, _linear_batch(masked, gene_ids, token_mask),
                                         active)), np.asarray(z), rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda t: jnp.sum(head.gene_linear_logits(
      t, _linear_batch(values, gene_ids, token_mask), active)))(table)
  assert np.all(np.asarray(grad)[5:] == 0.0) and np.all(np.abs(np.asarray(grad)[:5]) > 0)


def test_gene_linear_table_is_zero_and_sized_by_the_gene_table(tmp_path):
  from gil_jax.canal.model import init_params
  from gil_jax.models import build_model
  config = _config(_sim(tmp_path), gene_linear=True)
  backbone = build_model(config.model, config.genes.capacity, "mse")
  params = init_params(backbone, config, jax.random.PRNGKey(0))
  table = np.asarray(params["head"]["gene_linear"])
  assert table.shape == (config.genes.capacity, config.canal.max_classes)
  assert np.all(table == 0.0)
  config.canal.gene_linear = False
  assert "gene_linear" not in init_params(backbone, config, jax.random.PRNGKey(0))["head"]


def test_smoothed_ce_uses_only_active_classes():
  z = jnp.zeros((1, 6))
  active = jnp.array([True, True, False, False, False, False])
  ce = loss.smoothed_ce(head.mask_logits(z, active), jnp.array([0]), active, 0.1)
  np.testing.assert_allclose(float(ce[0]), np.log(2.0), rtol=1e-6)


def test_lambda_t_formula():
  assert float(loss.lambda_t(0.1, 7, 10)) == pytest.approx(0.07)
  assert float(loss.lambda_t(0.1, 0, 5)) == 0.0


# ------------------------------------------------------------------ bank

def test_bank_class_balance_size_and_ranking():
  rng = np.random.default_rng(0)
  protos = np.eye(4, 3)
  h = rng.normal(size=(60, 3))
  labs = np.repeat([0, 1, 2], 20)
  labs[40:57] = 1  # class 2 keeps only 3 cells
  cells = np.arange(100, 160)
  b = bank.update(bank.empty(12), h, labs, cells, protos, n_classes_seen=3, stage=0)
  counts = bank.class_counts(b)
  assert counts == {0: 4, 1: 4, 2: 3} and len(b["cells"]) == 12
  sel0 = b["cells"][(b["labels"] == 0) & bank.occupied(b)] - 100
  best = np.argsort(-(h[:20] @ protos[0]))[:4]
  assert set(sel0) == set(best)
  # a second stage with a new class: budget 12 // 4 = 3 per class, best ranks kept
  b2 = bank.update(b, h[:20], np.full(20, 3), np.arange(200, 220), protos, 4, stage=1)
  c2 = bank.class_counts(b2)
  assert c2 == {0: 3, 1: 3, 2: 3, 3: 3} and bank.occupied(b2).sum() <= 12
  assert set(b2["rank"][b2["labels"] == 0]) == {1, 2, 3}


# ------------------------------------------------------------------ novelty / metrics

def test_novelty_threshold_flags_constructed_outliers():
  hp = head.init_head(jax.random.PRNGKey(0), 4, (4, 4), 4)
  hp["fc1"]["w"] = jnp.eye(4)
  hp["fc1"]["b"] = jnp.zeros(4)
  hp["fc2"]["w"] = jnp.eye(4)
  hp["fc2"]["b"] = jnp.zeros(4)
  hp["cls"]["w"] = 4.0 * jnp.eye(4)
  hp["cls"]["b"] = jnp.zeros(4)
  active = np.array([True, True, True, False])
  rng = np.random.default_rng(0)
  known = np.eye(4)[rng.integers(0, 3, 40)] * 3.0
  novel = np.full((10, 4), 0.3)
  m = np.concatenate([known, novel]).astype(np.float32)
  _, z = head.from_manifold(hp, jnp.asarray(m))
  z = head.mask_logits(z, jnp.asarray(active))
  res = novelty.canal_rule(np.asarray(z), m, hp, active, n_mix=16)
  assert res.unassigned[40:].all() and not res.unassigned[:40].any()
  val = novelty.validation_rule(np.asarray(z), np.asarray(z)[:40], active, quantile=1.0)
  assert val.unassigned[40:].all() and not val.unassigned[:40].any()


def test_mahalanobis_rule_flags_cells_away_from_every_known_class():
  rng = np.random.default_rng(0)
  centres = np.array([[4.0, 0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0, 0], [0, 0, 4.0, 0, 0, 0]])
  scale = np.array([1.0, 1.0, 1.0, 0.2, 0.2, 0.2])   # correlated spread: not Euclidean
  def cells(c, n):
    return centres[c] + rng.normal(0, 1, (n, 6)) * scale
  ref_labels = np.repeat([0, 1, 2], 100)
  ref = np.concatenate([cells(c, 100) for c in range(3)])
  val = np.concatenate([cells(c, 40) for c in range(3)])
  active = np.array([True, True, True, False])
  calib = novelty.calibrate_mahalanobis(ref, ref_labels, val, active, quantile=0.95)
  json.dumps(calib)  # saved with the run for `annotate`
  assert calib["classes"] == [0, 1, 2]
  # the score is the smallest Mahalanobis distance to a class mean
  P, mu = np.asarray(calib["precision"]), np.asarray(calib["means"])
  brute = np.min([[(x - m) @ P @ (x - m) for m in mu] for x in val[:7]], axis=1)
  np.testing.assert_allclose(novelty.mahalanobis_scores(val[:7], mu, P), brute, rtol=1e-6)
  # a near type: between two known ones along the low-variance axes, where no known cell lies
  near = centres[0] * 0.5 + centres[1] * 0.5 + np.array([0, 0, 0, 1.5, 1.5, 0])
  novel = near + rng.normal(0, 1, (50, 6)) * scale
  known_test = np.concatenate([cells(c, 50) for c in range(3)])
  res = novelty.apply_calibration(None, active, calib, m=np.concatenate([known_test, novel]))
  assert res.unassigned[150:].mean() > 0.9 and res.unassigned[:150].mean() < 0.15
  with pytest.raises(ValueError, match="manifold vectors m"):
    novelty.apply_calibration(None, active, calib)
  with pytest.raises(ValueError, match=">= 2 known types"):
    novelty.calibrate_mahalanobis(ref[:100], ref_labels[:100], val, active)


def test_novelty_quantile_chosen_on_validation_by_leave_one_class_out():
  rng = np.random.default_rng(0)
  labs = np.repeat(np.arange(4), 40)
  z = rng.normal(0, 0.3, (160, 6)).astype(np.float32)
  sharp = rng.random(160) > 0.1  # ~13% of known cells are ambiguous (flat logits)
  z[np.flatnonzero(sharp), labs[sharp]] += 6.0
  active = np.array([True] * 4 + [False] * 2)
  z[:, ~active] = head.MASKED_LOGIT
  sel = novelty.select_quantile(z, labs, active)
  best = sel["grid"].index(sel["quantile"])
  # flagging about the ambiguous share beats both extremes (q too low / too high)
  assert 0.8 <= sel["quantile"] <= 0.9 and sel["mean_h"][best] > 0.85
  assert sel["mean_h"][best] > sel["mean_h"][-1] + 0.3 and sel["mean_h"][best] > sel["mean_h"][0]
  assert sel["pseudo_novel_classes"] == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="config.canal.val_fraction"):
    novelty.select_quantile(z[:80], labs[:80], active)


def test_metrics_bwt_forgetting_h():
  acc = [[0.9, None], [0.7, 0.8]]
  assert metrics.bwt(acc) == pytest.approx(-0.2)
  assert metrics.forgetting(acc) == pytest.approx(0.2)
  n = metrics.novel_metrics(["a", "b", "x", "x"], ["a", "a", "Unassigned", "b"], ["x"])
  assert n["known_accuracy"] == 0.5 and n["unknown_accuracy"] == 0.5
  assert n["h_score"] == pytest.approx(0.5)


def test_label_map_and_unknown_label():
  m = labels.parse_label_map("alpha; beta cell=beta")
  assert list(labels.harmonise(["alpha", "beta cell"], m, "s")) == ["alpha", "beta"]
  with pytest.raises(labels.LabelError, match="config.canal.label_map"):
    labels.harmonise(["gamma"], m, "s")
  v = labels.LabelVocab(3)
  v.activate(["b", "a"], 0)
  assert v.names == ["a", "b"] and v.activate(["c", "a"], 1) == ["c"]
  assert v.active_mask(0).tolist() == [True, True, False]
  with pytest.raises(labels.LabelError, match="max_classes"):
    v.activate(["d"], 2)


# ------------------------------------------------------------------ end to end
# One tiny gene-incremental (GIL) workdir and one CANAL run initialised from it are shared by
# every end-to-end test below (compilation dominates their cost). The GIL run uses the
# transformer backbone: its eager parameter init in gil_jax/core/loop.py costs ~15 s less than
# the exceiver's on a loaded 2-core CPU, and it covers CANAL on the second backbone (the real-data
# configs use the exceiver; its parameter names are covered by test_trainable_masks).

GIL_GENES = 64   # the GIL run's vocabulary: G00001..G00064
CANAL_GENES = 80  # the annotation data: 16 more genes, unknown to the GIL vocabulary


@pytest.fixture(scope="module")
def gil_run(tmp_path_factory):
  from gil_jax.tasks.gil import train_and_evaluate
  from tests.helpers import tiny_config
  config = tiny_config("transformer", **{
      "data.sim.n_genes": GIL_GENES, "stages.n_stages": 1, "stages.base_stage": False,
      "train.steps_per_stage": 2, "mesh.data": 1})
  workdir = str(tmp_path_factory.mktemp("gil") / "run")
  train_and_evaluate(config, workdir)
  return workdir, config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gil_run):
  tmp = tmp_path_factory.mktemp("canal")
  path, a = _sim(tmp, n_genes=CANAL_GENES)
  # novelty setting: type0 never trained on; CANAL's trainable set (last block(s) and head);
  # novelty threshold from validation cells with q chosen on them (saved for `annotate`)
  c = _config(path, withhold=("type0",), init_workdir=gil_run[0], trainable="last_blocks",
              novelty_rule="validation_auto", val_fraction=0.2)
  res = loop.train_annotation(c, str(tmp / "run"))
  return tmp, path, a, res


def test_training_results_and_no_recompile(trained):
  tmp, _, _, res = trained
  a = res["annotation"]
  assert res["compilations"]["train_step"] == 1
  assert len(a["accuracy_matrix"]) == 2 and a["accuracy_matrix"][0][1] is None
  assert set(a["final"]) == {"accuracy", "macro_f1", "ari"} and isinstance(a["bwt"], float)
  n = a["novel"]
  assert n is not None and 0.0 <= n["h_score"] <= 1.0 and n["withheld"] == ["type0"]
  assert n["rule"] == "validation_auto" and n["quantile"] in novelty.QUANTILE_GRID
  assert n["quantile_selection"]["quantile"] == n["quantile"]
  assert "type0" not in a["classes"]
  assert os.path.exists(tmp / "run" / "confusion.png") and os.path.exists(tmp / "run" / "report.md")
  assert sum(res["stages"][-1]["bank_per_class"].values()) <= 24
  knn = a["embedding_knn"]  # the model's embedding read out by kNN from its training cells
  assert knn["k"] == 15 and knn["reference_cells"] > 0
  assert set(knn["test"]) == {"accuracy", "macro_f1", "ari"} and 0.0 <= knn["test"]["accuracy"] <= 1


def test_sharded_annotation_matches_one_device(trained, gil_run):
  """The fixture ran on a mesh of the 8 simulated devices (config.mesh.data=-1); one device
  gives the same accuracy matrix and losses (float32 reduction order only)."""
  tmp, path, _, res = trained
  c = _config(path, withhold=("type0",), init_workdir=gil_run[0], trainable="last_blocks",
              novelty_rule="validation_auto", val_fraction=0.2)
  c.mesh.data = 1
  one = loop.train_annotation(c, str(tmp / "one_device"))
  assert one["accuracy_matrix"] == res["accuracy_matrix"]
  assert [s["final_loss"] for s in one["stages"]] == pytest.approx(
      [s["final_loss"] for s in res["stages"]], rel=1e-4)
  c.mesh.data, c.batch.batch_size = -1, 12
  with pytest.raises(ValueError, match="divisible by the mesh's data axis"):
    loop.train_annotation(c, str(tmp / "indivisible"))


def test_gil_init_loads_backbone_and_drops_unknown_genes(trained, gil_run):
  from gil_jax.canal.model import load_gil_params
  _, _, _, res = trained
  init = res["annotation"]["gil_init"]
  assert init["vocab_genes"] == GIL_GENES and init["data_genes"] == CANAL_GENES
  assert init["mapped_genes"] == GIL_GENES and init["dropped_genes"] == CANAL_GENES - GIL_GENES
  assert all(s["n_active_genes"] == GIL_GENES for s in res["stages"])
  gil_params, gil_vocab, gil_cfg = load_gil_params(gil_run[0])
  assert gil_vocab.capacity == gil_run[1].genes.capacity
  tuned, vocab, cfg = load_gil_params(str(trained[0] / "run"))  # the annotation run's backbone
  assert cfg["model"] == gil_cfg["model"] and vocab.gene_ids == gil_vocab.gene_ids
  flat_gil = dict(jax.tree_util.tree_leaves_with_path(gil_params))
  flat_tuned = dict(jax.tree_util.tree_leaves_with_path(tuned))
  assert flat_gil.keys() == flat_tuned.keys()
  assert cfg["model"]["name"] == "transformer" and cfg["model"]["n_layers"] == 1
  trained_blocks = {"layer_0"}  # trainable='last_blocks', trainable_blocks=1: the last block
  for path, before in flat_gil.items():
    after = flat_tuned[path]
    if str(getattr(path[0], "key", path[0])) in trained_blocks:
      assert not np.array_equal(after, before), path
    else:  # frozen: exactly the GIL checkpoint's values
      np.testing.assert_array_equal(after, before, err_msg=str(path))


def test_vocabularies_from_scratch_activate_stage_genes_and_types(tmp_path):
  path, _ = _sim(tmp_path, n_cells=120, n_genes=30)
  c = _config(path)
  stream = stream_lib.build_stream(c)
  vocab, labs = loop.build_vocabs(c, stream, None)
  assert len(vocab) == 30 and vocab.active_mask(0).sum() == 30
  assert labs.names == sorted(set(stream.labels[stream.stages[0].train_cells]))
  c2r = loop.columns_to_rows(stream, vocab, 0)
  assert (c2r > 0).all() and len(set(c2r)) == 30


def test_trainable_masks():
  from gil_jax.canal.model import trainable_labels
  params = {"backbone": {"genes": {"embedding": 0}, "process_0": {"w": 0}, "process_1": {"w": 0},
                         "latent_norm": {"scale": 0}},
            "head": {"cls": {"w": 0}}}
  lab = trainable_labels(params, "last_blocks", 1)
  b = lab["backbone"]
  assert b["process_1"]["w"] == "train" and b["latent_norm"]["scale"] == "train"
  assert b["process_0"]["w"] == "freeze" and b["genes"]["embedding"] == "freeze"
  assert lab["head"]["cls"]["w"] == "train"
  lab = trainable_labels(params, "head", 1)
  assert set(jax.tree.leaves(lab["backbone"])) == {"freeze"}
  assert set(jax.tree.leaves(trainable_labels(params, "all", 0))) == {"train"}
  with pytest.raises(ValueError, match="config.canal.trainable"):
    trainable_labels(params, "some", 1)


def test_annotate_round_trip_and_input_untouched(trained, tmp_path):
  tmp, path, a, _ = trained
  digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
  out = str(tmp_path / "annotated.h5ad")
  summary = annotate.annotate_file(str(tmp / "run"), path, out)
  assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
  r = ad.read_h5ad(out)
  assert r.n_obs == a.n_obs and r.obsm["X_gil"].shape == (a.n_obs, 16)
  assert {"gil_cell_type", "gil_confidence", "gil_novel", "gil_novelty_score"} <= set(r.obs.columns)
  assert summary["dropped_unknown_genes"] == CANAL_GENES - GIL_GENES  # not in the vocabulary
  assert summary["shared_genes"] == GIL_GENES
  names = set(a.obs["cell_type"].astype(str)) | {labels.UNASSIGNED}
  assert set(r.obs["gil_cell_type"]) <= names
  score = r.obs["gil_novelty_score"].to_numpy()
  assert np.isfinite(score).all()
  # the run's saved validation constants: flagged exactly when the score is above the threshold
  calib = annotate.load_run(str(tmp / "run"))[1]["novelty"]
  assert summary["novelty_rule"] == "validation_auto"
  assert summary["novelty_threshold"] == pytest.approx(calib["threshold"], abs=1e-4)
  np.testing.assert_array_equal(r.obs["gil_novel"].to_numpy(), score > calib["threshold"])
  # the best label even for flagged cells, its probability, and every class's probability
  probs = r.obsm["gil_probabilities"]
  assert probs.shape == (a.n_obs, len(r.uns["gil"]["classes"]))
  np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
  best = np.asarray(r.uns["gil"]["classes"], object)[probs.argmax(1)]
  np.testing.assert_array_equal(r.obs["gil_cell_type"].to_numpy(), best)
  np.testing.assert_allclose(r.obs["gil_confidence"].to_numpy(), probs.max(1), rtol=1e-6)
  # the Python API on the in-memory AnnData gives the file's annotation; the input is kept
  import gil_jax
  model = gil_jax.load(str(tmp / "run"))
  before = a.copy()
  mem = model.annotate(a)
  assert "gil_cell_type" not in a.obs and a.n_vars == before.n_vars
  for col in ("gil_cell_type", "gil_confidence", "gil_novel", "gil_novelty_score"):
    np.testing.assert_array_equal(mem.obs[col].to_numpy(), r.obs[col].to_numpy())
  np.testing.assert_array_equal(mem.obsm["X_gil"], r.obsm["X_gil"])
  # by default a cell's label and flag depend only on the cell: 20 cells alone = inside all
  part = model.annotate(a[:20].copy())
  for col in ("gil_cell_type", "gil_novel"):
    np.testing.assert_array_equal(part.obs[col].to_numpy(), mem.obs[col].to_numpy()[:20])
  np.testing.assert_allclose(part.obs["gil_confidence"].to_numpy(),
                             mem.obs["gil_confidence"].to_numpy()[:20], rtol=1e-5)
  info = model.info()
  assert info["task"] == "annotation" and info["classes"] == list(r.uns["gil"]["classes"])
  canal = annotate.annotate_file(str(tmp / "run"), path, str(tmp_path / "c.h5ad"),
                                 novelty_rule="canal")
  assert canal["novelty_rule"] == "canal" and 0.0 < canal["novelty_threshold"] < 1.0
  emb = str(tmp_path / "emb.h5ad")
  annotate.annotate_file(str(tmp / "run"), path, emb, embed_only=True)
  e = ad.read_h5ad(emb)
  assert "X_gil" in e.obsm and "gil_cell_type" not in e.obs


def test_annotation_ignores_library_size_and_file_format(trained):
  """Cells are annotated at the reference depth: the same profiles given as counts, as counts at
  3x the depth, or as ln(1 + CP10k) values get the same embedding and labels."""
  import scipy.sparse as sp
  tmp, _, a, _ = trained
  model = annotate.Model(str(tmp / "run"))
  x = sp.csr_matrix(a.X, dtype=np.float32)
  logn = x.multiply(1e4 / np.asarray(x.sum(1))).tocsr()
  logn.data = np.log1p(logn.data)
  outs = []
  for mat, norm in ((x, "log1p_cp10k"), (x * 3, "log1p_cp10k"), (logn, "none")):
    q = a.copy()
    q.X = mat
    outs.append(model.annotate(q, normalisation=norm))
  for o in outs[1:]:
    np.testing.assert_allclose(o.obsm["X_gil"], outs[0].obsm["X_gil"], atol=2e-4)
    np.testing.assert_array_equal(o.obs["gil_cell_type"].to_numpy(),
                                  outs[0].obs["gil_cell_type"].to_numpy())
  data = stream_lib.normalise_values(from_anndata(a.copy(), name="s"), "log1p_cp10k", "s")
  np.testing.assert_array_equal(data.size_factors, 1.0)


def test_mahalanobis_rule_is_saved_and_applied_cell_by_cell(tmp_path):
  """(With the gene-linear head path on, so that it goes through training and `annotate`.)"""
  path, a = _sim(tmp_path)
  res = loop.train_annotation(_config(path, withhold=("type0",), novelty_rule="mahalanobis",
                                      val_fraction=0.2, gene_linear=True), str(tmp_path / "run"))
  assert res["annotation"]["novel"]["rule"] == "mahalanobis"
  state, meta = annotate.load_run(str(tmp_path / "run"))
  calib = meta["novelty"]
  table = np.asarray(state["params"]["head"]["gene_linear"])
  trained_rows = np.any(table != 0, axis=1)  # the genes' rows learn; padding rows stay 0
  assert 0 < trained_rows.sum() <= a.n_vars < table.shape[0]
  assert calib["rule"] == "mahalanobis" and len(calib["classes"]) == 3  # type0 withheld
  summary = annotate.annotate_file(str(tmp_path / "run"), path, str(tmp_path / "out.h5ad"))
  r = ad.read_h5ad(str(tmp_path / "out.h5ad"))
  assert summary["novelty_rule"] == "mahalanobis"
  score = r.obs["gil_novelty_score"].to_numpy()
  np.testing.assert_array_equal(r.obs["gil_novel"].to_numpy(), score > calib["threshold"])
  part = annotate.Model(str(tmp_path / "run")).annotate(a[:25].copy())  # each cell on its own
  np.testing.assert_array_equal(part.obs["gil_novel"].to_numpy(), r.obs["gil_novel"].to_numpy()[:25])
  np.testing.assert_allclose(part.obsm["gil_probabilities"], r.obsm["gil_probabilities"][:25],
                             atol=1e-5)


def test_annotate_bad_inputs(trained, tmp_path):
  tmp, path, a, _ = trained
  few = a[:, :10].copy()
  few_path = str(tmp_path / "few.h5ad")
  few.write_h5ad(few_path)
  with pytest.raises(annotate.QueryError, match="shares only 10 .* at least 20"):
    annotate.annotate_file(str(tmp / "run"), few_path, str(tmp_path / "o.h5ad"))
  raw = a.copy()
  raw.X = raw.X * 1000.5  # read-level, not integers, not log scale
  raw_path = str(tmp_path / "raw.h5ad")
  raw.write_h5ad(raw_path)
  with pytest.raises(annotate.QueryError, match="neither integer counts nor log-normalised"):
    annotate.annotate_file(str(tmp / "run"), raw_path, str(tmp_path / "o.h5ad"))
  with pytest.raises(annotate.QueryError, match="never modified in place"):
    annotate.annotate_file(str(tmp / "run"), path, path)
  with pytest.raises(WorkdirError, match="no checkpoints"):
    annotate.annotate_file(str(tmp_path / "empty"), path, str(tmp_path / "o.h5ad"))


def test_training_file_label_errors(tmp_path):
  path, a = _sim(tmp_path, n_cells=60)
  with pytest.raises(DataError, match="label column 'celltype' not found"):
    stream_lib.build_stream(_cfg_with(path, label_column="celltype"))
  b = a.copy()
  b.obs["cell_type"] = b.obs["cell_type"].astype(object)
  b.obs.iloc[0, b.obs.columns.get_loc("cell_type")] = None
  bad = str(tmp_path / "nolab.h5ad")
  b.write_h5ad(bad)
  with pytest.raises(DataError, match="1 of .* cells have no label"):
    stream_lib.build_stream(_config(bad))
  with pytest.raises(labels.LabelError, match="no entry in the label map"):
    stream_lib.build_stream(_config(path, label_map=("type0=T0", "type1=T1")))


def _cfg_with(path, **src):
  c = _config(path)
  c.canal.sources.sim.update(src)
  return c


def test_validation_novelty_rules_need_validation_cells(tmp_path):
  for rule in ("validation", "validation_auto"):
    with pytest.raises(ValueError, match="config.canal.val_fraction > 0"):
      loop.train_annotation(_config("never_read.h5ad", novelty_rule=rule, val_fraction=0.0),
                            str(tmp_path / rule))
  with pytest.raises(ValueError, match="unknown config.canal.novelty_rule"):
    loop.train_annotation(_config("never_read.h5ad", novelty_rule="oracle"), str(tmp_path / "o"))


def test_cli_reports_errors(tmp_path):
  from gil_jax import cli
  path, _ = _sim(tmp_path, n_cells=40)
  rc = cli.main(["annotate", "--workdir", str(tmp_path / "nowhere"), "--input", path,
                 "--output", str(tmp_path / "x.h5ad")])
  assert rc == 2


def test_workdir_without_finished_stage(tmp_path):
  from gil_jax.checkpoint import Checkpointer
  ck = Checkpointer(str(tmp_path / "w"))
  ck.save(1, {"x": np.zeros(2, np.float32)}, {"progress": {"stage": 0, "stage_done": False}})
  ck.close()
  path, _ = _sim(tmp_path, n_cells=40)
  with pytest.raises(WorkdirError, match="no checkpoint of a finished stage"):
    annotate.annotate_file(str(tmp_path / "w"), path, str(tmp_path / "o.h5ad"))


def test_info_command(trained, capsys):
  from gil_jax import cli
  tmp, _, _, res = trained
  assert cli.main(["info", "--workdir", str(tmp / "run")]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["task"] == "annotation" and info["method"] == "canal"
  assert info["stages_done"] == info["stages"] == len(res["stages"])
  assert info["accuracy_matrix"] == res["accuracy_matrix"]
  card = open(tmp / "run" / "model_card.md").read()
  assert "task: `annotation`, method: `canal`" in card and "trained: 2 of 2 stages" in card


def test_token_dropout_hides_a_share_of_each_cells_tokens_and_keeps_one():
  from gil_jax.batch import empty_batch
  mask = np.zeros((64, 100), bool)
  mask[:, :80] = True
  mask[0, :] = False
  mask[0, 5] = True                      # a cell with one token keeps it
  batch = empty_batch(64, 100).replace(token_mask=mask)
  out = np.asarray(loss.drop_tokens(batch, 0.8, jax.random.PRNGKey(0)).token_mask)
  assert not (out & ~mask).any()                       # only hides, never adds
  assert out[0, 5] and out.sum(1).min() >= 1
  kept = out[1:].sum(1) / 80.0
  assert 0.15 < kept.min() and kept.max() <= 1.0 and 0.45 < kept.mean() < 0.75  # ~U(0.2, 1)
  assert np.unique(out[1:].sum(1)).size > 10             # the share differs between cells
  same = loss.drop_tokens(batch, 0.0, jax.random.PRNGKey(0)).token_mask
  np.testing.assert_array_equal(np.asarray(same), mask)


def test_test_only_source_reports_head_confusion_and_embedding_knn(tmp_path):
  """A source never trained on is scored with the head's argmax (and its confusion matrix) and
  with kNN label transfer on the model's embedding; baselines are refitted on its genes."""
  import ml_collections
  path, _ = sim_h5ad(tmp_path, "train.h5ad", seed=0)
  query, _ = sim_h5ad(tmp_path, "query.h5ad", seed=0, n_cells=120)
  c = _config(path, val_fraction=0.1)
  c.canal.sources.query = ml_collections.ConfigDict(dict(
      file=query, label_column="cell_type", normalisation="log1p_cp10k", split_column="",
      split_values=()))
  c.canal.test_only = ("query",)
  a = loop.train_annotation(c, str(tmp_path / "run"))["annotation"]
  head_q, knn_q = a["test_only"]["query"], a["embedding_knn"]["test_only"]["query"]
  assert head_q["n_cells"] == 120 and 0.0 <= head_q["accuracy"] <= 1.0
  assert np.sum(head_q["confusion"]["matrix"]) == head_q["n_seen_type_cells"]
  assert set(knn_q) == {"accuracy", "macro_f1", "ari"} and 0.0 <= knn_q["accuracy"] <= 1.0
  assert a["baselines"]["logistic_regression"]["test_only"]["query"]["n_cells"] == 120


def test_token_dropout_reaches_training_and_is_range_checked(tmp_path):
  path = _sim(tmp_path)[0]
  losses = []
  for share in (0.0, 0.6):
    res = loop.train_annotation(_config(path, token_dropout=share), str(tmp_path / f"run{share}"))
    losses.append([s["final_loss"] for s in res["stages"]])
  assert losses[0] != losses[1]
  with pytest.raises(ValueError, match="token_dropout=1.0 must be in"):
    loss.make_task_loss(None, 0.1, 1.0)


def test_gene_incremental_models_keep_real_depth_and_old_annotation_runs_warn(gil_run, trained,
                                                                             caplog):
  """Only annotation models see the reference depth: a gene-incremental workdir's `embed` still
  reads each cell's library size. An annotation run saved before the change is warned about."""
  _, _, a, _ = trained
  gil = annotate.Model(gil_run[0])
  deeper = a.copy()
  deeper.X = a.X * 3
  e1 = gil.embed(a).obsm["X_gil"]
  e3 = gil.embed(deeper).obsm["X_gil"]
  assert np.abs(e1 - e3).max() > 1e-3               # same profiles, 3x the depth: depth token
  d = from_anndata(a.copy(), name="s")
  kept = stream_lib.normalise_values(d, "log1p_cp10k", "s", reference_depth=False)
  np.testing.assert_array_equal(kept.size_factors, d.size_factors)
  with caplog.at_level("WARNING", logger="gil_jax"):
    stream_lib.warn_if_old_depth_input({"kind": "canal"}, "old run")
    stream_lib.warn_if_old_depth_input({"kind": "canal", "depth_input": "reference"}, "new run")
    stream_lib.warn_if_old_depth_input({"kind": "gil"}, "gil run")
  warned = [r.getMessage().split(" was")[0] for r in caplog.records if r.levelname == "WARNING"]
  assert warned == ["old run"]


def test_run_without_held_out_cells_finishes_with_empty_scores(tmp_path):
  """config.canal.test_fraction = 0 trains on every cell: the run ends with null scores and no
  confusion plot instead of failing after training."""
  path = _sim(tmp_path)[0]
  res = loop.train_annotation(_config(path, test_fraction=0.0), str(tmp_path / "run"))
  a = res["annotation"]
  assert a["n_test_cells"] == 0 and a["final"]["accuracy"] is None and a["confusion"] is None
  assert a["average_accuracy"] is None and a["bwt"] is None
  assert a["embedding_knn"]["test"] is None
  assert os.path.exists(tmp_path / "run" / "report.md")
  assert not os.path.exists(tmp_path / "run" / "confusion.png")


def _confounded_sources(tmp_path, n_extra=6):
  """Two labelled sources on the same genes, except `n_extra` genes that only the second one
  measures, and it holds one cell type of the first one's four."""
  import ml_collections
  import scipy.sparse as sp
  path, _ = sim_h5ad(tmp_path, "full.h5ad", seed=0)
  _, b = sim_h5ad(tmp_path, "narrow_src.h5ad", seed=1)
  b = b[b.obs["cell_type"] == b.obs["cell_type"].astype(str).iloc[0]].copy()
  extra = np.random.default_rng(0).poisson(3.0, (b.n_obs, n_extra)).astype(np.float32)
  narrow = ad.AnnData(sp.hstack([sp.csr_matrix(b.X), sp.csr_matrix(extra)]).tocsr(), obs=b.obs,
                      var=ad.AnnData(var=None, obs=None).var.reindex(
                          list(b.var_names) + [f"extra{i}" for i in range(n_extra)]))
  narrow_path = str(tmp_path / "narrow.h5ad")
  narrow.write_h5ad(narrow_path)
  c = _config(path)
  c.canal.sources.sim.split_column = ""
  c.canal.sources.narrow = ml_collections.ConfigDict(dict(
      file=narrow_path, label_column="cell_type", normalisation="log1p_cp10k", split_column="",
      split_values=()))
  return c, [f"extra{i}" for i in range(n_extra)]


def test_class_confounded_genes_are_left_out_of_the_vocabulary_and_ignored(tmp_path):
  """Genes measured only by a source that holds 1 of 4 types are left out at coverage 0.5 (not
  at 0): never active, not in the data's rows, and a query's labels ignore their values."""
  from gil_jax.data.vocab import GeneVocab
  c, extra = _confounded_sources(tmp_path)
  c.canal.min_gene_class_coverage = 0.0
  assert not stream_lib.build_stream(c).confounded.any()
  c.canal.min_gene_class_coverage = 0.5
  s = stream_lib.build_stream(c)
  assert sorted(s.data.gene_ids[s.confounded]) == extra
  vocab, _ = loop.build_vocabs(c, s, None)
  assert not set(extra) & set(vocab.gene_ids) and len(vocab) == s.data.n_genes - len(extra)
  c2r = loop.columns_to_rows(s, vocab, len(s.stages) - 1)
  assert (c2r[s.confounded] == 0).all() and (c2r[~s.confounded] > 0).all()
  pre = GeneVocab(256, gene_ids=list(s.data.gene_ids), activated_at=[0] * s.data.n_genes)
  vocab, _ = loop.build_vocabs(c, s, pre)  # a pre-trained table keeps their rows, inactive
  active = vocab.active_mask(len(s.stages) - 1)[vocab.rows(list(s.data.gene_ids))]
  np.testing.assert_array_equal(active, ~s.confounded)
  assert (loop.columns_to_rows(s, vocab, 0)[s.confounded] == 0).all()
  c.canal.min_gene_class_coverage = 1.5
  with pytest.raises(DataError, match="min_gene_class_coverage=1.5 must be in"):
    stream_lib.build_stream(c)

  c.canal.min_gene_class_coverage = 0.5
  with pytest.raises(DataError, match="does not know yet; use it with --config.method=joint"):
    loop.train_annotation(c, str(tmp_path / "continual"))  # later stages' types: not knowable
  c.method = "joint"
  res = loop.train_annotation(c, str(tmp_path / "run"))
  assert res["annotation"]["n_confounded_genes"] == len(extra)
  # normalised once, so that a value changed below moves no other gene's value (with counts,
  # a left-out gene still adds to the library size that CP10k divides by)
  query = ad.read_h5ad(str(tmp_path / "narrow.h5ad"))
  x = query.X.toarray()
  query.X = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
  model = annotate.Model(str(tmp_path / "run"))
  before = model.annotate(query, normalisation="none")
  query.X[:, -len(extra):] *= 5.0
  after = model.annotate(query, normalisation="none")
  np.testing.assert_array_equal(before.obsm["gil_probabilities"], after.obsm["gil_probabilities"])


def test_resume_refuses_a_rebuilt_vocabulary_that_differs_from_the_checkpoint():
  """The vocabulary is rebuilt from config, data and labels on resume; it must begin with the
  checkpointed one (an extension may append genes), else the run stops with a message."""
  from gil_jax import guards
  from gil_jax.data.vocab import NEVER, GeneVocab
  saved = GeneVocab(16, gene_ids=["a", "b", "c"], activated_at=[0, 0, 1])
  runner = loop.Runner.__new__(loop.Runner)  # restore_meta reads only the gene vocabulary
  meta = {"vocab": saved.to_json(), "depth_input": stream_lib.DEPTH_INPUT}
  runner.gene_vocab = GeneVocab(16, gene_ids=["a", "b", "c", "d"], activated_at=[0, 0, 1, 2])
  runner.restore_meta(meta)  # same prefix: a resume or an extension
  for genes, at in ((["a", "c", "b"], [0, 1, 0]), (["a", "b", "c"], [0, 0, NEVER])):
    runner.gene_vocab = GeneVocab(16, gene_ids=genes, activated_at=at)
    with pytest.raises(guards.RunError, match="gene vocabulary rebuilt from the config and data"):
      runner.restore_meta(meta)
