"""Gene-incremental pre-training from a corpus of .h5ad shards, read lazily (one stage per shard).

  python benchmarks/make_corpus.py --out runs/corpus      # or your own folder of .h5ad files
  gil-jax corpus runs/corpus --pack                      # validates; manifest.json + its pack
  python launch.py --config configs/gil_corpus.py --workdir runs/corpus_gil \
      --config.data.files=runs/corpus

Every shard keeps its own gene panel; stage k trains on shard k's panel and the vocabulary grows
by the genes no earlier shard measured (plan `dataset_stream`; `--config.stages.order=a,b,c` picks
and orders shards, default all). Rows are read from disk as batches need them (block shuffling,
16 consecutive cells per unit), built ahead by the loader (`--config.data.workers=W` for W
worker processes). The gene table is sized for up to 20,480 genes (`genes.capacity`).
"""

from gil_jax.config_base import base_config


def get_config():
  c = base_config("exceiver")
  c.experiment = "gil_corpus"
  c.data.source = "h5ad"
  c.data.files = ("runs/corpus",)
  c.data.lazy = True
  c.data.shuffle_block = 16
  c.stages.plan = "dataset_stream"
  c.stages.base_stage = False
  c.stages.eval_fraction = 0.02
  c.genes.capacity = 20480
  c.model.value_encoding = "softbin"
  c.train.learning_rate = 2e-3
  c.train.steps_per_stage = 300
  c.train.schedule = "cosine"
  c.train.warmup_steps = 50
  return c
