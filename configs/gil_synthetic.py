"""Gene-incremental learning on the embedded synthetic data (the default experiment).

  python launch.py --config configs/gil_synthetic.py --workdir runs/demo

6,000 simulated cells x 600 genes (negative-binomial counts, co-varying gene modules, 6 cell
types, 3 batches). A base stage on the 60% least expressed genes, then 2 stages, each adding
half of the most expressed genes as its stage-specific genes T_k (visible only in that stage),
like the GIL paper's crucial genes (top cumulative expression). Cells are split by simulated
batch (base = batch0, stage1 = batch1, stage2 = batch2), so each stage's data has its own
gene-level shifts. Exceiver backbone (soft-binning value encoding, chosen by measurement: README,
"Models that learn expression"; + depth token), masked-MSE objective, 20 epochs per stage with a 100-step warm-up and cosine decay, Adam reset at every
stage. Replay keeps 1,000 cells (the GIL paper's default; the library default is 200): with
the gene + cell offset head 200 cells did not reduce forgetting here (README, "Replay and the
oracle").

Pick a method with --config.method=replay|distill|ewc|oracle|... (README: methods); their
hyperparameters live in config.<transform>, e.g. --config.method=ewc --config.ewc.weight=100.
"""

from gil_jax.config_base import base_config


def get_config():
  c = base_config("exceiver")
  c.experiment = "gil_synthetic"
  c.data.sim.n_batches = 3
  c.stages.plan = "expressed"
  c.stages.obs_column = "batch"
  c.stages.order = ("batch0", "batch1", "batch2")
  c.model.value_encoding = "softbin"
  c.train.learning_rate = 2e-3
  c.train.epochs_per_stage = 20
  c.train.schedule = "cosine"
  c.train.warmup_steps = 100
  c.replay.buffer_size = 1000
  return c
