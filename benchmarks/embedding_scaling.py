#!/usr/bin/env python3
"""Train-step time and peak memory against table size: sparse vs dense gradients.

The model of configs/criteo_kaggle.py (the reference's Kaggle shape: 26
tables, one id per feature, SGD), batch 2048, random data (uniform ids, as
the TorchRec baseline in ../shared/bench/torchrec_dlrm_cpu.py uses), at
26 x ROWS rows for each ROWS.

Paths:
  sparse: dlrm_jax's train step (gradients with respect to the looked-up
          vectors, scatter update of the touched rows; donated state).
  dense:  the naive path for contrast: jax.grad with respect to the whole
          tables through the gather, then optax.sgd over every parameter.

Each (rows, path) runs in its own subprocess so that its peak RSS
(ru_maxrss) is its own; it prints one line per run. With --interleave they
all run in one process instead, taking turns step by step, for step times
that a shared machine's swings do not skew (no per-run peak memory then).

  python benchmarks/embedding_scaling.py --rows 100000,1000000,4000000 --paths sparse,dense
  python benchmarks/embedding_scaling.py --rows 100000,1000000,4000000 --paths sparse --interleave

`--config NAME` takes the model of configs/NAME.py instead (e.g.
criteo_terabyte, as config c of torchrec_side_by_side.py does), `--dim`,
`--bottom` and `--top` change its shape, and `--set KEY=VALUE` any other field
(e.g. `--set compute_dtype=bfloat16`).
`--huge-pages on` backs the tables with 2 MiB transparent huge pages after
initialisation (Linux; `both` with --interleave runs each size with and
without), as GLIBC_TUNABLES=glibc.malloc.hugetlb=1 does for every allocation
from the start.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import sys
import time

from common import (add_shape_arguments, child_result, random_batches, random_data_config,
                    shape_arguments, shape_overrides, take_turns, turn_row)


def advise_huge_pages(tree) -> int:
  """Moves the CPU buffers of `tree`'s arrays onto 2 MiB transparent huge pages.

  madvise(MADV_HUGEPAGE) then madvise(MADV_COLLAPSE) (Linux 6.1+) over each
  buffer's 2 MiB-aligned interior; returns the bytes advised. The buffers keep
  their addresses, and a donated state's tables stay in them step after step.
  """
  import jax

  libc = ctypes.CDLL(None, use_errno=True)
  libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  huge, advised = 2 ** 21, 0
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      start = shard.data.unsafe_buffer_pointer()
      lo, hi = -(-start // huge) * huge, (start + shard.data.nbytes) // huge * huge
      for advice in (14, 25):  # MADV_HUGEPAGE, MADV_COLLAPSE
        if hi > lo and libc.madvise(lo, hi - lo, advice) != 0:
          raise OSError(ctypes.get_errno(), f"madvise({advice}) failed: "
                        f"{os.strerror(ctypes.get_errno())}")
      advised += max(hi - lo, 0)
  return advised


def make_step(rows: int, path: str, batch: int, pool: int, lr: float, optimizer: str | None,
              shape: dict, huge_pages: bool = False):
  """(step_fn, state, batches, task, init_s) of one (rows, path) run; `shape`: the model's
  config overrides (`shape_overrides`)."""
  import jax
  import optax

  from dlrm_jax.task import Task

  task = Task(random_data_config(rows, batch, lr, optimizer, **shape))
  t = time.perf_counter()
  state = task.init_state(0)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t
  if huge_pages:
    t = time.perf_counter()
    mb = advise_huge_pages(state.tables) / 2**20
    print(f"26 x {rows:,}: {mb:,.0f} MB of tables on huge pages "
          f"({time.perf_counter() - t:.1f} s)", flush=True)
  batches = random_batches(task, batch, pool)

  if path == "sparse":
    step_fn = task.train_step
  elif path == "dense":
    tx = optax.sgd(lr)
    state = (state.params, state.tables, tx.init((state.params, state.tables)))

    def dense_step(s, b):
      params, tables, opt_state = s

      loss, grads = jax.value_and_grad(lambda pt: task.functions.loss(*pt, b))((params, tables))
      updates, opt_state = tx.update(grads, opt_state)
      params, tables = optax.apply_updates((params, tables), updates)
      return (params, tables, opt_state), {"loss": loss}

    step_fn = jax.jit(dense_step, donate_argnums=(0,))
  else:
    raise ValueError(path)
  return step_fn, state, batches, task, init_s


def run_one(rows: int, path: str, batch: int, warmup: int, steps: int, pool: int, lr: float,
            optimizer: str | None, shape: dict, huge_pages: bool = False) -> dict:
  import jax

  step_fn, state, batches, task, init_s = make_step(rows, path, batch, pool, lr, optimizer,
                                                    shape, huge_pages)
  t = time.perf_counter()
  for i in range(warmup):
    state, out = step_fn(state, batches[i % pool])
  jax.block_until_ready(state)
  warmup_s = time.perf_counter() - t
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, out = step_fn(state, batches[(warmup + i) % pool])
    jax.block_until_ready(out["loss"])
    times.append(time.perf_counter() - t)
  jax.block_until_ready(state)
  med = statistics.median(times)
  table_mb = task.collection.nbytes / 2**20
  emb_state = state.emb_opt_state if path == "sparse" else {}
  state_mb = sum(x.nbytes for x in jax.tree.leaves(emb_state)) / 2**20
  return {
      "rows": rows, "path": path, "huge_pages": huge_pages,
      "optimizer": task.run.training.embedding_optimizer if path == "sparse" else "optax.sgd",
      "model": {k: task.run.source[k] for k in ("arch_interaction_op", "compute_dtype",
                                                "arch_sparse_feature_size")},
      "batch": batch, "samples_per_s": batch / med, "median_step_ms": med * 1e3,
      "p10_step_ms": sorted(times)[len(times) // 10] * 1e3,
      "p90_step_ms": sorted(times)[(9 * len(times)) // 10] * 1e3,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "tables_mb": table_mb, "emb_opt_state_mb": state_mb,
      "init_s": init_s, "warmup_s": warmup_s, "final_loss": float(out["loss"]),
      "jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
  }


def run_interleaved(a) -> None:
  """Every (rows, path, huge pages) in this one process, taking turns step by
  step (`take_turns`); each run's time is also divided by the first run's in
  the same round. Peak memory is not per run here."""
  runs = {}
  for rows in [int(r) for r in a.rows.split(",")]:
    for path in a.paths.split(","):
      for huge in {"off": [False], "on": [True], "both": [False, True]}[a.huge_pages]:
        name = f"26 x {rows:,} | {path}"
        if a.huge_pages == "both":
          name += " | 2 MiB" if huge else " | 4 KiB"
        step_fn, state, batches, _, _ = make_step(rows, path, a.batch, a.pool, a.lr,
                                                  a.optimizer, shape_overrides(a), huge)
        runs[name] = [step_fn, state, batches]  # each run its own ids: in its tables' range
        print(f"{name}: set up", flush=True)
  result = take_turns(runs, a.steps, a.warmup)
  times = result["times"]
  first = next(iter(runs))
  columns = ["rows", "path"] + ["pages"] * (a.huge_pages == "both") + [
      "median step", "p10 step", "time / first row's (median over rounds)",
      "CPU / step (median)", "minor faults / step (median)"]
  print("\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
  for name, ts in times.items():
    print(f"| {name} | {turn_row(ts, times[first])} | "
          f"{statistics.median(result['cpu'][name]) * 1e3:,.0f} ms | "
          f"{statistics.median(result['faults'][name]):,.0f} |", flush=True)


def main():
  from dlrm_jax import hugepages

  hugepages.use_huge_pages()  # as train.py runs; DLRM_JAX_HUGE_PAGES=0: without
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--rows", default="100000,1000000,4000000")
  ap.add_argument("--paths", default="sparse,dense")
  ap.add_argument("--optimizer", default=None,
                  help="sparse optimiser of the sparse path (default: the config's)")
  ap.add_argument("--batch", type=int, default=2048)
  ap.add_argument("--warmup", type=int, default=5)
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--pool", type=int, default=8, help="distinct random batches")
  ap.add_argument("--lr", type=float, default=0.01)
  add_shape_arguments(ap)
  ap.add_argument("--huge-pages", choices=("off", "on", "both"), default="off",
                  help="tables on 2 MiB pages (advise_huge_pages); both: with --interleave")
  ap.add_argument("--repeats", type=int, default=1, help="runs of each (rows, path), alternated")
  ap.add_argument("--json", default="", help="append one JSON line per run here")
  ap.add_argument("--interleave", action="store_true",
                  help="run all in one process, step by step in turn (see run_interleaved)")
  ap.add_argument("--_child", nargs=2, metavar=("ROWS", "PATH"), help=argparse.SUPPRESS)
  a = ap.parse_args()

  if a._child:
    r = run_one(int(a._child[0]), a._child[1], a.batch, a.warmup, a.steps, a.pool, a.lr,
                a.optimizer, shape_overrides(a), a.huge_pages == "on")
    print("RESULT " + json.dumps(r), flush=True)
    return

  print(f"# {platform.node()} {platform.machine()} cores={os.cpu_count()} "
        f"{time.strftime('%Y-%m-%d %H:%M')} batch={a.batch} steps={a.steps} "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}", flush=True)
  if a.interleave:
    run_interleaved(a)
    return
  if a.huge_pages == "both":
    sys.exit("--huge-pages both needs --interleave")
  results = []
  for rep in range(a.repeats):
    for rows in [int(r) for r in a.rows.split(",")]:
      for path in a.paths.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", str(rows), path,
               "--batch", str(a.batch), "--warmup", str(a.warmup), "--steps", str(a.steps),
               "--pool", str(a.pool), "--lr", str(a.lr), "--huge-pages", a.huge_pages,
               *(["--optimizer", a.optimizer] if a.optimizer else []), *shape_arguments(a)]
        r = child_result(cmd)
        if "failed" in r:
          print(f"rows={rows} path={path}: FAILED ({r['failed']})", flush=True)
          continue
        r["repeat"] = rep
        results.append(r)
        print(f"rows=26x{rows:<9,} {path:6s} {r['samples_per_s']:>9,.0f} samples/s  "
              f"median {r['median_step_ms']:7.1f} ms  peak RSS {r['peak_rss_mb']:8,.0f} MB  "
              f"(tables {r['tables_mb']:,.0f} MB + opt state {r['emb_opt_state_mb']:,.0f} MB)",
              flush=True)
        if a.json:
          with open(a.json, "a") as f:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
