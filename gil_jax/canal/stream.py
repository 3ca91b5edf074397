"""A stream of labelled datasets: sources -> normalised CellData, stages, held-out cells, labels.

Each source (config.canal.sources.<name>: file, label_column, layer, normalisation, gene_column,
split_column, split_values) is read, normalised on the host (so sources with different value
types share one batcher with normalisation 'none'), its labels harmonised with the label map,
and split into stages (whole source, or one stage per value of `split_column`). Each training
stage keeps stratified held-out test cells and validation cells; test-only sources are never
trained on. Withheld types (novelty setting) are removed from training but kept in test cells.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import ml_collections
import numpy as np
import scipy.sparse as sp
from sklearn.model_selection import train_test_split

from gil_jax.canal import labels as labels_lib
from gil_jax.data import anndata_io, batching, pipeline
from gil_jax.data.anndata_io import CellData, DataError
from gil_jax.data import corpus
from gil_jax.data.corpus import resolve_path
from gil_jax.experiment import RAW_SCALE, as_names

log = logging.getLogger("gil_jax")
SOURCE_NORMALISATIONS = batching.NORMALISATIONS
DEPTH_INPUT = "reference"  # run meta: annotation models see every cell at size factor 1


@dataclasses.dataclass
class AnnotStage:
  name: str
  source: str
  train_cells: np.ndarray
  val_cells: np.ndarray
  test_cells: np.ndarray


@dataclasses.dataclass
class Stream:
  data: CellData              # all sources, normalised values
  labels: np.ndarray          # object[cells]: harmonised cell-type names
  stages: list[AnnotStage]
  test_only: dict[str, np.ndarray]   # source -> cells
  withheld: list[str]
  confounded: np.ndarray | None = None  # bool[genes]: left out (class_confounded_genes)

  def __post_init__(self):
    if self.confounded is None:
      self.confounded = np.zeros(self.data.n_genes, bool)

  def stage_genes(self, k: int) -> list[str]:
    """Genes measured by the datasets of stage k's cells (class-confounded ones left out)."""
    st = self.stages[k]
    cells = np.concatenate([st.train_cells, st.val_cells, st.test_cells])
    panels = self.data.panel[np.unique(self.data.dataset_index[cells])]
    return list(self.data.gene_ids[panels.any(0) & ~self.confounded])


def class_confounded_genes(data: CellData, labels: np.ndarray, stages: list[AnnotStage],
                           min_coverage: float) -> np.ndarray:
  """bool[genes]: genes that the training sources measuring them cover fewer than
  `min_coverage` of the training cell types for (0: none).

  A token is a detected gene, so a gene measured only by studies that hold some types is
  evidence for those types whatever its value: in the pancreas files, 38 genes of Wang's panel
  are measured among the training studies by Xin alone, whose cells are all endocrine, and a
  model trained with them calls Wang's ductal cells endocrine. Test-only sources do not count.
  """
  if not 0.0 <= min_coverage <= 1.0:
    raise DataError(f"config.canal.min_gene_class_coverage={min_coverage} must be in [0, 1] (a "
                    "share of the training cell types; 0 keeps every gene).")
  if min_coverage == 0.0 or not stages:
    return np.zeros(data.n_genes, bool)
  train = np.concatenate([s.train_cells for s in stages])
  classes, cls = np.unique(labels[train], return_inverse=True)
  held = np.zeros((data.panel.shape[0], len(classes)), bool)  # dataset x training type
  held[data.dataset_index[train], cls] = True
  measured = data.panel.astype(np.int32)                       # dataset x gene
  covered = (measured.T @ held.astype(np.int32)) > 0            # gene x training type
  by_training = measured[held.any(1)].any(0)
  return by_training & (covered.sum(1) < min_coverage * len(classes))


def normalise_values(data: CellData, how: str, source: str,
                     reference_depth: bool = True) -> CellData:
  """Returns `data` with X in ln(1 + CP10k) units (host-side, per source); with
  `reference_depth` (annotation models) every size factor is then 1.

  The annotator sees each cell at the reference depth: a pre-normalised file carries no library
  size (its stand-in, the sum of the file's values, differs by file format: -3.1 for panc8's
  ln CP10k layer, -0.9 for Baron's counts in log units), so the depth token would otherwise tell
  the classifier which file a cell came from, and the same cells given as counts or as
  ln(1 + CP10k) would get different labels. Gene-incremental models were trained on real size
  factors and keep them (`reference_depth=False`).
  """
  at_depth = _at_reference_depth if reference_depth else (lambda d: d)
  if how not in SOURCE_NORMALISATIONS:
    raise DataError(f"source {source!r}: unknown normalisation {how!r}; use one of "
                    f"{SOURCE_NORMALISATIONS} (config.canal.sources.{source}.normalisation).")
  if how == "none":
    return at_depth(data)
  if how == "log1p_cp10k" and not data.is_counts:
    log.warning("source %s: log1p_cp10k on non-integer values; set normalisation='none' for "
                "pre-normalised files", source)
  if how == "from_log2_cpm":
    top = float(data.X.data.max()) if sp.issparse(data.X) and data.X.nnz else None
    if data.is_counts or (top is not None and top > RAW_SCALE):
      raise DataError(f"source {source!r}: normalisation 'from_log2_cpm' expects log2(1 + CPM) "
                      "values, but the file holds "
                      + ("integer counts" if data.is_counts else f"values up to {top:.4g}")
                      + f"; use 'log1p_cp10k' for counts (config.canal.sources.{source}"
                      ".normalisation).")
  if not sp.issparse(data.X):  # lazily read: normalised as rows are read, same arithmetic
    data.X.normalise_on_read(how, data.size_factors)  # keeps its own copy of the factors
    return at_depth(data)
  x = data.X.copy().tocsr()
  rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
  x.data = batching.normalise(x.data, data.size_factors[rows], how)
  return at_depth(dataclasses.replace(data, X=sp.csr_matrix(x)))


def warn_if_old_depth_input(meta: dict, what: str) -> None:
  """Runs saved before annotation moved to the reference depth fed the depth token each file's
  size-factor stand-in; they now see size factor 1, so their labels can change."""
  if meta.get("kind") == "canal" and meta.get("depth_input") != DEPTH_INPUT:
    log.warning("%s was trained before annotation moved to the reference depth (every cell at "
                "size factor 1); its depth token now sees another input than in training, so "
                "its labels can differ from its saved figures. Retrain it for consistent results.",
                what)


def _at_reference_depth(data: CellData) -> CellData:
  return dataclasses.replace(data, size_factors=np.ones(data.n_cells, np.float32))


def read_source(name: str, src: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                label_map: dict, drop: set[str], scans: dict | None = None
                ) -> tuple[CellData, np.ndarray]:
  """One source as (normalised CellData, harmonised labels); bad labels raise clear errors.
  `scans` (`manifest_scans`): cached validating passes by (path, layer, gene column)."""
  path = resolve_path(src.file, config.data.data_dir)
  col = src.get("label_column", "") or config.data.label_column
  layer, gene_column = src.get("layer", "") or None, src.get("gene_column", "") or None
  if config.data.lazy:  # rows stay on disk; only the label and split columns are read
    scan = (scans or {}).get((os.path.realpath(path), layer, gene_column))
    data = pipeline.open_lazy_h5ad(path, name=name, layer=layer, gene_column=gene_column,
                                   obs_columns=[c for c in (col, src.get("split_column", ""))
                                                if c], scan=scan)
  else:
    data = anndata_io.read_h5ad(path, layer=layer, gene_column=gene_column, name=name)
  if not col or col not in data.obs.columns:
    raise DataError(f"source {name!r} ({path}): label column {col!r} not found in obs (columns: "
                    f"{list(data.obs.columns)}). Set config.canal.sources.{name}.label_column "
                    "(or config.data.label_column) to the column holding cell-type labels.")
  raw = data.obs[col]
  missing = raw.isna().to_numpy() | (raw.astype(str).str.strip() == "").to_numpy()
  if missing.all():
    raise DataError(f"source {name!r} ({path}): obs[{col!r}] holds no labels; a training or test "
                    "file needs cell-type labels for every cell.")
  if missing.any():
    raise DataError(f"source {name!r} ({path}): {int(missing.sum())} of {len(missing)} cells have "
                    f"no label in obs[{col!r}]; label them or remove them from the file.")
  keep = ~raw.astype(str).isin(drop).to_numpy()
  data = data.subset(np.flatnonzero(keep))
  labs = labels_lib.harmonise(data.obs[col].astype(str), label_map, f"source {name!r}")
  return normalise_values(data, src.get("normalisation", "log1p_cp10k"), name), labs


def _split(cells: np.ndarray, labs: np.ndarray, frac: float, seed: int):
  """(rest, held) with `frac` held out, stratified when every class has >= 2 cells."""
  if frac <= 0 or len(cells) < 2:
    return cells, cells[:0]
  _, counts = np.unique(labs, return_counts=True)
  strat = labs if counts.min() >= 2 and len(counts) > 1 else None
  n_held = max(1, int(round(frac * len(cells))))
  if strat is not None and n_held < len(counts):
    strat = None
  rest, held = train_test_split(cells, test_size=n_held, random_state=seed, stratify=strat)
  return np.sort(rest), np.sort(held)


def panel_genes(panel: str) -> list[str]:
  """The gene ids of a panel: an .h5ad file's var_names, or a text file with one id per line."""
  if not os.path.isfile(panel):
    raise DataError(f"config.canal.gene_panel: no file {panel!r}; name an .h5ad (its var_names) "
                    "or a text file with one gene id per line.")
  if panel.endswith(".h5ad"):
    import anndata as ad  # noqa: PLC0415
    return list(ad.read_h5ad(panel, backed="r").var_names.astype(str))
  with open(panel) as f:
    return [line.strip() for line in f if line.strip()]


def restrict_to_panel(data: CellData, panel: str, min_genes: int) -> CellData:
  """`data` on the genes of `panel` only (e.g. the genes a query study measures, so that the
  model learns from the genes it will see, as a baseline fitted on the shared genes does)."""
  if not sp.issparse(data.X):
    raise DataError("config.canal.gene_panel needs the sources in memory; set "
                    "--config.data.lazy=False (or drop the gene panel).")
  keep = np.isin(data.gene_ids, np.asarray(panel_genes(panel), dtype=str))
  if keep.sum() < min_genes:
    raise DataError(f"config.canal.gene_panel {panel!r} shares {int(keep.sum())} genes with the "
                    f"training data (< config.canal.min_shared_genes={min_genes}); check that "
                    "both use the same kind of gene ids.")
  log.info("gene panel %s: training on %d of %d genes", panel, int(keep.sum()), len(keep))
  return data.select_genes(keep)


def corpus_sources(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.canal.sources for a labelled corpus (config.data.files: its folder or manifest, as
  written by `gil-jax corpus`): one source per file, named by its file stem, with
  config.data.label_column, config.data.layer / gene_column and normalisation 'log1p_cp10k'.
  The manifest says which files hold counts; one that does not is refused (list the sources
  with their normalisation). Paths are stored relative to config.data.data_dir when under it,
  else absolute, so a resume finds the same sources however the corpus was named."""
  d = config.data
  fix = "or list the sources in config.canal.sources"
  if not d.label_column:
    raise DataError("config.canal.sources is empty and config.data.files names a corpus: its files "
                    "become the sources, labelled by config.data.label_column, which is empty; "
                    "set it to the obs column holding cell-type labels.")
  paths, manifest = corpus.expand_files(as_names(d.files), d.data_dir)
  if manifest is None:
    raise DataError(f"config.data.files={as_names(d.files)} has no corpus manifest; annotation "
                    "from a corpus reads which files hold counts from it: run `gil-jax corpus "
                    f"DIR` first ({fix}).")
  corpus.check_manifest_reads(manifest, d.layer, d.gene_column)
  root = os.path.abspath(d.data_dir)
  sources: dict[str, dict] = {}
  for f in manifest["files"]:
    path = f["abspath"]
    name = os.path.splitext(os.path.basename(path))[0]
    if any(c in name for c in ".,:") or not name:
      raise DataError(f"corpus file {path}: its name {name!r} cannot name a source (no '.', ',' "
                      f"or ':'); rename the file {fix}.")
    if name in sources:
      raise DataError(f"corpus files {sources[name]['file']} and {path} would both be source "
                      f"{name!r}; rename one {fix}.")
    if not f["is_counts"]:
      raise DataError(f"corpus file {path} holds non-integer values, so its normalisation is not "
                      f"known; list the sources in config.canal.sources with their normalisation "
                      f"({SOURCE_NORMALISATIONS}).")
    under = os.path.commonpath([root, path]) == root
    sources[name] = dict(file=os.path.relpath(path, root) if under else path,
                         label_column=d.label_column, layer=d.layer,
                         normalisation="log1p_cp10k", gene_column=d.gene_column,
                         split_column="", split_values=())
  return ml_collections.ConfigDict(sources)


def sources_manifest(config: ml_collections.ConfigDict) -> dict | None:
  """The corpus manifest of config.data.files, verified, for lazily read sources (None when
  there is none, the sources are read into memory, or it no longer matches its files: a
  corpus whose files become the sources is then refused with the fix by `corpus_sources`, and
  a resumed run by its data fingerprint)."""
  if not config.data.lazy or not as_names(config.data.files):
    return None
  try:
    return corpus.expand_files(as_names(config.data.files), config.data.data_dir)[1]
  except DataError as e:  # sources listed beside a stale corpus: they are read as files
    log.warning("config.data.files: its corpus manifest is not used for the sources: %s", e)
    return None


def manifest_scans(manifest: dict | None) -> dict:
  """{(file path, layer, gene column): its validating pass cached in the manifest}, so that
  sources from a corpus are opened without reading their values again ({} without one)."""
  if manifest is None:
    return {}
  layer, gene_column = manifest.get("layer") or None, manifest.get("gene_column") or None
  return {(os.path.realpath(f["abspath"]), layer, gene_column): f["scan"]
          for f in manifest["files"]}


def source_names(c: ml_collections.ConfigDict) -> list[str]:
  """The sources in the order their cells are stacked: config.canal.source_order, then any
  others in name order."""
  order = as_names(c.get("source_order", ()))
  unknown = [n for n in order if n not in c.sources]
  if unknown:
    raise DataError(f"config.canal.source_order names unknown sources {unknown}; known: "
                    f"{sorted(c.sources)}")
  return order + sorted(n for n in c.sources if n not in order)


def build_stream(config: ml_collections.ConfigDict) -> Stream:
  c = config.canal
  if not c.sources or not len(c.sources):
    raise DataError("config.canal.sources is empty; name at least one labelled .h5ad source (or "
                    "a labelled corpus in config.data.files).")
  label_map = labels_lib.parse_label_map(c.label_map)
  drop = set(as_names(c.drop_labels))
  test_only = as_names(c.test_only)
  unknown = [s for s in test_only if s not in c.sources]
  if unknown:
    raise DataError(f"config.canal.test_only names unknown sources {unknown}; known: "
                    f"{list(c.sources)}")
  names = source_names(c)
  manifest = sources_manifest(config)
  scans = manifest_scans(manifest)
  datas, labs = [], []
  for name in names:
    d, l = read_source(name, c.sources[name], config, label_map, drop, scans)
    datas.append(d)
    labs.append(l)
  data = datas[0] if len(datas) == 1 else anndata_io.concat(datas, name="+".join(names))
  if manifest is not None and config.data.get("use_pack", True):  # rows from its pack, if any
    data = corpus.pack_view(data, manifest)
  labels = np.concatenate(labs)
  if c.get("gene_panel", ""):
    data = restrict_to_panel(data, c.gene_panel, int(c.min_shared_genes))
  source_of = np.asarray(data.dataset_names, object)[data.dataset_index]

  stages, test_cells = [], {}
  for name in names:
    cells = np.flatnonzero(source_of == name)
    if name in test_only:
      test_cells[name] = cells
      continue
    src = c.sources[name]
    split_col = src.get("split_column", "")
    if split_col:
      if split_col not in data.obs.columns:
        raise DataError(f"source {name!r}: split column {split_col!r} not in obs; fix "
                        f"config.canal.sources.{name}.split_column.")
      vals = data.obs[split_col].astype(str).to_numpy()[cells]
      order = as_names(src.get("split_values", ())) or sorted(set(vals))
      parts = [(f"{name}:{v}", cells[vals == v]) for v in order]
    else:
      parts = [(name, cells)]
    for stage_name, sc in parts:
      if len(sc) == 0:
        raise DataError(f"stage {stage_name!r} has no cells; fix config.canal.sources.{name}."
                        "split_values.")
      rest, test = _split(sc, labels[sc], c.test_fraction, config.seed)
      train, val = _split(rest, labels[rest], c.val_fraction, config.seed + 1)
      stages.append(AnnotStage(stage_name, name, train, val, test))
  order = as_names(c.stage_order)
  if order:
    by = {s.name: s for s in stages}
    bad = [o for o in order if o not in by]
    if bad:
      raise DataError(f"config.canal.stage_order names unknown stages {bad}; known: {list(by)}")
    stages = [by[o] for o in order]
  withheld = as_names(c.withhold)
  if withheld:
    for s in stages:
      s.train_cells = s.train_cells[~np.isin(labels[s.train_cells], withheld)]
      s.val_cells = s.val_cells[~np.isin(labels[s.val_cells], withheld)]
  for s in stages:
    if len(s.train_cells) == 0:
      raise DataError(f"stage {s.name!r} has no training cells left; check config.canal.withhold "
                      "and config.canal.test_fraction.")
  confounded = class_confounded_genes(data, labels, stages,
                                      float(c.get("min_gene_class_coverage", 0.0)))
  if confounded.any():
    log.info("%d genes left out as class-confounded (their training sources hold < %.0f%% of "
             "the training cell types; config.canal.min_gene_class_coverage)",
             int(confounded.sum()), 100 * float(c.min_gene_class_coverage))
  return Stream(data=data, labels=labels, stages=stages, test_only=test_cells, withheld=withheld,
                confounded=confounded)
