"""Quadratic parameter anchors: L2 and MAS (and the penalty EWC shares).

Every anchor transform keeps ``{'anchor': params*, 'omega': importance}`` (both shaped like the
params, so fixed shapes from `init` and sharded like the params) and adds

    weight / 2 * sum_i omega_i * (theta_i - anchor_i)^2 .

Before the first consolidation omega is all zeros, so the term is exactly 0 (a no-op at stage 0).
Importance of a gene-table row is zero unless the row was active when the stage ended: a row the
model never trained on is free, an old gene's row is protected.

* ``l2``  -- omega = 1 on every trained parameter (plain L2 towards the previous stage's params).
* ``mas`` -- Memory Aware Synapses (Aljundi et al. 2018): omega = mean over the stage's batches of
             |d mean_j(pred_j^2) / d theta| at scored positions (unsupervised, output sensitivity);
             accumulated over stages (omega <- gamma * omega + omega_new).
* (SI needs a per-step path integral, which a pure loss transform cannot accumulate; not offered.)

Hyperparameters live in ``config.<name>`` (e.g. ``--config.l2.weight=10``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gil_jax.losses import objectives, registry
from gil_jax.losses.transforms import LossContext, LossTransform, StageEnd, add_term
from gil_jax.models import build_model
from gil_jax.core.state import mask_gene_rows


def quadratic_penalty(params: Any, anchor: Any, omega: Any) -> jnp.ndarray:
  """sum_i omega_i * (params_i - anchor_i)^2 over every leaf (anchor is not differentiated)."""
  terms = jax.tree.map(lambda p, a, o: jnp.sum(o * (p - jax.lax.stop_gradient(a)) ** 2),
                       params, anchor, omega)
  return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def anchor_init(params: Any) -> dict:
  """{'anchor': copy of params, 'omega': zeros}: a zero penalty until the first stage ends."""
  return {"anchor": jax.tree.map(jnp.array, params),
          "omega": jax.tree.map(jnp.zeros_like, params)}


def anchor_wrap(name: str, weight: float):
  def term(params, own, inputs, ctx, aux):
    del inputs, ctx, aux
    return 0.5 * weight * quadratic_penalty(params, own["anchor"], own["omega"])
  return lambda loss_fn: add_term(loss_fn, name, term)


def check_weight(name: str, weight: float) -> float:
  weight = float(weight)
  if not np.isfinite(weight) or weight < 0:
    raise ValueError(f"config.{name}.weight={weight} must be a finite number >= 0")
  return weight


def check_gamma(name: str, gamma: float) -> float:
  gamma = float(gamma)
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f"config.{name}.gamma={gamma} must be in [0, 1] (1 = sum over stages, "
                     "< 1 = online decay of older importance)")
  return gamma


def make_ctx(rng: Any, active_genes: Any, active_classes: Any = None) -> LossContext:
  """A LossContext built inside jit (LossContext itself is not a pytree)."""
  return LossContext(rng=rng, active_genes=active_genes, step=jnp.zeros((), jnp.int32),
                     active_classes=active_classes)


def mean_over_batches(fn, end: StageEnd, n_batches: int, params: Any) -> Any:
  """Mean of the pytree fn(params, inputs, rng, active_genes, active_classes) over n_batches of
  the stage (the masks at the stage end, as arrays: one compiled fn serves every stage).

  The dropout key is fold_in(PRNGKey(config seed), stage), so a resumed run computes the same
  statistics and another seed other ones.
  """
  if n_batches < 1:
    raise ValueError(f"need >= 1 batch to estimate importance, got {n_batches}")
  rng = jax.random.fold_in(jax.random.PRNGKey(end.seed), end.stage)
  active = jnp.asarray(end.active_genes)
  classes = None if end.active_classes is None else jnp.asarray(end.active_classes)
  total, n = None, 0
  for inputs in end.batches(n_batches):
    g = fn(params, inputs, rng, active, classes)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
    n += 1
  return jax.tree.map(lambda x: x / n, total)


def update_importance(own: dict, params: Any, new_omega: Any, active_genes: Any,
                      gamma: float) -> dict:
  """omega <- gamma * omega + new (rows inactive at the stage end get none); anchor <- params."""
  new_omega = mask_gene_rows(new_omega, jnp.asarray(active_genes))
  omega = jax.tree.map(lambda o, n: gamma * o + n, own["omega"], new_omega)
  return {"anchor": jax.tree.map(jnp.array, params), "omega": omega}


@registry.register("l2")
def l2(config: ml_collections.ConfigDict) -> LossTransform:
  weight = check_weight("l2", config.l2.weight)

  def consolidate(own, params, end: StageEnd):
    ones = jax.tree.map(jnp.ones_like, params)
    return update_importance(own, params, ones, end.active_genes, gamma=0.0)

  return LossTransform(init=anchor_init, consolidate=consolidate,
                       wrap=anchor_wrap("l2", weight))


@registry.register("mas")
def mas(config: ml_collections.ConfigDict) -> LossTransform:
  c = config.mas
  weight, gamma = check_weight("mas", c.weight), check_gamma("mas", c.gamma)
  model = build_model(config.model, config.genes.capacity, config.train.likelihood)

  def output_norm(params, inputs, rng, active, active_classes):
    del active_classes
    batch = inputs["main"]
    out = objectives.apply_model(model, params, batch, active, train=False, rng=rng)
    return objectives.masked_mean(out["pred"] ** 2, objectives.prediction_mask(batch, active))

  abs_grad = jax.jit(lambda *a: jax.tree.map(jnp.abs, jax.grad(output_norm)(*a)))

  def consolidate(own, params, end: StageEnd):
    omega = mean_over_batches(abs_grad, end, int(c.n_batches), params)
    return update_importance(own, params, omega, end.active_genes, gamma)

  return LossTransform(init=anchor_init, consolidate=consolidate,
                       wrap=anchor_wrap("mas", weight))
