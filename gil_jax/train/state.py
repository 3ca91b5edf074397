"""The train state pytree and the optimizer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from gil_jax.models.common import is_gene_param


@struct.dataclass
class TrainState:
  """Everything that changes during training, as one checkpointable pytree."""
  step: jnp.ndarray          # int32 scalar, global step over all stages
  params: Any
  opt_state: Any
  transforms: Any            # dict: transform name -> its state (teacher, Fisher, buffer, ...)
  rng: jnp.ndarray           # uint32[2] base key; step keys are fold_in(rng, step)
  active_genes: jnp.ndarray  # bool[capacity]: gene-table rows that may be read and updated


SCHEDULES = ("constant", "cosine")


def learning_rate(train_cfg: ml_collections.ConfigDict, decay_steps: int | None = None):
  """Peak `learning_rate` after a linear warm-up of `warmup_steps`; then constant, or cosine
  decay to 10 % of the peak over `train.decay_steps` (or the caller's `decay_steps`, e.g. a
  stage's length: the optimizer is re-created at every stage, so the schedule restarts)."""
  peak, warm = train_cfg.learning_rate, int(train_cfg.warmup_steps)
  schedule = train_cfg.get("schedule", "constant")
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown config.train.schedule {schedule!r}; known: {SCHEDULES}")
  if schedule == "constant":
    return optax.linear_schedule(0.0, peak, warm) if warm > 0 else peak
  total = int(train_cfg.get("decay_steps", 0)) or int(decay_steps or 0)
  if total <= 0:
    raise ValueError("config.train.schedule='cosine' needs the number of steps to decay over: "
                     "set --config.train.decay_steps=N (or use --config.train.schedule=constant)")
  return optax.warmup_cosine_decay_schedule(0.0, peak, max(warm, 0), max(total, warm + 1),
                                            end_value=0.1 * peak)


def make_optimizer(train_cfg: ml_collections.ConfigDict,
                   decay_steps: int | None = None) -> optax.GradientTransformation:
  """Adam(W) with the `learning_rate` schedule and optional global-norm clipping."""
  lr = learning_rate(train_cfg, decay_steps)
  if train_cfg.optimizer == "adam":
    opt = optax.adam(lr)
    if train_cfg.weight_decay:
      opt = optax.chain(optax.add_decayed_weights(train_cfg.weight_decay), opt)  # coupled L2
  elif train_cfg.optimizer == "adamw":
    opt = optax.adamw(lr, weight_decay=train_cfg.weight_decay)
  else:
    raise ValueError(f"unknown config.train.optimizer {train_cfg.optimizer!r}; known: adam, adamw")
  if train_cfg.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), opt)
  return opt


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def mask_gene_rows(tree: Any, active_genes: jnp.ndarray) -> Any:
  """Zeroes the rows of inactive genes in every gene-table-shaped leaf of a params-like tree."""

  def mask(path, x):
    if not is_gene_param(_path_names(path)):
      return x
    m = active_genes.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(m, x, jnp.zeros_like(x))

  return jax.tree_util.tree_map_with_path(mask, tree)


def init_state(params: Any, tx: optax.GradientTransformation, transform_states: Any,
               rng: jnp.ndarray, capacity: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    transforms=transform_states, rng=rng,
                    active_genes=jnp.zeros((capacity,), bool))
