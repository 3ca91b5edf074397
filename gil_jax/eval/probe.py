"""Gene-based classification (GIL paper Eq. 12, gil.md §3.2) as a stage-end evaluator.

After each stage the model is frozen; each labelled downstream dataset (config.downstream) is
embedded (CLS output) using only the genes seen so far (B ∪ T_1 ∪ ... ∪ T_k), with weighted
gene sampling and nothing hidden; a linear probe (optax Adam 5e-3, batch 64, 50 epochs) is then
trained on 70% of the cells, for 3 trials. Two numbers are reported:

* ``paper``:  the best of the 10 test evaluations (every 5 epochs), as the reference code does;
* ``honest``: the test accuracy of the evaluation chosen on a validation split carved out of the
  70% training part (the probe then trains on the rest), so no test label picks the probe.

Splits (and the gene sample of each cell) are fixed per trial and dataset, the same at every
stage, so stage-to-stage differences come from the model alone.

Beside them, the baseline ``logistic_regression``: scikit-learn logistic regression
(``eval/baselines.py``: standardised, C = 1) on the cells' normalised values of the same genes
seen so far, fitted on the same 70 % part of each trial and scored on the same test cells.

Two options beyond the paper (both off by default, so the default is the paper's protocol):
``standardize`` z-scores each embedding dimension with the mean/std of the probe's own training
cells (post-LN CLS outputs have a per-dimension spread ~0.05 around offsets ~0.8, which a probe
with Adam 5e-3 for 50 epochs barely moves away from chance), and ``embed_tokens`` embeds each
cell from that many sampled genes instead of ``config.batch.n_tokens`` (the transformer has no
positional encoding, so the token count may differ from training).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gil_jax import experiment
from gil_jax.data import batching, stages
from gil_jax.data.anndata_io import DataError
from gil_jax.data.downstream import Downstream
from gil_jax.eval import hooks
from gil_jax.eval.report import markdown_table
from gil_jax.core.step import make_embed_step

NAME = "gene_classification"
SECTION_TITLE = "## Gene-based classification"


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  trials: int = 3
  train_fraction: float = 0.7
  val_fraction: float = 0.1     # of all cells, taken from the training part (honest number)
  learning_rate: float = 5e-3
  batch_size: int = 64
  epochs: int = 50
  eval_every: int = 5
  seed: int = 0
  standardize: bool = False     # not in the paper: z-score features with the fit cells' stats
  embed_tokens: int = 0         # not in the paper: tokens per cell when embedding (0 = training)

  def __post_init__(self):
    f = "config.eval.probe"
    if self.trials < 1 or self.batch_size < 1 or self.epochs < 1 or self.eval_every < 1:
      raise DataError(f"{f}: trials, batch_size, epochs and eval_every must be >= 1.")
    if self.epochs % self.eval_every:
      raise DataError(f"{f}.epochs={self.epochs} must be a multiple of {f}.eval_every="
                      f"{self.eval_every}.")
    if self.embed_tokens < 0:
      raise DataError(f"{f}.embed_tokens={self.embed_tokens} must be >= 0 (0 = "
                      "config.batch.n_tokens).")
    if not (0 < self.val_fraction < self.train_fraction < 1):
      raise DataError(f"{f}: need 0 < val_fraction ({self.val_fraction}) < train_fraction "
                      f"({self.train_fraction}) < 1.")


# ---------------------------------------------------------------- splits and the linear probe

def trial_splits(n: int, name: str, trial: int, cfg: ProbeConfig
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(train, val, test) cell indices; train ∪ val is the paper's 70% part. Fixed per trial."""
  rng = np.random.default_rng([cfg.seed, trial, zlib.crc32(name.encode())])
  perm = rng.permutation(n)
  n_fit = int(round(cfg.train_fraction * n))
  n_val = max(1, int(round(cfg.val_fraction * n)))
  if n_fit - n_val < 1 or n - n_fit < 1:
    raise DataError(f"downstream dataset {name!r} has {n} cells: too few for the probe splits "
                    "(config.eval.probe.train_fraction / val_fraction).")
  return np.sort(perm[:n_fit - n_val]), np.sort(perm[n_fit - n_val:n_fit]), np.sort(perm[n_fit:])


@functools.partial(jax.jit, static_argnames=("n_classes", "batch_size", "epochs", "eval_every",
                                             "learning_rate"))
def _probe_curve(key, x_train, y_train, x_all, y_all, eval_masks, *, n_classes: int,
                 batch_size: int, epochs: int, eval_every: int, learning_rate: float):
  """Accuracy on each eval mask after every `eval_every` epochs: [epochs // eval_every, n_sets]."""
  n, e = x_train.shape
  bound = 1.0 / math.sqrt(e)  # torch.nn.Linear's default init
  k_w, k_b, k_ep = jax.random.split(key, 3)
  params = {"w": jax.random.uniform(k_w, (e, n_classes), minval=-bound, maxval=bound),
            "b": jax.random.uniform(k_b, (n_classes,), minval=-bound, maxval=bound)}
  tx = optax.adam(learning_rate)
  n_batches = -(-n // batch_size)
  pad = n_batches * batch_size - n
  weight = (jnp.arange(n_batches * batch_size) < n).reshape(n_batches, batch_size)

  def loss_fn(p, idx, w):
    logits = x_train[idx] @ p["w"] + p["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y_train[idx])
    return jnp.sum(ce * w) / jnp.sum(w)

  def step(carry, inp):
    p, s = carry
    idx, w = inp
    g = jax.grad(loss_fn)(p, idx, w)
    upd, s = tx.update(g, s, p)
    return (optax.apply_updates(p, upd), s), None

  def epoch(carry, k):
    perm = jnp.concatenate([jax.random.permutation(k, n), jnp.zeros((pad,), jnp.int32)])
    carry, _ = jax.lax.scan(step, carry, (perm.reshape(n_batches, batch_size), weight))
    return carry, None

  def block(carry, keys):
    carry, _ = jax.lax.scan(epoch, carry, keys)
    correct = (jnp.argmax(x_all @ carry[0]["w"] + carry[0]["b"], -1) == y_all).astype(jnp.float32)
    acc = (eval_masks * correct).sum(-1) / jnp.maximum(eval_masks.sum(-1), 1.0)
    return carry, acc

  keys = jax.random.split(k_ep, epochs).reshape(epochs // eval_every, eval_every, -1)
  _, accs = jax.lax.scan(block, (params, tx.init(params)), keys)
  return accs


def probe_curve(feats: np.ndarray, labels: np.ndarray, n_classes: int, train: np.ndarray,
                eval_sets: Sequence[np.ndarray], cfg: ProbeConfig, key) -> np.ndarray:
  """Trains a linear probe on `train`; accuracy on each eval set per evaluation [n_evals, sets]."""
  masks = np.zeros((len(eval_sets), len(labels)), np.float32)
  for i, s in enumerate(eval_sets):
    masks[i, s] = 1.0
  feats = np.asarray(feats, np.float32)
  labels = np.asarray(labels, np.int32)
  if cfg.standardize:  # statistics of the probe's training cells only (no test leakage)
    mu, sd = feats[train].mean(0), feats[train].std(0)
    feats = (feats - mu) / np.where(sd > 1e-6, sd, 1.0)
  return np.asarray(_probe_curve(key, feats[train], labels[train], feats, labels, masks,
                                 n_classes=int(n_classes), batch_size=cfg.batch_size,
                                 epochs=cfg.epochs, eval_every=cfg.eval_every,
                                 learning_rate=float(cfg.learning_rate)))


def evaluate_probe(feats: np.ndarray, labels: np.ndarray, n_classes: int, name: str,
                   cfg: ProbeConfig) -> dict[str, Any]:
  """Paper and honest accuracies (%) per trial, with mean and std over trials."""
  paper, honest = [], []
  for t in range(cfg.trials):
    train, val, test = trial_splits(len(labels), name, t, cfg)
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), t)
    fit = np.concatenate([train, val])
    curve = probe_curve(feats, labels, n_classes, fit, [test], cfg, key)
    paper.append(100.0 * float(curve[:, 0].max()))           # best of the test evaluations
    curve = probe_curve(feats, labels, n_classes, train, [val, test], cfg, key)
    honest.append(100.0 * float(curve[int(np.argmax(curve[:, 0])), 1]))  # chosen on val
  return {"paper": float(np.mean(paper)), "paper_std": float(np.std(paper)),
          "honest": float(np.mean(honest)), "honest_std": float(np.std(honest)),
          "paper_trials": paper, "honest_trials": honest}


def logistic_regression_accuracy(ds: Downstream, cols: np.ndarray, normalisation: str, name: str,
                                 cfg: ProbeConfig) -> tuple[float, float]:
  """Test accuracy % (mean, std over trials) of logistic regression on the normalised values of
  the data columns with ``cols > 0`` (the genes seen so far), on the probe's trial splits."""
  from gil_jax.eval.baselines import logistic_regression_baseline  # noqa: PLC0415 (sklearn)
  x = ds.data.X[:, np.flatnonzero(cols > 0)].tocsr().astype(np.float32)
  owner = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
  x.data = batching.normalise(x.data, ds.data.size_factors[owner], normalisation)
  acc = []
  for t in range(cfg.trials):
    train, val, test = trial_splits(len(ds.labels), name, t, cfg)
    fit = np.concatenate([train, val])
    pred = logistic_regression_baseline(x[fit], ds.labels[fit], x[test])
    acc.append(100.0 * float(np.mean(pred == ds.labels[test])))
  return float(np.mean(acc)), float(np.std(acc))


# ---------------------------------------------------------------- embeddings of a frozen model

def _context(runner) -> dict[str, Any]:
  """Per-runner cache: downstream datasets, the jitted embed step and the probe config."""
  ctx = getattr(runner, "_gene_classification", None)
  if ctx is None:
    c = runner.config
    ctx = {"datasets": experiment.load_downstream(c),
           "embed": jax.jit(make_embed_step(runner.model)),
           "probe": ProbeConfig(**c.eval.probe.to_dict())}
    runner._gene_classification = ctx
  return ctx


def embeddings(runner, params, active_genes, vocab, k: int, ds: Downstream, embed) -> np.ndarray:
  """float32[cells, E]: CLS embeddings of `ds` from genes seen up to stage k (weighted sampling,
  nothing hidden; the gene sample of each cell is a fixed function of eval.mask_seed)."""
  cols = stages.eval_columns(ds.data, vocab, experiment.seen_genes(runner.plan, k))
  if not np.any(cols > 0):
    raise DataError(f"downstream dataset {ds.name!r} shares no gene with the genes seen up to "
                    f"stage {k} (disjoint gene panels); check config.downstream.datasets and "
                    "config.downstream.gene_column.")
  spec = dataclasses.replace(runner.eval_spec, sampling="weighted", mask_ratio=0.0)
  tokens = _context(runner)["probe"].embed_tokens
  if tokens:
    spec = dataclasses.replace(spec, n_tokens=int(tokens))
  sharding = runner.eval_step_batch_sharding()
  out = []
  for batch in batching.eval_batches(ds.data, np.arange(ds.data.n_cells), cols, spec,
                                     runner.config.eval.mask_seed):
    out.append(np.asarray(embed(params, runner.put(batch, sharding), active_genes)))
  return np.concatenate(out)[:ds.data.n_cells]


# ---------------------------------------------------------------- results block and report

def classification_forgetting(matrix: list[list[float | None]], learned_at: list[int | None]
                              ) -> dict[str, Any]:
  """Δ_j = acc after the last stage − acc right after the stage that learned dataset j's genes
  (negative = forgetting, as the paper's Table 3). Datasets learned last (or never) get None."""
  last = len(matrix) - 1
  per = []
  for j, s in enumerate(learned_at):
    if s is None or s >= last or matrix[last][j] is None or matrix[s][j] is None:
      per.append(None)
    else:
      per.append(float(matrix[last][j] - matrix[s][j]))
  scored = [d for d in per if d is not None]
  return {"per_dataset": per, "average": float(np.mean(scored)) if scored else None}


def _fmt(mean: float | None, std: float | None) -> str:
  return "-" if mean is None else f"{mean:.2f} ± {std:.2f}"


def report_section(block: dict[str, Any]) -> str:
  names, stage_names = block["datasets"], block["stage_names"]
  parts = [SECTION_TITLE, "",
           "Linear probe on frozen CLS embeddings (genes seen so far), test accuracy in %, mean ± "
           "std over trials. *paper* = best of the test evaluations (as the reference code); "
           "*honest* = evaluation chosen on a validation split. Δ = accuracy after the last stage "
           "− right after the stage that learned the dataset's crucial genes.", ""]
  for kind in ("paper", "honest", "logistic_regression"):
    mat, std = {"paper": (block["matrix"], block["std"]),
                "honest": (block["matrix_honest"], block["std_honest"]),
                "logistic_regression": (block.get("baseline_logistic_regression"),
                                        block.get("std_logistic_regression"))}[kind]
    if mat is None:  # results of runs before the baseline existed
      continue
    rows = [[stage_names[i]] + [_fmt(m, s) for m, s in zip(mat[i], std[i])]
            for i in range(len(mat))]
    fg = classification_forgetting(mat, block["learned_at"])
    rows.append(["Δ"] + ["-" if d is None else f"{d:+.2f}" for d in fg["per_dataset"]])
    avg = "-" if fg["average"] is None else f"{fg['average']:+.2f}"
    title = ("*baseline: logistic regression on the values of the same genes, same splits*"
             if kind == "logistic_regression" else f"**{kind}**")
    parts += [f"{title} (average Δ: {avg})", "",
              markdown_table(["after stage \\ dataset"] + names, rows), ""]
  return "\n".join(parts)


@hooks.register(NAME)
def gene_classification(runner, state, vocab, k: int, results: dict) -> dict:
  """Stage-end evaluator: fills row k of results['gene_classification'] (see module doc)."""
  ctx = _context(runner)
  datasets: list[Downstream] = ctx["datasets"]
  stage_names = [s.name for s in runner.plan.stages]
  n, m = len(stage_names), len(datasets)
  block = results.get(NAME)
  if block is None:
    empty = lambda: [[None] * m for _ in range(n)]  # noqa: E731
    block = {"datasets": [d.name for d in datasets], "stage_names": stage_names,
             "label_columns": [d.label_column for d in datasets],
             "n_cells": [d.data.n_cells for d in datasets],
             "n_classes": [len(d.classes) for d in datasets],
             "learned_at": [stage_names.index(d.name) if d.name in stage_names else None
                            for d in datasets],
             "matrix": empty(), "std": empty(), "matrix_honest": empty(), "std_honest": empty(),
             "protocol": dataclasses.asdict(ctx["probe"])}
  for key in ("baseline_logistic_regression", "std_logistic_regression"):
    block.setdefault(key, [[None] * m for _ in range(n)])
  params, active = state.params, state.active_genes
  for j, ds in enumerate(datasets):
    feats = embeddings(runner, params, active, vocab, k, ds, ctx["embed"])
    r = evaluate_probe(feats, ds.labels, len(ds.classes), ds.name, ctx["probe"])
    block["matrix"][k][j], block["std"][k][j] = r["paper"], r["paper_std"]
    block["matrix_honest"][k][j], block["std_honest"][k][j] = r["honest"], r["honest_std"]
    cols = stages.eval_columns(ds.data, vocab, experiment.seen_genes(runner.plan, k))
    (block["baseline_logistic_regression"][k][j],
     block["std_logistic_regression"][k][j]) = logistic_regression_accuracy(
        ds, cols, runner.spec.normalisation, ds.name, ctx["probe"])
  block["forgetting"] = classification_forgetting(block["matrix"], block["learned_at"])
  block["forgetting_honest"] = classification_forgetting(block["matrix_honest"],
                                                         block["learned_at"])
  results[NAME] = block
  sections = [s for s in results.get("report_sections", []) if not s.startswith(SECTION_TITLE)]
  results["report_sections"] = sections + [report_section(block)]
  return results
