"""Gene-incremental pre-training on the two unlabelled PBMC files, as a backbone for CANAL.

  python launch.py --config configs/gil_pbmc_pretrain.py --workdir runs/gil_pbmc_pretrain
  python -m gil_jax.cli train --config configs/canal_pbmc.py --workdir runs/canal_pbmc_gil \
      --config.canal.init_workdir=runs/gil_pbmc_pretrain

Stages: one per file (dataset_stream: 10x 3-chemistry PBMCs, then Kang ctrl/stim PBMCs), masked
expression modelling. Same backbone shape, token count and value scale (log1p CP10k) as
configs/canal_pbmc.py, so the annotation run only swaps the initialisation. None of these cells
or files is in the labelled PBMC stream (the Kang file here is the harmony subset, not muscat's).
"""

from gil_jax.config_base import base_config

PRETRAIN = ("pbmc_3chem_10x_scWGParis_nolabels", "kang_pbmc_harmony_nolabels")


def get_config():
  c = base_config("exceiver")
  c.experiment = "gil_pbmc_pretrain"
  c.seed = 0
  c.data.source = "h5ad"
  c.data.files = PRETRAIN
  c.stages.plan = "dataset_stream"
  c.stages.order = PRETRAIN
  c.stages.eval_fraction = 0.1
  c.genes.capacity = 20480          # the union of the two panels is 20,212 genes
  c.batch.normalisation = "log1p_cp10k"
  c.batch.batch_size = 32
  c.batch.n_tokens = 256
  c.batch.mask_ratio = 0.4
  c.eval.batch_size = 128
  c.model.d_model = 32
  c.model.n_latents = 16
  c.model.n_layers = 1
  c.model.n_heads = 2
  c.train.learning_rate = 1e-3
  c.train.epochs_per_stage = 3
  return c
