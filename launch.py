"""Runs a gil_jax experiment: `python launch.py --config configs/X.py --workdir runs/X`.

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

import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from gil_jax import distributed, guards  # noqa: E402
from gil_jax.train import loop  # noqa: E402
from gil_jax.eval import report  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, results.json, report.md, plots.")
flags.DEFINE_string("coordinator", None, "Multi-process: coordinator 'host:port' "
                    "(default: $GIL_COORDINATOR).")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes "
                     "(default: $GIL_NUM_PROCESSES or 1).")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index "
                     "(default: $GIL_PROCESS_ID or 0).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # before anything touches a device: jax.distributed must be initialised first
  logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
  distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  try:
    results = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except guards.Interrupted as e:
    print(e, file=sys.stderr)
    sys.exit(guards.EXIT_INTERRUPTED)
  except ValueError as e:
    if not guards.is_user_error(e) or os.environ.get("GIL_TRACEBACK"):
      raise
    guards.exit_with_error(e)  # bad input: say what and how to fix it, no traceback; exit 2
  if jax.process_index() != 0:
    return
  print()
  print(report.stage_table(results))
  print()
  print(report.regression_table(results))
  print()
  print(report.baseline_table(results))
  print(f"\naverage forgetting Δ: {results['forgetting']['average']}")
  print(f"results: {FLAGS.workdir}/results.json, report: {FLAGS.workdir}/report.md")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (exit 2) for a bad --config file or override."""
  try:
    return FLAGS(argv)
  except Exception as e:  # noqa: BLE001 -- config_flags raises many kinds for a bad override
    if os.environ.get("GIL_TRACEBACK"):
      raise
    msg = guards.one_line(e)
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
      path = argv[argv.index("--config") + 1]
    if path and os.path.isfile(path):
      try:
        guards.check_overrides(guards.load_config(path), argv[1:])
      except Exception as e2:  # noqa: BLE001
        msg = guards.one_line(e2)
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(guards.EXIT_ERROR)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
