"""A 16-bit table's row update on XLA:CPU: stored as is against stored in pairs.

    python benchmarks/packed_tables.py [--rows 2600000] [--dim 128] [--touched 50000]

Gathers the touched rows of a donated [rows, dim] table, adds an update in float32
and writes them back (unique rows), as the sparse optimisers do, with the table
stored as float32, as bfloat16, and as bfloat16 pairs in uint32 elements
(`dlrm_jax.embedding.collection.pack`, how dlrm_jax stores 16-bit tables). Each in
its own process: median ms of 5 steps and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import common


def run(kind: str, rows: int, dim: int, touched: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dlrm_jax.embedding.collection import pack, unpack

  rng = np.random.default_rng(0)
  index = jnp.asarray(np.unique(rng.integers(0, rows, touched)).astype(np.int32))
  update = jnp.asarray(rng.standard_normal((index.shape[0], dim)).astype(np.float32)) * 1e-3

  def step(table, index, update):
    values = unpack(table[index]).astype(jnp.float32) + update
    values = values.astype(jnp.bfloat16 if kind != "float32" else jnp.float32)
    if kind == "bfloat16_pairs":
      values = pack(values)
    return table.at[index].set(values, unique_indices=True, mode="drop")

  shape = (rows, dim // 2) if kind == "bfloat16_pairs" else (rows, dim)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "bfloat16_pairs": jnp.uint32}[kind]
  f = jax.jit(step, donate_argnums=0)
  table = f(jnp.zeros(shape, dtype), index, update)
  table.block_until_ready()
  times = []
  for _ in range(5):
    t = time.perf_counter()
    table = f(table, index, update)
    table.block_until_ready()
    times.append(time.perf_counter() - t)
  return {"kind": kind, "median_ms": float(np.median(times)) * 1e3,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "table_mb": table.nbytes / 2**20}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=2_600_000)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--touched", type=int, default=50_000)
  parser.add_argument("--kind", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.kind:
    print("RESULT " + json.dumps(run(args.kind, args.rows, args.dim, args.touched)), flush=True)
    return
  for kind in ("float32", "bfloat16", "bfloat16_pairs"):
    print(json.dumps(common.child_result([sys.executable, __file__, "--kind", kind, "--rows",
                                          str(args.rows), "--dim", str(args.dim), "--touched",
                                          str(args.touched)])), flush=True)


if __name__ == "__main__":
  main()
