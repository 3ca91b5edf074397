"""Persistent label vocabulary (cell-type name -> class row) and the label map.

Rows are handed out in order of first activation and never reused (CANAL: alphabetical at the
first stage, new types appended alphabetically), so a checkpointed class row keeps its meaning.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence

import numpy as np

UNASSIGNED = "Unassigned"


class LabelError(ValueError):
  """Labels cannot be used as given; the message names the config field to fix."""


def label_map_entries(spec: str | Sequence[str] | None) -> list[str]:
  """The non-empty, stripped entries of a label map written as a tuple of 'from=to' / 'name'
  entries (config.canal.label_map), an entry or a string holding several separated by ';'
  (`--config.canal.label_map='a; b=c'`, and the string form of earlier revisions). Commas are
  not separators here: cell-type names may contain them."""
  items = [spec] if isinstance(spec, str) else list(spec or ())
  return [x.strip() for item in items for x in str(item).split(";") if x.strip()]


def parse_label_map(spec: str | Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
  """('from=to', 'name', ...) (see `label_map_entries`; or a mapping) -> dict; a bare name
  declares a canonical name (maps to itself). Whitespace around names is stripped."""
  if not spec:
    return {}
  if isinstance(spec, Mapping):
    return {str(k).strip(): str(v).strip() for k, v in spec.items()}
  out = {}
  for item in label_map_entries(spec):
    if item.count("=") > 1:
      raise LabelError(f"label map entry {item!r} holds more than one '='; write one 'from=to' "
                       "per entry of config.canal.label_map (or separate them with ';').")
    src, dst = item.split("=", 1) if "=" in item else (item, item)
    out[src.strip()] = dst.strip()
  return out


def harmonise(labels: Iterable[str], label_map: Mapping[str, str], source: str) -> np.ndarray:
  """Maps raw labels through `label_map`; with a non-empty map every label must be a key or a
  target name (a canonical name), else LabelError names the label and the config field."""
  labels = np.asarray([str(x) for x in labels], dtype=object)
  if not label_map:
    return labels
  canonical = set(label_map.values())
  unknown = sorted({x for x in labels if x not in label_map and x not in canonical})
  if unknown:
    raise LabelError(f"{source}: labels {unknown[:8]} have no entry in the label map and are not "
                     f"target names of it (targets: {sorted(canonical)[:12]}). Add "
                     "'name=target' entries to config.canal.label_map, or list the names in "
                     "config.canal.drop_labels.")
  return np.asarray([label_map.get(x, x) for x in labels], dtype=object)


@dataclasses.dataclass
class LabelVocab:
  """Cell-type name -> row of a padded class head of `capacity` rows."""

  capacity: int
  names: list[str] = dataclasses.field(default_factory=list)
  activated_at: list[int] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if self.capacity < 1:
      raise LabelError(f"class capacity must be >= 1, got {self.capacity} "
                       "(config.canal.max_classes).")
    self._row = {n: i for i, n in enumerate(self.names)}

  def __len__(self) -> int:
    return len(self.names)

  def __contains__(self, name: str) -> bool:
    return name in self._row

  def activate(self, names: Iterable[str], stage: int) -> list[str]:
    """Adds unseen names (sorted) as new rows, active from `stage`; returns the new names."""
    new = sorted({str(n) for n in names} - set(self._row))
    if len(self) + len(new) > self.capacity:
      raise LabelError(f"stage {stage} brings {len(new)} new cell types but the class head has "
                       f"room for {self.capacity - len(self)} more (capacity {self.capacity}). "
                       f"Raise config.canal.max_classes to at least {len(self) + len(new)}.")
    for n in new:
      self._row[n] = len(self.names)
      self.names.append(n)
      self.activated_at.append(stage)
    return new

  def rows(self, names: Iterable[str], missing: int | None = None) -> np.ndarray:
    """int32 rows of `names`; unknown names raise, or map to `missing` when given."""
    out = []
    for n in names:
      if n in self._row:
        out.append(self._row[n])
      elif missing is not None:
        out.append(missing)
      else:
        raise LabelError(f"cell type {n!r} is not in the label vocabulary {self.names}.")
    return np.asarray(out, np.int32)

  def active_mask(self, stage: int) -> np.ndarray:
    """bool[capacity]: rows activated at or before `stage`."""
    mask = np.zeros(self.capacity, bool)
    mask[:len(self.names)] = np.asarray(self.activated_at, np.int64) <= stage
    return mask

  def to_json(self) -> dict:
    return {"capacity": self.capacity, "names": list(self.names),
            "activated_at": [int(s) for s in self.activated_at]}

  @classmethod
  def from_json(cls, d: Mapping) -> "LabelVocab":
    return cls(capacity=int(d["capacity"]), names=[str(n) for n in d["names"]],
               activated_at=[int(s) for s in d["activated_at"]])
