"""Run-time guards shared by the GIL stage loop and the annotation loop.

* `RunError` and subclasses: problems the user fixes (bad config, data, workdir); entry points
  print them as one line and exit with `EXIT_ERROR` (2).
* `check_finite` / `check_state_finite`: stop on a non-finite loss, gradient norm or state,
  before anything non-finite is checkpointed (`NonFiniteError`).
* `WorkdirLock`: an OS file lock on `workdir/.lock` held while training.
* `Preemption`: SIGTERM / SIGINT set a flag; the loop checkpoints at the next step boundary and
  raises `Interrupted` (entry points exit with `EXIT_INTERRUPTED`, 3).
* `finite_or_none`: non-finite floats -> None, so results are strict JSON.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import fcntl
import math
import os
import signal
import socket
import sys
import tempfile
import time
from typing import Any, Iterator, Mapping

import numpy as np

EXIT_ERROR = 2        # a one-line error: the message names the problem and the fix
EXIT_INTERRUPTED = 3  # SIGTERM / SIGINT: checkpointed at a step boundary; rerun to resume


class RunError(ValueError):
  """A problem the user fixes; printed as one line (no traceback), exit code 2."""


class ConfigError(RunError):
  """An invalid config value or override."""


class WorkdirError(RunError):
  """The workdir cannot be used (a file, read-only, locked by another run)."""


class NonFiniteError(RunError):
  """A loss, gradient norm or state leaf became NaN / inf."""


class Interrupted(Exception):
  """SIGTERM / SIGINT: a checkpoint was written at a step boundary; rerun to resume."""


# ------------------------------------------------------------------ one-line errors

USER_ERRORS = (ValueError, KeyError, OSError)


def is_user_error(e: BaseException) -> bool:
  """A RunError, or a ValueError of gil_jax's own kinds (DataError, VocabularyError, ...): a
  message for the user, printed as one line."""
  return isinstance(e, RunError) or (isinstance(e, ValueError)
                                     and type(e).__module__.startswith("gil_jax."))


@contextlib.contextmanager
def user_errors(what: str) -> Iterator[None]:
  """Converts ValueError / KeyError / OSError raised while `what` (config, data and workdir
  checks, before training) into a `RunError`, so entry points print one line; gil_jax's own
  error kinds pass unchanged."""
  try:
    yield
  except USER_ERRORS as e:
    if is_user_error(e):
      raise
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    raise RunError(f"{what}: {msg}") from e


def one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def exit_with_error(e: BaseException, prefix: str = "error") -> None:
  print(f"{prefix}: {one_line(e)}", file=sys.stderr)
  sys.exit(EXIT_ERROR)


# fields that moved: old spelling -> new spelling (named in the error for the old one)
RENAMED = {"canal.mode": "method", "canal.epochs_per_stage": "train.epochs_per_stage"}


def unknown_override(config, key: str) -> str | None:
  """None when `config` has the dotted field `key`; else a message naming the unknown part and
  the closest known fields (or the new spelling of a renamed field)."""
  if key in RENAMED and unknown_override(config, RENAMED[key]) is None:
    return (f"config.{key} was renamed: use --config.{RENAMED[key]}=... (the same values; "
            "config.task selects the annotation methods)")
  node, path = config, []
  for part in key.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      where = ".".join(path) or "the top level"
      close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
      hint = (f"did you mean {', '.join('config.' + '.'.join(path + [c]) for c in close)}? "
              if close else "")
      return (f"unknown config field 'config.{key}' ({part!r} is not a field of {where}); "
              f"{hint}fields there: {', '.join(sorted(map(str, keys)))}")
    node, path = node[part], path + [part]
  return None


def check_overrides(config, argv: list[str]) -> None:
  """ConfigError for the first `--config.a.b=value` in argv naming an unknown field."""
  for item in argv:
    if item.startswith("--config.") and "=" in item:
      msg = unknown_override(config, item[len("--config."):].split("=", 1)[0])
      if msg:
        raise ConfigError(msg)


def load_config(path: str, overrides: list[str] = ()):
  """get_config() of a config file, locked, with `--config.a.b=value` overrides; ConfigError
  (one line) for a missing file, an unknown field or a value of the wrong type."""
  import importlib.util
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path!r}")
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))  # so `from configs import x` works
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location("gil_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  config.lock()
  return apply_overrides(config, overrides)


def apply_overrides(config, overrides: list[str] = ()):
  """`config` with `--config.a.b=value` overrides applied (values parsed by the field's type);
  ConfigError (one line) for an unknown field or a value of the wrong type."""
  import ast
  for item in overrides:
    if not item.startswith("--config.") or "=" not in item:
      raise ConfigError(f"unexpected argument {item!r}; overrides look like --config.a.b=value")
    key, value = item[len("--config."):].split("=", 1)
    msg = unknown_override(config, key)
    if msg:
      raise ConfigError(msg)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    old = node[leaf]
    try:
      if isinstance(old, str):
        node[leaf] = value
      elif isinstance(old, bool):
        if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
          raise ValueError("not a boolean")
        node[leaf] = value.lower() in ("1", "true", "yes")
      elif isinstance(old, tuple):  # list fields: a literal, or the comma form a,b
        from gil_jax.experiment import as_names
        try:
          parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
          parsed = value
        node[leaf] = (tuple(parsed) if isinstance(parsed, (tuple, list)) else
                      tuple(as_names(parsed)) if isinstance(parsed, str) else (parsed,))
      else:
        node[leaf] = type(old)(ast.literal_eval(value))
    except (ValueError, TypeError, SyntaxError) as e:
      raise ConfigError(f"--config.{key}={value!r}: expected a {type(old).__name__} like "
                        f"{old!r} ({one_line(e)})") from e
  return config


def check_steps(n_steps: int, stage: int, name: str, n_cells: int) -> None:
  if n_steps < 1:
    raise ConfigError(
        f"stage {stage} ({name}) would run {n_steps} train steps ({n_cells} train cells); set "
        "--config.train.steps_per_stage > 0 or --config.train.epochs_per_stage > 0 "
        "(and check the stage has cells).")


# ------------------------------------------------------------------ workdir

def prepare_workdir(workdir: str) -> str:
  """Creates `workdir`; WorkdirError (one line) when it is a file, under a file or not
  writable. Returns its absolute path."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir {workdir!r} is a file, not a directory; choose another path.")
  try:
    os.makedirs(path, exist_ok=True)
  except (FileExistsError, NotADirectoryError) as e:
    raise WorkdirError(f"cannot create --workdir {workdir!r}: a parent is a file ({e.strerror}); "
                       "choose another path.") from e
  except OSError as e:
    raise WorkdirError(f"cannot create --workdir {workdir!r} ({e.strerror}); choose a writable "
                       "path.") from e
  try:
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir!r} is not writable ({e.strerror}); fix its "
                       "permissions or choose another path.") from e
  return path


class WorkdirLock:
  """Exclusive `fcntl.flock` on `workdir/.lock` (holding pid and host) while training.

  The OS releases the lock when the holder exits or is killed, so a stale `.lock` file left by a
  killed run never blocks. A second run on the same workdir gets a WorkdirError naming the
  holder. Only process 0 of a multi-process run locks (the others share its workdir).
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, ".lock")
    self.enabled = enabled
    self.fd: int | None = None

  def __enter__(self) -> "WorkdirLock":
    if not self.enabled:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirError(
            f"workdir {os.path.dirname(self.path)!r} is in use by {holder}; wait for that run "
            "to finish (or stop it) or use another --workdir.") from e
      raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    os.set_inheritable(fd, False)
    self.fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self.fd is not None:
      os.ftruncate(self.fd, 0)
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None


# ------------------------------------------------------------------ non-finite values

def _bad(x) -> bool:
  try:
    return not bool(np.all(np.isfinite(np.asarray(x, dtype=np.float64))))
  except (TypeError, ValueError):
    return False


def nonfinite_terms(metrics: Mapping[str, Any]) -> list[str]:
  """Names of the loss terms and the gradient norm in `metrics` (host values) that are not
  finite, components before the total."""
  watched = [k for k in metrics if k.startswith("loss") or k == "grad_norm"]
  bad = [k for k in watched if _bad(metrics[k])]
  return sorted(bad, key=lambda k: (k == "loss", k == "grad_norm", k))


def _advice(config) -> str:
  t = config.train
  parts = [f"--config.train.learning_rate (now {t.learning_rate:g}): try 10x lower"]
  if not t.grad_clip:
    parts.append("--config.train.grad_clip=1.0")
  if not t.warmup_steps:
    parts.append("--config.train.warmup_steps=100")
  if config.batch.get("normalisation") == "none":
    parts.append("--config.batch.normalisation=log1p_cp10k (raw values are unnormalised)")
  return "; ".join(parts)


def _where(step: int, stage: int, stage_name: str) -> str:
  return f"step {step} of stage {stage} ({stage_name})"


def check_finite(metrics: Mapping[str, Any], config, *, step: int, stage: int, stage_name: str,
                 ckpt) -> None:
  """NonFiniteError (one line: where, which term, the kept checkpoint, what to change) when a
  loss term or the gradient norm in the host `metrics` is NaN / inf."""
  bad = nonfinite_terms(metrics)
  if bad:
    values = ", ".join(f"{k}={float(np.asarray(metrics[k])):g}" for k in bad)
    raise NonFiniteError(
        f"non-finite training values at {_where(step, stage, stage_name)}: {values}. Nothing "
        f"non-finite was checkpointed; {last_good_text(ckpt)}. Change {_advice(config)}; then "
        "rerun with a fresh --workdir.")


def check_state_finite(state, config, *, step: int, stage: int, stage_name: str,
                       ckpt) -> None:
  """NonFiniteError when a floating leaf of `state` holds NaN / inf (checked before saving)."""
  import jax
  import jax.numpy as jnp
  leaves = [x for x in jax.tree.leaves(state)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return
  ok = bool(jax.device_get(_all_finite(leaves)))
  if not ok:
    raise NonFiniteError(
        f"the training state became non-finite (NaN / inf parameters or optimizer state) at "
        f"{_where(step, stage, stage_name)}. It was not checkpointed; {last_good_text(ckpt)}. "
        f"Change {_advice(config)}; then rerun with a fresh --workdir.")


def _all_finite(leaves):
  import jax
  import jax.numpy as jnp
  fn = _all_finite.__dict__.get("fn")
  if fn is None:
    fn = _all_finite.fn = jax.jit(lambda xs: jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(x)) for x in xs])))
  return fn(leaves)


def last_good_text(ckpt) -> str:
  """'the last good checkpoint is step N in DIR (kept)' or 'there is no checkpoint yet'."""
  step = ckpt.latest_step()
  if step is None:
    return "there is no checkpoint yet"
  return f"the last good checkpoint, step {step} in {ckpt.directory}, is kept"


def finite_or_none(obj: Any) -> Any:
  """A copy of a JSON-like object with every NaN / inf float replaced by None (strict JSON)."""
  if isinstance(obj, float) or isinstance(obj, np.floating):
    return float(obj) if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_or_none(v) for v in obj]
  return obj


# ------------------------------------------------------------------ preemption

class Preemption:
  """While active, SIGTERM and SIGINT set `requested` instead of killing the process; the loop
  polls `should_stop(step)` at step boundaries, checkpoints and raises `Interrupted`.

  Several processes (multi-host): JAX's preemption sync point (`reached_preemption_sync_point`,
  fed by the coordination service's SIGTERM notifier) makes every process stop at the same step;
  SIGINT is then left to its default. A second signal of the same kind kills at once.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, multi_process: bool = False):
    self.multi_process = multi_process
    self.signal: str | None = None
    self._old: dict = {}

  def __enter__(self) -> "Preemption":
    import threading
    if self.multi_process or threading.current_thread() is not threading.main_thread():
      return self
    for s in self.SIGNALS:
      self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    if self.signal is not None:  # a second signal: give up on the clean stop
      self.__exit__()
      os.kill(os.getpid(), signum)
      return
    self.signal = signal.Signals(signum).name
    print(f"\n{self.signal} received: checkpointing at the next step boundary, then stopping "
          "(send it again to stop at once)", file=sys.stderr, flush=True)

  def should_stop(self, step: int) -> bool:
    if self.signal is not None:
      return True
    if self.multi_process:
      from jax.experimental import multihost_utils
      try:
        reached = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # no preemption sync manager (not started by jax.distributed)
        return False
      if reached:
        self.signal = "SIGTERM"
        return True
    return False

  def __exit__(self, *exc) -> None:
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old = {}


def interrupted_message(sig: str, where: str, step: int, directory: str) -> str:
  return (f"{sig}: stopped at {where}; checkpoint step {step} written to {directory}. Rerun the "
          f"same command to resume from it (exit code {EXIT_INTERRUPTED}).")


class CheckpointClock:
  """Time-based checkpoints: `due()` once `minutes` passed since the last `reset()` (0 = off).
  Several processes agree through process 0's clock (checked every `every` steps only)."""

  def __init__(self, minutes: float, multi_process: bool = False, every: int = 10):
    self.seconds = float(minutes) * 60.0
    self.multi_process, self.every = multi_process, max(1, int(every))
    self.reset()

  def reset(self) -> None:
    self.t = time.monotonic()

  def due(self, step: int) -> bool:
    if self.seconds <= 0:
      return False
    if not self.multi_process:
      return time.monotonic() - self.t >= self.seconds
    if step % self.every:
      return False
    from jax.experimental import multihost_utils
    flag = np.int32(time.monotonic() - self.t >= self.seconds)
    return bool(multihost_utils.broadcast_one_to_all(flag))
