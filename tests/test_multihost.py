"""Two local processes on loopback (JAX CPU collectives, gloo) train and checkpoint together and
see the same losses as one process that builds both data shards."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")


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


def _run(tmp, n):
  port = _free_port()
  procs = []
  for pid in range(n):
    env = dict(os.environ, GIL_COORDINATOR=f"127.0.0.1:{port}", GIL_NUM_PROCESSES=str(n),
               GIL_PROCESS_ID=str(pid), PYTHONPATH=ROOT)
    procs.append(subprocess.Popen([sys.executable, WORKER, str(tmp / f"run{n}"), "2"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=240)[0] for p in procs]
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  with open(tmp / f"run{n}" / f"losses_{n}.json") as f:
    return json.load(f)


@pytest.mark.skipif(not _gloo_available(), reason="JAX CPU collectives (gloo) unavailable in "
                    "this jaxlib; multi-process CPU training cannot run")
def test_two_processes_match_one(tmp_path):
  one = _run(tmp_path, 1)
  two = _run(tmp_path, 2)
  assert len(two) == 3
  assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
