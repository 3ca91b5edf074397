"""Loss transforms and method presets by name, so a config line picks and combines them."""

from __future__ import annotations

from typing import Callable, NamedTuple

import ml_collections

from gil_jax.experiment import as_names
from gil_jax.losses import transforms

# name -> builder(config) -> LossTransform. Methods modules register themselves here.
TRANSFORMS: dict[str, Callable[[ml_collections.ConfigDict], transforms.LossTransform]] = {}



class Preset(NamedTuple):
  """A method: loss transforms (applied in order; the first wraps the task loss innermost) and,
  for the annotation task, whether every stage's data is trained at once (the joint upper
  bound)."""
  transforms: tuple[str, ...] = ()
  joint: bool = False


# task -> method preset name -> Preset; `config.method` picks one for `config.task`.
METHODS: dict[str, dict[str, Preset]] = {
    "gil": {
        "baseline": Preset(),                      # Eq. 7: sequential training, no mitigation
        "replay": Preset(("replay",)),             # Eq. 9 (config.replay)
        "distill": Preset(("distill",)),           # Eq. 10 (config.distill)
        "ewc": Preset(("ewc",)),                   # config.ewc
        "online_ewc": Preset(("online_ewc",)),     # config.online_ewc
        "l2": Preset(("l2",)),                     # config.l2
        "mas": Preset(("mas",)),                   # config.mas
        "oracle": Preset(("oracle",)),             # Eq. 8 as cumulative replay (config.oracle)
        "replay_distill": Preset(("replay", "distill")),
    },
    "annotation": {
        # CANAL: representation KD + replay from the example bank (config.canal.bank_size);
        # the bank wraps outermost, so banked cells are distilled too, as in CANAL's batches
        "canal": Preset(("canal_rkd", "example_bank")),
        "finetune": Preset(),
        "replay": Preset(("example_bank",)),         # the example bank alone
        "distill": Preset(("canal_rkd",)),
        "lwf": Preset(("canal_lwf",)),
        "ewc": Preset(("ewc",)),
        "joint": Preset(joint=True),                 # one stage on all stages' data
    },
}


def preset(config: ml_collections.ConfigDict) -> Preset:
  """The `config.method` preset of `config.task`."""
  task = config.get("task", "gil")
  if task not in METHODS:
    raise ValueError(f"unknown config.task {task!r}; known tasks: {sorted(METHODS)}")
  if config.method not in METHODS[task]:
    raise ValueError(f"unknown config.method {config.method!r} for config.task={task!r}; "
                     f"known methods: {sorted(METHODS[task])}")
  return METHODS[task][config.method]


def register(name: str):
  def deco(builder):
    TRANSFORMS[name] = builder
    return builder
  return deco


def transform_names(config: ml_collections.ConfigDict) -> list[str]:
  """The transform list: `config.loss_transforms` if set, else the `config.method` preset."""
  default = list(preset(config).transforms)  # validates config.method either way
  names = as_names(config.loss_transforms) or default
  unknown = [n for n in names if n not in TRANSFORMS]
  if unknown:
    raise ValueError(f"unknown loss transform(s) {unknown} in config.loss_transforms; known: "
                     f"{sorted(TRANSFORMS)}")
  return names


def build(config: ml_collections.ConfigDict) -> transforms.LossTransform:
  """The chained LossTransform selected by the config."""
  return transforms.chain([(n, TRANSFORMS[n](config)) for n in transform_names(config)])
