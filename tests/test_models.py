"""Model layer: interface, mask semantics, invariances, gene-param layout, dtype and sharding."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gil_jax.models import (build_model, is_gene_param, model_config, paper_transformer_config)

CAP, B, N = 37, 8, 12       # capacity differs from every other dimension
USED = 20                   # batches only use rows 1..USED-1; rows >= USED are absent

VARIANTS = {
    "exceiver-softbin-mse": ("exceiver", dict(value_encoding="softbin"), "mse"),
    "exceiver-additive-nb": ("exceiver", dict(value_encoding="additive",
                                              gene_cell_offset=False), "nb"),
    "transformer-mvc-nb": ("transformer", dict(use_mvc=True), "nb"),
    "transformer-poisson": ("transformer", dict(use_mvc=False), "poisson"),
}


def make_cfg(variant, **overrides):
  name, extra, likelihood = VARIANTS[variant]
  cfg = model_config(name)
  cfg.update(**extra, **overrides)
  return cfg, likelihood


def make_inputs(seed=0, b=B, n=N):
  """Cells with distinct genes, varying lengths (cell 1 full, the rest padded), ~30% hidden."""
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.permutation(np.arange(1, USED))[:n] for _ in range(b)]).astype(np.int32)
  lengths = rng.integers(3, n + 1, size=b)
  lengths[1] = n
  token = np.arange(n)[None, :] < lengths[:, None]
  pred = token & (rng.random((b, n)) < 0.3)
  pred[:, 0] = True                               # at least one hidden gene per cell
  pred[:, 1] = False                              # and at least one visible one
  vals = rng.normal(size=(b, n)).astype(np.float32)
  ids = np.where(token, ids, 0)
  vals = np.where(token & ~pred, vals, 0.0).astype(np.float32)
  return dict(gene_ids=ids, values=vals, token_mask=token, pred_mask=pred)


@functools.lru_cache(maxsize=None)
def built(variant, dtype="float32"):
  cfg, likelihood = make_cfg(variant, dtype=dtype)
  model = build_model(cfg, CAP, likelihood)
  x = make_inputs()
  params = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                      x["gene_ids"], x["values"], x["token_mask"], x["pred_mask"], False)["params"]

  @functools.partial(jax.jit, static_argnames="train")
  def apply(params, x, train=False, key=jax.random.key(2)):
    return model.apply({"params": params}, x["gene_ids"], x["values"], x["token_mask"],
                       x["pred_mask"], train, rngs={"dropout": key})
  return model, params, apply


def expected_keys(variant):
  keys = {"pred", "cell_emb"}
  if "mvc" in variant:
    keys.add("mvc")
  if variant.endswith("nb"):
    keys.add("log_theta")
  return keys


def assert_close_real(a, b, token_mask, atol=1e-5):
  for k in a:
    if a[k].ndim == 2 and k != "cell_emb":
      np.testing.assert_allclose(np.where(token_mask, a[k], 0), np.where(token_mask, b[k], 0),
                                 atol=atol, err_msg=k)
    else:
      np.testing.assert_allclose(a[k], b[k], atol=atol, err_msg=k)


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shapes(variant):
  model, params, apply = built(variant)
  out = apply(params, make_inputs())
  assert set(out) == expected_keys(variant)
  d = model_config(VARIANTS[variant][0]).d_model
  for k, v in out.items():
    assert v.dtype == jnp.float32, k
    assert v.shape == ((B, d) if k == "cell_emb" else (B, N)), k
    assert np.isfinite(v).all(), k


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_is_ignored(variant):
  _, params, apply = built(variant)
  x = make_inputs()
  y = dict(x)
  rng = np.random.default_rng(5)
  pad = ~x["token_mask"]
  y["gene_ids"] = np.where(pad, rng.integers(0, CAP, (B, N)), x["gene_ids"]).astype(np.int32)
  y["values"] = np.where(pad, rng.normal(size=(B, N)) * 10, x["values"]).astype(np.float32)
  assert_close_real(apply(params, x), apply(params, y), x["token_mask"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_hidden_values_are_never_seen(variant):
  _, params, apply = built(variant)
  x = make_inputs()
  y = dict(x, values=np.where(x["pred_mask"], 7.5, x["values"]).astype(np.float32))
  a, b = apply(params, x), apply(params, y)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("variant", VARIANTS)
def test_token_permutation(variant):
  _, params, apply = built(variant)
  x = make_inputs()
  rng = np.random.default_rng(3)
  perm = np.stack([rng.permutation(N) for _ in range(B)])
  y = {k: np.take_along_axis(v, perm, axis=1) for k, v in x.items()}
  a, b = apply(params, x), apply(params, y)
  np.testing.assert_allclose(a["cell_emb"], b["cell_emb"], atol=1e-5)
  for k in a:
    if k != "cell_emb":
      ap = np.take_along_axis(np.asarray(a[k]), perm, axis=1)
      assert_close_real({k: ap}, {k: b[k]}, y["token_mask"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_padding_cell_is_finite(variant):
  _, params, apply = built(variant)
  x = make_inputs()
  for k in ("token_mask", "pred_mask"):
    x[k] = x[k].copy()
    x[k][0] = False
  x["gene_ids"] = x["gene_ids"].copy()
  x["gene_ids"][0] = 0
  # a cell whose tokens are all hidden: no visible keys for the Exceiver encoder
  x["pred_mask"][2] = x["token_mask"][2]
  out = apply(params, x)
  for k, v in out.items():
    assert np.isfinite(v).all(), k
  # the empty cell's embedding must not depend on its padding content
  y = dict(x, gene_ids=x["gene_ids"].copy(), values=x["values"].copy())
  y["gene_ids"][0] = np.arange(1, N + 1)
  y["values"][0] = 3.0
  np.testing.assert_allclose(out["cell_emb"], apply(params, y)["cell_emb"], atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_absent_gene_rows_get_zero_gradient(variant):
  _, params, apply = built(variant)
  x = make_inputs()
  m = jnp.asarray(x["token_mask"], jnp.float32)

  def loss(p):
    out = apply(p, x)
    return sum(jnp.sum(v * m) for k, v in out.items() if k != "cell_emb") + out["cell_emb"].sum()

  grads = jax.grad(loss)(params)["genes"]
  present = np.zeros(CAP, bool)
  present[np.unique(x["gene_ids"][x["token_mask"]])] = True
  assert present[1:USED].any() and not present[USED:].any() and not present[0]
  for name, g in grads.items():
    g = np.asarray(g).reshape(CAP, -1)
    assert (g[~present] == 0).all(), name          # absent rows and the (masked) padding row
    assert (np.abs(g[present]).sum(-1) > 0).any(), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_gene_params_are_exactly_the_capacity_rows(variant):
  _, params, _ = built(variant)
  flat = flax.traverse_util.flatten_dict(params)
  genes = {p for p in flat if is_gene_param(p)}
  assert genes and all(p[0] == "genes" for p in genes)
  for path, v in flat.items():
    assert v.dtype == jnp.float32, path
    assert (v.shape[0] == CAP) == is_gene_param(path), path
  expected = {("genes", "embedding")} | ({("genes", "log_theta")} if variant.endswith("nb") else set())
  expected |= {("genes", "bias")} if make_cfg(variant)[0].get("gene_cell_offset") else set()
  assert genes == expected
  # also works on jax key paths, with or without the 'params' collection
  jax.tree_util.tree_map_with_path(
      lambda kp, v: None if (v.shape[0] == CAP) == is_gene_param(kp) else pytest.fail(str(kp)),
      {"params": params})


@pytest.mark.parametrize("variant", ["exceiver-softbin-mse", "transformer-mvc-nb"])
def test_bfloat16_compute(variant):
  _, params, apply = built(variant, "bfloat16")
  for v in jax.tree_util.tree_leaves(params):
    assert v.dtype == jnp.float32
  x = make_inputs()
  out = apply(params, x)
  _, _, apply32 = built(variant)
  ref = apply32(params, x)
  for k, v in out.items():
    assert v.dtype == jnp.float32 and np.isfinite(v).all(), k
    np.testing.assert_allclose(v, ref[k], atol=0.1, rtol=0.1, err_msg=k)


def test_dropout():
  _, params, apply = built("transformer-mvc-nb")
  x = make_inputs()
  a = apply(params, x, train=True, key=jax.random.key(0))
  b = apply(params, x, train=True, key=jax.random.key(1))
  c = apply(params, x, train=False, key=jax.random.key(0))
  d = apply(params, x, train=False, key=jax.random.key(1))
  assert not np.allclose(a["pred"], b["pred"])
  np.testing.assert_array_equal(c["pred"], d["pred"])


@pytest.mark.parametrize("variant", ["exceiver-additive-nb", "transformer-mvc-nb"])
def test_sharded_matches_single_device(variant):
  assert jax.device_count() == 8
  _, params, apply = built(variant)
  x = make_inputs()
  ref = jax.device_get(apply(params, x))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  ps = jax.device_put(params, NamedSharding(mesh, P()))
  out = apply(ps, xs)
  assert out["pred"].sharding.spec[0] == "data" or len(out["pred"].sharding.device_set) == 8
  for k in ref:
    np.testing.assert_allclose(np.asarray(out[k]), ref[k], atol=1e-5, err_msg=k)


def test_configs_and_errors():
  for name in ("exceiver", "transformer"):
    cfg = model_config(name)
    cfg.lock()
    assert cfg.name == name and cfg.dtype == "float32"
    build_model(cfg, CAP)
  p = paper_transformer_config()
  assert (p.d_model, p.n_layers, p.n_heads, p.ffn_dim, p.dropout, p.use_mvc) == (
      256, 6, 8, 256, 0.15, True)
  with pytest.raises(ValueError, match="exceiver"):
    model_config("bert")
  bad = model_config("exceiver")
  bad.name = "bert"
  with pytest.raises(ValueError, match="transformer"):
    build_model(bad, CAP)
  with pytest.raises(ValueError, match="likelihood"):
    build_model(model_config("exceiver"), CAP, "gamma")
  bad = model_config("exceiver")
  bad.value_encoding = "bins"
  with pytest.raises(ValueError, match="value_encoding"):
    build_model(bad, CAP)
  bad = model_config("transformer")
  bad.dtype = "float16"
  with pytest.raises(ValueError, match="dtype"):
    build_model(bad, CAP)


def test_paper_size_parameter_count():
  cfg = paper_transformer_config()
  model = build_model(cfg, 1000, "mse")
  x = make_inputs(n=4)
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x["gene_ids"], x["values"],
      x["token_mask"], x["pred_mask"], False))["params"]
  flat = flax.traverse_util.flatten_dict(shapes)
  non_gene = sum(int(np.prod(v.shape)) for p, v in flat.items() if not is_gene_param(p))
  d, f, layers = 256, 256, 6
  layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d     # attn, ffn, two LNs
  mlp3 = lambda out: 2 * (d * d + d) + d * out + out
  expected = layers * layer + d + (d + d + d * d + d) + mlp3(1) + mlp3(d)
  assert non_gene == expected


@pytest.mark.parametrize("cross", [False, True])
def test_attention_implementations_agree(cross, monkeypatch):
  """config.model.attention picks a kernel, not the math: cpu_tiled (tiled: the batch exceeds
  one tile), xla and the fused jax.nn.dot_product_attention path (what 'auto' takes off CPU)
  give the same outputs and gradients; a cell without any valid key attends to nothing (0)."""
  from gil_jax.models import attention, kernels
  b, s, h, d = 8, 96, 4, 8
  monkeypatch.setattr(kernels, "TILE_ELEMENTS", 4096)  # several tiles at a test's size
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  kv = jax.random.normal(k1, (b, s, 2 if cross else 3, h, d))
  q = jax.random.normal(k2, (b, 16, h, d)) if cross else None
  mask = jnp.arange(s)[None, :] < jnp.array([s, 5, 40, 0, 96, 1, 60, 70])[:, None]
  n_q = 16 if cross else s
  assert b * h * n_q * s > kernels.TILE_ELEMENTS

  def loss(kv, impl, backend=None, rate=0.0, seed=None):
    out = attention.attend(q, kv, mask, rate, seed, impl, backend)
    return jnp.sum(jnp.sin(out)), out

  (_, ref), g_ref = jax.value_and_grad(loss, has_aux=True)(kv, "cpu_tiled")
  assert float(jnp.abs(ref[3]).max()) == 0.0 and float(jnp.abs(ref).max()) > 0.1
  for impl, backend in (("xla", None), ("auto", "gpu")):
    (_, out), g = jax.value_and_grad(loss, has_aux=True)(kv, impl, backend)
    np.testing.assert_allclose(out, ref, atol=2e-5, err_msg=impl)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=2e-5, err_msg=impl)
  seed = kernels.seed_words(jax.random.PRNGKey(3))  # dropout: same hash mask on both paths
  drop = lambda impl: loss(kv, impl, None, 0.3, seed)[1]
  np.testing.assert_allclose(drop("xla"), drop("cpu_tiled"), atol=2e-5)
  assert attention.resolve("auto", True, "gpu") == "xla"
  with pytest.raises(ValueError, match="config.model.attention"):
    cfg = model_config("exceiver")
    cfg.attention = "flash"
    build_model(cfg, 32)
