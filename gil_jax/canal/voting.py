"""Majority voting over clusters of the cell embedding (celltypist's `majority_voting`)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.cluster import AgglomerativeClustering
from sklearn.neighbors import kneighbors_graph


def over_cluster(emb: np.ndarray, *, n_neighbors: int = 15, cells_per_cluster: int = 30,
                 seed: int = 0) -> np.ndarray:
  """int[cells]: small clusters (about `cells_per_cluster` cells each) of a kNN graph of the
  embedding (Ward linkage restricted to graph neighbours); one cluster per cell below
  2 * `cells_per_cluster` cells (no voting)."""
  del seed  # deterministic
  n = len(emb)
  if n < 2 * cells_per_cluster:  # too few cells to over-cluster: each cell keeps its label
    return np.arange(n, dtype=np.int64)
  graph = kneighbors_graph(emb, n_neighbors=min(n_neighbors, n - 1), include_self=False)
  with warnings.catch_warnings():  # a graph of several components is joined, as intended
    warnings.filterwarnings("ignore", message="the number of connected components")
    return AgglomerativeClustering(n_clusters=n // cells_per_cluster, connectivity=graph,
                                   linkage="ward").fit_predict(emb).astype(np.int64)


def majority_vote(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
  """Each cell gets its cluster's most frequent label (ties: the first in sorted order)."""
  labels = np.asarray(labels, object)
  out = np.empty_like(labels)
  for c in np.unique(clusters):
    idx = clusters == c
    vals, counts = np.unique(labels[idx].astype(str), return_counts=True)
    out[idx] = vals[np.argmax(counts)]
  return out
