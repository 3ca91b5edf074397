"""Growing the gene table past capacity: params, Adam moments, transform state, one recompile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gil_jax import parallel, surgery
from gil_jax.losses import objectives
from gil_jax.models import build_model
from gil_jax.core.state import init_state, make_optimizer
from gil_jax.core.step import make_train_step
from tests.helpers import tiny_config
from tests.test_parallel import random_batch

OLD, NEW = 48, 80
LIKELIHOOD = "mse"  # the Exceiver's default gene + cell offset head predicts log1p values


def make(name, capacity):
  cfg = tiny_config(name)
  model = build_model(cfg.model, capacity, LIKELIHOOD)
  b = random_batch()
  params = model.init({"params": jax.random.key(capacity)}, b.gene_ids, b.values, b.token_mask,
                      b.pred_mask, False)["params"]
  return model, make_optimizer(cfg.train), params


@pytest.mark.parametrize("name", ["exceiver", "transformer"])
def test_grow_keeps_old_rows_and_recompiles_once(name):
  model, tx, params = make(name, OLD)
  fisher = jax.tree.map(jnp.ones_like, params)
  state = init_state(params, tx, {"ewc": {"fisher": fisher}}, jax.random.PRNGKey(0), OLD)
  state = state.replace(active_genes=jnp.arange(OLD) > 0)
  loss_fn = objectives.make_task_loss(model, LIKELIHOOD)
  step = jax.jit(make_train_step(loss_fn, tx))
  b1, b2 = {"main": random_batch(1)}, {"main": random_batch(2)}
  state, _ = step(state, b1)

  # reference: the old-capacity model takes one more step
  ref_state, ref_m = step(state, b2)

  model2, _, fresh = make(name, NEW)
  grown = surgery.grow_state(state, OLD, NEW, fresh)
  assert grown.params["genes"]["embedding"].shape[0] == NEW
  assert grown.active_genes.shape == (NEW,) and not bool(grown.active_genes[OLD:].any())
  mu = grown.opt_state[0].mu["genes"]["embedding"]
  assert mu.shape[0] == NEW and not np.any(np.asarray(mu[OLD:]))
  np.testing.assert_array_equal(mu[:OLD], state.opt_state[0].mu["genes"]["embedding"])
  f = grown.transforms["ewc"]["fisher"]["genes"]["embedding"]
  assert f.shape[0] == NEW and not np.any(np.asarray(f[OLD:]))
  # new param rows come from the fresh init, old rows are copied
  np.testing.assert_array_equal(grown.params["genes"]["embedding"][OLD:],
                                fresh["genes"]["embedding"][OLD:])
  np.testing.assert_array_equal(grown.params["genes"]["embedding"][:OLD],
                                state.params["genes"]["embedding"])
  if "bias" in state.params["genes"]:  # the offset head's per-gene levels grow like the table
    assert grown.params["genes"]["bias"].shape[0] == NEW
    np.testing.assert_array_equal(grown.params["genes"]["bias"][:OLD],
                                  state.params["genes"]["bias"])

  step2 = jax.jit(make_train_step(objectives.make_task_loss(model2, LIKELIHOOD), tx))
  new_state, m = step2(grown, b2)
  np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
  np.testing.assert_allclose(new_state.params["genes"]["embedding"][:OLD],
                             ref_state.params["genes"]["embedding"], rtol=1e-5, atol=1e-7)
  # activate a new row and keep training with the same compiled step: no further compile
  new_state = new_state.replace(active_genes=new_state.active_genes.at[OLD + 3].set(True))
  new_state, _ = step2(new_state, b1)
  assert step2._cache_size() == 1 and step._cache_size() == 1


def test_grow_shards_on_model_axis():
  if jax.device_count() < 8:
    pytest.skip("needs 8 simulated devices")
  _, tx, params = make("exceiver", OLD)
  state = init_state(params, tx, {}, jax.random.PRNGKey(0), OLD)
  _, _, fresh = make("exceiver", NEW)
  grown = surgery.grow_state(state, OLD, NEW, fresh)
  mesh = parallel.make_mesh({"data": 2, "model": 4})
  sh = parallel.state_shardings(mesh, grown, NEW)
  assert "params/genes/embedding" in parallel.describe_shardings(sh)
  jax.device_put(grown, sh)


def test_shrinking_is_an_error():
  with pytest.raises(ValueError, match="only grows"):
    surgery.grow_tree({"genes": {"embedding": jnp.zeros((4, 2))}}, 4, 2)
