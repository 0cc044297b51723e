"""The host process's memory pages, which the speed of a CPU train step depends on.

XLA:CPU allocates each step's temporary buffer afresh, in a block above any
mmap threshold glibc's malloc allows, so glibc maps and unmaps it every step
and the step faults its pages in again. With the glibc tunable
`glibc.malloc.hugetlb=1` (glibc 2.35+) malloc asks for transparent huge pages
for such mappings and its heaps, so the block takes a few 2 MiB faults; the
embedding tables, allocated the same way, get huge pages too, which cuts the
cost of their random rows' page-table walks. The measurements are in
docs/cpu_performance.md and benchmarks/RESULTS.md.

The tunable is read when the process starts, so an entry point that wants it
re-executes itself with it (`use_huge_pages`); `train.py` does. Library users
set it themselves: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python ...`.
"""

from __future__ import annotations

import os
import platform
import sys

HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def _glibc_has_the_tunable() -> bool:
  name, version = platform.libc_ver()
  if name != "glibc" or not sys.platform.startswith("linux"):
    return False
  try:
    return tuple(int(x) for x in version.split(".")[:2]) >= (2, 35)
  except ValueError:
    return False


def use_huge_pages() -> None:
  """Re-executes this process with glibc's malloc on transparent huge pages, once.

  Does nothing where glibc is older than 2.35 or absent, when GLIBC_TUNABLES
  already sets `glibc.malloc.hugetlb`, or when DLRM_JAX_HUGE_PAGES=0. The
  process keeps its id, arguments and interpreter options (`sys.orig_argv`).
  Call it first thing in a program's main module, before any work is done;
  not in an interactive kernel (a notebook), which it would re-execute.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if (os.environ.get("DLRM_JAX_HUGE_PAGES") == "0" or "glibc.malloc.hugetlb" in tunables
      or not _glibc_has_the_tunable()):
    return
  os.environ["GLIBC_TUNABLES"] = (f"{tunables}:{HUGE_PAGE_TUNABLE}" if tunables
                                  else HUGE_PAGE_TUNABLE)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)
