"""The complete default experiment config; every config file starts from `base_config()`.

All fields exist here so that a locked config rejects unknown `--config.x=...` overrides.

List-valued fields (LIST_FIELDS) hold tuples, read with `experiment.as_names` (or `as_floats`).
On the command line: `--config.stages.order='("batch0","batch1")'`, repeated flags
(`--config.stages.order=batch0 --config.stages.order=batch1`) or the comma form
`--config.stages.order=batch0,batch1`.
"""

from __future__ import annotations

import ml_collections

from gil_jax import models

# The list-valued fields (tuples; comma-separated strings in earlier revisions). '*' stands for
# any key (one entry per source). The checkpoint fingerprint compares them by their items.
LIST_FIELDS = ("loss_transforms", "data.files", "stages.order", "downstream.datasets",
               "eval.stage_evaluators", "canal.stage_order", "canal.test_only",
               "canal.drop_labels", "canal.withhold", "canal.sources.*.split_values",
               "canal.source_order")
NUMBER_LIST_FIELDS = ("stages.cell_ratios",)
# config.canal.label_map: a tuple of 'from=to' / 'name' entries (';'-separated in a string; see
# gil_jax/canal/labels.py) -- commas may occur in cell-type names.
LABEL_MAP_FIELD = "canal.label_map"


def _register_list_override_parser() -> None:
  """Replaces ml_collections' parser of `--config.x=...` overrides of tuple fields by one that
  keeps a value it cannot read as a Python literal as one string element instead of raising, so
  the comma form `--config.canal.stage_order=panc8:celseq,baron` (or a list of paths, or a name
  with spaces) arrives as ('panc8:celseq,baron',), whose commas `experiment.as_names` splits.
  (The stock parser does this by itself for plain names like `batch0,batch1`, but raises on ':',
  '/', '=' or a space when the value holds a comma or a space.)"""
  try:
    from ml_collections import config_flags
    from ml_collections.config_flags import tuple_parser
    register = config_flags.register_flag_parser_for_type
  except (ImportError, AttributeError):  # older ml_collections: quote the tuple instead
    return

  class ListOverrideParser(tuple_parser.TupleParser):  # a TupleParser: repeated flags append

    def parse(self, argument):
      try:
        return super().parse(argument)
      except ValueError:
        return (argument,)

  register(tuple, ListOverrideParser())


# Config files import this module, so the parser is in place before config_flags parses their
# overrides (it looks up the parser of each overridden field's type after loading the file).
_register_list_override_parser()


def base_config(model: str = "exceiver") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = "gil"
  c.seed = 0
  # What is trained: 'gil' (gene-incremental, self-supervised) | 'annotation' (continual cell-type
  # annotation, config.canal); both run through gil_jax/core/loop.py (gil_jax/tasks/).
  c.task = "gil"
  # Continual-learning method preset of the task (gil_jax/losses/registry.py METHODS): gil:
  # baseline, replay, distill, ewc, online_ewc, l2, mas, oracle, replay_distill; annotation:
  # canal, finetune, replay, distill, lwf, ewc, joint.
  c.method = "baseline"
  c.loss_transforms = ()  # tuple of transform names; () = the preset's list
  # Per-transform hyperparameters: one section per transform name (gil_jax/losses/*.py), e.g.
  # --config.method=ewc --config.ewc.weight=100. Only the sections of listed transforms are read.
  c.replay = ml_collections.ConfigDict(dict(
      buffer_size=200, per_stage=0, mode="batch", weight=1.0, batch_size=0, include_base=False))
  c.oracle = ml_collections.ConfigDict(dict(mode="concat", weight=1.0, batch_size=0,
                                            include_base=True))
  c.distill = ml_collections.ConfigDict(dict(weight=5.0, mode="output", feature_weight=1.0))
  c.ewc = ml_collections.ConfigDict(dict(weight=1000.0, gamma=1.0, n_batches=20, normalize=True))
  c.online_ewc = ml_collections.ConfigDict(dict(weight=1000.0, gamma=0.9, n_batches=20,
                                                normalize=True))
  c.l2 = ml_collections.ConfigDict(dict(weight=10.0))
  c.mas = ml_collections.ConfigDict(dict(weight=1000.0, gamma=1.0, n_batches=20))

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"       # 'synthetic' | 'h5ad'
  c.data.data_dir = "../shared/data"
  # tuple of .h5ad names (relative to data_dir) or paths, folders, globs, or one corpus manifest
  # (`gil-jax corpus DIR`; gil_jax/data/corpus.py)
  c.data.files = ()
  c.data.layer = ""                 # '' = X
  c.data.gene_column = ""           # '' = var_names
  c.data.label_column = ""
  c.data.batch_column = ""
  # Read the .h5ad files (annotation: the canal.sources files) row by row from disk instead of
  # into memory (corpora larger than RAM; X / the layer must be CSR); same results as eager
  # reading (gil_jax/data/corpus.py).
  c.data.lazy = False
  # A corpus manifest with a pack (`gil-jax corpus DIR --pack`): read training rows from the pack
  # (the same rows, faster) instead of the .h5ad files. False: the files, even with a pack.
  c.data.use_pack = True
  # Training batches are built ahead by gil_jax/data/loader.py (concurrent.futures): 0 = in one
  # background thread, W > 0 = in W worker processes. Never changes a batch.
  c.data.workers = 0
  # Shuffle runs of this many consecutive cells as units (1 = every cell on its own). Lazy data:
  # a batch then reads batch_size / shuffle_block contiguous row ranges instead of one per cell.
  c.data.shuffle_block = 1
  c.data.sim = ml_collections.ConfigDict(dict(
      n_cells=6000, n_genes=600, n_cell_types=6, n_modules=30, n_batches=2, n_datasets=1,
      panel_fraction=1.0, seed=0))

  c.stages = ml_collections.ConfigDict()
  c.stages.plan = "random"          # 'random' | 'dataset_stream' | 'crucial'
  c.stages.n_stages = 2             # incremental stages (after the optional base stage)
  c.stages.base_stage = True        # paper protocol: a base-genes-only stage 0 on half the cells
  c.stages.base_fraction = 0.6      # share of genes in the base set B (random plan)
  c.stages.eval_fraction = 0.1      # held-out cells for gene-wise regression
  # True: the held-out (test) cells are dropped and eval_fraction of each stage's training
  # cells is held out instead (validation), to choose a recipe without touching the test cells
  c.stages.validation = False
  c.stages.obs_column = ""          # partition cells by this obs column instead of ratios
  c.stages.order = ()               # tuple of datasets / obs values, in stage order
  # plan 'crucial' (GIL paper benchmark): T_k = top-K genes of downstream dataset k (see
  # config.downstream), de-duplicated with the 20/100 rank rules; B = all other genes.
  c.stages.top_k = 150              # crucial genes per downstream dataset (before dedup)
  c.stages.keep_rank1 = 20          # dedup rule thresholds (0-based ranks), gil.md §1.2
  c.stages.keep_rank2 = 100
  c.stages.cell_ratios = ()         # tuple of cell shares per stage incl. base; () = paper

  # Labelled downstream datasets: crucial genes (plan 'crucial') and gene-based classification.
  c.downstream = ml_collections.ConfigDict()
  c.downstream.datasets = ()        # ('name:label_column', ...) (.h5ad under config.data.data_dir)
  c.downstream.gene_column = ""     # '' = var_names
  c.downstream.layer = ""           # '' = X

  c.genes = ml_collections.ConfigDict()
  c.genes.capacity = 1024           # rows of the padded gene table (row 0 = padding)

  c.batch = ml_collections.ConfigDict()
  c.batch.batch_size = 64
  c.batch.n_tokens = 128
  c.batch.mask_ratio = 0.4
  c.batch.normalisation = "log1p_cp10k"  # 'log1p_cp10k' | 'log1p' | 'none' | 'from_log2_cpm'
  c.batch.sampling = "paper"             # 'paper' | 'uniform' | 'weighted'
  c.batch.zero_tokens = 0
  # annotation inputs: 'none' (normalised values) | 'cell_rank' (each value's quantile rank
  # among the cell's detected genes: robust to how another study normalised its values)
  c.batch.value_scale = "none"
  # detection floor, ln(1 + CP10k): smaller values are not tokens (one count in a 10k-count cell
  # is 0.69; a deep full-length cell detects many genes far below that, a droplet cell none)
  c.batch.min_value = 0.0

  c.model = models.model_config(model)

  c.train = ml_collections.ConfigDict()
  c.train.likelihood = "mse"        # 'mse' | 'poisson' | 'nb'
  c.train.optimizer = "adam"        # 'adam' | 'adamw'
  c.train.learning_rate = 1e-3
  c.train.weight_decay = 0.0
  c.train.warmup_steps = 0
  # 'constant' (after warm-up) | 'cosine' (warm-up, then cosine decay to 10 % of the peak over
  # decay_steps; 0 = each stage's length in gene-incremental runs)
  c.train.schedule = "constant"
  c.train.decay_steps = 0
  c.train.grad_clip = 0.0           # 0 = off
  c.train.epochs_per_stage = 5
  c.train.steps_per_stage = 0       # > 0 overrides epochs_per_stage
  c.train.reset_opt_state = True    # paper: Adam re-created at every stage
  c.train.checkpoint_every = 200    # steps; stage ends are always checkpointed
  c.train.checkpoint_minutes = 10.0  # also checkpoint this often (wall clock; 0 = off)
  c.train.keep_checkpoints = 3
  c.train.log_every = 10

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256
  c.eval.mask_seed = 1234
  c.eval.stage_evaluators = ()      # tuple of names from gil_jax/eval/hooks.py
  # Gene-based classification ('gene_classification' evaluator, gil_jax/eval/probe.py).
  c.eval.probe = ml_collections.ConfigDict(dict(
      trials=3, train_fraction=0.7, val_fraction=0.1, learning_rate=5e-3, batch_size=64,
      epochs=50, eval_every=5, seed=0))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))

  # Continual cell-type annotation (config.task='annotation'; gil_jax/canal, `gil-jax annotate`);
  # the method is config.method, the stage length config.train.epochs_per_stage.
  c.canal = ml_collections.ConfigDict(dict(
      sources=ml_collections.ConfigDict(),  # name -> {file, label_column, layer, normalisation,
                                            #   gene_column, split_column, split_values (tuple)}
      # (left empty with config.data.files set: every file of that corpus is one source, named
      # by its file stem, labelled by config.data.label_column; stream.corpus_sources)
      # tuples of stage / source / label names; label_map: ('from=to' or 'name', ...)
      stage_order=(), test_only=(), label_map=(), drop_labels=(), withhold=(),
      source_order=(),  # the order sources' cells are stacked in; () = sorted names (extend
                        # appends new sources here, so that earlier cells keep their indices)
      test_fraction=0.25, val_fraction=0.1, max_classes=32, bank_size=1000,
      distill_weight=0.1, label_smoothing=0.1, lwf_weight=1.0, lwf_temperature=2.0,
      hidden1=128, hidden2=64, trainable="all", trainable_blocks=1, init_workdir="",
      novelty_rule="canal", novelty_temperature=0.8, novelty_mix=128,
      novelty_quantile=0.95, min_shared_genes=50,
      # train on these genes only: an .h5ad (its var_names) or a text file of ids; '' = all.
      # E.g. the query study's file, so that the model learns from the genes it will see.
      gene_panel="",
      # a logistic regression on the cell's expression profile added to the logits
      # (gil_jax/canal/head.py: gene_linear_logits)
      gene_linear=False,
      # training only: hide a random share (up to this, per cell) of each cell's tokens, so that
      # no type is learnt from how many of the panel's genes its studies measure
      token_dropout=0.0,
      # joint training: leave out genes measured only by training sources that together hold
      # fewer than this share of the training cell types (0 = keep all): their presence says
      # which study a cell comes from, and through it the type (stream.class_confounded_genes)
      min_gene_class_coverage=0.0))
  return c
