"""Continual cell-type annotation from a labelled corpus: every .h5ad file in config.data.files
(a folder, glob, list or manifest) is one source, named by its file stem and labelled by
obs[config.data.label_column], its rows read lazily (gil_jax/canal/stream.py: corpus_sources).

  python benchmarks/make_corpus.py --out runs/corpus3 --shards 3   # cells labelled cell_type
  gil-jax corpus runs/corpus3
  python launch.py --config configs/canal_corpus.py --workdir runs/canal_corpus \
      --config.data.files=runs/corpus3

Stages follow the files' names (--config.canal.stage_order=a,b picks and orders them;
--config.canal.test_only=c holds a file out as a study never trained on).
"""

from gil_jax.config_base import base_config


def get_config():
  c = base_config("exceiver")
  c.experiment = "canal_corpus"
  c.task, c.method = "annotation", "canal"
  c.data.files = ("runs/corpus3",)
  c.data.lazy = True
  c.data.label_column = "cell_type"
  c.data.shuffle_block = 16
  c.genes.capacity = 20480
  c.batch.batch_size = 64
  c.batch.n_tokens = 128
  c.batch.sampling = "weighted"
  c.model.value_encoding = "softbin"
  c.train.learning_rate = 1e-3
  c.train.steps_per_stage = 150
  c.canal.bank_size = 300
  c.canal.max_classes = 16
  return c
