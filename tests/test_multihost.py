"""Two local processes on loopback (JAX CPU collectives, gloo) run the shared stage loop together:
the gene-incremental task preempted and resumed, the annotation task against one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _gloo_available() -> bool:
  import jax
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    return True
  except Exception:  # noqa: BLE001
    return False


def _launch(n, worker, *args, expect: int = 0) -> list[str]:
  """Runs `worker args` as n processes on loopback; fails with the output of a process whose
  exit code is not `expect`. Returns the outputs."""
  port = _free_port()
  procs = []
  for pid in range(n):
    env = dict(os.environ, GIL_COORDINATOR=f"127.0.0.1:{port}", GIL_NUM_PROCESSES=str(n),
               GIL_PROCESS_ID=str(pid), PYTHONPATH=ROOT)
    procs.append(subprocess.Popen([sys.executable, worker, *args], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, o in zip(procs, outs):
    assert p.returncode == expect, o[-3000:]
  return outs


@pytest.mark.skipif(not _gloo_available(), reason="JAX CPU collectives (gloo) unavailable in "
                    "this jaxlib; multi-process CPU training cannot run")
def test_gil_loop_two_processes_preempted_and_resumed_match_one(tmp_path):
  """The full gene-incremental loop in two processes: SIGTERM to one of them after stage 0 makes
  both stop at the same step (JAX's preemption sync point) with a checkpoint and exit code 3;
  rerun, they finish with the results of an uninterrupted two-process run. (Each process draws
  its rows' token samples and masks from its own stream, so two processes are statistically,
  not bitwise, equivalent to one: `batching.stage_batches`.)"""
  from gil_jax import checkpoint, guards
  worker = os.path.join(ROOT, "tests", "multihost_gil_worker.py")
  _launch(2, worker, str(tmp_path / "one"), "0")
  outs = _launch(2, worker, str(tmp_path / "two"), "1", expect=guards.EXIT_INTERRUPTED)
  assert all("SIGTERM: stopped at" in o for o in outs)
  steps = {o.split("checkpoint step ")[1].split()[0] for o in outs}
  assert len(steps) == 1  # both stopped at the same step
  ck = checkpoint.Checkpointer(str(tmp_path / "two"))
  assert str(ck.latest_step()) in steps
  ck.close()
  _launch(2, worker, str(tmp_path / "two"), "0")
  runs = {}
  for d in ("one", "two"):
    with open(tmp_path / d / "compared_2.json") as f:
      runs[d] = json.load(f)
  assert runs["two"]["losses"] == pytest.approx(runs["one"]["losses"], rel=1e-5)
  np.testing.assert_allclose(np.asarray(runs["two"]["matrix"], float),
                             np.asarray(runs["one"]["matrix"], float), rtol=1e-5)


@pytest.mark.skipif(not _gloo_available(), reason="JAX CPU collectives (gloo) unavailable in "
                    "this jaxlib; multi-process CPU training cannot run")
def test_annotation_two_processes_match_one(tmp_path):
  """The shared stage loop with the annotation task: two processes (each building its half of
  every batch, one device each) give the accuracy matrix, losses and example bank of one."""
  from tests.helpers import sim_h5ad
  path, _ = sim_h5ad(tmp_path, n_cells=240, n_genes=60)
  worker = os.path.join(ROOT, "tests", "multihost_canal_worker.py")
  runs = {}
  for n in (1, 2):
    _launch(n, worker, path, str(tmp_path / f"canal{n}"))
    with open(tmp_path / f"canal{n}" / "compared.json") as f:
      runs[n] = json.load(f)
  assert runs[2]["accuracy_matrix"] == runs[1]["accuracy_matrix"]
  assert runs[2]["bank"] == runs[1]["bank"]
  assert runs[2]["losses"] == pytest.approx(runs[1]["losses"], rel=1e-4)
