"""The host process on huge pages (dlrm_jax.hugepages)."""

import os
import subprocess
import sys

import pytest

from dlrm_jax import hugepages

# Prints GLIBC_TUNABLES and the process id before and after use_huge_pages().
SCRIPT = ("import os; print('before', os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), "
          "flush=True); from dlrm_jax import hugepages; hugepages.use_huge_pages(); "
          "print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES', ''))")


def _run(**env_changes):
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "DLRM_JAX_HUGE_PAGES")}
  env.update(env_changes)
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       check=True).stdout
  return [line.split(" ", 2) for line in out.splitlines()]


def _glibc_version() -> tuple[int, ...]:
  """The C library's own answer (confstr), independent of hugepages.py's platform.libc_ver."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, OSError, ValueError):  # not glibc, or no such name here
    return ()
  return tuple(int(x) for x in version.split(".")[:2]) if name == "glibc" else ()


@pytest.mark.skipif(_glibc_version() < (2, 35), reason="glibc.malloc.hugetlb: glibc 2.35+")
def test_use_huge_pages_reexecutes_once_with_the_tunable():
  lines = _run()
  # The first run re-executes (same process id) with the tunable; the second goes on.
  assert [l[0] for l in lines] == ["before", "before", "after"]
  assert len({l[1] for l in lines}) == 1
  assert lines[0][2] == "" and lines[1][2] == lines[2][2] == "glibc.malloc.hugetlb=1"
  kept = _run(GLIBC_TUNABLES="glibc.malloc.arena_max=2")  # other tunables are kept
  assert kept[-1][2] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_use_huge_pages_leaves_the_process_alone_when_told_or_already_set():
  assert [l[0] for l in _run(DLRM_JAX_HUGE_PAGES="0")] == ["before", "after"]
  lines = _run(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
  assert [l[0] for l in lines] == ["before", "after"]
  assert lines[-1][2] == "glibc.malloc.hugetlb=0"
