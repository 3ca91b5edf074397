"""Annotator pieces: params (backbone + class head), optimizer with a trainable mask, the train
state and the pure jitted steps (train with inactive classes/genes masked; eval)."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct

from gil_jax import checkpoint
from gil_jax.batch import Batch, empty_batch
from gil_jax.canal import head as head_lib
from gil_jax.canal.loss import AnnotationContext
from gil_jax.data.vocab import GeneVocab
from gil_jax.models import build_model
from gil_jax.train.state import make_optimizer, mask_gene_rows

TRAINABLE = ("all", "head", "last_blocks")


@struct.dataclass
class AnnotState:
  step: jnp.ndarray
  params: Any                  # {'backbone': ..., 'head': ...}
  opt_state: Any
  transforms: Any
  rng: jnp.ndarray
  active_genes: jnp.ndarray    # bool[gene capacity]
  active_classes: jnp.ndarray  # bool[class capacity]
  bank: Any                    # dict of int32[L] arrays (see bank.py)


def init_params(backbone, config: ml_collections.ConfigDict, key) -> dict:
  """Backbone + head params, initialised in one jitted call (eager flax init dispatches and
  compiles hundreds of tiny ops: ~17 s on a loaded 2-core CPU against ~2 s jitted)."""
  b = empty_batch(config.batch.batch_size, config.batch.n_tokens)
  c = config.canal

  def init(key):
    kb, kd, kh = jax.random.split(key, 3)
    bparams = backbone.init({"params": kb, "dropout": kd}, b.gene_ids, b.values, b.token_mask,
                            b.pred_mask, False)["params"]
    emb = jax.eval_shape(lambda p: backbone.apply({"params": p}, b.gene_ids, b.values,
                                                  b.token_mask, b.pred_mask, False),
                         bparams)["cell_emb"].shape[-1]
    return {"backbone": bparams,
            "head": head_lib.init_head(kh, emb, (c.hidden1, c.hidden2), c.max_classes)}

  # runs once: XLA's backend optimisations only cost compile time here (same values)
  return jax.jit(init).lower(key).compile({"xla_backend_optimization_level": 0})(key)


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


def make_tx(config: ml_collections.ConfigDict, params: dict) -> optax.GradientTransformation:
  labels = trainable_labels(params, config.canal.trainable, config.canal.trainable_blocks)
  return optax.multi_transform({"train": make_optimizer(config.train),
                                "freeze": optax.set_to_zero()}, labels)


def mask_backbone_genes(tree: dict, active_genes) -> dict:
  return dict(tree, backbone=mask_gene_rows(tree["backbone"], active_genes))


def make_train_step(loss_fn, tx: optax.GradientTransformation):
  """Pure step: (state, inputs) -> (state, metrics); shapes never depend on the active sets."""

  def step(state: AnnotState, inputs: dict[str, Batch]):
    ctx = AnnotationContext(rng=jax.random.fold_in(state.rng, state.step),
                            active_genes=state.active_genes, step=state.step,
                            active_classes=state.active_classes)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.transforms, inputs, ctx)
    grads = mask_backbone_genes(grads, state.active_genes)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = mask_backbone_genes(updates, state.active_genes)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(aux["metrics"], loss=loss, grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


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
