"""Runs a gil_jax experiment of any task: `python launch.py --config configs/X.py --workdir runs/X`
(the same as `gil-jax train ...`; the config's `task` says what is trained).

Override any config field with `--config.a.b=value`; unknown fields are rejected. Rerunning
with the same workdir resumes at the last checkpoint.

Exit codes: 0 done; 2 a one-line error (bad config, data or workdir, a workdir in use by another
run, a non-finite loss); 3 stopped by SIGTERM / SIGINT after checkpointing at a step boundary
(rerun the same command to resume). GIL_TRACEBACK=1 shows the traceback of a one-line error.

Multi-process (multi-host) runs: start the same command once per process with
`--coordinator=host:port --num_processes=P --process_id=i` (or the environment variables
GIL_COORDINATOR / GIL_NUM_PROCESSES / GIL_PROCESS_ID); every process reads only its rows of
each global batch and all of them write the same (shared) workdir.
"""

from gil_jax import hostenv

hostenv.use_huge_pages()  # re-executes once, before any buffer is allocated (see hostenv.py)

import sys  # noqa: E402

from absl import app, flags  # noqa: E402

from gil_jax import cli  # noqa: E402

FLAGS = flags.FLAGS
cli.define_train_flags(FLAGS)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sys.exit(cli.run_training(FLAGS))


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (exit 2) for a bad --config file or override."""
  return cli.parse_flags(FLAGS, argv)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
