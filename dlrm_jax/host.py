"""Settings of the host process that the speed of a CPU train step depends on.

XLA:CPU allocates each step's temporaries afresh, a few MB each. With glibc's
defaults, blocks that large are mapped with mmap and unmapped when freed, and
freed heap memory is handed back to the kernel, so every step faults in its
temporaries' pages again: about 11,000 minor page faults (45 MB) per step of
the Kaggle-shaped model at batch 2048, a quarter of its time on a 2-core VM
(see benchmarks/RESULTS.md). `keep_freed_memory` makes malloc keep freed
memory for the next step instead. `dlrm_jax.trainer` calls it when imported;
it must run before XLA's CPU client starts (at the first device query or
array), or the step still faults: measured here, the same settings made after
`jax.devices()` left the faults as they were. DLRM_JAX_KEEP_FREED_MEMORY=0
turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

# Blocks up to 32 MiB (glibc's largest mmap threshold) come from the heaps;
# heaps keep up to 1 GiB free at their top and grow 64 MiB at a time, which
# also keeps glibc from shrinking or unmapping its per-thread heaps (64 MiB each).
MALLOC_SETTINGS = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20}

_applied: bool | None = None


def keep_freed_memory() -> bool:
  """Tells glibc's malloc to keep freed memory for reuse; True if it took the settings.

  Process-wide and idempotent; a no-op (False) where the C library is not
  glibc or DLRM_JAX_KEEP_FREED_MEMORY=0. The resident memory is then the
  largest working set so far rather than the current one: freed temporaries
  stay mapped, up to 1 GiB per heap.
  """
  global _applied
  if _applied is None:
    _applied = False
    if sys.platform.startswith("linux") and os.environ.get("DLRM_JAX_KEEP_FREED_MEMORY") != "0":
      try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
      except (OSError, AttributeError):
        return False
      mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
      _applied = all(mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS.items())
  return _applied
