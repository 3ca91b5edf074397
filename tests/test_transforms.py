"""Continual-learning loss transforms: anchors, gradients, composition, state, resume, no retrace."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gil_jax import checkpoint, experiment
from gil_jax.data import batching, stages
from gil_jax.losses import registry
from gil_jax.losses.transforms import LossContext, LossTransform, StageEnd, add_term, chain
from gil_jax.tasks import gil
from tests.helpers import tiny_config

ALL = ("replay", "distill", "ewc", "online_ewc", "l2", "mas")


def _setup(**overrides):
  config = tiny_config(**{"mesh.data": 1, **overrides})
  data = experiment.load_data(config)
  plan = experiment.build_plan(config, data)
  runner = gil.Runner(config, data, plan)
  return runner, data, plan


def _stage(runner, data, plan, k, n=2):
  """(vocab, cols, numpy batches, StageEnd-maker) for stage k."""
  vocab = experiment.stage_vocab(plan, runner.capacity, k)
  cols = stages.stage_columns(data, vocab, plan.stages[k])
  batches = [b for _, b in batching.stage_batches(data, plan.stages[k].train_cells, cols,
                                                  runner.spec, 0, k, 0, n)]
  return vocab, cols, batches


def _end(runner, params, vocab, k, batches, plan):
  return StageEnd(stage=k, params=params, active_genes=vocab.active_mask(k),
                  task_loss=runner.task_loss,
                  batches=lambda n: ({"main": b} for b in (batches * n)[:n]),
                  stage_cells=plan.stages[k].train_cells)


def _ctx(active):
  return LossContext(rng=jax.random.PRNGKey(0), active_genes=jnp.asarray(active),
                     step=jnp.zeros((), jnp.int32))


def _perturb(params, scale=0.05, seed=1):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def _jit_loss(runner):
  """(params, tstates, inputs, active) -> (loss, metrics), jitted (eager runs are slow)."""
  return jax.jit(lambda p, t, i, a: (lambda l, aux: (l, aux["metrics"]))(
      *runner.loss_fn(p, t, i, _ctx(a))))


def test_unknown_names_list_known_ones():
  with pytest.raises(ValueError, match="known:.*ewc"):
    registry.transform_names(tiny_config(loss_transforms=("ewc", "nope")))
  with pytest.raises(ValueError, match="known methods:.*oracle"):
    registry.transform_names(tiny_config(method="nope"))
  with pytest.raises(ValueError, match="config.distill.mode"):
    registry.build(tiny_config(method="distill", **{"distill.mode": "logits"}))
  with pytest.raises(ValueError, match="config.replay.buffer_size"):
    registry.build(tiny_config(method="replay", **{"replay.buffer_size": -1}))


def test_first_stage_terms_are_exact_noops():
  """Before any stage ended: distill has no teacher, anchors no importance, replay no cells."""
  runner, data, plan = _setup(loss_transforms=ALL)
  vocab, _, batches = _stage(runner, data, plan, 0)
  feed = gil.Feed(data, plan, vocab, runner.spec, 0, 0, 0)
  state = runner.initial_state()
  inputs = runner.inputs_for(state, batches[0], feed)
  assert not inputs["replay"].cell_mask.any()
  active = vocab.active_mask(0)
  params = _perturb(state.params)  # away from every anchor: terms are still 0 (no importance)
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda p, t, i, a: runner.loss_fn(p, t, i, _ctx(a))[0]))
  loss, grads = loss_and_grad(params, state.transforms, inputs, active)
  _, metrics = _jit_loss(runner)(params, state.transforms, inputs, active)
  for name in ALL:
    if name != "replay":  # replay reports its (empty-batch) loss, which is not added
      assert float(metrics[f"loss/{name}"]) == 0.0, name
  task = metrics["loss/expression"]
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), float(task), rtol=1e-6)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_replay_buffer_zero_is_a_noop():
  runner, data, plan = _setup(method="replay", **{"replay.buffer_size": 0})
  vocab, _, batches = _stage(runner, data, plan, 0)
  end = _end(runner, runner.initial_state().params, vocab, 0, batches, plan)
  states = runner.transform.consolidate(runner.initial_state().transforms, runner.initial_state().params, end)
  assert not np.asarray(states["replay"]["valid"]).any()
  vocab1, _, batches1 = _stage(runner, data, plan, 1)
  feed = gil.Feed(data, plan, vocab1, runner.spec, 0, 1, 0)
  inputs = runner.inputs_for(runner.initial_state().replace(transforms=states), batches1[0], feed)
  assert not inputs["replay"].cell_mask.any() and not inputs["replay_weight"].any()


@pytest.mark.parametrize("name", ["ewc", "online_ewc", "l2", "mas", "distill"])
def test_zero_at_anchor_and_gradient_points_to_it(name):
  runner, data, plan = _setup(loss_transforms=(name,))
  state = runner.initial_state()
  vocab, _, batches = _stage(runner, data, plan, 0)
  anchor = _perturb(state.params, seed=3)  # a non-trivial anchor: "the params after stage 0"
  end = _end(runner, anchor, vocab, 0, batches, plan)
  tstates = runner.transform.consolidate(state.transforms, anchor, end)
  # Stage-0 batch and genes: every token is an old gene, so the distill teacher sees it all.
  inputs, active = {"main": batches[0]}, vocab.active_mask(0)
  f = jax.jit(lambda p: runner.loss_fn(p, tstates, inputs, _ctx(active))[1]["metrics"][
      f"loss/{name}"])
  at_anchor = float(f(anchor))
  assert abs(at_anchor) < 1e-7, at_anchor
  away = _perturb(anchor, scale=0.05, seed=4)
  value, grad = jax.jit(jax.value_and_grad(f))(away)
  assert float(value) > 0
  # A small step along -grad lowers the term, i.e. moves the params (or outputs) to the anchor.
  step = jax.tree.map(lambda p, g: p - 1e-3 * g / (1e-12 + optax_norm(grad)), away, grad)
  assert float(f(step)) < float(value)
  if name != "distill":  # quadratic anchors: the gradient is aligned with (params - anchor)
    dot = sum(float(jnp.vdot(g, p - a)) for g, p, a in zip(
        jax.tree.leaves(grad), jax.tree.leaves(away), jax.tree.leaves(anchor)))
    assert dot > 0


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))


def test_importance_only_on_rows_active_at_the_stage_end():
  runner, data, plan = _setup(loss_transforms=("ewc", "l2"))
  vocab, _, batches = _stage(runner, data, plan, 0)
  end = _end(runner, runner.initial_state().params, vocab, 0, batches, plan)
  tstates = runner.transform.consolidate(runner.initial_state().transforms, runner.initial_state().params, end)
  active = vocab.active_mask(0)
  for name in ("ewc", "l2"):
    emb = np.asarray(tstates[name]["omega"]["genes"]["embedding"])
    assert not emb[~active].any(), name            # new / unused rows are free
    assert (emb[active].sum(axis=1) > 0).mean() > 0.5, name  # old genes' rows are protected


def test_replay_cells_keep_their_own_stage_genes_and_concat_pooling():
  runner, data, plan = _setup(method="replay",
                              **{"replay.include_base": True, "replay.mode": "concat"})
  vocab0, _, b0 = _stage(runner, data, plan, 0)
  end = _end(runner, runner.initial_state().params, vocab0, 0, b0, plan)
  tstates = runner.transform.consolidate(runner.initial_state().transforms, runner.initial_state().params, end)
  buf = {k: np.asarray(v) for k, v in tstates["replay"].items()}
  assert buf["valid"].sum() == min(200, len(plan.stages[0].train_cells))
  assert np.isin(buf["cells"][buf["valid"]], plan.stages[0].train_cells).all()
  vocab1, _, b1 = _stage(runner, data, plan, 1)
  feed = gil.Feed(data, plan, vocab1, runner.spec, 0, 1, 5)
  state = runner.initial_state().replace(transforms=tstates)
  inputs = runner.inputs_for(state, b1[0], feed)
  rep = inputs["replay"]
  assert rep.cell_mask.all()
  base_rows = set(vocab1.rows(plan.stages[0].train_genes).tolist())
  assert set(rep.gene_ids[rep.token_mask].tolist()) <= base_rows   # no stage-1 genes
  again = runner.inputs_for(state, b1[0], feed)                    # deterministic in (seed, step)
  np.testing.assert_array_equal(again["replay"].gene_ids, rep.gene_ids)
  # Concat pooling: a replay batch identical to the main batch leaves the loss unchanged.
  same = dict(inputs, replay=b1[0], replay_weight=np.ones_like(inputs["replay_weight"]))
  pooled, metrics = _jit_loss(runner)(state.params, tstates, same, vocab1.active_mask(1))
  np.testing.assert_allclose(float(pooled), float(metrics["loss/expression"]), rtol=1e-5)


@pytest.mark.parametrize("plan_name", ["expressed", "random"])
def test_replay_buffer_never_holds_base_stage_cells(tmp_path, plan_name):
  """Every plan with a base stage (not only 'random') keeps its cells out of the buffer when
  include_base=False: the buffer after training holds later stages' cells only."""
  config = tiny_config(method="replay", **{"mesh.data": 1, "stages.plan": plan_name,
                                           "train.steps_per_stage": 2})
  gil.train_and_evaluate(config, str(tmp_path), progress_bar=False)
  data = experiment.load_data(config)
  plan = experiment.build_plan(config, data)
  assert plan.base_stage and plan.stages[0].name == "base"
  runner = gil.Runner(config, data, plan)
  ck = checkpoint.Checkpointer(str(tmp_path))
  state, _ = ck.restore(ck.manager.latest_step(), checkpoint.abstract_like(runner.initial_state()))
  ck.close()
  buf = {k: np.asarray(v) for k, v in state.transforms["replay"].items()}
  cells = buf["cells"][buf["valid"]]
  assert len(cells) > 0
  assert not np.isin(cells, plan.stages[0].train_cells).any()
  assert (buf["stage"][buf["valid"]] > 0).all()


def test_chain_respects_order():
  def scale(f):  # a wrapper that doubles the loss
    return lambda p, t, i, c: (lambda l, a: (2.0 * l, a))(*f(p, t, i, c))
  noop = dict(init=lambda p: {}, consolidate=lambda s, p, e: s)
  double = LossTransform(wrap=scale, **noop)
  plus_one = LossTransform(wrap=lambda f: add_term(f, "one", lambda *a: 1.0), **noop)
  base = lambda p, t, i, c: (jnp.float32(3.0), {"metrics": {}, "out": None})
  first = chain([("d", double), ("one", plus_one)]).wrap(base)(None, {"d": {}, "one": {}}, {}, None)
  second = chain([("one", plus_one), ("d", double)]).wrap(base)(None, {"d": {}, "one": {}}, {}, None)
  assert float(first[0]) == 7.0 and float(second[0]) == 8.0
  with pytest.raises(ValueError, match="twice"):
    chain([("d", double), ("d", double)])


def test_state_survives_checkpoint_round_trip(tmp_path):
  runner, data, plan = _setup(loss_transforms=ALL)
  vocab, _, batches = _stage(runner, data, plan, 0)
  state = runner.initial_state()
  end = _end(runner, _perturb(state.params), vocab, 0, batches, plan)
  tstates = jax.device_put(runner.transform.consolidate(state.transforms, end.params, end),
                           runner.state_sharding.transforms)
  state = state.replace(transforms=tstates)
  ck = checkpoint.Checkpointer(str(tmp_path))
  ck.save(1, state, {"x": 1})
  restored, _ = ck.restore(1, checkpoint.abstract_like(runner.initial_state()))
  ck.close()
  for a, b in zip(jax.tree.leaves(state.transforms), jax.tree.leaves(restored.transforms)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(restored.transforms["distill"]["has_teacher"]) == 1.0


def test_resumed_run_equals_uninterrupted_without_retrace(tmp_path):
  config = tiny_config(loss_transforms=("replay", "distill", "ewc"),
                       **{"mesh.data": 1, "ewc.n_batches": 2})
  full = gil.train_and_evaluate(config, str(tmp_path / "full"), progress_bar=False)
  assert full["compilations"]["train_step"] == 1  # transform state updates never recompile
  m = np.array(full["gene_regression"]["matrix"], dtype=float)
  assert np.isfinite(m[np.tril_indices(len(m))]).all()
  part = str(tmp_path / "part")
  gil.train_and_evaluate(config, part, stop_after_steps=9, progress_bar=False)  # mid stage 1
  resumed = gil.train_and_evaluate(config, part, progress_bar=False)
  np.testing.assert_allclose(np.array(resumed["gene_regression"]["matrix"], dtype=float), m,
                             rtol=1e-5, equal_nan=True)
  assert [s["final_train_loss"] for s in resumed["stages"]] == pytest.approx(
      [s["final_train_loss"] for s in full["stages"]], rel=1e-5)


def test_ewc_fisher_uses_each_stages_own_task_loss():
  """A task loss built per stage (as annotation builds one over each stage's active classes)
  must be the one whose gradients make that stage's Fisher, not the first stage's."""
  from gil_jax.config_base import base_config
  from gil_jax.losses import ewc as ewc_lib
  config = base_config()
  config.ewc.normalize = False
  transform = ewc_lib.ewc(config)
  params = {"w": jnp.ones((2,), jnp.float32)}

  def end(k, scale):
    def task_loss(p, tstates, inputs, ctx):
      return scale * jnp.sum(p["w"] * inputs["main"]), {}
    return StageEnd(stage=k, params=params, active_genes=np.ones(4, bool), task_loss=task_loss,
                    batches=lambda n: ({"main": jnp.array([1.0, 2.0])} for _ in range(n)))

  state = transform.consolidate(transform.init(params), params, end(0, 1.0))
  np.testing.assert_allclose(state["omega"]["w"], [1.0, 4.0])
  state = transform.consolidate(state, params, end(1, 10.0))
  np.testing.assert_allclose(state["omega"]["w"], [101.0, 404.0])  # 1 + 100, 4 + 400


def test_ewc_fisher_reads_the_stage_ends_active_classes():
  """One task loss for every stage (as the annotation task has): the classes active at a stage
  end reach it through the loss context, so each stage's Fisher sees its own classes."""
  from gil_jax.config_base import base_config
  from gil_jax.losses import ewc as ewc_lib
  config = base_config()
  config.ewc.normalize = False
  transform = ewc_lib.ewc(config)
  params = {"w": jnp.ones((3,), jnp.float32)}

  def task_loss(p, tstates, inputs, ctx):  # a loss over the active classes' weights only
    return jnp.sum(jnp.where(ctx.active_classes, p["w"], 0.0) * inputs["main"]), {}

  def end(k, classes):
    return StageEnd(stage=k, params=params, active_genes=np.ones(4, bool), task_loss=task_loss,
                    batches=lambda n: ({"main": jnp.array([1.0, 2.0, 3.0])} for _ in range(n)),
                    active_classes=np.asarray(classes))

  state = transform.consolidate(transform.init(params), params, end(0, [True, False, False]))
  np.testing.assert_allclose(state["omega"]["w"], [1.0, 0.0, 0.0])
  state = transform.consolidate(state, params, end(1, [True, True, True]))
  np.testing.assert_allclose(state["omega"]["w"], [2.0, 4.0, 9.0])  # stage 1 adds 1, 4, 9
