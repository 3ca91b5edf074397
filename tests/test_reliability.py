"""Reliability (issue 14): finite-loss guard, workdir lock, preemption-safe shutdown, one-line
errors (exit 2, no traceback) and safe `annotate` outputs."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gil_jax import checkpoint, guards
from gil_jax.tasks import gil
from tests.helpers import sim_h5ad, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"mesh.data": 1}


def _launch(tmp_path, *args, config: str | None = None, timeout: int = 300):
  if config is None:
    config = str(tmp_path / "tiny_cfg.py")
    with open(config, "w") as f:
      f.write("from tests.helpers import tiny_config\n\n\ndef get_config():\n"
              "  return tiny_config(**{'mesh.data': 1})\n")
  return subprocess.run([sys.executable, "launch.py", "--config", config, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc, rc: int = 2) -> str:
  assert proc.returncode == rc, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if "error: " in l]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def _all_finite_checkpoints(workdir: str) -> list[int]:
  ck = checkpoint.Checkpointer(workdir)
  steps = list(ck.manager.all_steps())
  for step in steps:
    raw = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    for leaf in jax.tree.leaves(raw["state"]):
      if np.issubdtype(np.asarray(leaf).dtype, np.floating):
        assert np.isfinite(leaf).all(), f"non-finite leaf in checkpoint {step}"
  ck.close()
  return steps


# ------------------------------------------------------------------ finite-loss guard

def test_nonfinite_loss_stops_with_one_line_and_no_nonfinite_checkpoint(tmp_path):
  workdir = str(tmp_path / "w")
  proc = _launch(tmp_path, "--config.train.learning_rate=1e3", "--config.train.checkpoint_every=1",
                 "--workdir", workdir)
  line = _one_line_error(proc)
  assert line.startswith("error: non-finite")
  for part in ("stage 0", "--config.train.learning_rate", "fresh --workdir"):
    assert part in line, line
  _all_finite_checkpoints(workdir)  # the steps before the failure; none holds NaN / inf
  assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_check_finite_names_the_term_and_results_are_strict_json(tmp_path):
  class Ck:
    directory, latest_step = "/w/checkpoints", staticmethod(lambda: 12)
  metrics = {"loss": np.float32(np.nan), "loss/distill": np.float32(np.inf),
             "loss/task": np.float32(1.0), "grad_norm": np.float32(2.0)}
  with pytest.raises(guards.NonFiniteError) as e:
    guards.check_finite(metrics, tiny_config(), step=7, stage=1, stage_name="s1", ckpt=Ck)
  msg = str(e.value)
  assert "step 7 of stage 1 (s1)" in msg and "loss/distill=inf" in msg and "loss/task" not in msg
  assert "step 12 in /w/checkpoints" in msg and "\n" not in msg
  guards.check_finite({"loss": 1.0, "grad_norm": 3.0}, tiny_config(), step=1, stage=0,
                      stage_name="a", ckpt=Ck)
  res = guards.finite_or_none({"m": [[1.0, float("nan")], [np.float32(np.inf), None]],
                               "a": {"b": float("-inf"), "c": "x", "d": 3}})
  assert res == {"m": [[1.0, None], [None, None]], "a": {"b": None, "c": "x", "d": 3}}
  json.dumps(res, allow_nan=False)


# ------------------------------------------------------------------ workdir lock

def test_second_run_on_a_locked_workdir_exits_2_and_stale_lock_does_not_block(tmp_path):
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom gil_jax import guards\n"
       f"with guards.WorkdirLock({workdir!r}):\n  print('locked', flush=True)\n  time.sleep(600)"],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    line = _one_line_error(_launch(tmp_path, "--workdir", workdir))
    assert f"pid {holder.pid}" in line and "in use" in line
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  finally:
    holder.kill()  # SIGKILL: the .lock file stays behind, its flock goes with the process
    holder.wait()
  assert f"pid {holder.pid}" in open(os.path.join(workdir, ".lock")).read()
  with guards.WorkdirLock(workdir):  # the stale lock file does not block
    with pytest.raises(guards.WorkdirError, match=f"pid {os.getpid()}"):
      with guards.WorkdirLock(workdir):
        pass


# ------------------------------------------------------------------ preemption

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full") / "w")
  return gil.train_and_evaluate(tiny_config(**TINY), workdir, progress_bar=False)


def _same_results(a: dict, b: dict) -> None:
  np.testing.assert_allclose(np.array(a["gene_regression"]["matrix"], dtype=float),
                             np.array(b["gene_regression"]["matrix"], dtype=float),
                             rtol=1e-5, equal_nan=True)
  assert [s["final_train_loss"] for s in a["stages"]] == pytest.approx(
      [s["final_train_loss"] for s in b["stages"]], rel=1e-5)


SLOW_LAUNCH = """
import time
from absl import app
import launch
from gil_jax.tasks import gil
init = gil.Runner.__init__
def slow_init(self, *a, **k):
  init(self, *a, **k)
  step = self.train_step
  n = [0]
  def slow(state, inputs):
    out = step(state, inputs)
    n[0] += 1
    print("STEP", n[0], flush=True)
    time.sleep(0.5)  # leaves time for the test's signal to arrive before the step boundary
    return out
  slow._cache_size = step._cache_size
  self.train_step = slow
gil.Runner.__init__ = slow_init
app.run(launch.main, flags_parser=launch.parse_flags)
"""


def test_sigterm_mid_stage_checkpoints_and_resume_is_identical(tmp_path, uninterrupted):
  workdir = str(tmp_path / "w")
  cfg = tmp_path / "tiny_cfg.py"
  cfg.write_text("from tests.helpers import tiny_config\n\n\ndef get_config():\n"
                 "  return tiny_config(**{'mesh.data': 1})\n")
  script = tmp_path / "slow_launch.py"
  script.write_text(SLOW_LAUNCH)
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen([sys.executable, str(script), "--config", str(cfg), "--workdir",
                           workdir], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env)
  try:
    for line in proc.stdout:  # 6 steps per stage: the 9th step is step 3 of stage 1
      if line.strip() == "STEP 9":
        proc.send_signal(signal.SIGTERM)
        break
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == guards.EXIT_INTERRUPTED, err[-3000:]
  assert "Traceback" not in err and "Rerun the same command" in err, err[-3000:]
  ck = checkpoint.Checkpointer(workdir)
  step = ck.latest_step()
  progress = ck.read_meta(step)["progress"]
  ck.close()
  assert progress["stage"] == 1 and not progress["stage_done"], progress
  assert progress["step_in_stage"] in (3, 4) and step == 6 + progress["step_in_stage"]
  assert f"checkpoint step {step}" in err
  resumed = gil.train_and_evaluate(tiny_config(**TINY), workdir, progress_bar=False)
  _same_results(resumed, uninterrupted)
  json.loads(open(os.path.join(workdir, "results.json")).read(),
             parse_constant=lambda c: pytest.fail(f"{c} in results.json"))


def signal_at_step(monkeypatch, runner_cls, at: int, sig) -> None:
  """Makes `runner_cls`'s train step send `sig` to this process on its `at`-th call."""
  init = runner_cls.__init__

  def init_with_signal(self, *a, **k):
    init(self, *a, **k)
    step, n = self.train_step, [0]

    def signalled(state, inputs):
      n[0] += 1
      if n[0] == at:
        os.kill(os.getpid(), sig)
      return step(state, inputs)
    signalled._cache_size = step._cache_size
    self.train_step = signalled

  monkeypatch.setattr(runner_cls, "__init__", init_with_signal)


def test_sigint_in_process_checkpoints_at_the_next_step(tmp_path, uninterrupted, monkeypatch):
  workdir = str(tmp_path / "w")
  signal_at_step(monkeypatch, gil.Runner, 2, signal.SIGINT)  # step 2 of stage 0
  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(guards.Interrupted, match="SIGINT: stopped at step 2 of 6 of stage 0"):
    gil.train_and_evaluate(tiny_config(**TINY), workdir, progress_bar=False)
  assert signal.getsignal(signal.SIGINT) is before  # handlers restored
  monkeypatch.undo()
  ck = checkpoint.Checkpointer(workdir)
  assert ck.latest_step() == 2
  ck.close()
  _same_results(gil.train_and_evaluate(tiny_config(**TINY), workdir, progress_bar=False),
                uninterrupted)


def test_time_based_checkpoints(monkeypatch):
  clock = guards.CheckpointClock(0.5)
  assert not clock.due(1)
  monkeypatch.setattr(guards.time, "monotonic", lambda: clock.t + 31.0)
  assert clock.due(2)
  assert not guards.CheckpointClock(0).due(1)
  assert "train.checkpoint_minutes" in checkpoint.NON_SEMANTIC_FIELDS


# ------------------------------------------------------------------ one-line errors

def _read_only_ok() -> bool:
  return os.geteuid() != 0  # root writes anywhere


@pytest.mark.parametrize("case", [
    "unknown_field", "unknown_method", "n_stages_0", "zero_steps", "workdir_is_file",
    "workdir_under_file", "read_only_workdir", "bad_value"])
def test_launch_errors_are_one_line(tmp_path, case):
  workdir = str(tmp_path / "w")
  args = {"unknown_field": ["--config.train.lr=1"],
          "unknown_method": ["--config.method=foo"],
          "n_stages_0": ["--config.stages.n_stages=0"],
          "zero_steps": ["--config.train.steps_per_stage=0", "--config.train.epochs_per_stage=0"],
          "bad_value": ["--config.train.learning_rate=fast"]}.get(case, [])
  if case == "workdir_is_file":
    open(workdir, "w").close()
  elif case == "workdir_under_file":
    open(tmp_path / "f", "w").close()
    workdir = str(tmp_path / "f" / "w")
  elif case == "read_only_workdir":
    if not _read_only_ok():
      pytest.skip("root ignores directory permissions")
    os.makedirs(workdir)
    os.chmod(workdir, 0o555)
  line = _one_line_error(_launch(tmp_path, *args, "--workdir", workdir))
  expect = {"unknown_field": "unknown config field 'config.train.lr'",
            "unknown_method": "known methods", "n_stages_0": "n_stages",
            "zero_steps": "steps_per_stage", "workdir_is_file": "is a file",
            "workdir_under_file": "parent is a file", "read_only_workdir": "not writable",
            "bad_value": "learning_rate"}[case]
  assert expect in line, line


def _sim(tmp_path, name="sim.h5ad", **kw):
  return sim_h5ad(tmp_path, name, **{"n_cells": 240, "n_genes": 60, **kw})


CANAL_CFG = """
from tests.helpers import tiny_canal_config


def get_config():
  return tiny_canal_config({path!r}, experiment="canal_rel", capacity=96)
"""


def _canal_cfg(tmp_path, path) -> str:
  cfg = tmp_path / "canal_cfg.py"
  cfg.write_text(CANAL_CFG.format(path=path))
  return str(cfg)


def test_gil_jax_train_errors_are_one_line(tmp_path, capsys):
  from gil_jax import cli
  path, a = _sim(tmp_path)
  cfg = _canal_cfg(tmp_path, path)
  w = str(tmp_path / "w")
  nolab = a.copy()
  del nolab.obs["cell_type"]
  nolab_path = str(tmp_path / "nolab.h5ad")
  nolab.write_h5ad(nolab_path)
  trunc = str(tmp_path / "trunc.h5ad")
  with open(path, "rb") as f, open(trunc, "wb") as g:
    g.write(f.read()[:2000])
  cases = {
      "unknown config field 'config.canal.mdoe'": ["--config.canal.mdoe=replay"],
      "config.canal.mode was renamed: use --config.method": ["--config.canal.mode=foo"],
      "unknown config.method 'foo'": ["--config.method=foo"],
      "label column": [f"--config.canal.sources.sim.file={nolab_path}"],
      "cannot read h5ad": [f"--config.canal.sources.sim.file={trunc}"],
      "not found": [f"--config.canal.sources.sim.file={tmp_path / 'missing.h5ad'}"],
      "steps_per_stage": ["--config.train.steps_per_stage=0", "--config.train.epochs_per_stage=0"],
      "config file not found": None,
  }
  for expect, overrides in cases.items():
    argv = (["train", "--config", cfg, "--workdir", w, "--quiet"] + overrides if overrides
            is not None else ["train", "--config", str(tmp_path / "nope.py"), "--workdir", w])
    assert cli.main(argv) == 2, expect
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gil-jax train: error: "), (expect, err)
    assert expect in err[0], (expect, err[0])


# ------------------------------------------------------------------ safe outputs

@pytest.fixture(scope="module")
def canal_run(tmp_path_factory):
  from gil_jax import cli
  tmp = tmp_path_factory.mktemp("canal")
  path, _ = _sim(tmp)
  assert cli.main(["train", "--config", _canal_cfg(tmp, path), "--workdir", str(tmp / "run"),
                   "--quiet"]) == 0
  return tmp, path


def _digest(path) -> str:
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_annotate_refuses_unsafe_outputs_and_partial_runs(canal_run, tmp_path, capsys):
  import shutil
  import anndata as ad
  from gil_jax import cli
  tmp, path = canal_run
  run = str(tmp / "run")
  digest = _digest(path)

  def annotate(out, *extra, workdir=run, query=path):
    rc = cli.main(["annotate", "--workdir", workdir, "--input", query, "--output", str(out),
                   *extra])
    err = capsys.readouterr().err.strip().splitlines()
    if rc:
      assert len(err) == 1 and "Traceback" not in "\n".join(err), err
    return rc, (err[0] if err else "")

  existing = tmp_path / "exists.h5ad"
  existing.write_bytes(b"keep me")
  rc, msg = annotate(existing)
  assert rc == 2 and "already exists" in msg and "--overwrite" in msg, msg
  assert existing.read_bytes() == b"keep me"
  sym = tmp_path / "sym.h5ad"
  os.symlink(path, sym)
  hard = tmp_path / "hard.h5ad"
  os.link(path, hard)
  for link in (sym, hard):
    for extra in ((), ("--overwrite",)):
      rc, msg = annotate(link, *extra)
      assert rc == 2 and "is the input file" in msg, msg
  rc, msg = annotate(tmp_path)
  assert rc == 2 and "is a folder" in msg
  trunc = tmp_path / "trunc.h5ad"
  trunc.write_bytes(open(path, "rb").read()[:3000])
  noth5 = tmp_path / "query.txt"
  noth5.write_text("gene,cell\n")
  for bad in (trunc, noth5):
    rc, msg = annotate(tmp_path / "o.h5ad", query=str(bad))
    assert rc == 2 and "cannot read h5ad file" in msg, msg
  assert _digest(path) == digest

  rc, _ = annotate(existing, "--overwrite")
  assert rc == 0 and ad.read_h5ad(existing).n_obs > 0
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
  assert _digest(path) == digest

  partial = str(tmp_path / "partial")  # the run after its first stage only
  shutil.copytree(run, partial)
  ck = checkpoint.Checkpointer(partial)
  ck.manager.delete(ck.latest_step())
  ck.close()
  rc, msg = annotate(tmp_path / "p.h5ad", workdir=partial)
  assert rc == 2 and "finished only 1 of its 2 stages" in msg and "--allow-partial" in msg
  assert annotate(tmp_path / "p.h5ad", "--allow-partial", workdir=partial)[0] == 0
  assert "1 of 2" in ad.read_h5ad(tmp_path / "p.h5ad").uns["gil"]["partial_model"]
  assert _digest(path) == digest


# ------------------------------------------------------------------ verified checkpoints

def _flip_a_bit(workdir: str, step: int) -> None:
  """Rewrites `step` with one bit of one parameter flipped and the original metadata (what a
  silently damaged disk gives: readable files, other values)."""
  ck = checkpoint.Checkpointer(workdir)
  meta = ck.read_meta(step)
  raw = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = jax.tree.map(np.array, raw["state"])  # writable copies
  leaf = state["params"]["decoder"]["attn"]["out"]["kernel"]
  leaf.reshape(-1).view(np.uint32)[0] ^= 1 << 20
  ck.manager.delete(step)
  ck.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                meta=ocp.args.JsonSave(meta)), force=True)
  ck.manager.wait_until_finished()
  ck.close()


def test_damaged_checkpoints_fall_back_to_the_previous_good_step(tmp_path, uninterrupted):
  workdir = str(tmp_path / "w")
  config = tiny_config(**TINY)
  gil.train_and_evaluate(config, workdir, stop_after_steps=9, progress_bar=False)
  _flip_a_bit(workdir, 9)
  ck = checkpoint.Checkpointer(workdir)
  with pytest.raises(checkpoint.integrity.CheckpointDamagedError, match="differ from the check"):
    try:
      ck.restore(9, checkpoint.abstract_like(gil.Runner(config, *_data_plan(config))
                                             .initial_state()))
    finally:
      ck.close()
  resumed = gil.train_and_evaluate(config, workdir, progress_bar=False)  # from step 6
  _same_results(resumed, uninterrupted)
  assert os.path.isdir(os.path.join(workdir, "checkpoints.damaged", "9"))

  ck = checkpoint.Checkpointer(workdir)
  last = ck.latest_step()
  ck.close()
  # a finished run whose latest state is damaged rewrites its report from the metadata alone
  state_dir = os.path.join(workdir, "checkpoints", str(last), "state")
  for root, _, files in os.walk(state_dir):
    for f in files:
      if not f.startswith("_"):
        open(os.path.join(root, f), "wb").close()
  again = gil.train_and_evaluate(config, workdir, progress_bar=False)
  assert again["gene_regression"] == resumed["gene_regression"]
  # a missing meta/metadata in the latest step: back to the previous stage end, re-done
  os.remove(os.path.join(workdir, "checkpoints", str(last), "meta", "metadata"))
  _same_results(gil.train_and_evaluate(config, workdir, progress_bar=False), uninterrupted)


def _data_plan(config):
  from gil_jax import experiment
  data = experiment.load_data(config)
  return data, experiment.build_plan(config, data)


# ------------------------------------------------------------------ data fingerprints

def test_resume_on_changed_data_is_refused(tmp_path):
  from gil_jax import integrity
  path, a = _sim(tmp_path, "train.h5ad", n_cells=320, n_genes=64)
  config = tiny_config(**TINY, **{"data.source": "h5ad", "data.files": (path,)})
  workdir = str(tmp_path / "w")
  gil.train_and_evaluate(config, workdir, stop_after_steps=4, progress_bar=False)
  other = _sim(tmp_path, "other.h5ad", n_cells=320, n_genes=64, seed=5)[1]
  other.obs_names, other.var_names = a.obs_names, a.var_names
  other.write_h5ad(path)  # same shape and ids, other values
  with pytest.raises(integrity.DataChangedError, match="train.h5ad.*(size|content)"):
    gil.train_and_evaluate(config, workdir, progress_bar=False)
  a[:300].copy().write_h5ad(path)  # fewer cells
  with pytest.raises(integrity.DataChangedError, match="cells of .*train.h5ad.*320 -> 300"):
    gil.train_and_evaluate(config, workdir, progress_bar=False)


def test_canal_sigterm_mid_stage_resumes_exactly(canal_run, tmp_path, monkeypatch):
  from gil_jax.tasks import annotation
  tmp, path = canal_run
  full = json.load(open(tmp / "run" / "results.json"))
  signal_at_step(monkeypatch, annotation.Runner, 5, signal.SIGTERM)  # step 2 of stage 1
  workdir = str(tmp_path / "w")
  cfg = _canal_cfg(tmp_path, path)
  with pytest.raises(guards.Interrupted, match="SIGTERM: stopped at step 2 of 3 of stage 1"):
    annotation.train_annotation(guards.load_config(cfg), workdir)
  monkeypatch.undo()
  resumed = annotation.train_annotation(guards.load_config(cfg), workdir)
  assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
  assert [s["final_loss"] for s in resumed["stages"]] == pytest.approx(
      [s["final_loss"] for s in full["stages"]], rel=1e-5)


def test_no_held_out_cells_warns(tmp_path, monkeypatch, caplog):
  class Stop(Exception):
    pass

  def stop(*a, **k):
    raise Stop

  monkeypatch.setattr(gil, "Runner", stop)  # the warning comes before any compilation
  with caplog.at_level("WARNING", logger="gil_jax"), pytest.raises(Stop):
    gil.train_and_evaluate(tiny_config(**TINY, **{"stages.eval_fraction": 0.0}),
                            str(tmp_path / "w"), progress_bar=False)
  assert "no held-out cells" in caplog.text and "eval_fraction > 0" in caplog.text


def test_gil_jax_train_config_can_import_its_sibling_configs(tmp_path, capsys):
  """`gil-jax train --config pkg/b.py` where b.py imports `pkg.a`, from a folder not on
  sys.path (as the README's `gil-jax train --config configs/canal_novelty.py` does)."""
  from gil_jax import cli
  pkg = tmp_path / "mycfgs_for_test"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from tests.helpers import tiny_config\n\n\ndef get_config():\n"
                            "  return tiny_config()\n")
  (pkg / "b.py").write_text("from mycfgs_for_test import a\n\n\ndef get_config():\n"
                            "  c = a.get_config()\n  c.stages.n_stages = 0\n  return c\n")
  rc = cli.main(["train", "--config", str(pkg / "b.py"), "--workdir", str(tmp_path / "w"),
                 "--quiet"])
  err = capsys.readouterr().err
  assert rc == 2 and "n_stages" in err and "No module named" not in err, err
