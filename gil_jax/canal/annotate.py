"""`gil-jax annotate` / `embed`: apply a trained workdir to a query .h5ad, write a new .h5ad.

The query's genes are mapped to the run's gene vocabulary: genes not in it are dropped (and
counted), vocabulary genes absent from the query are "not measured" (never tokens). The input
file is only read; results go to --output, which must be a different file (also after resolving
symbolic and hard links) and must not exist unless `overwrite`; it is written to a temporary
file in the same folder and renamed, so a failed run leaves no half-written output. A workdir
whose run has not finished every stage is refused unless `allow_partial` (then noted in `uns`).
Novel cells: the run's rule (the validation-rule constants saved with the checkpoint, or CANAL's
transductive mixup rule on the query set); novelty_rule='canal' forces CANAL's rule.
"""

from __future__ import annotations

import logging
import os
import tempfile

import anndata as ad
import jax
import ml_collections
import numpy as np
import pandas as pd
import scipy.sparse as sp
import orbax.checkpoint as ocp

from gil_jax import integrity
from gil_jax.canal import novelty, voting
from gil_jax.canal.labels import UNASSIGNED
from gil_jax.canal.model import WorkdirError, eval_step_for, latest_finished
from gil_jax.canal.stream import normalise_values, warn_if_old_depth_input
from gil_jax.data import anndata_io, batching
from gil_jax.data.anndata_io import DataError
from gil_jax.data.vocab import GeneVocab
from gil_jax.experiment import RAW_SCALE
from gil_jax.core import step as step_lib
from gil_jax.models import build_model


class QueryError(ValueError):
  """The query cannot be annotated with this workdir."""


def load_run(workdir: str) -> tuple[dict, dict]:
  """(raw state as numpy pytree, meta) of the latest finished stage of `workdir`."""
  ckpt, step, meta = latest_finished(workdir)
  try:
    state = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
  finally:
    ckpt.close()
  integrity.verify_tree(state, meta.get("checksums"), f"checkpoint step {step} of {workdir!r} "
                        "(rerun the training command to rewrite it)")
  return state, meta


def gene_mapping(query_genes, vocab: GeneVocab, active: np.ndarray, min_shared: int):
  """(columns_to_rows, summary); raises QueryError when too few genes are shared."""
  rows = vocab.rows(list(query_genes), missing="pad")
  rows = np.where(active[rows], rows, 0).astype(np.int32)
  shared = int(np.sum(rows > 0))
  n_active = int(active.sum())
  summary = {"query_genes": len(rows), "shared_genes": shared,
             "dropped_unknown_genes": len(rows) - shared,
             "vocabulary_genes_not_measured": n_active - shared}
  if shared < min_shared:
    raise QueryError(f"the query shares only {shared} of its {len(rows)} genes with the model's "
                     f"{n_active}-gene vocabulary; at least {min_shared} are required "
                     "(--min-shared-genes / config.canal.min_shared_genes). Check that gene ids "
                     "are of the same kind (symbols vs Ensembl: --gene-column) and species.")
  return rows, summary


def check_output(input_path: str, output_path: str, overwrite: bool = False) -> None:
  """QueryError when `output_path` is (a link to) the input, a folder, or exists without
  `overwrite`; checked before any computation."""
  same = QueryError(f"--output {output_path!r} is the input file {input_path!r} (the same file "
                    "after resolving links); the input is never modified in place. Choose "
                    "another output path.")
  if os.path.realpath(input_path) == os.path.realpath(output_path):
    raise same
  if os.path.isdir(output_path):
    raise QueryError(f"--output {output_path!r} is a folder; give a file path such as "
                     f"{os.path.join(output_path, 'annotated.h5ad')!r}.")
  if os.path.lexists(output_path):
    if os.path.exists(output_path) and os.path.exists(input_path) and os.path.samefile(
        input_path, output_path):  # a hard link to the input
      raise same
    if not overwrite:
      raise QueryError(f"--output {output_path!r} already exists; pass --overwrite to replace "
                       "it, or choose another path.")
  folder = os.path.dirname(os.path.abspath(output_path))
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise QueryError(f"--output {output_path!r}: {folder!r} is a file, not a folder.")


def run_progress(meta: dict) -> tuple[int, int]:
  """(finished stages, stages of the run) of a checkpoint's meta (annotation or GIL run)."""
  done = int(meta.get("progress", {}).get("stage", -1)) + 1
  if meta.get("kind") == "canal":
    config = meta.get("config", {})
    joint = "joint" in (config.get("method"), config.get("canal", {}).get("mode"))  # new, old
    return done, 1 if joint else len(meta.get("stages", []))
  return done, len(meta.get("plan", {}).get("stages", []))


def write_atomic(adata: ad.AnnData, output_path: str) -> None:
  """Writes to a temporary file in the output's folder, then renames it over `output_path` (a
  symbolic link there is replaced, never followed)."""
  folder = os.path.dirname(os.path.abspath(output_path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(output_path)}.",
                             suffix=".tmp")
  os.close(fd)
  try:
    adata.write_h5ad(tmp)
    os.replace(tmp, output_path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


log = logging.getLogger("gil_jax")
LN_CP10K_CEILING = float(np.log1p(1e4))   # the largest possible ln(1 + CP10k) value


def detect_normalisation(data, what: str) -> str:
  """How a file's values enter the model ('auto'): 'log1p_cp10k' for integer counts, 'none' for
  values within ln(1 + CP10k)'s range, 'from_log2_cpm' for larger values when log2(1 + CPM) is
  the only usual log scale they fit (e.g. the scClassify pancreas files: un-logged with base 2
  every cell sums to at most 1e6 but some to more than 1e4, and with base e some to more than
  1e7, beyond even deep ln(1 + x) normalisations); QueryError for anything else, naming the
  scales the values fit."""
  if data.is_counts:
    return "log1p_cp10k"
  x = data.X if hasattr(data.X, "data") else None
  top = float(x.data.max()) if x is not None and x.data.size else 0.0
  if top <= LN_CP10K_CEILING * 1.001:
    return "none"
  if top > RAW_SCALE:
    raise QueryError(f"the {what}'s values reach {top:.4g}: neither integer counts nor "
                     "log-normalised expression. Normalise it first (scanpy.pp.normalize_total "
                     "+ log1p), or say what it is: --normalisation log1p_cp10k for non-integer "
                     "counts (e.g. TPM), none to use the values as they are.")

  rows, v = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr)), x.data.astype(np.float64)
  # each cell's largest un-logged total per base (/ 1.001: float32 rounding of stored values)
  base2, base_e = (float(np.bincount(rows, np.expm1(v * np.log(b))).max()) / 1.001
                   for b in (2.0, np.e))
  fits = [name for name, ok in (("log2(1 + CPM)", base2 <= 1e6), ("log2(1 + CP10k)", base2 <= 1e4),
                                ("ln(1 + x) with cell totals up to 1e7", base_e <= 1e7)) if ok]
  if fits != ["log2(1 + CPM)"]:
    raise QueryError(
        f"the {what}'s values reach {top:.4g}, above ln(1 + CP10k)'s ceiling "
        f"({LN_CP10K_CEILING:.2f}): already log-scaled, but they fit "
        f"{' and '.join(fits) or 'no usual log scale'}, so 'auto' does not guess. Un-log them "
        "(2^v - 1 or e^v - 1) and renormalise to ln(1 + CP10k), or say what they are: "
        "--normalisation from_log2_cpm for log2(1 + CPM) values, none to use them as they are.")
  log.warning("%s: values up to %.4g fit log2(1 + CPM) only; converting them to ln(1 + CP10k) "
              "(normalisation 'from_log2_cpm'; pass --normalisation none to use them as they "
              "are)", what, top)
  return "from_log2_cpm"


class Model:
  """A finished run (either task) loaded once for use on many queries: `gil_jax.load(workdir)`.

  The jitted eval step is built on first use and reused by every later call (it is shared with
  training runs in the same process), so annotating many small AnnData objects in a loop pays
  compilation once.
  """

  def __init__(self, workdir: str, allow_partial: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.state, self.meta = load_run(workdir)
    self.is_annotation = self.meta.get("kind") == "canal"
    warn_if_old_depth_input(self.meta, f"workdir {workdir!r}")
    self.done, self.total = run_progress(self.meta)
    self.partial = self.done < self.total
    if self.partial and not allow_partial:
      raise WorkdirError(f"workdir {workdir!r} finished only {self.done} of its {self.total} "
                         "stages (the training run, or a `gil-jax extend`, stopped early); "
                         "resume it by rerunning that same command, or pass --allow-partial "
                         "(allow_partial=True) to use the partly trained model.")
    self.config = ml_collections.ConfigDict(self.meta["config"])
    self.vocab = GeneVocab.from_json(self.meta["vocab"])
    self.active_genes = np.asarray(self.state["active_genes"], bool)
    self.classes = list(self.meta["label_vocab"]["names"]) if self.is_annotation else []
    self._fn = None

  def extend(self, adata: ad.AnnData | str, *, label_key: str = "", name: str = "",
             progress_bar: bool = True, **kw) -> dict:
    """Appends `adata` (an AnnData or an .h5ad path) to the run as a new stage, trains it (see
    `gil_jax.tasks.extend`; keywords: normalisation, layer, overrides) and reloads this model.
    An in-memory AnnData is first written to `<workdir>/extensions/<name>.h5ad` (the run reads
    its data from files, so that an interrupted extension resumes). Returns the run's results."""
    from gil_jax import tasks  # noqa: PLC0415 -- the tasks import this module
    path = adata
    if isinstance(adata, ad.AnnData):
      folder = os.path.join(self.workdir, "extensions")
      os.makedirs(folder, exist_ok=True)
      x = adata.X
      total = float(x.sum()) if x is not None else 0.0
      name = name or "extension_" + integrity.ids_hash(  # same data, same file: resumable
          [adata.shape, total, *adata.obs_names, *adata.var_names])[:10]
      path = os.path.join(folder, f"{name}.h5ad")
      if not os.path.exists(path):
        write_atomic(adata, path)
    results = tasks.extend(self.workdir, [path], label_key=label_key,
                           progress_bar=progress_bar, **kw)
    self.__init__(self.workdir)
    return results

  def info(self) -> dict:
    """What the run is: task, method, stages, genes, classes and its final figures."""
    results = self.meta.get("results", {})
    config = self.config
    out = {"workdir": self.workdir, "task": "annotation" if self.is_annotation else "gil",
           "experiment": config.get("experiment"),
           "method": config.get("method", config.get("canal", {}).get("mode")),
           "stages_done": self.done, "stages": self.total,
           "active_genes": int(self.active_genes.sum()), "gene_capacity": self.vocab.capacity,
           "versions": results.get("versions")}
    if self.is_annotation:
      out.update(classes=self.classes, datasets=[s["name"] for s in self.meta.get("stages", [])],
                 accuracy_matrix=results.get("accuracy_matrix"),
                 novelty_rule=(self.meta.get("novelty") or {}).get("rule", "canal"))
    else:
      out.update(datasets=[s["name"] for s in self.meta.get("plan", {}).get("stages", [])],
                 regression_matrix=results.get("gene_regression", {}).get("matrix"))
    return out

  def _outputs(self, data, c2r) -> dict[str, np.ndarray]:
    config = self.config
    if self._fn is None:
      if self.is_annotation:
        self._fn = eval_step_for(config.model, self.vocab.capacity)  # shared with training
      else:
        embed = step_lib.make_embed_step(build_model(config.model, self.vocab.capacity,
                                                     config.train.likelihood))
        self._fn = jax.jit(lambda p, b, g, a: {"cell_emb": embed(p, b, g)})
    spec = batching.spec_from_config(  # the query is normalised above; nothing hidden
        config.batch, batch_size=int(config.eval.get("batch_size", 256)), mask_ratio=0.0,
        normalisation="none")
    classes = (np.asarray(self.state["active_classes"], bool) if self.is_annotation else None)
    outs = []
    for b in batching.eval_batches(data, np.arange(data.n_cells), c2r, spec,
                                   int(config.eval.mask_seed)):
      o = jax.device_get(self._fn(self.state["params"], b, self.active_genes, classes))
      outs.append({k: np.asarray(v)[np.asarray(b.cell_mask)] for k, v in o.items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  def check_request(self, novelty_rule: str, embed_only: bool) -> None:
    """QueryError / WorkdirError for a request this model cannot serve (before any work)."""
    if novelty_rule not in ("run", "canal"):
      raise QueryError(f"--novelty-rule {novelty_rule!r}: use 'run' (the run's rule) or 'canal'.")
    if not embed_only and not self.is_annotation:
      raise WorkdirError(f"workdir {self.workdir!r} is not an annotation run (no class head); "
                         "use `gil-jax embed` (model.embed), or train with `gil-jax train "
                         "--config configs/canal_*.py`.")

  def embed(self, adata: ad.AnnData, *, inplace: bool = False, **kw) -> ad.AnnData | dict:
    """`obsm['X_gil']` (cell embeddings) for `adata`; a copy unless `inplace` (then the summary
    dict is returned). Keywords as `annotate`."""
    return self.annotate(adata, inplace=inplace, embed_only=True, **kw)

  def annotate(self, adata: ad.AnnData, *, layer: str = "", normalisation: str = "auto",
               gene_column: str = "", min_shared_genes: int | None = None,
               novelty_rule: str = "run", inplace: bool = False, embed_only: bool = False,
               majority_voting: bool = False) -> ad.AnnData | dict:
    """Cell types of an in-memory AnnData: `obs['gil_cell_type']` (the most probable label),
    `obs['gil_confidence']` (its probability), `obs['gil_novel']` and
    `obs['gil_novelty_score']` (the novelty rule: the run's saved constants by default, or
    novelty_rule='canal' for CANAL's transductive rule on this query), `obsm['gil_probabilities']`
    (columns: `uns['gil']['classes']`), `obsm['X_gil']`; with `majority_voting`, also
    `obs['gil_over_clustering']` (clusters of a kNN graph of X_gil) and
    `obs['gil_majority_voting']` (each cluster's most frequent label). Returns an annotated copy,
    or with
    `inplace=True` writes into `adata` and returns the summary dict."""
    self.check_request(novelty_rule, embed_only)
    config = self.config
    data = anndata_io.from_anndata(adata.copy(), layer=layer or None,
                                   gene_column=gene_column or None, name="query")
    mat = adata.layers[layer] if layer else adata.X
    totals = np.asarray(sp.csr_matrix(mat).sum(axis=1)).ravel()
    kept = np.flatnonzero(totals > 0)
    norm = detect_normalisation(data, "query") if normalisation == "auto" else normalisation
    data = normalise_values(data, norm, "query", reference_depth=self.is_annotation)
    min_shared = (min_shared_genes if min_shared_genes is not None else
                  int(config.get("canal", {}).get("min_shared_genes", 50)))
    c2r, summary = gene_mapping(data.gene_ids, self.vocab, self.active_genes, min_shared)
    out = self._outputs(data, c2r)

    result = adata if inplace else adata.copy()
    emb = np.full((adata.n_obs, out["cell_emb"].shape[1]), np.nan, np.float32)
    emb[kept] = out["cell_emb"]
    result.obsm["X_gil"] = emb
    summary.update(cells=int(adata.n_obs), cells_without_expression=int(adata.n_obs - len(kept)),
                   normalisation=norm)
    uns = {"workdir": self.workdir, "package_version": _version(),
           "stages_trained": self.done, "training_datasets": self.info()["datasets"]}
    if not embed_only:
      active = np.asarray(self.state["active_classes"], bool)
      names = np.asarray(self.classes + [UNASSIGNED], object)
      calib = self.meta.get("novelty") if novelty_rule == "run" else None
      if calib:  # the run's validation-rule constants: each cell on its own
        nov = novelty.apply_calibration(out["logits"], active, calib, m=out["m"])
      else:  # CANAL's transductive rule on this query set
        c = config.canal
        nov = novelty.canal_rule(out["logits"], out["m"], self.state["params"]["head"], active,
                                 temperature=float(c.novelty_temperature),
                                 n_mix=int(c.novelty_mix),
                                 key=jax.random.PRNGKey(int(config.seed)))
      probs = out["probs"][:, :len(self.classes)]
      best = np.argmax(out["logits"], -1)
      cell_type = np.full(adata.n_obs, UNASSIGNED, object)
      cell_type[kept] = names[best]
      confidence = np.zeros(adata.n_obs, np.float32)
      confidence[kept] = probs[np.arange(len(best)), best]
      novel = np.zeros(adata.n_obs, bool)
      novel[kept] = nov.unassigned
      score = np.full(adata.n_obs, np.nan, np.float32)
      score[kept] = nov.score
      prob_full = np.zeros((adata.n_obs, len(self.classes)), np.float32)
      prob_full[kept] = probs
      result.obs["gil_cell_type"] = cell_type.astype(str)
      result.obs["gil_confidence"] = confidence
      result.obs["gil_novel"] = novel
      result.obs["gil_novelty_score"] = score
      result.obsm["gil_probabilities"] = prob_full
      if majority_voting:  # celltypist's convention: a separate column, opt-in
        clusters = np.full(adata.n_obs, -1, np.int64)
        clusters[kept] = voting.over_cluster(out["cell_emb"], seed=int(config.seed))
        voted = np.full(adata.n_obs, UNASSIGNED, object)
        voted[kept] = voting.majority_vote(names[best], clusters[kept])
        result.obs["gil_over_clustering"] = pd.Categorical(clusters.astype(str))
        result.obs["gil_majority_voting"] = voted.astype(str)
        summary.update(over_clusters=int(len(np.unique(clusters[kept]))),
                       majority_voting_changed=int(np.sum(voted[kept] != names[best])))
      summary.update(novelty_rule=calib["rule"] if calib else "canal",
                     novelty_threshold=round(float(nov.threshold), 4),
                     novel=int(novel.sum()), unlabelled_empty_cells=int(adata.n_obs - len(kept)))
      uns.update(classes=self.classes, novelty_rule=summary["novelty_rule"],
                 novelty_threshold=summary["novelty_threshold"])
    if self.partial:
      summary["partial_model"] = f"trained {self.done} of {self.total} stages (--allow-partial)"
    result.uns["gil"] = {**uns, **summary}
    return summary if inplace else result


def _version() -> str:
  from gil_jax import __version__
  return __version__


def annotate_file(workdir: str, input_path: str, output_path: str, *, embed_only: bool = False,
                  layer: str = "", normalisation: str = "auto", gene_column: str = "",
                  min_shared_genes: int | None = None, novelty_rule: str = "run",
                  overwrite: bool = False, allow_partial: bool = False,
                  majority_voting: bool = False) -> dict:
  """`gil-jax annotate` / `embed`: `Model(workdir).annotate(...)` of the query file, written to
  a new file (atomically; the input is only read). Returns the summary."""
  check_output(input_path, output_path, overwrite)
  if not os.path.isfile(input_path):
    raise QueryError(f"query file not found: {input_path!r}")
  model = Model(workdir, allow_partial=allow_partial)
  model.check_request(novelty_rule, embed_only)
  try:
    adata = ad.read_h5ad(input_path)
  except Exception as e:  # noqa: BLE001 -- any read failure means the query is unusable
    raise anndata_io.unreadable_file_error(input_path, e) from e
  summary = model.annotate(adata, layer=layer, normalisation=normalisation,
                           gene_column=gene_column, min_shared_genes=min_shared_genes,
                           novelty_rule=novelty_rule, inplace=True, embed_only=embed_only,
                           majority_voting=majority_voting)
  write_atomic(adata, output_path)
  summary["output"] = output_path
  return summary


__all__ = ["Model", "annotate_file", "QueryError", "DataError", "WorkdirError"]
