"""The noise floor of masked-expression regression on the simulated data: how low can any
predictor's MSE go?

  python benchmarks/noise_floor.py --config configs/gil_synthetic.py [--config.seed=1] --json

The simulator knows every count's negative-binomial mean mu. The best possible prediction of a
detected gene's log1p-CP10k value, knowing mu and the cell's size factor, is
E[log1p(X / sf) | X >= 1] for X ~ NB(mu, dispersion) (computed on a grid of counts). Its MSE
against the observed values is a floor no model can beat on average (a model does not know mu:
it must infer the cell's module activity and library size from the visible genes). It is
reported per stage's genes on the experiment's held-out cells, over all their detected entries
(the evaluator scores a random 40 % of them, so its MSE has the same expectation), beside the
trivial "gene + cell offset" predictor computed the same way (per-gene detected mean from the
training cells, plus the cell's mean offset over its other detected genes of the stage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from gil_jax import experiment, guards  # noqa: E402
from gil_jax.data import simulate  # noqa: E402


def bayes_prediction(mu: np.ndarray, sf: np.ndarray, dispersion: float,
                     max_count: int = 4096, chunk: int = 4096) -> np.ndarray:
  """E[log1p(X / sf) | X >= 1] for X ~ NB(mean mu, var mu + dispersion mu^2), elementwise."""
  n = 1.0 / dispersion
  out = np.empty(len(mu))
  x = np.arange(1, max_count + 1, dtype=np.float64)
  for i in range(0, len(mu), chunk):
    m, s = mu[i:i + chunk, None].astype(np.float64), sf[i:i + chunk, None].astype(np.float64)
    pmf = stats.nbinom.pmf(x[None, :], n, n / (n + m))
    out[i:i + chunk] = (pmf * np.log1p(x[None, :] / s)).sum(1) / np.maximum(pmf.sum(1), 1e-300)
  return out


def run(config) -> dict:
  data = experiment.load_data(config)
  plan = experiment.build_plan(config, data)
  cfg = simulate.SimConfig(**config.data.sim.to_dict())
  mu_all = simulate.true_means(cfg)
  rows = np.array([int(n.removeprefix("cell")) for n in data.obs.index])  # simulation order
  eval_cells = np.asarray(plan.eval_cells)
  train = np.setdiff1d(np.arange(data.n_cells), eval_cells)
  sf = data.size_factors
  out = {"config": config.experiment, "seed": int(config.seed), "stages": {}}
  for st in plan.stages:
    cols = np.flatnonzero(np.isin(data.gene_ids, np.asarray(st.eval_genes, str)))
    x = data.X[eval_cells][:, cols].toarray()
    xt = data.X[train][:, cols].toarray()
    det = x > 0
    value = np.log1p(x / sf[eval_cells, None])
    vt = np.log1p(xt / sf[train, None])
    gene_mean = np.where((xt > 0).sum(0) > 0, (vt * (xt > 0)).sum(0) / np.maximum(
        (xt > 0).sum(0), 1), 0.0)
    # gene + cell offset, leaving the predicted entry out of the cell's offset
    resid = np.where(det, value - gene_mean[None, :], 0.0)
    n_det = det.sum(1, keepdims=True)
    offset = (resid.sum(1, keepdims=True) - resid) / np.maximum(n_det - 1, 1)
    offset_pred = gene_mean[None, :] + np.where(n_det > 1, offset, 0.0)
    ci, gi = np.nonzero(det)
    mu = mu_all[rows[eval_cells[ci]], cols[gi]]
    bayes = bayes_prediction(mu, sf[eval_cells[ci]], cfg.dispersion)
    target = value[ci, gi]
    floor = float(np.mean((target - bayes) ** 2))
    trivial = float(np.mean((target - offset_pred[ci, gi]) ** 2))
    out["stages"][st.name] = {"entries": int(len(target)), "noise_floor_mse": round(floor, 4),
                              "gene_cell_offset_mse": round(trivial, 4),
                              "floor_over_offset": round(floor / trivial, 3)}
  return out


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="configs/gil_synthetic.py")
  p.add_argument("--json", action="store_true")
  a, rest = p.parse_known_args()
  config = guards.load_config(a.config, rest)
  print(json.dumps(run(config), indent=None if a.json else 1))
