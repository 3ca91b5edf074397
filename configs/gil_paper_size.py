"""The GIL paper's model and optimisation sizes on the 2-stage real-data setting (accelerator).

  python launch.py --config configs/gil_paper_size.py --workdir runs/paper_size

Paper (gil.md §1.3, §6 key args): scGPT-style transformer d=256, 6 layers, 8 heads, FFN 256,
dropout 0.15, MVC head; 512 tokens per cell (0.5 weighted / 0.5 uniform gene sampling), 40%
masked, log1p of raw counts; Adam lr 5e-4, batch 128, 5 epochs per stage, Adam reset per stage;
top-150 crucial genes per downstream dataset, 20/100 dedup ranks; base stage on half the cells.
Not part of the CPU benchmark (it is ~50x the compute of gil_paper_2stage.py per cell); pick the
3-stage datasets with --config.downstream.datasets=... as in configs/gil_paper_3stage.py.
"""

from gil_jax import models
from configs import gil_paper_2stage


def get_config():
  c = gil_paper_2stage.get_config()
  c.experiment = "gil_paper_size"
  c.model = models.paper_transformer_config()
  c.batch.n_tokens = 512
  c.batch.batch_size = 128
  c.eval.batch_size = 256
  c.train.learning_rate = 5e-4
  c.train.epochs_per_stage = 5
  c.replay.buffer_size = 1000
  c.distill.weight = 5.0
  return c
