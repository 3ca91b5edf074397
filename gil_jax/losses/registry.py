"""Loss transforms and method presets by name, so a config line picks and combines them."""

from __future__ import annotations

from typing import Callable

import ml_collections

from gil_jax.losses import transforms

# name -> builder(config) -> LossTransform. Methods modules register themselves here.
TRANSFORMS: dict[str, Callable[[ml_collections.ConfigDict], transforms.LossTransform]] = {}

# method preset -> transform names (applied in order).
METHODS: dict[str, tuple[str, ...]] = {
    "baseline": (),                    # Eq. 7: sequential training, no mitigation
    "replay": ("replay",),             # Eq. 9 (config.replay)
    "distill": ("distill",),           # Eq. 10 (config.distill; mode='feature' for embeddings)
    "ewc": ("ewc",),                   # config.ewc
    "online_ewc": ("online_ewc",),     # config.online_ewc
    "l2": ("l2",),                     # config.l2
    "mas": ("mas",),                   # config.mas
    "oracle": ("oracle",),             # Eq. 8 as cumulative replay (config.oracle)
    "replay_distill": ("replay", "distill"),
}


def register(name: str):
  def deco(builder):
    TRANSFORMS[name] = builder
    return builder
  return deco


def transform_names(config: ml_collections.ConfigDict) -> list[str]:
  """The transform list: `config.loss_transforms` if set, else the `config.method` preset."""
  if config.method not in METHODS:
    raise ValueError(f"unknown config.method {config.method!r}; known methods: "
                     f"{sorted(METHODS)}")
  if config.loss_transforms:
    names = [n.strip() for n in config.loss_transforms.split(",") if n.strip()]
  else:
    names = list(METHODS[config.method])
  unknown = [n for n in names if n not in TRANSFORMS]
  if unknown:
    raise ValueError(f"unknown loss transform(s) {unknown} in config.loss_transforms; known: "
                     f"{sorted(TRANSFORMS)}")
  return names


def build(config: ml_collections.ConfigDict) -> transforms.LossTransform:
  """The chained LossTransform selected by the config."""
  return transforms.chain([(n, TRANSFORMS[n](config)) for n in transform_names(config)])
