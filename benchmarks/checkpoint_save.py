#!/usr/bin/env python3
"""How long a checkpoint save blocks the training loop, and its size on disk.

The model of configs/criteo_kaggle.py (the reference's Kaggle shape) at
26 x ROWS rows, batch 2048, random data, on one device. It trains a few
steps, then saves the train state (`dlrm_jax.checkpoint.Checkpointer`,
asynchronous Orbax) every few steps while training goes on, and reports per
save:

  blocked   time the save call held the loop (the copy of the state to host
            memory; the write goes on in a background thread)
  write     time from the save call until the checkpoint was committed
  step      median train-step time while a write was in flight, against
            the median without one

and the checkpoint's size on disk against the raw bytes of the state (every
array of the TrainState: dense parameters, optax state, tables, sparse
optimiser slots). Then it restores the last checkpoint and times that.

  python benchmarks/checkpoint_save.py --rows 1000000 --optimizer rowwise_adagrad
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

from common import random_batches, random_data_config


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", type=int, default=1_000_000, help="rows of each of the 26 tables")
  p.add_argument("--batch", type=int, default=2048)
  p.add_argument("--optimizer", default="rowwise_adagrad", help="embedding optimiser")
  p.add_argument("--saves", type=int, default=3)
  p.add_argument("--steps-between", type=int, default=10, help="train steps between saves")
  p.add_argument("--dir", default="", help="where to write (default: a temporary directory)")
  args = p.parse_args()

  import jax
  from dlrm_jax import checkpoint
  from dlrm_jax.task import Task

  config = random_data_config(args.rows, args.batch, 0.1, args.optimizer)
  task = Task(config)
  state = task.init_state(0)
  batches = random_batches(task, args.batch, 4)
  state, _ = task.train_step(state, batches[0])  # compile
  jax.block_until_ready(state)
  raw = sum(x.nbytes for x in jax.tree.leaves(state))
  table_bytes = sum(x.nbytes for x in jax.tree.leaves(state.tables))

  directory = args.dir or tempfile.mkdtemp(prefix="dlrm_ckpt_bench_")
  shutil.rmtree(os.path.join(directory, "checkpoints"), ignore_errors=True)
  ckpt = checkpoint.Checkpointer(os.path.join(directory, "checkpoints"),
                                 max_to_keep=args.saves, keep_best=False)
  contents = checkpoint.Contents(config=json.loads(config.to_json()), plan=task.plan)

  def timed_steps(n, start):
    times = []
    for i in range(n):
      t = time.perf_counter()
      nonlocal_state[0], out = task.train_step(nonlocal_state[0], batches[(start + i) % 4])
      jax.block_until_ready(out["loss"])
      times.append(time.perf_counter() - t)
    return times

  nonlocal_state = [state]
  quiet = timed_steps(args.steps_between, 1)
  saves = []
  step = 1 + args.steps_between
  for _ in range(args.saves):
    t = time.perf_counter()
    ckpt.save(step, nonlocal_state[0], contents)
    blocked = time.perf_counter() - t
    during = timed_steps(args.steps_between, step)
    ckpt.wait()
    write = time.perf_counter() - t
    saves.append({"step": step, "blocked_s": blocked, "write_s": write,
                  "step_during_write_s": statistics.median(during)})
    print(f"save at step {step}: blocked the loop {blocked:.3f} s, committed after "
          f"{write:.1f} s, median step {statistics.median(during):.3f} s while writing "
          f"({statistics.median(quiet):.3f} s before the first save)", flush=True)
    step += args.steps_between
  last = ckpt.steps()[-1]
  size = dir_bytes(os.path.join(ckpt.directory, str(last)))
  print(f"checkpoint {size / 2**20:,.1f} MiB on disk for {raw / 2**20:,.1f} MiB of state "
        f"({size / raw:.2f}x); restoring it", flush=True)
  t = time.perf_counter()
  restored = ckpt.restore(task)
  jax.block_until_ready(restored.state)
  restore_s = time.perf_counter() - t
  ckpt.close()
  assert restored.step == last and int(restored.state.step) == last, restored.step
  result = {
      "rows": args.rows, "optimizer": args.optimizer, "devices": task.mesh.size,
      "raw_state_bytes": raw, "table_bytes": table_bytes, "checkpoint_bytes": size,
      "blocked_s": [round(s["blocked_s"], 3) for s in saves],
      "write_s": [round(s["write_s"], 2) for s in saves],
      "step_s_quiet": round(statistics.median(quiet), 4),
      "step_s_during_write": [round(s["step_during_write_s"], 4) for s in saves],
      "restore_s": round(restore_s, 2),
      "machine": f"{platform.machine()}, {os.cpu_count()} cores", "jax": jax.__version__,
  }
  print(json.dumps(result))
  print(f"26 x {args.rows:,} rows, {args.optimizer}: state {raw / 2**20:,.1f} MiB "
        f"(tables {table_bytes / 2**20:,.1f} MiB), checkpoint {size / 2**20:,.1f} MiB "
        f"({size / raw:.2f}x); save blocked the loop {min(result['blocked_s']):.3f}-"
        f"{max(result['blocked_s']):.3f} s, wrote in {min(result['write_s']):.1f}-"
        f"{max(result['write_s']):.1f} s; step {result['step_s_quiet']:.3f} s quiet, "
        f"{statistics.median(result['step_s_during_write']):.3f} s during a write; "
        f"restore {restore_s:.1f} s")
  if not args.dir:
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
  main()
