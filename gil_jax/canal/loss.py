"""CANAL losses: label-smoothed CE over active classes, and the distillation transforms.

* ``canal_rkd``: representation distillation, λ_t · mean((h − h_old)²) with
  λ_t = λ · |old classes| / |all classes| (CANAL §2.4), teacher = model at the end of the
  previous stage (frozen), applied to every cell of the batch (new and replayed).
* ``canal_lwf``: LwF-style logit distillation on the old classes (baseline), temperature T,
  KL(softmax(z_old/T) || softmax(z/T)) · T².

Both are `LossTransform`s of gil_jax/losses/transforms.py, registered in the registry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from gil_jax.canal import head as head_lib
from gil_jax.losses import registry
from gil_jax.losses.transforms import LossContext, LossTransform, StageEnd, add_term
from gil_jax.models import build_model


def smoothed_ce(logits: jnp.ndarray, labels: jnp.ndarray, active: jnp.ndarray,
                eps: float) -> jnp.ndarray:
  """Per-cell label-smoothed CE; q = (1-ε)·onehot + ε/K_t over the K_t active classes."""
  k_t = jnp.maximum(jnp.sum(active), 1).astype(jnp.float32)
  onehot = jax.nn.one_hot(jnp.maximum(labels, 0), logits.shape[-1], dtype=jnp.float32)
  q = (1.0 - eps) * onehot + eps * active.astype(jnp.float32) / k_t
  return -jnp.sum(q * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def lambda_t(lam: float, n_old, n_all) -> jnp.ndarray:
  """CANAL's distillation weight λ·|old|/|all| (0 when there are no old classes)."""
  return lam * jnp.asarray(n_old, jnp.float32) / jnp.maximum(jnp.asarray(n_all, jnp.float32), 1.0)


def _cell_mean(x: jnp.ndarray, cell_mask: jnp.ndarray) -> jnp.ndarray:
  w = cell_mask.astype(jnp.float32)
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def drop_tokens(batch, max_share: float, rng: jax.Array):
  """`batch` with a random share of each cell's tokens hidden (the share drawn per cell from
  U(0, max_share); a cell's first token always stays), so that a cell is classified from
  whatever part of its profile a study happens to measure."""
  k_share, k_keep = jax.random.split(rng)
  share = jax.random.uniform(k_share, (batch.token_mask.shape[0], 1)) * max_share
  keep = jax.random.uniform(k_keep, batch.token_mask.shape) >= share
  first = jnp.cumsum(batch.token_mask, axis=-1) == 1
  return batch.replace(token_mask=batch.token_mask & (keep | first))


def make_task_loss(backbone, label_smoothing: float, token_dropout: float = 0.0):
  """LossFn: label-smoothed CE on labelled real cells of inputs['main'] (aux['out'] = outputs).

  With `token_dropout` > 0 the model sees each cell through `drop_tokens`; the loss transforms
  reading aux['out'] (CANAL's distillation, LwF) then compare that view with a teacher that
  sees the whole cell, and EWC's Fisher is taken on the dropped view.
  """
  if not 0.0 <= token_dropout < 1.0:
    raise ValueError(f"config.canal.token_dropout={token_dropout} must be in [0, 1): the largest "
                     "share of a cell's tokens hidden during training (0 = off).")

  def loss_fn(params, tstates, inputs, ctx: LossContext):
    del tstates
    batch, rng = inputs["main"], ctx.rng
    if token_dropout > 0:
      rng, k_drop = jax.random.split(rng)
      batch = drop_tokens(batch, token_dropout, k_drop)
    out = head_lib.apply(backbone, params, batch, ctx.active_genes, ctx.active_classes,
                         train=True, rng=rng)
    valid = batch.cell_mask & (batch.labels >= 0)
    ce = _cell_mean(smoothed_ce(out["logits"], batch.labels, ctx.active_classes,
                                label_smoothing), valid)
    acc = _cell_mean((jnp.argmax(out["logits"], -1) == batch.labels).astype(jnp.float32), valid)
    return ce, {"metrics": {"loss/ce": ce, "train_accuracy": acc}, "out": out}

  return loss_fn


def _teacher_state(params) -> dict:
  cap = params["head"]["cls"]["b"].shape[0]
  return {"teacher": jax.tree.map(jnp.array, params), "n_old": jnp.zeros((), jnp.float32),
          "old_classes": jnp.zeros((cap,), bool)}


def _consolidate(state, params, end: StageEnd):
  active = end.active_classes
  if active is None:
    raise ValueError("canal distillation needs a class head (StageEnd.active_classes); use it "
                     "with an annotation config (config.task='annotation').")
  active = jnp.asarray(active, bool)
  return {"teacher": jax.tree.map(jnp.array, params),
          "n_old": jnp.sum(active).astype(jnp.float32), "old_classes": active}


def _backbone(config: ml_collections.ConfigDict):
  return build_model(config.model, config.genes.capacity, "mse")


@registry.register("canal_rkd")
def rkd_transform(config: ml_collections.ConfigDict) -> LossTransform:
  """Representation KD with CANAL's λ_t (config.canal.distill_weight = λ)."""
  backbone = _backbone(config)
  lam = float(config.canal.distill_weight)

  def term(params, state, inputs, ctx, aux):
    del params
    batch = inputs["main"]
    t_out = head_lib.apply(backbone, state["teacher"], batch, ctx.active_genes,
                           ctx.active_classes, train=False, rng=ctx.rng)
    h_old = jax.lax.stop_gradient(t_out["h"])
    mse = _cell_mean(jnp.mean((aux["out"]["h"] - h_old) ** 2, axis=-1), batch.cell_mask)
    return lambda_t(lam, state["n_old"], jnp.sum(ctx.active_classes)) * mse

  return LossTransform(init=_teacher_state, consolidate=_consolidate,
                       wrap=lambda loss_fn: add_term(loss_fn, "canal_rkd", term))


@registry.register("canal_lwf")
def lwf_transform(config: ml_collections.ConfigDict) -> LossTransform:
  """LwF logit distillation on old classes (weight config.canal.lwf_weight, T=lwf_temperature)."""
  backbone = _backbone(config)
  weight, temp = float(config.canal.lwf_weight), float(config.canal.lwf_temperature)

  def term(params, state, inputs, ctx, aux):
    del params
    batch = inputs["main"]
    t_out = head_lib.apply(backbone, state["teacher"], batch, ctx.active_genes,
                           state["old_classes"], train=False, rng=ctx.rng)
    old = state["old_classes"]
    t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(t_out["logits"]) / temp, -1)
    s_logp = jax.nn.log_softmax(head_lib.mask_logits(aux["out"]["logits"], old) / temp, -1)
    kl = jnp.sum(jnp.where(old, jnp.exp(t_logp) * (t_logp - s_logp), 0.0), axis=-1)
    on = (state["n_old"] > 0).astype(jnp.float32)
    return on * weight * temp ** 2 * _cell_mean(kl, batch.cell_mask)

  return LossTransform(init=_teacher_state, consolidate=_consolidate,
                       wrap=lambda loss_fn: add_term(loss_fn, "canal_lwf", term))
