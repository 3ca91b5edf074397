"""Every backbone x value encoding uses the expression values (and the depth token the library
size): a model whose output ignores its input values is broken however well it trains."""

import functools

import jax
import numpy as np
import optax
import pytest

from gil_jax.models import VALUE_BLIND, VALUE_ENCODINGS, build_model, model_config

CAP, B, N = 48, 32, 16
BACKBONES = ("exceiver", "transformer")


def tiny(name: str, encoding: str, depth_token: bool = True, offset: bool = False):
  """Without the gene + cell offset head by default: the encoder alone must carry the values."""
  cfg = model_config(name)
  cfg.update(d_model=32, n_layers=1, n_heads=2, dropout=0.0, value_encoding=encoding,
             depth_token=depth_token, gene_cell_offset=offset)
  if name == "exceiver":
    cfg.update(n_latents=8, ffn_mult=2)
  else:
    cfg.update(ffn_dim=32)
  return build_model(cfg, CAP)


def level_task(seed: int):
  """Each cell has a level; every gene's value is level + small noise, so a hidden value is
  predictable only from the *values* of the visible genes (which genes are present is random)."""
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.permutation(np.arange(1, CAP))[:N] for _ in range(B)]).astype(np.int32)
  level = rng.uniform(0.5, 4.0, (B, 1))
  target = (level + 0.1 * rng.normal(size=(B, N))).astype(np.float32)
  token = np.ones((B, N), bool)
  pred = rng.random((B, N)) < 0.3
  pred[:, 0], pred[:, 1] = True, False
  values = np.where(pred, 0.0, target).astype(np.float32)
  sf = np.ones(B, np.float32)
  return ids, values, target, token, pred, sf


@functools.lru_cache(maxsize=None)
def trained_mse(name: str, encoding: str, steps: int = 60, offset: bool = False
                ) -> tuple[float, float]:
  """(held-out masked MSE after `steps` Adam steps, variance of the held-out targets)."""
  model = tiny(name, encoding, offset=offset)
  ids, values, target, token, pred, sf = level_task(0)
  params = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, ids, values,
                      token, pred, False, sf)["params"]
  tx = optax.adam(3e-3)

  def loss(p, ids, values, target, pred):
    out = model.apply({"params": p}, ids, values, token, pred, False, sf)["pred"]
    return np.float32(1.0) * ((out - target) ** 2 * pred).sum() / pred.sum()

  @jax.jit
  def step(p, o, batch):
    g = jax.grad(loss)(p, *batch)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  opt = tx.init(params)
  for i in range(steps):
    ids_i, values_i, target_i, _, pred_i, _ = level_task(i + 1)
    params, opt = step(params, opt, (ids_i, values_i, target_i, pred_i))
  ids_t, values_t, target_t, _, pred_t, _ = level_task(10_000)
  mse = float(jax.jit(loss)(params, ids_t, values_t, target_t, pred_t))
  return mse, float(target_t[pred_t].var())


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("encoding", [e for e in VALUE_ENCODINGS if e not in VALUE_BLIND])
def test_encoding_learns_from_values(name, encoding):
  mse, var = trained_mse(name, encoding)
  assert mse < 0.3 * var, (mse, var)


def test_scale_encoding_is_value_blind_in_the_exceiver():
  """Documented flaw kept for old runs: (v + 1) * e_g then LayerNorm erases v >= 0."""
  mse, var = trained_mse("exceiver", "scale")
  assert mse > 0.7 * var, (mse, var)
  model = tiny("exceiver", "scale", depth_token=False)
  ids, values, _, token, pred, sf = level_task(0)
  params = model.init({"params": jax.random.key(0)}, ids, values, token, pred, False)["params"]
  f = jax.jit(lambda v: model.apply({"params": params}, ids, v, token, pred, False)["pred"])
  ones = np.where(pred, 0.0, 1.0).astype(np.float32)
  a, b = np.asarray(f(values)), np.asarray(f(ones))
  assert np.abs(a - b)[pred].max() < 0.05 * a[pred].std()  # only LayerNorm's eps leaks v


@pytest.mark.parametrize("name", BACKBONES)
def test_depth_token_reads_library_size(name):
  ids, values, _, token, pred, sf = level_task(0)
  for depth_token in (True, False):
    model = tiny(name, "additive", depth_token=depth_token)
    params = model.init({"params": jax.random.key(0)}, ids, values, token, pred, False,
                        sf)["params"]
    f = jax.jit(lambda s: model.apply({"params": params}, ids, values, token, pred, False,
                                      s)["pred"])
    change = float(np.abs(f(sf) - f(sf * 20.0)).max())
    if depth_token:
      assert change > 1e-3, change
    else:
      assert change == 0.0, change


def test_old_name_mlp_points_to_additive():
  cfg = model_config("exceiver")
  cfg.value_encoding = "mlp"
  with pytest.raises(ValueError, match="'mlp' is now called 'additive'"):
    build_model(cfg, CAP)


@pytest.mark.parametrize("name", BACKBONES)
def test_gene_cell_offset_head_starts_at_the_trivial_predictor_and_reads_values(name):
  """With the correction's output layer at 0, 'pred' is exactly the evaluator's gene + cell
  offset predictor with the gene levels as detected means; trained, the model reads values."""
  from gil_jax.eval.regression import trivial_predictions  # noqa: PLC0415
  model = tiny(name, "softbin", offset=True)
  ids, values, target, token, pred, sf = level_task(0)
  params = model.init({"params": jax.random.key(0)}, ids, values, token, pred, False, sf)["params"]
  levels = np.random.default_rng(1).uniform(0.0, 3.0, CAP).astype(np.float32)
  head = "head" if name == "exceiver" else "value_head"
  last = max(params[head])
  params = dict(params, genes=dict(params["genes"], bias=levels),
                **{head: dict(params[head], **{last: jax.tree.map(np.zeros_like,
                                                                  params[head][last])})})
  out = np.asarray(model.apply({"params": params}, ids, values, token, pred, False, sf)["pred"])

  class HostBatch:
    gene_ids, token_mask, pred_mask = ids, token, pred
  HostBatch.values = values
  expected = trivial_predictions(HostBatch, np.zeros(CAP), levels.astype(np.float64))
  np.testing.assert_allclose(out, expected["gene_cell_offset"], rtol=1e-5, atol=1e-5)
  shifted = np.where(pred, 0.0, values + 1.0).astype(np.float32)
  out2 = np.asarray(model.apply({"params": params}, ids, shifted, token, pred, False, sf)["pred"])
  np.testing.assert_allclose((out2 - out)[pred], 1.0, rtol=1e-5)  # a visible shift moves it
  mse, var = trained_mse(name, "softbin", offset=True)
  assert mse < 0.3 * var, (mse, var)


def test_gene_cell_offset_needs_the_mse_likelihood():
  cfg = model_config("exceiver")
  with pytest.raises(ValueError, match="gene_cell_offset=False for count likelihoods"):
    build_model(cfg, CAP, "nb")
