"""Gene-incremental stage plans: which genes and which cells each stage trains on.

Protocol (gil.md §1.2): base genes B plus disjoint stage-specific sets T_1..T_n; stage k trains on
B ∪ T_k only (earlier T's are NOT visible later, which is what causes forgetting); an optional
'base' stage first trains on B with half of the cells. A held-out set of eval cells is never
trained on. Plans are deterministic functions of the data and a seed, and serialise to JSON.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import numpy as np

from gil_jax.data.anndata_io import CellData, DataError
from gil_jax.data.vocab import PAD_ROW, GeneVocab

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Stage:
  name: str
  train_genes: list[str]   # genes visible in training at this stage (B ∪ T_k)
  new_genes: list[str]     # genes first introduced at this stage, in order
  eval_genes: list[str]    # genes this stage's gene-wise-regression column is scored on
  train_cells: np.ndarray  # int64 indices into the experiment's CellData


@dataclasses.dataclass
class StagePlan:
  stages: list[Stage]
  eval_cells: np.ndarray   # int64 held-out cells, never trained on
  base_stage: bool = False  # stage 0 trains on the base genes B only (which every stage sees)

  def to_json(self) -> dict[str, Any]:
    return {
        "stages": [{"name": s.name, "train_genes": list(s.train_genes),
                    "new_genes": list(s.new_genes), "eval_genes": list(s.eval_genes),
                    "train_cells": [int(c) for c in s.train_cells]} for s in self.stages],
        "eval_cells": [int(c) for c in self.eval_cells],
        "base_stage": bool(self.base_stage),
    }

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "StagePlan":
    stages = [Stage(name=str(s["name"]), train_genes=[str(g) for g in s["train_genes"]],
                    new_genes=[str(g) for g in s["new_genes"]],
                    eval_genes=[str(g) for g in s["eval_genes"]],
                    train_cells=np.asarray(s["train_cells"], np.int64)) for s in d["stages"]]
    # plans saved before `base_stage` was recorded: the base stage is the one named 'base'
    base = d.get("base_stage", bool(stages) and stages[0].name == "base")
    return cls(stages=stages, eval_cells=np.asarray(d["eval_cells"], np.int64),
               base_stage=bool(base))

  def check(self, data: CellData, min_cells: int = 1) -> None:
    """Raises DataError for a stage without enough cells or genes, or with unknown genes/cells."""
    known = set(data.gene_ids)
    if not self.stages:
      raise DataError("stage plan has no stages; check config.stages (n_stages / gene lists).")
    for s in self.stages:
      if len(s.train_cells) < min_cells:
        raise DataError(f"stage {s.name!r} has {len(s.train_cells)} training cells (< {min_cells})"
                        f" in data {data.name!r}; change cell_ratios, config.stages.obs_column/order "
                        "or config.stages.eval_fraction, or use more cells.")
      if not s.train_genes:
        raise DataError(f"stage {s.name!r} has no training genes; check the stage gene lists or "
                        "config.stages.base_fraction.")
      missing = [g for g in (*s.train_genes, *s.eval_genes) if g not in known]
      if missing:
        raise DataError(f"stage {s.name!r}: {len(missing)} genes are not in data {data.name!r}, "
                        f"e.g. {missing[:5]}; fix the stage gene lists or config.data.gene_column.")
      if len(s.train_cells) and (s.train_cells.min() < 0 or s.train_cells.max() >= data.n_cells):
        raise DataError(f"stage {s.name!r}: cell indices out of range for data {data.name!r} "
                        f"({data.n_cells} cells); the plan was built for other data - rebuild it.")
    overlap = np.intersect1d(self.eval_cells, np.concatenate([s.train_cells for s in self.stages]))
    if overlap.size:
      raise DataError(f"{overlap.size} eval cells are also training cells; rebuild the plan.")


@dataclasses.dataclass
class ObsPartition:
  """Partition cells by obs[column]: one value (or list of values) per stage."""
  column: str
  values: list[Any] | None = None   # None: one stage per distinct value (sorted)


def _as_partition(p: ObsPartition | Mapping | Sequence | None) -> ObsPartition | None:
  if p is None or isinstance(p, ObsPartition):
    return p
  if isinstance(p, Mapping):
    return ObsPartition(column=p["column"], values=p.get("values"))
  column, values = p
  return ObsPartition(column=column, values=values)


def _eval_split(n_cells: int, eval_fraction: float, rng: np.random.Generator,
                groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(eval cells, train pool in random order); split within each group when given."""
  if not 0.0 <= eval_fraction < 1.0:
    raise DataError(f"eval_fraction={eval_fraction} must be in [0, 1) (config.stages.eval_fraction).")
  perm = rng.permutation(n_cells)
  if groups is None:
    n_eval = int(round(eval_fraction * n_cells))
    return np.sort(perm[:n_eval]), perm[n_eval:]
  is_eval = np.zeros(n_cells, bool)
  for gid in np.unique(groups):
    members = perm[groups[perm] == gid]
    is_eval[members[:int(round(eval_fraction * len(members)))]] = True
  return np.flatnonzero(is_eval), perm[~is_eval[perm]]


def validation_plan(plan: StagePlan, fraction: float, seed: int) -> StagePlan:
  """`plan` for choosing a recipe without touching its test cells: they are dropped, and a
  `fraction` of each stage's training cells (drawn with `seed`) becomes the held-out set that
  every figure is then computed on; the stages train on the rest."""
  if not 0.0 < fraction < 1.0:
    raise DataError(f"eval_fraction={fraction} must be in (0, 1) to carve validation cells "
                    "(config.stages.eval_fraction with config.stages.validation=True).")
  rng = np.random.default_rng([seed, 977])
  val = np.concatenate([rng.permutation(s.train_cells)[:int(round(fraction * len(s.train_cells)))]
                        for s in plan.stages])
  val = np.unique(val)
  kept = [dataclasses.replace(s, train_cells=s.train_cells[~np.isin(s.train_cells, val)])
          for s in plan.stages]
  return dataclasses.replace(plan, stages=kept, eval_cells=val)


def _ratio_split(pool: np.ndarray, ratios: Sequence[float]) -> list[np.ndarray]:
  """Consecutive chunks of `pool`; rounding remainder goes to the first stages (as the paper)."""
  ratios = np.asarray(ratios, np.float64)
  if np.any(ratios < 0) or ratios.sum() > 1.0 + 1e-6:
    raise DataError(f"cell_ratios {ratios.tolist()} must be >= 0 and sum to <= 1 "
                    "(the cell_ratios argument).")
  counts = np.floor(ratios * len(pool) + 1e-9).astype(int)
  if abs(ratios.sum() - 1.0) < 1e-6:
    counts[:len(pool) - counts.sum()] += 1
  bounds = np.concatenate([[0], np.cumsum(counts)])
  return [np.sort(pool[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _obs_split(data: CellData, pool: np.ndarray, part: ObsPartition, n: int) -> list[np.ndarray]:
  if part.column not in data.obs.columns:
    raise DataError(f"obs_partition column {part.column!r} not in obs of {data.name!r}; available: "
                    f"{list(data.obs.columns)} (config.stages.obs_column).")
  col = data.obs[part.column].astype(str).to_numpy()
  values = part.values if part.values is not None else sorted(set(col))
  if len(values) != n:
    raise DataError(f"obs_partition on {part.column!r} gives {len(values)} groups {values} for "
                    f"{n} stages; list exactly one value (or list of values) per stage in config.stages.order.")
  out = []
  for v in values:
    vs = {str(x) for x in (v if isinstance(v, (list, tuple)) else [v])}
    unknown = vs - set(col)
    if unknown:
      raise DataError(f"obs_partition: values {sorted(unknown)} not found in obs[{part.column!r}] "
                      f"of {data.name!r}; available: {sorted(set(col))[:20]}.")
    out.append(np.sort(pool[np.isin(col[pool], list(vs))]))
  unused = len(pool) - sum(len(o) for o in out)
  if unused:
    missing = int(data.obs[part.column].iloc[pool].isna().sum())
    log.warning("obs_partition on %r: %d of %d training cells match no stage's values and are "
                "not trained on (%d of them have a missing value); list their values in "
                "config.stages.order to use them.", part.column, unused, len(pool), missing)
  return out


def _ordered(data: CellData, genes: set[str]) -> list[str]:
  return [g for g in data.gene_ids if g in genes]


def _gene_plan(data: CellData, base: list[str], specific: list[list[str]], names: list[str],
               cell_ratios: Sequence[float] | None, eval_fraction: float, seed: int,
               base_stage: bool, obs_partition: Any) -> StagePlan:
  rng = np.random.default_rng([seed, 101])
  eval_cells, pool = _eval_split(data.n_cells, eval_fraction, rng)
  n = len(specific) + int(base_stage)
  part = _as_partition(obs_partition)
  if part is not None:
    cells = _obs_split(data, pool, part, n)
  else:
    if cell_ratios is None:
      k = len(specific)
      cell_ratios = [0.5] + [0.5 / k] * k if base_stage else [1.0 / k] * k
    if len(cell_ratios) != n:
      raise DataError(f"cell_ratios has {len(cell_ratios)} entries for {n} stages (the base "
                      "stage counts when config.stages.base_stage=True).")
    cells = _ratio_split(pool, cell_ratios)
  stages = []
  if base_stage:
    stages.append(Stage("base", list(base), list(base), list(base), cells[0]))
  for i, (name, t) in enumerate(zip(names, specific)):
    first = i == 0 and not base_stage
    stages.append(Stage(name, _ordered(data, set(base) | set(t)),
                        (list(base) + list(t)) if first else list(t), list(t),
                        cells[i + int(base_stage)]))
  return StagePlan(stages=stages, eval_cells=eval_cells, base_stage=base_stage)


def random_gene_plan(data: CellData, n_stages: int, base_fraction: float = 0.5, *,
                     cell_ratios: Sequence[float] | None = None, eval_fraction: float = 0.1,
                     seed: int = 0, base_stage: bool = True,
                     obs_partition: ObsPartition | Mapping | Sequence | None = None) -> StagePlan:
  """Random B (base_fraction of genes) and an even split of the rest into T_1..T_n_stages.

  With base_stage, a first stage 'base' trains on B with 50% of the training cells and the rest
  is split equally (cell_ratios, including the base stage, or obs_partition override this).
  """
  if n_stages < 1:
    raise DataError(f"n_stages={n_stages} must be >= 1 (config.stages.n_stages).")
  if not 0.0 <= base_fraction < 1.0:
    raise DataError(f"base_fraction={base_fraction} must be in [0, 1) "
                    "(config.stages.base_fraction).")
  rng = np.random.default_rng([seed, 100])
  perm = rng.permutation(data.n_genes)
  n_base = int(round(base_fraction * data.n_genes))
  if data.n_genes - n_base < n_stages:
    raise DataError(f"{data.n_genes - n_base} non-base genes cannot fill {n_stages} stages; lower "
                    "config.stages.base_fraction or config.stages.n_stages.")
  base = list(data.gene_ids[np.sort(perm[:n_base])])
  specific = [list(data.gene_ids[np.sort(c)]) for c in np.array_split(perm[n_base:], n_stages)]
  names = [f"stage{i + 1}" for i in range(n_stages)]
  return _gene_plan(data, base, specific, names, cell_ratios, eval_fraction, seed, base_stage,
                    obs_partition)


def explicit_plan(data: CellData, stage_genes: Sequence[Sequence[str]], base_genes: Sequence[str],
                  *, stage_names: Sequence[str] | None = None,
                  cell_ratios: Sequence[float] | None = None, eval_fraction: float = 0.1,
                  seed: int = 0, base_stage: bool = True,
                  obs_partition: ObsPartition | Mapping | Sequence | None = None) -> StagePlan:
  """Plan from given gene lists: B = base_genes, T_k = stage_genes[k] (must be disjoint)."""
  names = list(stage_names) if stage_names is not None else [
      f"stage{i + 1}" for i in range(len(stage_genes))]
  if len(names) != len(stage_genes) or not stage_genes:
    raise DataError(f"{len(stage_genes)} stage gene lists but {len(names)} stage names; give one "
                    "name per list and at least one list.")
  known = set(data.gene_ids)
  seen = {g: "base" for g in base_genes}
  for name, genes in zip(names, stage_genes):
    missing = [g for g in genes if g not in known]
    if missing:
      raise DataError(f"stage {name!r}: {len(missing)} genes not in data {data.name!r}, e.g. "
                      f"{missing[:5]}; fix the gene list or config.data.gene_column.")
    clash = [g for g in genes if g in seen]
    if clash:
      raise DataError(f"stage {name!r}: genes {clash[:5]} also in stage {seen[clash[0]]!r}; "
                      "stage-specific gene sets must be disjoint from each other and from B.")
    seen.update({g: name for g in genes})
  missing = [g for g in base_genes if g not in known]
  if missing:
    raise DataError(f"base genes: {len(missing)} not in data {data.name!r}, e.g. {missing[:5]}.")
  return _gene_plan(data, list(base_genes), [list(g) for g in stage_genes], names, cell_ratios,
                    eval_fraction, seed, base_stage, obs_partition)


def dedup_crucial(ranked: Sequence[Sequence[str]], keep_rank1: int = 20,
                  keep_rank2: int = 100) -> list[list[str]]:
  """Cross-dataset de-duplication of crucial-gene lists (gil.md §1.2, `select_exclude_1102`).

  `ranked[i]` is dataset i's top-K genes, best first (0-based rank = position). For a gene in
  >= 2 lists, with r = its smallest rank:
    r > keep_rank2                                   -> removed from every list;
    r < keep_rank1 in >= 2 lists                     -> removed from every list;
    r < keep_rank1 in exactly one list               -> kept only in that list;
    keep_rank1 <= r <= keep_rank2                    -> kept in the first list (input order) where
                                                        keep_rank1 <= rank <= keep_rank2 only.
  Genes in one list are kept. Lists keep their rank order.
  """
  if not 0 <= keep_rank1 <= keep_rank2:
    raise DataError(f"need 0 <= keep_rank1 ({keep_rank1}) <= keep_rank2 ({keep_rank2}) "
                    "(config.stages.keep_rank1 / keep_rank2).")
  ranks: dict[str, dict[int, int]] = {}
  for i, genes in enumerate(ranked):
    if len(set(genes)) != len(genes):
      raise DataError(f"crucial-gene list {i} has duplicate genes.")
    for r, g in enumerate(genes):
      ranks.setdefault(g, {})[i] = r
  keep_in: dict[str, set[int]] = {}
  for g, by_list in ranks.items():
    if len(by_list) < 2:
      keep_in[g] = set(by_list)
      continue
    r_min = min(by_list.values())
    n_top = sum(r < keep_rank1 for r in by_list.values())
    if r_min > keep_rank2 or n_top >= 2:
      keep_in[g] = set()
    elif n_top == 1:
      keep_in[g] = {min(by_list, key=lambda i: by_list[i])}
    else:
      keep_in[g] = {min(i for i, r in by_list.items() if keep_rank1 <= r <= keep_rank2)}
  return [[g for g in genes if i in keep_in[g]] for i, genes in enumerate(ranked)]


def crucial_gene_plan(data: CellData, ranked: Sequence[Sequence[str]], names: Sequence[str], *,
                      keep_rank1: int = 20, keep_rank2: int = 100,
                      cell_ratios: Sequence[float] | None = None, eval_fraction: float = 0.1,
                      seed: int = 0, base_stage: bool = True) -> StagePlan:
  """The paper's benchmark plan: T_k = de-duplicated crucial genes of downstream dataset k.

  `ranked[k]` is dataset `names[k]`'s top-K list (see `downstream.top_genes`), in stage order.
  B = every other gene of `data`; stage 0 ('base') trains on B with half the cells (default
  cell_ratios [0.5, 0.5/n, ...]), then stage k on B ∪ T_k.
  """
  names = list(names)
  if len(names) != len(ranked) or not names:
    raise DataError(f"{len(ranked)} crucial-gene lists for {len(names)} downstream datasets; "
                    "give one list per dataset (config.downstream.datasets / config.stages.order).")
  specific = dedup_crucial(ranked, keep_rank1, keep_rank2)
  for name, before, after in zip(names, ranked, specific):
    log.info("crucial genes of %r: %d of top-%d kept after de-duplication", name, len(after),
             len(before))
    if not after:
      raise DataError(f"downstream dataset {name!r}: all {len(before)} crucial genes were removed "
                      "by the cross-dataset de-duplication; raise config.stages.top_k or change "
                      "config.stages.keep_rank1 / keep_rank2.")
  crucial = {g for t in specific for g in t}
  base = [g for g in data.gene_ids if g not in crucial]
  return explicit_plan(data, specific, base, stage_names=names, cell_ratios=cell_ratios,
                       eval_fraction=eval_fraction, seed=seed, base_stage=base_stage)


def dataset_stream_plan(data: CellData, order: Sequence[str] | None = None,
                        eval_fraction: float = 0.1, seed: int = 0) -> StagePlan:
  """One stage per source dataset, training on that dataset's gene panel.

  new_genes = panel genes not seen in earlier stages; eval_genes = new_genes (first stage: its
  whole panel). Eval cells are held out within every dataset.
  """
  order = list(order) if order is not None else list(data.dataset_names)
  unknown = [d for d in order if d not in data.dataset_names]
  if unknown:
    raise DataError(f"datasets {unknown} not in {data.name!r}; available: {data.dataset_names} "
                    "(config.stages.order).")
  rng = np.random.default_rng([seed, 102])
  eval_cells, pool = _eval_split(data.n_cells, eval_fraction, rng, groups=data.dataset_index)
  seen: set[str] = set()
  stages = []
  for d in order:
    di = data.dataset_names.index(d)
    panel = list(data.gene_ids[data.panel[di]])
    new = [g for g in panel if g not in seen]
    seen.update(new)
    stages.append(Stage(d, panel, new, new, np.sort(pool[data.dataset_index[pool] == di])))
  return StagePlan(stages=stages, eval_cells=eval_cells)


def eval_columns(data: CellData, vocab: GeneVocab, genes: Sequence[str]) -> np.ndarray:
  """int32[n_genes]: vocab row for data columns whose gene is in `genes` (and the vocab), else 0."""
  keep = np.isin(data.gene_ids, np.asarray(list(genes), dtype=str))
  rows = vocab.rows(list(data.gene_ids), missing="pad")
  return np.where(keep, rows, PAD_ROW).astype(np.int32)


def stage_columns(data: CellData, vocab: GeneVocab, stage: Stage) -> np.ndarray:
  """int32[n_genes]: vocab row for data columns whose gene is in stage.train_genes, else 0."""
  cols = eval_columns(data, vocab, stage.train_genes)
  unknown = [g for g in stage.train_genes if g not in vocab]
  if unknown:
    raise DataError(f"stage {stage.name!r}: {len(unknown)} train genes have no gene-table row, "
                    f"e.g. {unknown[:5]}; call vocab.activate(stage.new_genes, stage_index) first.")
  dropped = int(np.sum(cols == PAD_ROW))
  log.info("stage %r: %d of %d genes of %r dropped (not in the stage); %d kept", stage.name,
           dropped, data.n_genes, data.name, data.n_genes - dropped)
  return cols
