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

import os
import tempfile

import anndata as ad
import jax
import ml_collections
import numpy as np
import scipy.sparse as sp
import orbax.checkpoint as ocp

from gil_jax import integrity
from gil_jax.canal import novelty
from gil_jax.canal.labels import UNASSIGNED
from gil_jax.canal.model import WorkdirError, eval_step_for, latest_finished
from gil_jax.canal.stream import normalise_values
from gil_jax.data import anndata_io, batching
from gil_jax.data.anndata_io import DataError
from gil_jax.data.vocab import GeneVocab
from gil_jax.train import step as step_lib
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
    joint = meta.get("config", {}).get("canal", {}).get("mode") == "joint"
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


def annotate_file(workdir: str, input_path: str, output_path: str, *, embed_only: bool = False,
                  layer: str = "", normalisation: str = "auto", gene_column: str = "",
                  min_shared_genes: int | None = None, novelty_rule: str = "run",
                  overwrite: bool = False, allow_partial: bool = False) -> dict:
  if novelty_rule not in ("run", "canal"):
    raise QueryError(f"--novelty-rule {novelty_rule!r}: use 'run' (the run's rule) or 'canal'.")
  check_output(input_path, output_path, overwrite)
  if not os.path.isfile(input_path):
    raise QueryError(f"query file not found: {input_path!r}")
  state, meta = load_run(workdir)
  is_canal = meta.get("kind") == "canal"
  if not embed_only and not is_canal:
    raise WorkdirError(f"workdir {workdir!r} is not an annotation run (no class head); use "
                       "`gil-jax embed`, or train with `gil-jax train --config configs/canal_*.py`.")
  done, total = run_progress(meta)
  partial = done < total
  if partial and not allow_partial:
    raise WorkdirError(f"workdir {workdir!r} finished only {done} of its {total} stages (the "
                       "training run stopped early); resume it with the same training command, "
                       "or pass --allow-partial to use the partly trained model.")
  config = ml_collections.ConfigDict(meta["config"])
  try:
    adata = ad.read_h5ad(input_path)
  except Exception as e:  # noqa: BLE001 -- any read failure means the query is unusable
    raise anndata_io.unreadable_file_error(input_path, e) from e
  data = anndata_io.from_anndata(adata.copy(), layer=layer or None,
                                 gene_column=gene_column or None, name="query")
  mat = adata.layers[layer] if layer else adata.X
  totals = np.asarray(sp.csr_matrix(mat).sum(axis=1)).ravel()
  kept = np.flatnonzero(totals > 0)
  norm = ("log1p_cp10k" if data.is_counts else "none") if normalisation == "auto" else normalisation
  data = normalise_values(data, norm, "query")

  vocab = GeneVocab.from_json(meta["vocab"])
  active_genes = np.asarray(state["active_genes"], bool)
  min_shared = (min_shared_genes if min_shared_genes is not None else
                int(config.get("canal", {}).get("min_shared_genes", 50)))
  c2r, summary = gene_mapping(data.gene_ids, vocab, active_genes, min_shared)

  backbone = build_model(config.model, vocab.capacity, "mse" if is_canal else
                         config.train.likelihood)
  spec = batching.BatchSpec(batch_size=int(config.eval.get("batch_size", 256)),  # non-semantic
                            n_tokens=int(config.batch.n_tokens), mask_ratio=0.0,
                            normalisation="none", sampling=str(config.batch.sampling),
                            zero_tokens=int(config.batch.zero_tokens))
  params = state["params"]
  if is_canal:
    active_classes = np.asarray(state["active_classes"], bool)
    fn = eval_step_for(config.model, vocab.capacity)  # shared with training: compiled once
  else:
    embed = step_lib.make_embed_step(backbone)
    fn, active_classes = jax.jit(lambda p, b, g, a: {"cell_emb": embed(p, b, g)}), None
  outs = []
  for b in batching.eval_batches(data, np.arange(data.n_cells), c2r, spec,
                                 int(config.eval.mask_seed)):
    o = jax.device_get(fn(params, b, active_genes, active_classes))
    outs.append({k: np.asarray(v)[np.asarray(b.cell_mask)] for k, v in o.items()})
  out = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

  result = adata  # a fresh in-memory copy read from disk; the input file is not written
  emb = np.full((adata.n_obs, out["cell_emb"].shape[1]), np.nan, np.float32)
  emb[kept] = out["cell_emb"]
  result.obsm["X_gil"] = emb
  summary.update(cells=int(adata.n_obs), cells_without_expression=int(adata.n_obs - len(kept)),
                 normalisation=norm)
  if not embed_only:
    names = np.asarray(meta["label_vocab"]["names"] + [UNASSIGNED], object)
    c = config.canal
    calib = meta.get("novelty") if novelty_rule == "run" else None
    if calib:  # the run's validation-rule constants (energy range, threshold)
      nov = novelty.apply_calibration(out["logits"], active_classes, calib)
    else:  # CANAL's transductive rule on this query set
      nov = novelty.canal_rule(out["logits"], out["m"], params["head"], active_classes,
                               temperature=float(c.novelty_temperature),
                               n_mix=int(c.novelty_mix), key=jax.random.PRNGKey(int(config.seed)))
    pred = np.where(nov.unassigned, UNASSIGNED, names[np.argmax(out["logits"], -1)])
    cell_type = np.full(adata.n_obs, UNASSIGNED, object)
    cell_type[kept] = pred
    score = np.full(adata.n_obs, np.nan, np.float32)
    score[kept] = nov.score
    result.obs["gil_cell_type"] = cell_type.astype(str)
    result.obs["gil_novelty_score"] = score
    result.obs["gil_unassigned"] = cell_type == UNASSIGNED
    summary.update(novelty_rule=calib["rule"] if calib else "canal",
                   novelty_threshold=round(float(nov.threshold), 4),
                   unassigned=int(np.sum(cell_type == UNASSIGNED)))
  if partial:
    summary["partial_model"] = f"trained {done} of {total} stages (--allow-partial)"
  result.uns["gil"] = {"workdir": os.path.abspath(workdir), **{k: v for k, v in summary.items()}}
  write_atomic(result, output_path)
  summary["output"] = output_path
  return summary


__all__ = ["annotate_file", "QueryError", "DataError", "WorkdirError"]
