"""Losses: the task objective, the loss-transform framework and the continual-learning methods.

Importing this package registers every transform (replay, oracle, distill, ewc, online_ewc, l2,
mas) in `registry.TRANSFORMS`.
"""

from gil_jax.losses import anchors, distill, ewc, replay  # noqa: F401  (register transforms)
