"""bf16 compute with float32 params and optimizer state (config.model.dtype='bfloat16')."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gil_jax import experiment
from gil_jax.data import batching, stages
from gil_jax.losses.transforms import LossContext
from gil_jax.tasks import gil
from tests.helpers import tiny_config


@pytest.mark.parametrize("model", ["exceiver", "transformer"])
def test_bf16_compute_keeps_f32_state(model):
  config = tiny_config(model, **{"model.dtype": "bfloat16"})
  data = experiment.load_data(config)
  plan = experiment.build_plan(config, data)
  runner = gil.Runner(config, data, plan)
  vocab = experiment.stage_vocab(plan, runner.capacity, 0)
  cols = stages.stage_columns(data, vocab, plan.stages[0])
  state = runner.set_active(runner.initial_state(), vocab.active_mask(0))
  batches = [b for _, b in batching.stage_batches(data, plan.stages[0].train_cells, cols,
                                                  runner.spec, 0, 0, 0, 3)]
  # the matmuls really run in bf16
  ctx = LossContext(rng=jax.random.PRNGKey(0), active_genes=state.active_genes, step=0)
  jaxpr = str(jax.make_jaxpr(lambda p: runner.loss_fn(p, state.transforms,
                                                      {"main": batches[0]}, ctx)[0])(state.params))
  assert "bf16" in jaxpr
  losses = []
  for b in batches:
    state, metrics = runner.train_step(state, runner.put({"main": b}, runner.inputs_sharding))
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  for name, tree in (("params", state.params), ("opt_state", state.opt_state)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32, (name, jax.tree_util.keystr(path), leaf.dtype)
        assert np.all(np.isfinite(np.asarray(leaf))), (name, jax.tree_util.keystr(path))
