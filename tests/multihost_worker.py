"""One process of tests/test_multihost.py: trains 3 steps on its shard and checkpoints."""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = ""
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gil_jax import distributed, parallel  # noqa: E402


def main(out_dir: str, n_shards: int):
  pid, n = distributed.initialize()
  from tests.multihost_common import build, local_batches, train_and_save
  mesh = parallel.make_mesh({"data": -1, "model": 1})
  state, step, sh, in_sh = build(mesh)
  shards = [pid] if n > 1 else list(range(n_shards))
  losses = train_and_save(state, step, sh, mesh, shards, n_shards, os.path.join(out_dir, "ckpt"))
  if pid == 0:
    with open(os.path.join(out_dir, f"losses_{n}.json"), "w") as f:
      json.dump(losses, f)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
