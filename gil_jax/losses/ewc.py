"""Elastic weight consolidation (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018).

State ``{'anchor': params*, 'omega': diagonal Fisher}`` (shaped like the params). At a stage end
the diagonal empirical Fisher is estimated from ``config.<name>.n_batches`` batches of that
stage's data as the mean squared gradient of the un-wrapped task loss (minibatch gradients, as
in SequeL's JAX EWC). A gene-table row the stage never saw gets zero gradient, hence zero Fisher
(and rows inactive at the stage end are masked out explicitly): new genes are free, old genes'
rows are protected. Penalty: ``weight / 2 * sum F (theta - theta*)^2`` (0 before stage 0 ends).

* ``ewc``        -- F accumulates over stages (gamma = 1), anchor = latest stage end.
* ``online_ewc`` -- F <- gamma * F + F_new (``config.online_ewc.gamma``, default 0.9).

``normalize=True`` divides each stage's F_new by its largest entry, so ``weight`` does not
depend on the loss scale or the batch size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from gil_jax.losses import registry
from gil_jax.losses.anchors import (anchor_init, anchor_wrap, check_gamma, check_weight,
                                    make_ctx, mean_over_batches, update_importance)
from gil_jax.losses.transforms import LossTransform, StageEnd


@functools.partial(jax.jit, static_argnums=0)
def _sq_grad(task_loss, params, inputs, rng, active, active_classes):
  """Squared gradient of `task_loss` at the stage end's masks (arrays, so a stage's own active
  classes reach the loss; static: compiled once per task loss)."""
  g = jax.grad(lambda q: task_loss(q, {}, inputs, make_ctx(rng, active, active_classes))[0])(
      params)
  return jax.tree.map(jnp.square, g)


def _ewc(name: str, config: ml_collections.ConfigDict) -> LossTransform:
  c = config[name]
  weight, gamma = check_weight(name, c.weight), check_gamma(name, c.gamma)
  n_batches, normalize = int(c.n_batches), bool(c.normalize)
  if n_batches < 1:
    raise ValueError(f"config.{name}.n_batches={n_batches} must be >= 1")

  def consolidate(own, params, end: StageEnd):
    fisher = mean_over_batches(functools.partial(_sq_grad, end.task_loss), end, n_batches, params)
    if normalize:
      top = jnp.max(jnp.stack([jnp.max(x) for x in jax.tree.leaves(fisher)]))
      fisher = jax.tree.map(lambda x: x / jnp.maximum(top, 1e-30), fisher)
    return update_importance(own, params, fisher, end.active_genes, gamma)

  return LossTransform(init=anchor_init, consolidate=consolidate, wrap=anchor_wrap(name, weight))


@registry.register("ewc")
def ewc(config: ml_collections.ConfigDict) -> LossTransform:
  return _ewc("ewc", config)


@registry.register("online_ewc")
def online_ewc(config: ml_collections.ConfigDict) -> LossTransform:
  return _ewc("online_ewc", config)
