"""Gene-incremental learning on the embedded synthetic data (the default experiment).

  python launch.py --config configs/gil_synthetic.py --workdir runs/demo

A base stage on 60% of the genes and half the cells, then 2 stages each adding its own
stage-specific genes (visible only in that stage). Exceiver backbone, masked-MSE objective.
Pick a method with --config.method=replay (see README: methods).
"""

from gil_jax.config_base import base_config


def get_config():
  c = base_config("exceiver")
  c.experiment = "gil_synthetic"
  return c
