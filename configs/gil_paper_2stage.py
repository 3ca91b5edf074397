"""GIL paper protocol on real data, 2-stage setting (in the spirit of Norman → Lupus).

  python launch.py --config configs/gil_paper_2stage.py --workdir runs/paper2 \
      [--config.data.data_dir=/path/to/shared/data] [--config.method=replay]

Pre-training cells: two unlabelled PBMC files (4,860 cells, raw counts → log1p as the paper).
Crucial genes (top-150 by cumulative log1p expression, de-duplicated with the 20/100 rank rules)
of two labelled downstream datasets define the stages: base stage 0 on B = all other genes with
half of the cells, stage 1 = B ∪ T(cellbench_3cl_3tech_outer: cancer cell lines, a non-PBMC
dataset like Norman's K562), stage 2 = B ∪ T(pbmc_3chem_symphony: PBMC cell types, like Lupus).
Evaluation: gene-wise regression on 10% held-out cells, and gene-based classification (linear
probe, paper and honest numbers) on both downstream datasets after every stage.
CPU-sized transformer (d=64, 2 layers, 64 tokens, 12 epochs per stage; wall per run on 2 shared
CPU cores: baseline ~2 min, distill ~2.3 min, replay ~3.5 min, oracle ~4 min);
the paper-size model: configs/gil_paper_size.py.
"""

from gil_jax import models
from gil_jax.config_base import base_config

PRETRAIN = ("pbmc_3chem_10x_scWGParis_nolabels", "kang_pbmc_harmony_nolabels")


def get_config(downstream: tuple[str, ...] = ("cellbench_3cl_3tech_outer:cell_line",
                                              "pbmc_3chem_symphony:cell_type")):
  c = base_config("transformer")
  c.experiment = "gil_paper_2stage"
  c.data.source = "h5ad"
  c.data.files = PRETRAIN
  c.downstream.datasets = downstream
  c.stages.plan = "crucial"
  c.stages.top_k = 150
  c.stages.eval_fraction = 0.1
  c.genes.capacity = 20480          # the union of the two PBMC panels is 20,212 genes
  c.batch.normalisation = "log1p"   # paper: log1p of raw counts, no library-size scaling
  c.batch.sampling = "paper"
  c.batch.mask_ratio = 0.4
  c.batch.n_tokens = 64             # paper: 512 (configs/gil_paper_size.py)
  c.batch.batch_size = 32
  c.eval.batch_size = 128
  c.model = models.model_config("transformer")
  c.model.update(d_model=64, n_layers=2, n_heads=4, ffn_dim=64, dropout=0.1, use_mvc=True)
  c.train.learning_rate = 2e-3      # paper: 5e-4 with 5 epochs of ~227k cells per stage
  c.train.epochs_per_stage = 12      # 5: Δ within noise; 12: baseline Δ 0.106 and 0.047 in two
                                     # runs of the same config (runs/paper_tables_e12, _final)
  c.train.checkpoint_every = 1000
  c.train.log_every = 20
  c.eval.stage_evaluators = ("gene_classification",)
  return c
