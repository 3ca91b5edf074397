"""gil_jax: continual learning on single-cell transcriptomics (gene-incremental learning and
continual cell-type annotation) in JAX.

  import gil_jax
  gil_jax.train(config, workdir)          # any config (config.task: gil | annotation)
  model = gil_jax.load(workdir)           # a finished run
  annotated = model.annotate(adata)       # obs['gil_cell_type'], ['gil_confidence'], ...
  embedded = model.embed(adata)           # obsm['X_gil']
  model.info()                            # task, method, stages, genes, classes, figures
"""

from __future__ import annotations

__version__ = "0.2.0"


def train(config, workdir: str, progress_bar: bool = True) -> dict:
  """Trains (or resumes) `config` in `workdir`; returns its results (also results.json)."""
  from gil_jax import tasks
  return tasks.train(config, workdir, progress_bar=progress_bar)


def load(workdir: str, allow_partial: bool = False):
  """A finished run, loaded once for `annotate` / `embed` / `info` on in-memory AnnData."""
  from gil_jax.canal.annotate import Model
  return Model(workdir, allow_partial=allow_partial)


__all__ = ["__version__", "load", "train"]
