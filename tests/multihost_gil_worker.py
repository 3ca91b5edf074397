"""One process of tests/test_multihost.py: the full gene-incremental loop (`train_and_evaluate`)
on loopback, optionally sending itself SIGTERM once stage 0 is checkpointed (a preemption)."""

import json
import os
import signal
import sys
import threading
import time

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = ""
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sigterm_after_first_checkpoint(workdir: str) -> None:
  def watch():
    while not os.path.isdir(os.path.join(workdir, "checkpoints")) or not any(
        d.isdigit() for d in os.listdir(os.path.join(workdir, "checkpoints"))):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
  threading.Thread(target=watch, daemon=True).start()


def main(workdir: str, preempt: str) -> int:
  from gil_jax import distributed, guards
  distributed.initialize()
  import jax
  from gil_jax.tasks.gil import train_and_evaluate
  from tests.helpers import tiny_config
  config = tiny_config(**{"train.steps_per_stage": 40, "train.checkpoint_every": 1000,
                          "stages.n_stages": 2, "mesh.data": -1})
  if preempt == "1" and jax.process_index() == 1:
    _sigterm_after_first_checkpoint(workdir)
  try:
    results = train_and_evaluate(config, workdir, progress_bar=False)
  except guards.Interrupted as e:
    print(e)
    return guards.EXIT_INTERRUPTED
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"compared_{jax.process_count()}.json"), "w") as f:
      json.dump({"matrix": results["gene_regression"]["matrix"],
                 "losses": [s["final_train_loss"] for s in results["stages"]]}, f)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1], sys.argv[2]))
