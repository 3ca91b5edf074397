"""Sharding rules and sharded train steps on 8 simulated CPU devices (see conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gil_jax import parallel
from gil_jax.batch import Batch
from gil_jax.losses import objectives
from gil_jax.models import build_model
from gil_jax.core.state import init_state, make_optimizer
from gil_jax.core.step import make_train_step
from tests.helpers import tiny_config

CAP, B, N = 48, 16, 12

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices; set XLA_FLAGS="
                            "--xla_force_host_platform_device_count=8 before jax is imported")


def random_batch(seed=0, b=B, n=N):
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.choice(np.arange(1, CAP), n, replace=False) for _ in range(b)])
  tok = rng.random((b, n)) < 0.9
  pred = tok & (rng.random((b, n)) < 0.4)
  tgt = rng.normal(size=(b, n)).astype(np.float32)
  return Batch(gene_ids=np.where(tok, ids, 0).astype(np.int32),
               values=np.where(tok & ~pred, tgt, 0).astype(np.float32), targets=tgt,
               counts=np.zeros((b, n), np.float32), size_factors=np.ones(b, np.float32),
               token_mask=tok, pred_mask=pred, cell_mask=np.ones(b, bool),
               labels=np.zeros(b, np.int32))


def setup(name="exceiver", likelihood="nb"):
  cfg = tiny_config(name, **{"model.gene_cell_offset": False})  # count likelihood
  model = build_model(cfg.model, CAP, likelihood)
  tx = make_optimizer(cfg.train)
  b = random_batch()
  params = model.init({"params": jax.random.key(0)}, b.gene_ids, b.values, b.token_mask,
                      b.pred_mask, False)["params"]
  transforms = {"teacher": {"params": params}, "other": {"scale": jnp.ones((CAP, 3))}}
  state = init_state(params, tx, transforms, jax.random.PRNGKey(1), CAP)
  state = state.replace(active_genes=jnp.arange(CAP) < 40)
  loss = objectives.make_task_loss(model, likelihood)
  return state, make_train_step(loss, tx)


@needs8
@pytest.mark.parametrize("layout", [(2, 4), (4, 2), (1, 8), (8, 1)])
def test_rules_shard_gene_rows_only(layout):
  state, _ = setup()
  mesh = parallel.make_mesh({"data": layout[0], "model": layout[1]})
  specs = parallel.describe_shardings(parallel.state_shardings(mesh, state, CAP))
  if layout[1] == 1:
    assert specs == {}
    return
  gene_paths = {p for p in specs}
  # params, both Adam moments, the transform's mirrored copy, and the mask are row-sharded
  for must in ("params/genes/embedding", "params/genes/log_theta", "active_genes",
               "transforms/teacher/params/genes/embedding"):
    assert must in gene_paths, (must, specs)
  assert sum("mu/genes/embedding" in p for p in gene_paths) == 1
  assert sum("nu/genes/embedding" in p for p in gene_paths) == 1
  assert all(s == str(P("model")) for s in specs.values())
  # a [capacity, 3] array outside any `genes` subtree is replicated: the path decides
  assert not any("other" in p for p in gene_paths)
  assert not any("latents" in p or "decoder" in p for p in gene_paths)


def test_leading_dim_must_divide():
  mesh = parallel.make_mesh({"data": 1, "model": 1})
  assert parallel.leaf_spec(("params", "genes", "embedding"), (CAP, 4), CAP, mesh) == P()


def run_steps(state, step_fn, mesh, n=3):
  sh = parallel.state_shardings(mesh, state, CAP)
  batches = [{"main": random_batch(i)} for i in range(n)]
  in_sh = parallel.batch_shardings(mesh, batches[0])
  step = jax.jit(step_fn, in_shardings=(sh, in_sh),
                 out_shardings=(sh, parallel.replicated(mesh)))
  state = jax.device_put(state, sh)
  losses = []
  for b in batches:
    state, m = step(state, jax.device_put(b, in_sh))
    losses.append(float(m["loss"]))
  return state, losses


@needs8
@pytest.mark.parametrize("name", ["exceiver", "transformer"])
@pytest.mark.parametrize("layout", [(2, 4), (8, 1), (1, 8)])
def test_sharded_step_matches_one_device(name, layout):
  state, step_fn = setup(name)
  one = parallel.make_mesh({"data": 1, "model": 1})
  s1, l1 = run_steps(state, step_fn, one)
  mesh = parallel.make_mesh({"data": layout[0], "model": layout[1]})
  s8, l8 = run_steps(state, step_fn, mesh)
  np.testing.assert_allclose(l8, l1, rtol=2e-5, atol=2e-6)
  emb = s8.params["genes"]["embedding"]
  if layout[1] > 1:
    assert emb.sharding.spec == P("model")
  np.testing.assert_allclose(np.asarray(emb), np.asarray(s1.params["genes"]["embedding"]),
                             rtol=1e-4, atol=1e-6)
