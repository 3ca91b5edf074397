"""Gene distillation (GIL paper Eq. 10) and a feature-level variant.

State: ``teacher`` (a frozen copy of the params at the previous stage end), ``has_teacher``
(float32 scalar, 0 until the first stage ends) and ``old_rows`` (bool[capacity]: gene-table rows
that were active when the teacher was snapshot, i.e. genes the teacher was trained on).

Term, on the main batch, with the teacher run in eval mode on the same masked input but with
only its own genes as tokens (the current stage's new genes are dropped: the teacher never
learned them):

* ``mode='output'`` (paper): ``weight * masked_mean((pred - pred_teacher)^2)`` over hidden
  positions of *base* genes, i.e. genes whose row is in ``old_rows`` (the new genes T_k are
  excluded, paper §"Gene distillation"); weight λ = 5 by default.
* ``mode='feature'``: ``weight * mean_cells(mean_d (cell_emb - cell_emb_teacher)^2)``.
* ``mode='both'``: the sum of the two (feature term scaled by ``feature_weight``).

At the first stage there is no teacher: the term is multiplied by ``has_teacher = 0`` and is
exactly 0 (a documented no-op, never NaN). ``config.distill.*`` holds the hyperparameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from gil_jax.losses import objectives, registry
from gil_jax.losses.anchors import check_weight
from gil_jax.losses.transforms import LossTransform, StageEnd, add_term
from gil_jax.models import build_model

MODES = ("output", "feature", "both")


@registry.register("distill")
def distill(config: ml_collections.ConfigDict) -> LossTransform:
  c = config.distill
  weight = check_weight("distill", c.weight)
  feature_weight = check_weight("distill", c.feature_weight)
  if c.mode not in MODES:
    raise ValueError(f"unknown config.distill.mode {c.mode!r}; known: {MODES}")
  mode = c.mode
  capacity = int(config.genes.capacity)
  model = build_model(config.model, capacity, config.train.likelihood)

  def init(params):
    return {"teacher": jax.tree.map(jnp.array, params),
            "has_teacher": jnp.zeros((), jnp.float32),
            "old_rows": jnp.zeros((capacity,), bool)}

  def consolidate(own, params, end: StageEnd):
    del own
    return {"teacher": jax.tree.map(jnp.array, params),
            "has_teacher": jnp.ones((), jnp.float32),
            "old_rows": jnp.asarray(end.active_genes, bool)}

  def term(params, own, inputs, ctx, aux):
    del params
    batch, student = inputs["main"], aux["out"]
    old = own["old_rows"]
    teacher_active = ctx.active_genes & old
    teacher = objectives.apply_model(model, jax.lax.stop_gradient(own["teacher"]), batch,
                                     teacher_active, train=False, rng=ctx.rng)
    teacher = jax.lax.stop_gradient(teacher)
    total = jnp.zeros((), jnp.float32)
    if mode in ("output", "both"):
      mask = objectives.prediction_mask(batch, ctx.active_genes) & old[batch.gene_ids]
      total += weight * objectives.masked_mean((student["pred"] - teacher["pred"]) ** 2, mask)
    if mode in ("feature", "both"):
      fw = weight if mode == "feature" else feature_weight
      per_cell = jnp.mean((student["cell_emb"] - teacher["cell_emb"]) ** 2, axis=-1)
      total += fw * objectives.masked_mean(per_cell, batch.cell_mask)
    return own["has_teacher"] * total

  return LossTransform(init=init, consolidate=consolidate,
                       wrap=lambda loss_fn: add_term(loss_fn, "distill", term))
