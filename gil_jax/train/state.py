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


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam(W) with optional linear warm-up and global-norm clipping."""
  lr = train_cfg.learning_rate
  if train_cfg.warmup_steps > 0:
    lr = optax.linear_schedule(0.0, train_cfg.learning_rate, train_cfg.warmup_steps)
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
