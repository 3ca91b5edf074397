"""Host process settings that must be in place before the C library reads them: huge pages for
XLA's per-step buffers on Linux.

XLA:CPU allocates each executable's temporary buffers per call (gigabytes per train step at the
paper transformer's size) with ``malloc``, which maps them fresh from the kernel: every 4 KiB page
is faulted in and zeroed again on every step (~610k page faults and ~0.85 s of kernel time per
step measured on the 2-core CI machine). With glibc's ``glibc.malloc.hugetlb=1`` tunable those
mappings are advised as transparent huge pages (2 MiB): ~3k faults per step. The tunable is read
once at process start, so entry points call ``use_huge_pages`` first, which re-executes the same
command line with it set (glibc >= 2.35). Set ``GIL_JAX_HUGE_PAGES=0`` to opt out.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "GIL_JAX_HUGE_PAGES"
REEXECED = "GIL_JAX_REEXECED"     # set in the re-executed process: never re-execute twice
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _tunables() -> list[str]:
  return [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]


def huge_pages_active() -> bool:
  """True if this process runs with the huge-page malloc tunable."""
  return TUNABLE in _tunables()


def _huge_pages_possible() -> bool:
  """Linux, glibc >= 2.35 (the tunable's first release), transparent huge pages not 'never'."""
  if sys.platform != "linux":
    return False
  libc, version = platform.libc_ver()
  try:
    if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
      return False
    with open(THP_SETTING) as f:
      return "[never]" not in f.read()
  except (OSError, ValueError):
    return False


def _accelerator_host() -> bool:
  """JAX will run on a GPU / TPU here (its buffers are not host malloc): JAX_PLATFORMS names one,
  or, without JAX_PLATFORMS, a CUDA or TPU plugin is installed. Checked without importing jax."""
  import importlib.util
  platforms = os.environ.get("JAX_PLATFORMS", "").lower()
  if platforms:
    return any(p in platforms for p in ("cuda", "gpu", "rocm", "tpu"))
  return any(importlib.util.find_spec(m) is not None
             for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu"))


def describe() -> str:
  """One line for a run's log: whether this process runs with huge pages, and why."""
  if huge_pages_active():
    return f"host malloc: huge pages on ({TUNABLE}; {OPT_OUT}=0 turns it off)"
  return "host malloc: huge pages off (not a CPU command-line run, opted out or unavailable)"


def use_huge_pages() -> None:
  """Re-execute this command-line process with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``. Only
  entry points call it (launch.py, gil-jax, benchmarks), never a library import. A no-op when it
  is already set (or the user set ``glibc.malloc.hugetlb`` themselves), after one
  re-execution, when opted out (``GIL_JAX_HUGE_PAGES=0``), on accelerator hosts, or where huge
  pages are not available."""
  if (os.environ.get(OPT_OUT, "1").lower() in ("0", "false", "off", "no")
      or os.environ.get(REEXECED) or not sys.executable or _accelerator_host()
      or any(t.startswith("glibc.malloc.hugetlb=") for t in _tunables())
      or not _huge_pages_possible()):
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(_tunables() + [TUNABLE]), **{REEXECED: "1"})
  for stream in (sys.stdout, sys.stderr):
    if stream is not None:
      stream.flush()
  try:
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
  except OSError:
    return  # cannot re-execute (e.g. an embedded interpreter): run without huge pages
