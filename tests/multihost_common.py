"""Shared pieces of the multi-host test (imported after jax.distributed is initialised)."""

import jax
import numpy as np

from gil_jax import checkpoint, distributed, parallel
from gil_jax.data import batching, simulate
from gil_jax.losses import objectives
from gil_jax.models import build_model
from gil_jax.core.state import init_state, make_optimizer
from gil_jax.core.step import make_train_step
from tests.helpers import tiny_config

CAP, B, N = 64, 8, 16


def build(mesh):
  cfg = tiny_config("exceiver")
  model = build_model(cfg.model, CAP, "mse")
  tx = make_optimizer(cfg.train)
  z = np.zeros((1, N), np.int32)
  params = model.init({"params": jax.random.key(0)}, z, z.astype(np.float32), z > 0, z > 0,
                      False)["params"]
  state = init_state(params, tx, {}, jax.random.PRNGKey(1), CAP)
  state = state.replace(active_genes=np.arange(CAP) > 0)
  sh = parallel.state_shardings(mesh, state, CAP)
  step = jax.jit(make_train_step(objectives.make_task_loss(model, "mse"), tx))
  return jax.device_put(state, sh), step, sh, None


def local_batches(shards, n_shards, n_steps=3):
  data = simulate.simulate_cell_data(simulate.SimConfig(n_cells=64, n_genes=40, n_cell_types=3,
                                                        n_modules=4, n_batches=1, seed=0))
  spec = batching.BatchSpec(batch_size=B, n_tokens=N)
  c2r = np.arange(1, 41, dtype=np.int32)
  its = [batching.stage_batches(data, np.arange(64), c2r, spec, 0, 0, 0, n_steps, shard=s,
                                n_shards=n_shards)
         for s in shards]
  for parts in zip(*its):
    yield jax.tree.map(lambda *x: np.concatenate(x), *[b for _, b in parts])


def train_and_save(state, step, sh, mesh, shards, n_shards, ckpt_dir):
  losses = []
  for local in local_batches(shards, n_shards):
    state, m = step(state, {"main": distributed.global_batch(local, mesh)})
    losses.append(float(jax.device_get(m["loss"])))
  ck = checkpoint.Checkpointer(ckpt_dir, keep=1)
  ck.save(int(state.step), state, {"losses": losses})
  restored, meta = ck.restore(ck.latest_step(), checkpoint.abstract_like(state))
  ck.close()
  assert meta["losses"] == losses
  np.testing.assert_array_equal(
      np.asarray(jax.device_get(restored.params["latents"])),
      np.asarray(jax.device_get(state.params["latents"])))
  return losses
