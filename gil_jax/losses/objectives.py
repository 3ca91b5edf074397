"""Masked expression objectives: the self-supervised task loss of every backbone."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from gil_jax.batch import Batch

LIKELIHOODS = ("mse", "poisson", "nb")


def masked_mean(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Mean of `x` over True entries of `mask` (0 when the mask is empty)."""
  mask = mask.astype(x.dtype)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def prediction_mask(batch: Batch, active_genes: jnp.ndarray) -> jnp.ndarray:
  """Positions scored by the loss: hidden, real, active genes of real cells."""
  return (batch.pred_mask & effective_token_mask(batch, active_genes)
          & batch.cell_mask[:, None])


def effective_token_mask(batch: Batch, active_genes: jnp.ndarray) -> jnp.ndarray:
  """Token mask with genes that are not active in this stage removed (a device-side guard)."""
  return batch.token_mask & active_genes[batch.gene_ids]


def poisson_nll(log_rate: jnp.ndarray, counts: jnp.ndarray, size_factors: jnp.ndarray):
  log_mu = log_rate + jnp.log(size_factors)[:, None]
  return jnp.exp(log_mu) - counts * log_mu + jax.lax.lgamma(counts + 1.0)


def nb_nll(log_rate, log_theta, counts, size_factors):
  """Negative-binomial NLL with mean mu = rate * size_factor and inverse dispersion theta."""
  log_mu = log_rate + jnp.log(size_factors)[:, None]
  theta = jnp.exp(log_theta)
  log_theta_mu = jnp.logaddexp(log_theta, log_mu)
  return -(jax.lax.lgamma(counts + theta) - jax.lax.lgamma(theta) - jax.lax.lgamma(counts + 1.0)
           + theta * (log_theta - log_theta_mu) + counts * (log_mu - log_theta_mu))


def predicted_values(out: dict, batch: Batch, likelihood: str, normalisation: str) -> jnp.ndarray:
  """The model's prediction in the space of `batch.targets` (for MSE evaluation)."""
  if likelihood == "mse":
    return out["pred"]
  rate = jnp.exp(out["pred"])  # expected count per 1e4 library units
  if normalisation == "log1p_cp10k":
    return jnp.log1p(rate)
  if normalisation == "log1p":
    return jnp.log1p(rate * batch.size_factors[:, None])
  raise ValueError(f"likelihood {likelihood!r} needs normalisation 'log1p_cp10k' or 'log1p'")


def expression_loss(out: dict, batch: Batch, mask: jnp.ndarray, likelihood: str):
  """Task loss over `mask` positions and its metrics (MVC head added when present)."""
  if likelihood == "mse":
    loss = masked_mean((out["pred"] - batch.targets) ** 2, mask)
  elif likelihood == "poisson":
    loss = masked_mean(poisson_nll(out["pred"], batch.counts, batch.size_factors), mask)
  elif likelihood == "nb":
    loss = masked_mean(nb_nll(out["pred"], out["log_theta"], batch.counts, batch.size_factors),
                       mask)
  else:
    raise ValueError(f"unknown likelihood {likelihood!r}; known: {LIKELIHOODS}")
  metrics = {"loss/expression": loss}
  if "mvc" in out:
    mvc = masked_mean((out["mvc"] - batch.targets) ** 2, mask)
    metrics["loss/mvc"] = mvc
    loss = loss + mvc
  return loss, metrics


def apply_model(model, params, batch: Batch, active_genes, *, train: bool, rng) -> dict:
  """Runs the backbone on a batch with inactive genes removed from the tokens."""
  return model.apply({"params": params}, batch.gene_ids, batch.values,
                     effective_token_mask(batch, active_genes), batch.pred_mask, train,
                     batch.size_factors, rngs={"dropout": rng})


def make_task_loss(model, likelihood: str) -> Callable[..., Any]:
  """The base LossFn: masked expression prediction on `inputs['main']`.

  A LossFn maps (params, transform_states, inputs, ctx) to (loss, aux) where aux holds
  'metrics' (scalars for logging) and 'out' (the backbone's outputs on the main batch, so that
  loss transforms can reuse them instead of running the model again).
  """
  if likelihood not in LIKELIHOODS:
    raise ValueError(f"unknown config.train.likelihood {likelihood!r}; known: {LIKELIHOODS}")

  def loss_fn(params, tstates, inputs, ctx):
    del tstates
    batch = inputs["main"]
    out = apply_model(model, params, batch, ctx.active_genes, train=True, rng=ctx.rng)
    loss, metrics = expression_loss(out, batch, prediction_mask(batch, ctx.active_genes),
                                    likelihood)
    return loss, {"metrics": metrics, "out": out}

  return loss_fn
