"""The complete default experiment config; every config file starts from `base_config()`.

All fields exist here so that a locked config rejects unknown `--config.x=...` overrides.
"""

from __future__ import annotations

import ml_collections

from gil_jax import models


def base_config(model: str = "exceiver") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "gil"
  c.seed = 0
  # Continual-learning method preset (see gil_jax/losses/registry.py) and its transforms.
  c.method = "baseline"
  c.loss_transforms = ""  # comma-separated names; empty = the preset's list

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"       # 'synthetic' | 'h5ad'
  c.data.data_dir = "../shared/data"
  c.data.files = ""                 # comma-separated .h5ad names (relative to data_dir) or paths
  c.data.layer = ""                 # '' = X
  c.data.gene_column = ""           # '' = var_names
  c.data.label_column = ""
  c.data.batch_column = ""
  c.data.sim = ml_collections.ConfigDict(dict(
      n_cells=6000, n_genes=600, n_cell_types=6, n_modules=30, n_batches=2, n_datasets=1,
      panel_fraction=1.0, seed=0))

  c.stages = ml_collections.ConfigDict()
  c.stages.plan = "random"          # 'random' | 'dataset_stream'
  c.stages.n_stages = 2             # incremental stages (after the optional base stage)
  c.stages.base_stage = True        # paper protocol: a base-genes-only stage 0 on half the cells
  c.stages.base_fraction = 0.6      # share of genes in the base set B (random plan)
  c.stages.eval_fraction = 0.1      # held-out cells for gene-wise regression
  c.stages.obs_column = ""          # partition cells by this obs column instead of ratios
  c.stages.order = ""               # comma-separated datasets / obs values, in stage order

  c.genes = ml_collections.ConfigDict()
  c.genes.capacity = 1024           # rows of the padded gene table (row 0 = padding)

  c.batch = ml_collections.ConfigDict()
  c.batch.batch_size = 64
  c.batch.n_tokens = 128
  c.batch.mask_ratio = 0.4
  c.batch.normalisation = "log1p_cp10k"  # 'log1p_cp10k' | 'log1p' | 'none'
  c.batch.sampling = "paper"             # 'paper' | 'uniform' | 'weighted'
  c.batch.zero_tokens = 0

  c.model = models.model_config(model)

  c.train = ml_collections.ConfigDict()
  c.train.likelihood = "mse"        # 'mse' | 'poisson' | 'nb'
  c.train.optimizer = "adam"        # 'adam' | 'adamw'
  c.train.learning_rate = 1e-3
  c.train.weight_decay = 0.0
  c.train.warmup_steps = 0
  c.train.grad_clip = 0.0           # 0 = off
  c.train.epochs_per_stage = 5
  c.train.steps_per_stage = 0       # > 0 overrides epochs_per_stage
  c.train.reset_opt_state = True    # paper: Adam re-created at every stage
  c.train.checkpoint_every = 200    # steps; stage ends are always checkpointed
  c.train.keep_checkpoints = 3
  c.train.log_every = 10

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256
  c.eval.mask_seed = 1234
  c.eval.stage_evaluators = ""      # comma-separated names from gil_jax/eval/hooks.py

  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  return c
