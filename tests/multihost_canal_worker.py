"""One process of tests/test_multihost.py's annotation check: the whole stage loop of a tiny
CANAL run (data-parallel over the processes' devices); process 0 writes what is compared."""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = ""
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gil_jax import distributed  # noqa: E402


def main(data_path: str, workdir: str):
  pid, _ = distributed.initialize()
  from gil_jax.tasks import annotation
  from tests.helpers import tiny_canal_config
  config = tiny_canal_config(data_path, experiment="canal_multihost", capacity=96)
  results = annotation.train_annotation(config, workdir)
  if pid == 0:
    with open(os.path.join(workdir, "compared.json"), "w") as f:
      json.dump({"accuracy_matrix": results["accuracy_matrix"],
                 "losses": [s["final_loss"] for s in results["stages"]],
                 "bank": [s["bank_per_class"] for s in results["stages"]]}, f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
