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


def sim_h5ad(tmp_path, name: str = "sim.h5ad", **kw):
  """Writes one simulated dataset (small defaults, overridable SimConfig fields) as an .h5ad;
  returns (path, AnnData)."""
  from gil_jax.data import simulate
  cfg = dict(n_cells=360, n_genes=80, n_cell_types=4, n_modules=8, n_batches=2)
  cfg.update(kw)
  a = simulate.simulate(simulate.SimConfig(**cfg))[0]
  path = str(tmp_path / name)
  a.write_h5ad(path)
  return path, a


def tiny_canal_config(path: str, experiment: str = "canal_test", capacity: int = 128,
                      method: str = "canal", **canal):
  """A tiny annotation config over one simulated .h5ad split by batch (see `sim_h5ad`)."""
  import ml_collections
  c = base_config("exceiver")
  c.experiment = experiment
  c.task, c.method = "annotation", method
  c.canal.sources = ml_collections.ConfigDict(dict(sim=dict(
      file=path, label_column="cell_type", normalisation="log1p_cp10k", split_column="batch",
      split_values=())))
  c.genes.capacity = capacity
  c.batch.batch_size = 16
  c.batch.n_tokens = 32
  c.eval.batch_size = 32
  c.model.update(d_model=16, n_heads=2, n_layers=1, n_latents=8)
  c.canal.update(dict(hidden1=16, hidden2=8, max_classes=8, bank_size=24, novelty_mix=8,
                      min_shared_genes=20))
  c.train.steps_per_stage = 3
  c.canal.update(canal)
  return c
