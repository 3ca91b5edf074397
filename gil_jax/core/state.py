"""The train state pytree and the optimizer, shared by every task (gene-incremental, annotation)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from gil_jax.models.common import GENES


@struct.dataclass
class TrainState:
  """Everything that changes during training, as one checkpointable pytree."""
  step: jnp.ndarray          # int32 scalar, global step over all stages
  params: Any
  opt_state: Any
  transforms: Any            # dict: transform name -> its state (teacher, Fisher, buffer, ...)
  rng: jnp.ndarray           # uint32[2] base key; step keys are fold_in(rng, step)
  active_genes: jnp.ndarray  # bool[capacity]: gene-table rows that may be read and updated
  active_classes: Any = None  # bool[class capacity]: classes of a class head (None: no head)
  extras: Any = struct.field(default_factory=dict)  # task arrays, e.g. the annotation bank


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


def make_optimizer(train_cfg: ml_collections.ConfigDict, decay_steps: int | None = None,
                   trainable: Any = None) -> optax.GradientTransformation:
  """Adam(W) with the `learning_rate` schedule and optional global-norm clipping.

  `trainable`: a params-shaped tree of 'train' / 'freeze' labels; frozen leaves get zero updates
  (e.g. fine-tuning only a head). None trains every leaf.
  """
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
  if trainable is not None:
    opt = optax.multi_transform({"train": opt, "freeze": optax.set_to_zero()}, trainable)
  return opt


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def mask_gene_rows(tree: Any, active_genes: jnp.ndarray) -> Any:
  """Zeroes the rows of inactive genes in every gene-table leaf (under a ``genes`` submodule, at
  any depth: a backbone's own or one nested in a task's params) of a params-like tree."""

  def mask(path, x):
    if GENES not in _path_names(path):
      return x
    m = active_genes.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(m, x, jnp.zeros_like(x))

  return jax.tree_util.tree_map_with_path(mask, tree)


def init_state(params: Any, tx: optax.GradientTransformation, transform_states: Any,
               rng: jnp.ndarray, capacity: int, n_classes: int = 0,
               extras: Any = None) -> TrainState:
  """Step 0, nothing active (stages switch masks on); a class mask when n_classes > 0."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    transforms=transform_states, rng=rng,
                    active_genes=jnp.zeros((capacity,), bool),
                    active_classes=jnp.zeros((n_classes,), bool) if n_classes > 0 else None,
                    extras={} if extras is None else extras)
