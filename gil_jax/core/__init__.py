"""The training core every task shares: train state (`state`), steps (`step`), stage loop (`loop`).

(Named `core`, not `train`, so that the package never shadows the `gil_jax.train` function.)
"""
