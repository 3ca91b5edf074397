"""Annotator pieces: params (backbone + class head), the trainable subset, the eval step, and
loading a backbone from a finished workdir."""

from __future__ import annotations

import functools
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from gil_jax import checkpoint
from gil_jax.batch import empty_batch
from gil_jax.canal import head as head_lib
from gil_jax.data.vocab import GeneVocab
from gil_jax.models import build_model

TRAINABLE = ("all", "head", "last_blocks")


def init_params(backbone, config: ml_collections.ConfigDict, key) -> dict:
  """Backbone + head params (pure and traceable: the runner jits it with the state's
  shardings)."""
  b = empty_batch(config.batch.batch_size, config.batch.n_tokens)
  c = config.canal
  kb, kd, kh = jax.random.split(key, 3)
  bparams = backbone.init({"params": kb, "dropout": kd}, b.gene_ids, b.values, b.token_mask,
                          b.pred_mask, False)["params"]
  emb = jax.eval_shape(lambda p: backbone.apply({"params": p}, b.gene_ids, b.values,
                                                b.token_mask, b.pred_mask, False),
                       bparams)["cell_emb"].shape[-1]
  return {"backbone": bparams,
          "head": head_lib.init_head(kh, emb, (c.hidden1, c.hidden2), c.max_classes,
                                     backbone.capacity if c.gene_linear else 0)}


def _block_names(bparams: dict) -> list[str]:
  """Backbone blocks in depth order (transformer 'layer_i', exceiver 'process_i')."""
  blocks = [k for k in bparams if k.startswith(("layer_", "process_"))]
  return sorted(blocks, key=lambda k: int(k.rsplit("_", 1)[1]))


def trainable_labels(params: dict, mode: str, n_blocks: int) -> dict:
  """'train' / 'freeze' per leaf: head only, head + last `n_blocks` blocks (+ final norm), all."""
  if mode not in TRAINABLE:
    raise ValueError(f"unknown config.canal.trainable {mode!r}; known: {TRAINABLE}")
  last = set(_block_names(params["backbone"])[-n_blocks:]) if n_blocks > 0 else set()
  last |= {"latent_norm"}

  def label(path, _):
    names = [str(getattr(k, "key", k)) for k in path]
    if names[0] == "head" or mode == "all":
      return "train"
    if mode == "last_blocks" and len(names) > 1 and names[1] in last:
      return "train"
    return "freeze"

  return jax.tree_util.tree_map_with_path(label, params)


def make_eval_step(backbone):
  """(params, batch, active_genes, active_classes) -> dict of logits, probs, m, h, cell_emb."""

  def step(params, batch, active_genes, active_classes):
    return head_lib.apply(backbone, params, batch, active_genes, active_classes, train=False,
                          rng=jax.random.PRNGKey(0))

  return step


@functools.lru_cache(maxsize=8)
def _cached_eval_step(model_json: str, capacity: int):
  model_cfg = ml_collections.ConfigDict(json.loads(model_json))
  return jax.jit(make_eval_step(build_model(model_cfg, capacity, "mse")))


def eval_step_for(model_cfg, capacity: int):
  """The jitted eval step of a backbone config, shared by training runs and `annotate` in one
  process (same function object, so XLA compilations are reused across calls)."""
  cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
  return _cached_eval_step(json.dumps(cfg, sort_keys=True), int(capacity))


# ------------------------------------------------------------- starting from a GIL checkpoint

class WorkdirError(ValueError):
  """A workdir cannot be used (no finished stage, wrong kind)."""


def latest_finished(workdir: str) -> tuple[checkpoint.Checkpointer, int, dict]:
  """(checkpointer, step, meta) of the latest checkpoint whose stage finished."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise WorkdirError(f"workdir {workdir!r} has no checkpoints/ folder; train first (gil-jax "
                       "train / launch.py) or pass the right --workdir.")
  ckpt = checkpoint.Checkpointer(workdir)
  for step in sorted(ckpt.manager.all_steps(), reverse=True):
    meta = ckpt.read_meta(step)
    if meta.get("progress", {}).get("stage_done"):
      return ckpt, step, meta
  ckpt.close()
  raise WorkdirError(f"workdir {workdir!r} has no checkpoint of a finished stage (training was "
                     "interrupted before the first stage ended); resume the training run first.")


def load_gil_params(workdir: str) -> tuple[dict, GeneVocab, dict]:
  """(backbone params, gene vocabulary, saved config) of a gene-incremental (GIL) workdir."""
  ckpt, step, meta = latest_finished(workdir)
  try:
    raw = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    ckpt.close()
  state = raw["state"]
  params = state["params"] if isinstance(state, dict) else state.params
  if "backbone" in params:  # an annotation workdir: reuse its backbone
    params = params["backbone"]
  return jax.tree.map(np.asarray, params), GeneVocab.from_json(meta["vocab"]), meta["config"]
