"""Host process settings that must be in place before the C library reads them: huge pages for
XLA's per-step buffers on Linux.

XLA:CPU allocates each executable's temporary buffers per call (gigabytes per train step at the
paper transformer's size) with ``malloc``, which maps them fresh from the kernel: every 4 KiB page
is faulted in and zeroed again on every step (~610k page faults and ~0.85 s of kernel time per
step measured on the 2-core CI machine). With glibc's ``glibc.malloc.hugetlb=1`` tunable those
mappings are advised as transparent huge pages (2 MiB): ~3k faults per step. The tunable is read
once at process start, so entry points call ``use_huge_pages`` first, which re-executes the same
command line with it set. Set ``GIL_JAX_HUGE_PAGES=0`` to opt out.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "GIL_JAX_HUGE_PAGES"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_active() -> bool:
  """True if this process runs with the huge-page malloc tunable."""
  return TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def _huge_pages_possible() -> bool:
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    with open(THP_SETTING) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def use_huge_pages() -> None:
  """Re-execute this process with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (once; no-op when
  already set, opted out, or not Linux/glibc with transparent huge pages available)."""
  if huge_pages_active() or os.environ.get(OPT_OUT, "1") == "0" or not _huge_pages_possible():
    return
  tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
  env = dict(os.environ, GLIBC_TUNABLES=":".join(tunables + [TUNABLE]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
