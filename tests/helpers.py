"""Shared tiny configs for fast end-to-end tests."""

from gil_jax.config_base import base_config


def tiny_config(model: str = "exceiver", **overrides):
  c = base_config(model)
  c.experiment = "tiny"
  c.data.sim.update(dict(n_cells=480, n_genes=96, n_cell_types=4, n_modules=8, n_batches=2))
  c.genes.capacity = 160
  c.batch.batch_size = 16
  c.batch.n_tokens = 32
  c.eval.batch_size = 32
  c.train.steps_per_stage = 6
  c.train.checkpoint_every = 4
  c.train.log_every = 2
  c.model.d_model = 16
  c.model.n_heads = 2
  c.model.n_layers = 1
  if model == "exceiver":
    c.model.n_latents = 8
  else:
    c.model.ffn_dim = 16
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c
