"""This host's memory bandwidth: the figure the planner's time model uses for CPU devices.

    python benchmarks/host_bandwidth.py [--mib 256] [--repeats 5]

XLA:CPU's simulated devices share the host's memory, so a collective between them
is a copy through it, as a lookup or an update is: one bandwidth serves for both
(`dlrm_jax.embedding.step_time.CPU`). Copies a float32 array of --mib MiB into
another --repeats times and prints the bytes read and written per second of the
median copy. A measurement of this machine at this moment (shared machines are
noisy): record it in benchmarks/RESULTS.md with the machine and date.
"""

import argparse
import platform
import time

import numpy as np


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mib", type=int, default=256)
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  src = np.ones(a.mib * 2**20 // 4, np.float32)
  dst = np.empty_like(src)
  np.copyto(dst, src)  # touch every page first
  times = []
  for _ in range(a.repeats):
    t = time.perf_counter()
    np.copyto(dst, src)
    times.append(time.perf_counter() - t)
  seconds = float(np.median(times))
  print(f"{platform.processor() or platform.machine()}: copy of {a.mib} MiB, median of "
        f"{a.repeats}: {seconds * 1e3:.1f} ms, {2 * src.nbytes / seconds / 1e9:.1f} GB/s "
        "(read + written)")


if __name__ == "__main__":
  main()
