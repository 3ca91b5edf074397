"""Gene-incremental learning on the embedded synthetic data (the default experiment).

  python launch.py --config configs/gil_synthetic.py --workdir runs/demo

A base stage on 60% of the genes, then 2 stages each adding its own stage-specific genes
(visible only in that stage). Cells are split by simulated batch (base = batch0, stage1 = batch1,
stage2 = batch2), so every stage's data has its own gene-level shifts and the shared weights
move between stages: with a learning rate of 2e-3 this makes forgetting of stage-1 genes
measurable (baseline Δ ≈ 0.06 vs ≈ 0.01 with a random cell split at 1e-3).
Exceiver backbone, masked-MSE objective.
Pick a method with --config.method=replay (see README: methods; per-method hyperparameters in
config.<transform>, e.g. --config.method=ewc --config.ewc.weight=100).
"""

from gil_jax.config_base import base_config


def get_config():
  c = base_config("exceiver")
  c.experiment = "gil_synthetic"
  c.data.sim.n_batches = 3
  c.stages.obs_column = "batch"
  c.stages.order = "batch0,batch1,batch2"
  c.train.learning_rate = 2e-3
  return c
