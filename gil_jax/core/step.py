"""Pure, jit-compiled step functions: train, evaluate (gene-wise regression) and embed."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from gil_jax.batch import Batch
from gil_jax.losses import objectives
from gil_jax.losses.transforms import LossContext
from gil_jax.core.state import TrainState, mask_gene_rows


def make_train_step(loss_fn: Callable[..., Any], tx: optax.GradientTransformation):
  """(state, inputs) -> (state, metrics). `inputs` is a dict of Batches ('main' + extras).

  Inactive gene rows get neither gradient (so optimizer moments stay zero) nor update (so
  weight decay does not touch them either).
  """

  def train_step(state: TrainState, inputs: dict[str, Batch]):
    ctx = LossContext(rng=jax.random.fold_in(state.rng, state.step),
                      active_genes=state.active_genes, step=state.step,
                      active_classes=state.active_classes)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, aux), grads = grad_fn(state.params, state.transforms, inputs, ctx)
    grads = mask_gene_rows(grads, state.active_genes)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = mask_gene_rows(updates, state.active_genes)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(aux["metrics"], loss=loss, grad_norm=optax.tree.norm(grads),
                   cells=jnp.sum(inputs["main"].cell_mask))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_regression_eval_step(model, likelihood: str, normalisation: str, n_groups: int):
  """(params, batch, active_genes, row_group) -> (sum_sq[n_groups], count[n_groups]).

  `row_group[r]` is the stage whose genes row r is scored for (-1: not scored). Squared errors
  at hidden positions are pooled per group, so MSE = sum_sq / count.
  """

  def eval_step(params, batch: Batch, active_genes, row_group):
    out = objectives.apply_model(model, params, batch, active_genes, train=False,
                                 rng=jax.random.PRNGKey(0))
    pred = objectives.predicted_values(out, batch, likelihood, normalisation)
    mask = objectives.prediction_mask(batch, active_genes)
    group = jnp.where(mask, row_group[batch.gene_ids], -1)
    group = jnp.where(group < 0, n_groups, group).reshape(-1)
    sq = ((pred - batch.targets) ** 2).reshape(-1)
    sum_sq = jax.ops.segment_sum(sq, group, num_segments=n_groups + 1)[:n_groups]
    count = jax.ops.segment_sum(jnp.ones_like(sq), group, num_segments=n_groups + 1)[:n_groups]
    return sum_sq, count

  return eval_step


def apply_visible(model, params, batch: Batch, active_genes, *, train: bool = False,
                  rng=None) -> dict[str, Any]:
  """Model outputs for a fully visible batch (nothing hidden: values = targets), e.g. to embed
  cells or to classify them."""
  batch = batch.replace(pred_mask=jnp.zeros_like(batch.pred_mask), values=batch.targets)
  return objectives.apply_model(model, params, batch, active_genes, train=train,
                                rng=jax.random.PRNGKey(0) if rng is None else rng)


def make_embed_step(model):
  """(params, batch, active_genes) -> cell embeddings [B, E] (nothing hidden, eval mode)."""

  def embed_step(params, batch: Batch, active_genes):
    return apply_visible(model, params, batch, active_genes)["cell_emb"]

  return embed_step
