"""CANAL continual annotation on the pancreas stream (real data from ../shared/data).

Stages: panc8 (bbknnR subset) split by technology (celseq, celseq2, fluidigmc1, indrop,
smartseq2), then Baron (CIDER subset, human+mouse: adds activated_stellate, macrophage), then Xin
(adds gamma). Wang is test-only (never trained on). Per-source normalisation: panc8's 'lognorm'
layer is ln(1 + CP10k) already ('none'); Baron holds counts ('log1p_cp10k'); Xin and Wang hold
log2(1 + CPM) values (up to 18.5; each cell's 2^v - 1 sums to <= 1e6), converted to ln(1 + CP10k)
('from_log2_cpm').
Run: python -m gil_jax.cli train --config configs/canal_pancreas.py --workdir runs/canal_pancreas
Baselines: --config.method=finetune|replay|distill|lwf|ewc|joint. Novelty setting:
configs/canal_novelty.py.
"""

import ml_collections

from gil_jax.config_base import base_config

# label map entries (gil_jax/canal/labels.py): a bare name is a canonical name, 'from=to' renames
PANCREAS_LABELS = ("acinar", "activated_stellate", "alpha", "beta", "delta", "ductal",
                   "endothelial", "gamma", "macrophage", "stellate=activated_stellate")


def _src(file, label_column, normalisation, layer="", split_column="", split_values=()):
  return ml_collections.ConfigDict(dict(
      file=file, label_column=label_column, layer=layer, normalisation=normalisation,
      gene_column="", split_column=split_column, split_values=split_values))


def get_config():
  c = base_config("exceiver")
  c.experiment = "canal_pancreas"
  c.seed = 0
  c.data.label_column = "cell_type"
  c.canal.sources = ml_collections.ConfigDict(dict(
      panc8=_src("pancreas_panc8_small_bbknnR", "celltype", "none", layer="lognorm",
                 split_column="tech",
                 split_values=("celseq", "celseq2", "fluidigmc1", "indrop", "smartseq2")),
      baron=_src("pancreas_baron_hs_mm_CIDER", "Group", "log1p_cp10k"),
      xin=_src("pancreas_xin_scClassify", "cell_type", "from_log2_cpm"),
      wang=_src("pancreas_wang_scClassify", "cell_type", "from_log2_cpm"),
  ))
  c.canal.test_only = ("wang",)
  c.canal.stage_order = ("panc8:celseq", "panc8:celseq2", "panc8:fluidigmc1", "panc8:indrop",
                         "panc8:smartseq2", "baron", "xin")
  c.canal.label_map = PANCREAS_LABELS
  c.task = "annotation"
  c.method = "canal"
  c.canal.bank_size = 300
  c.train.epochs_per_stage = 15
  c.canal.max_classes = 16
  c.canal.test_fraction = 0.25
  c.canal.val_fraction = 0.1
  c.genes.capacity = 16384
  c.batch.batch_size = 32
  c.batch.n_tokens = 256
  c.batch.sampling = "weighted"
  c.eval.batch_size = 128
  # soft-binned values (measured, README "Measured: CANAL"): the additive encoder reached only
  # 0.52 accuracy on this stream, soft bins 0.95
  c.model.value_encoding = "softbin"
  c.model.d_model = 32
  c.model.n_latents = 16
  c.model.n_layers = 1
  c.model.n_heads = 2
  c.train.learning_rate = 1e-3
  return c
