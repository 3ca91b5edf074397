"""Builds an experiment's data, stage plan and vocabulary from a config (host side)."""

from __future__ import annotations

import logging
import os

import ml_collections
import numpy as np

from gil_jax.data import anndata_io, corpus, downstream, simulate, stages
from gil_jax.data.anndata_io import DataError
from gil_jax.data.vocab import GeneVocab

log = logging.getLogger(__name__)
RAW_SCALE = 50.0  # values above this are not log-scale expression


def check_value_scale(data: anndata_io.CellData, normalisation: str) -> float | None:
  """Warns when `normalisation='none'` would feed values far above log scale (e.g. raw counts
  or read-level values) to the model; returns the largest value checked (None: not checked)."""
  if normalisation != "none" or not hasattr(data.X, "data") or data.X.data.size == 0:
    return None
  top = float(data.X.data.max())
  if top > RAW_SCALE:
    log.warning("config.batch.normalisation='none' but %s holds values up to %.4g, far above "
                "log-normalised expression; use --config.batch.normalisation=log1p_cp10k (counts) "
                "or log1p, or normalise the data first.", data.name, top)
  return top


def as_names(value) -> list[str]:
  """A list-valued config field (e.g. config.stages.order) -> its non-empty, stripped names.

  Config files write these fields as tuples of strings. An element holding commas is split, so
  the override `--config.stages.order=a,b` (which ml_collections' tuple parser keeps as the one
  element 'a,b') names two stages; a plain comma-separated string (configs and saved runs of
  earlier revisions) is read the same way. None and '' give []. Non-string elements (numbers
  that the tuple parser read from `--config.x=1,2`) are written with str().
  """
  if value is None:
    return []
  if isinstance(value, str):
    items = [value]
  elif isinstance(value, (list, tuple)):
    items = list(value)
  else:
    raise TypeError(f"expected a tuple of names or a comma-separated string, got "
                    f"{type(value).__name__} {value!r}")
  return [x.strip() for item in items if item is not None
          for x in str(item).split(",") if x.strip()]


def as_floats(value, field: str = "") -> list[float]:
  """`as_names` for a list of numbers (config.stages.cell_ratios): a tuple of numbers, or names
  that are numbers ('0.5,0.25,0.25' from an override or an earlier revision's string)."""
  items = list(value) if isinstance(value, (list, tuple)) else [value]
  out = []
  for item in items:
    if isinstance(item, (int, float)) and not isinstance(item, bool):
      out.append(float(item))
      continue
    for x in as_names(item):
      try:
        out.append(float(x))
      except ValueError:
        raise DataError(f"{field or 'a list of numbers'}: {x!r} is not a number; write a tuple "
                        "of numbers, e.g. (0.5, 0.25, 0.25).") from None
  return out


def data_files(config: ml_collections.ConfigDict) -> tuple[list[str], dict | None]:
  """(.h5ad paths, corpus manifest or None) of `config.data.files` (`corpus.expand_files`)."""
  return corpus.expand_files(as_names(config.data.files), config.data.data_dir)


def load_data(config: ml_collections.ConfigDict) -> anndata_io.CellData:
  """The experiment's cells: the embedded simulator or `.h5ad` files (see config.data)."""
  d = config.data
  if d.lazy and d.source != "h5ad":
    raise DataError(f"config.data.lazy=True reads an .h5ad file from disk, but "
                    f"config.data.source={d.source!r}; set --config.data.source=h5ad "
                    "--config.data.files=FILE.h5ad, or --config.data.lazy=False.")
  if d.source == "synthetic":
    return simulate.simulate_cell_data(simulate.SimConfig(**d.sim.to_dict()))
  if d.source != "h5ad":
    raise DataError(f"unknown config.data.source {d.source!r}; use 'synthetic' or 'h5ad'")
  if not as_names(d.files):
    raise DataError("config.data.source='h5ad' needs config.data.files (.h5ad names under "
                    "config.data.data_dir, paths, a folder, a glob or a corpus manifest)")
  if not os.path.isdir(d.data_dir) and not all(os.path.isabs(f) or os.path.exists(f)
                                                or any(c in f for c in "*?[")
                                                for f in as_names(d.files)):
    raise DataError(f"data directory {d.data_dir!r} does not exist; pass "
                    "--config.data.data_dir=/path/to/shared/data")
  files, manifest = data_files(config)
  require_counts = config.train.likelihood in ("poisson", "nb")
  if d.lazy:
    return corpus.open_corpus(files, layer=d.layer or None, gene_column=d.gene_column or None,
                              require_counts=require_counts, obs_columns=obs_columns_used(config),
                              manifest=manifest, use_pack=d.use_pack)
  datas = [anndata_io.read_h5ad(f, layer=d.layer or None, gene_column=d.gene_column or None,
                                require_counts=require_counts) for f in files]
  return datas[0] if len(datas) == 1 else anndata_io.concat(datas, name="+".join(
      os.path.splitext(os.path.basename(f))[0] for f in files))


def obs_columns_used(config: ml_collections.ConfigDict) -> list[str]:
  """The obs columns the config names (a lazy read loads only these)."""
  cols = [config.stages.obs_column, config.data.label_column, config.data.batch_column]
  return list(dict.fromkeys(c for c in cols if c))


def build_plan(config: ml_collections.ConfigDict, data: anndata_io.CellData) -> stages.StagePlan:
  s = config.stages
  order = as_names(s.order) or None
  if s.plan == "random":
    plan = stages.random_gene_plan(
        data, n_stages=s.n_stages, base_fraction=s.base_fraction, eval_fraction=s.eval_fraction,
        seed=config.seed, base_stage=s.base_stage,
        obs_partition=stages.ObsPartition(s.obs_column, order) if s.obs_column else None)
  elif s.plan == "dataset_stream":
    plan = stages.dataset_stream_plan(data, order=order, eval_fraction=s.eval_fraction,
                                      seed=config.seed)
  elif s.plan == "crucial":
    plan = crucial_plan(config, data, load_downstream(config))
  elif s.plan == "modules":
    plan = module_plan(config, data)
  elif s.plan == "expressed":
    plan = expressed_plan(config, data)
  else:
    raise ValueError(f"unknown config.stages.plan {s.plan!r}; known: random, expressed, "
                     "modules, dataset_stream, crucial")
  if s.validation:
    plan = stages.validation_plan(plan, s.eval_fraction, config.seed)
  plan.check(data)
  return plan


def expressed_plan(config: ml_collections.ConfigDict,
                   data: anndata_io.CellData) -> stages.StagePlan:
  """Plan 'expressed': the stage-specific genes are the most expressed genes, split at random.

  Like the paper's crucial genes (top cumulative expression of a downstream dataset), each
  stage's T_k are high-expression genes; B is the (1 - base_fraction) least expressed rest.
  """
  s = config.stages
  mean = anndata_io.gene_means(data) / max(float(data.size_factors.mean()), 1e-8)
  order = np.argsort(-mean, kind="stable")
  n_specific = data.n_genes - int(round(s.base_fraction * data.n_genes))
  if n_specific < s.n_stages:
    raise ValueError(f"{n_specific} stage-specific genes cannot fill {s.n_stages} stages; lower "
                     "config.stages.base_fraction")
  pool = np.random.default_rng([config.seed, 104]).permutation(order[:n_specific])
  genes = np.asarray(data.gene_ids)
  base = list(genes[np.sort(order[n_specific:])])
  specific = [list(genes[np.sort(part)]) for part in np.array_split(pool, s.n_stages)]
  obs_order = as_names(s.order) or None
  return stages.explicit_plan(
      data, specific, base, eval_fraction=s.eval_fraction, seed=config.seed,
      base_stage=s.base_stage,
      obs_partition=stages.ObsPartition(s.obs_column, obs_order) if s.obs_column else None)


def module_plan(config: ml_collections.ConfigDict, data: anndata_io.CellData) -> stages.StagePlan:
  """Plan 'modules' (synthetic data only): stage-specific genes are whole simulated gene modules.

  A hidden stage-k gene is then predictable only through its module-mates, which are also
  stage-k genes, so the model must carry that module's signal; later stages never show those
  genes, and what the shared weights lose of it is measurable forgetting.
  """
  s = config.stages
  if config.data.source != "synthetic":
    raise ValueError("config.stages.plan='modules' needs config.data.source='synthetic'; use "
                     "'random', 'dataset_stream' or 'crucial' for real data")
  module = simulate.gene_modules(simulate.SimConfig(**config.data.sim.to_dict()))
  ids = np.random.default_rng([config.seed, 103]).permutation(int(module.max()) + 1)
  n_base = int(round(s.base_fraction * len(ids)))
  if len(ids) - n_base < s.n_stages:
    raise ValueError(f"{len(ids) - n_base} non-base modules cannot fill {s.n_stages} stages; raise "
                     "config.data.sim.n_modules or lower config.stages.base_fraction")
  genes = np.asarray(simulate.gene_names(len(module)))
  base = list(genes[np.isin(module, ids[:n_base])])
  specific = [list(genes[np.isin(module, part)])
              for part in np.array_split(ids[n_base:], s.n_stages)]
  order = as_names(s.order) or None
  return stages.explicit_plan(
      data, specific, base, eval_fraction=s.eval_fraction, seed=config.seed,
      base_stage=s.base_stage,
      obs_partition=stages.ObsPartition(s.obs_column, order) if s.obs_column else None)


def load_downstream(config: ml_collections.ConfigDict) -> list[downstream.Downstream]:
  """The labelled downstream datasets of `config.downstream.datasets`."""
  d = config.data
  if not os.path.isdir(d.data_dir):
    raise DataError(f"data directory {d.data_dir!r} does not exist (needed for "
                    "config.downstream.datasets); pass --config.data.data_dir=/path/to/shared/data")
  return downstream.load(config.downstream.datasets, d.data_dir,
                         gene_column=config.downstream.gene_column,
                         layer=config.downstream.layer)


def crucial_plan(config: ml_collections.ConfigDict, data: anndata_io.CellData,
                 datasets: list[downstream.Downstream]) -> stages.StagePlan:
  """Plan 'crucial': one stage per downstream dataset (config.stages.order), after a base stage."""
  s = config.stages
  by_name = {ds.name: ds for ds in datasets}
  order = as_names(s.order) or [ds.name for ds in datasets]
  unknown = [n for n in order if n not in by_name]
  if unknown:
    raise DataError(f"config.stages.order names {unknown}, which are not downstream datasets; "
                    f"known: {list(by_name)} (config.downstream.datasets).")
  ratios = as_floats(s.cell_ratios, "config.stages.cell_ratios") or None
  ranked = [downstream.top_genes(data, by_name[n].data, s.top_k, config.batch.normalisation)
            for n in order]
  return stages.crucial_gene_plan(data, ranked, order, keep_rank1=s.keep_rank1,
                                  keep_rank2=s.keep_rank2, cell_ratios=ratios,
                                  eval_fraction=s.eval_fraction, seed=config.seed,
                                  base_stage=s.base_stage)


def extend_plan(plan: stages.StagePlan, data: anndata_io.CellData, datasets: list[str],
                eval_fraction: float, seed: int) -> stages.StagePlan:
  """`plan` with one stage per dataset of `datasets` appended (`gil-jax extend`): the stage
  trains on the dataset's gene panel, introduces the panel genes no earlier stage saw and is
  scored on them (on its whole panel when it brings none); `eval_fraction` of its cells are
  held out. Earlier stages, cells and eval cells are unchanged."""
  out, evals = list(plan.stages), [plan.eval_cells]
  seen = set(seen_genes(plan, len(plan.stages) - 1))
  for d in datasets:
    di = data.dataset_names.index(d)
    cells = np.flatnonzero(data.dataset_index == di)
    perm = np.random.default_rng([seed, 104, len(out)]).permutation(cells)
    n_eval = int(round(eval_fraction * len(cells)))
    panel = [str(g) for g in data.gene_ids[data.panel[di]]]
    new = [g for g in panel if g not in seen]
    seen.update(new)
    out.append(stages.Stage(d, panel, new, new or panel, np.sort(perm[n_eval:])))
    evals.append(np.sort(perm[:n_eval]))
  extended = stages.StagePlan(out, np.sort(np.concatenate(evals)), plan.base_stage)
  extended.check(data)
  return extended


def check_capacity(plan: stages.StagePlan, capacity: int) -> None:
  """Fails before training when the plan's genes cannot fit in the gene table."""
  vocab = GeneVocab(capacity)
  for k, stage in enumerate(plan.stages):
    vocab.activate(stage.new_genes, k)
  del vocab


def stage_vocab(plan: stages.StagePlan, capacity: int, upto: int) -> GeneVocab:
  """The vocabulary after activating stages 0..upto (deterministic from the plan)."""
  vocab = GeneVocab(capacity)
  for k, stage in enumerate(plan.stages[:upto + 1]):
    vocab.activate(stage.new_genes, k)
  return vocab


def seen_genes(plan: stages.StagePlan, upto: int) -> list[str]:
  """B ∪ T_1 ∪ ... ∪ T_upto: every gene trained on up to stage `upto`, in first-seen order."""
  out, seen = [], set()
  for stage in plan.stages[:upto + 1]:
    for g in stage.train_genes:
      if g not in seen:
        seen.add(g)
        out.append(g)
  return out
