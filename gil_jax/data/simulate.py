"""Deterministic negative-binomial single-cell simulator (default embedded data and test data).

Generative model (all draws from one seeded numpy Generator):

* genes are split into co-varying *modules*; each gene has a positive loading on its module;
* each cell type has a *program* (mean module activity); a cell's module activities are its
  type's program plus per-cell noise, so a hidden gene is predictable from its module-mates;
* gene mean = base mean x exp(loading x module activity + batch shift) x library size, with
  log-normal base means (most genes lowly expressed), per-batch multiplicative gene shifts and
  log-normal library sizes;
* counts ~ NB(mean, dispersion) via a gamma-Poisson mixture.

Each simulated source dataset measures its own gene panel (`panel_fraction` of the genes).
"""

from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from gil_jax.data.anndata_io import CellData, DataError, concat, from_anndata


@dataclasses.dataclass
class SimConfig:
  n_cells: int = 6000
  n_genes: int = 600
  n_cell_types: int = 6
  n_modules: int = 20
  n_batches: int = 3
  n_datasets: int = 1
  panel_fraction: float = 1.0     # fraction of genes each dataset measures (1.0 = all)
  base_log_mean: float = -2.2     # log of a gene's base mean count (at library size 1)
  base_log_sd: float = 1.3
  program_sd: float = 1.0         # spread of cell-type module programs
  activity_noise_sd: float = 0.4  # per-cell module activity noise
  loading_low: float = 0.6        # module loadings ~ U(low, high)
  loading_high: float = 1.4
  batch_sd: float = 0.25          # per-batch log-scale gene shift
  lib_log_mean: float = 0.0       # log-normal library-size factor
  lib_log_sd: float = 0.35
  dispersion: float = 0.3         # NB: var = mu + dispersion * mu^2
  seed: int = 0


def _check(cfg: SimConfig) -> None:
  bad = [f for f in ("n_cells", "n_genes", "n_cell_types", "n_modules", "n_batches", "n_datasets")
         if getattr(cfg, f) < 1]
  if bad:
    raise DataError(f"simulator config: {bad} must be >= 1 (config.data.sim.*).")
  if not 0.0 < cfg.panel_fraction <= 1.0:
    raise DataError(f"simulator config: panel_fraction={cfg.panel_fraction} must be in (0, 1] "
                    "(config.data.sim.panel_fraction).")
  if cfg.n_modules > cfg.n_genes:
    raise DataError(f"simulator config: n_modules={cfg.n_modules} > n_genes={cfg.n_genes}; "
                    "lower config.data.sim.n_modules.")
  if cfg.dispersion <= 0:
    raise DataError("simulator config: dispersion must be > 0 (config.data.sim.dispersion).")


def gene_names(n_genes: int) -> list[str]:
  width = max(5, len(str(n_genes)))
  return [f"G{i + 1:0{width}d}" for i in range(n_genes)]


def gene_modules(cfg: SimConfig) -> np.ndarray:
  """int[n_genes]: module of every gene (same draw as `simulate`)."""
  return _latents(cfg)["module"]


def _latents(cfg: SimConfig) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([cfg.seed, 7])
  g = cfg.n_genes
  module = rng.permutation(np.arange(g) % cfg.n_modules)
  return dict(
      module=module,
      loading=rng.uniform(cfg.loading_low, cfg.loading_high, g),
      base=rng.normal(cfg.base_log_mean, cfg.base_log_sd, g),
      program=rng.normal(0.0, cfg.program_sd, (cfg.n_cell_types, cfg.n_modules)),
      batch_shift=rng.normal(0.0, cfg.batch_sd, (cfg.n_batches, g)),
      type_p=rng.dirichlet(np.full(cfg.n_cell_types, 5.0)),
  )


def _means(cfg: SimConfig, rng: np.random.Generator):
  """(NB means float32[cells, genes], cell_type, batch, dataset): the draws before the counts."""
  lat = _latents(cfg)
  c = cfg.n_cells
  cell_type = rng.choice(cfg.n_cell_types, size=c, p=lat["type_p"])
  batch = rng.integers(0, cfg.n_batches, c)
  dataset = np.sort(rng.integers(0, cfg.n_datasets, c)) if cfg.n_datasets > 1 else np.zeros(c, int)
  activity = lat["program"][cell_type] + rng.normal(0.0, cfg.activity_noise_sd,
                                                    (c, cfg.n_modules))
  lib = rng.normal(cfg.lib_log_mean, cfg.lib_log_sd, c)
  log_mu = (lat["base"][None, :] + lat["loading"][None, :] * activity[:, lat["module"]]
            + lat["batch_shift"][batch] + lib[:, None])
  return np.exp(log_mu.astype(np.float32)), cell_type, batch, dataset


def true_means(cfg: SimConfig) -> np.ndarray:
  """float32[cells, genes]: the negative-binomial mean of every simulated count (cells in
  simulation order, `cell{i}`), for noise-floor analyses: no predictor of the counts can beat
  knowing it."""
  return _means(cfg, np.random.default_rng([cfg.seed, 11]))[0]


def _counts(cfg: SimConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(counts float32[cells, genes], cell_type, batch, dataset) for all cells."""
  rng = np.random.default_rng([cfg.seed, 11])
  mu, cell_type, batch, dataset = _means(cfg, rng)
  shape = np.float32(1.0 / cfg.dispersion)
  lam = rng.standard_gamma(shape, size=mu.shape, dtype=np.float32) * (mu / shape)
  counts = rng.poisson(lam).astype(np.float32)
  return counts, cell_type, batch, dataset


def _panels(cfg: SimConfig) -> np.ndarray:
  """bool[n_datasets, n_genes]: genes measured by each simulated dataset."""
  rng = np.random.default_rng([cfg.seed, 13])
  k = max(1, int(round(cfg.panel_fraction * cfg.n_genes)))
  panel = np.zeros((cfg.n_datasets, cfg.n_genes), bool)
  for d in range(cfg.n_datasets):
    panel[d, rng.choice(cfg.n_genes, k, replace=False) if k < cfg.n_genes else slice(None)] = True
  return panel


def dataset_names(cfg: SimConfig) -> list[str]:
  return [f"sim{d}" for d in range(cfg.n_datasets)]


def simulate(cfg: SimConfig | None = None) -> list[ad.AnnData]:
  """One AnnData per simulated dataset: integer counts (CSR float32) on its own gene panel."""
  cfg = cfg or SimConfig()
  _check(cfg)
  counts, cell_type, batch, dataset = _counts(cfg)
  panel = _panels(cfg)
  genes = np.array(gene_names(cfg.n_genes))
  width = max(5, len(str(cfg.n_cells)))
  cells = np.array([f"cell{i:0{width}d}" for i in range(cfg.n_cells)])
  types = [f"type{t}" for t in range(cfg.n_cell_types)]
  batches = [f"batch{b}" for b in range(cfg.n_batches)]
  names = dataset_names(cfg)
  out = []
  for d in range(cfg.n_datasets):
    rows, cols = np.flatnonzero(dataset == d), np.flatnonzero(panel[d])
    obs = pd.DataFrame({
        "cell_type": pd.Categorical(np.asarray(types)[cell_type[rows]], categories=types),
        "batch": pd.Categorical(np.asarray(batches)[batch[rows]], categories=batches),
        "dataset": pd.Categorical([names[d]] * len(rows), categories=names),
    }, index=pd.Index(cells[rows]))
    x = sp.csr_matrix(counts[np.ix_(rows, cols)])
    out.append(ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes[cols]))))
  return out


def simulate_cell_data(cfg: SimConfig | None = None) -> CellData:
  """`simulate` read through `from_anndata` and concatenated (cells with no counts dropped)."""
  cfg = cfg or SimConfig()
  datas = [from_anndata(a, name=n) for a, n in zip(simulate(cfg), dataset_names(cfg))]
  if len(datas) == 1:
    return dataclasses.replace(datas[0], name="sim")
  return concat(datas, name="sim")


def shard_panel(cfg: SimConfig, shard: int, min_fraction: float = 0.5) -> np.ndarray:
  """int[k]: sorted gene indices measured by corpus shard `shard` (a uniform share of the genes
  between `min_fraction` and all; drawn from (seed, shard) alone)."""
  rng = np.random.default_rng([cfg.seed, 19, shard])
  k = int(rng.integers(max(1, int(min_fraction * cfg.n_genes)), cfg.n_genes + 1))
  return np.sort(rng.choice(cfg.n_genes, k, replace=False))


def simulate_shard(cfg: SimConfig, shard: int, genes: np.ndarray, chunk: int = 1000
                   ) -> ad.AnnData:
  """`cfg.n_cells` cells of corpus shard `shard` measured on `genes` (indices), as integer
  counts (CSR float32), drawn `chunk` cells at a time (memory O(chunk x genes)).

  All shards share the generative latents of `cfg` (gene modules, loadings, base means, cell
  type programs), so a gene means the same in every shard; cells, batches and library sizes are
  drawn from (seed, shard, chunk). obs: cell_type, batch, dataset.
  """
  _check(cfg)
  lat = _latents(cfg)
  genes = np.asarray(genes, np.int64)
  types = [f"type{t}" for t in range(cfg.n_cell_types)]
  batches = [f"batch{b}" for b in range(cfg.n_batches)]
  shape = np.float32(1.0 / cfg.dispersion)
  mats, cell_type, batch = [], [], []
  for i, c0 in enumerate(range(0, cfg.n_cells, chunk)):
    rng = np.random.default_rng([cfg.seed, 17, shard, i])
    c = min(chunk, cfg.n_cells - c0)
    t = rng.choice(cfg.n_cell_types, size=c, p=lat["type_p"])
    b = rng.integers(0, cfg.n_batches, c)
    activity = lat["program"][t] + rng.normal(0.0, cfg.activity_noise_sd, (c, cfg.n_modules))
    lib = rng.normal(cfg.lib_log_mean, cfg.lib_log_sd, c)
    log_mu = (lat["base"][genes][None, :]
              + lat["loading"][genes][None, :] * activity[:, lat["module"][genes]]
              + lat["batch_shift"][b][:, genes] + lib[:, None]).astype(np.float32)
    lam = rng.standard_gamma(shape, size=log_mu.shape, dtype=np.float32) * (np.exp(log_mu) / shape)
    mats.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    cell_type.append(t)
    batch.append(b)
  name = f"shard{shard:03d}"
  obs = pd.DataFrame({
      "cell_type": pd.Categorical(np.asarray(types)[np.concatenate(cell_type)], categories=types),
      "batch": pd.Categorical(np.asarray(batches)[np.concatenate(batch)], categories=batches),
      "dataset": pd.Categorical([name] * cfg.n_cells),
  }, index=pd.Index([f"{name}_cell{i:06d}" for i in range(cfg.n_cells)]))
  var = pd.DataFrame(index=pd.Index(np.asarray(gene_names(cfg.n_genes))[genes]))
  return ad.AnnData(X=sp.vstack(mats, format="csr"), obs=obs, var=var)
