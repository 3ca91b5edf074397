"""Persistent gene vocabulary: gene id -> row of a fixed-capacity gene table.

Rows are handed out in order of first activation and never reused, so a checkpointed table row
keeps meaning the same gene for the whole experiment. Row 0 is reserved for padding and is never
active. The active-gene mask is a pure function of the vocabulary and a stage index.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

PAD_ROW = 0


class VocabularyError(ValueError):
  """The gene vocabulary cannot satisfy a request (capacity, unknown or duplicate genes)."""


NEVER = 2**31 - 1  # activated_at of a gene that keeps its row but is never active


@dataclasses.dataclass
class GeneVocab:
  """Gene id -> table row, with the stage at which each gene became active."""

  capacity: int
  gene_ids: list[str] = dataclasses.field(default_factory=list)   # row r+1 holds gene_ids[r]
  activated_at: list[int] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if self.capacity < 2:
      raise VocabularyError(f"gene table capacity must be >= 2 (row 0 is padding), got {self.capacity}")
    self._row = {g: i + 1 for i, g in enumerate(self.gene_ids)}
    if len(self._row) != len(self.gene_ids):
      raise VocabularyError("duplicate gene ids in a saved vocabulary")

  def __len__(self) -> int:
    return len(self.gene_ids)

  def __contains__(self, gene: str) -> bool:
    return gene in self._row

  @property
  def free_rows(self) -> int:
    return self.capacity - 1 - len(self.gene_ids)

  def activate(self, genes: Iterable[str], stage: int) -> np.ndarray:
    """Gives every gene not yet in the vocabulary a fresh row, active from `stage` on.

    Returns the rows of all `genes` (old and new) in input order.
    """
    genes = list(genes)
    if len(set(genes)) != len(genes):
      dup = sorted({g for g in genes if genes.count(g) > 1})[:5]
      raise VocabularyError(f"duplicate gene ids {dup}: make gene ids unique (e.g. anndata's "
                            "`var_names_make_unique()`) before building stages")
    new = [g for g in genes if g not in self._row]
    if len(new) > self.free_rows:
      raise VocabularyError(
          f"stage {stage} needs {len(new)} new gene rows but the gene table has only "
          f"{self.free_rows} free (capacity {self.capacity}, {len(self)} genes used, row 0 is "
          f"padding). Raise `config.genes.capacity` to at least {len(self) + len(new) + 1}.")
    for g in new:
      self.gene_ids.append(g)
      self.activated_at.append(stage)
      self._row[g] = len(self.gene_ids)
    return self.rows(genes)

  def rows(self, genes: Sequence[str], missing: str = "raise") -> np.ndarray:
    """Rows of `genes`; with missing='pad', unknown genes map to PAD_ROW instead of raising."""
    if missing == "pad":
      return np.array([self._row.get(g, PAD_ROW) for g in genes], np.int32)
    unknown = [g for g in genes if g not in self._row]
    if unknown:
      raise VocabularyError(f"{len(unknown)} genes are not in the vocabulary, e.g. {unknown[:5]}")
    return np.array([self._row[g] for g in genes], np.int32)

  def active_mask(self, stage: int) -> np.ndarray:
    """bool[capacity]: rows of genes activated at or before `stage` (padding row is False)."""
    mask = np.zeros(self.capacity, bool)
    at = np.asarray(self.activated_at, np.int64)
    mask[1:1 + len(at)] = at <= stage
    return mask

  def to_json(self) -> dict:
    return {"capacity": self.capacity, "gene_ids": list(self.gene_ids),
            "activated_at": [int(s) for s in self.activated_at]}

  @classmethod
  def from_json(cls, d: dict) -> "GeneVocab":
    return cls(capacity=int(d["capacity"]), gene_ids=list(d["gene_ids"]),
               activated_at=[int(s) for s in d["activated_at"]])
