#!/usr/bin/env python3
"""Train-step time on MLPerf's multi-hot bags: padded with a mask against flat.

The model of configs/criteo_kaggle.py (D=16, bottom 13-512-256-64-16, top
512-256-1, dot interaction) with 26 x ROWS rows, one device, random ids with
MLPerf DLRM-DCNv2's hotness per feature (3, 2, 1, 2, 6, ..., 100, 27, 10, 3, 1, 1:
214 ids per sample). The same bags are fed two ways to the same model:

  padded: 'sparse' [B, 26, 100] with 'sparse_mask' (every bag padded to the widest,
          2,600 slots per sample: gathered, pooled and updated, padding included);
  flat:   'sparse' [B, 214], feature f's ids end to end (the prepared files' rows).

Both runs live in one process and take turns step by step (`common.take_turns`),
so that the machine's swings fall on both alike; their losses agree to float
rounding, which the script checks.

  python benchmarks/multihot.py --rows 10000 --batch 256 --steps 30
"""

from __future__ import annotations

import argparse
import platform
import statistics

import numpy as np

from common import random_data_config, take_turns, turn_row

MLPERF_HOTNESS = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3,
                  1, 1)


def padded(batch: dict, hotness) -> dict:
  """Flat bags [B, sum(hotness)] -> the same bags padded to max(hotness), with a mask."""
  b, width = len(batch["label"]), max(hotness)
  ids = np.zeros((b, len(hotness), width), np.int32)
  mask = np.zeros(ids.shape, bool)
  at = 0
  for f, h in enumerate(hotness):
    ids[:, f, :h] = batch["sparse"][:, at:at + h]
    mask[:, f, :h] = True
    at += h
  return {**batch, "sparse": ids, "sparse_mask": mask}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", type=int, default=10_000, help="rows of each of the 26 tables")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--steps", type=int, default=30, help="timed rounds (one step of each)")
  p.add_argument("--warmup", type=int, default=3, help="untimed rounds (compiles included)")
  p.add_argument("--optimizer", default="adagrad", help="embedding optimiser (MLPerf's)")
  p.add_argument("--pooling", default="sum", choices=("sum", "mean"))
  p.add_argument("--pool", type=int, default=4, help="distinct batches, used in turn")
  a = p.parse_args(argv)

  import jax

  from dlrm_jax.config import dash_list
  from dlrm_jax.data import RandomData
  from dlrm_jax.task import Task

  config = random_data_config(a.rows, a.batch, 0.01, a.optimizer, embedding_pooling=a.pooling,
                              data={"hotness": dash_list(MLPERF_HOTNESS)})
  task = Task(config)
  gen = RandomData(task.spec.table_rows, task.spec.num_dense, a.batch, 1,
                   hotness=MLPERF_HOTNESS)
  flat = [gen.batch(i) for i in range(a.pool)]
  for b in flat:
    task.collection.check_ids(b["sparse"])
  runs = {"padded": [task.train_step, task.init_state(0),
                     [task.device_batch(padded(b, MLPERF_HOTNESS)) for b in flat]],
          "flat": [task.train_step, task.init_state(0), [task.device_batch(b) for b in flat]]}
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.machine()}),"
        f" 26 x {a.rows:,} rows, D={task.spec.embedding_dim}, batch {a.batch}, "
        f"{a.optimizer}, {a.pooling} pooling: {sum(MLPERF_HOTNESS)} ids per sample, "
        f"{26 * max(MLPERF_HOTNESS)} padded slots", flush=True)
  result = take_turns(runs, a.steps, a.warmup)
  times, losses = result["times"], result["losses"]
  gap = max(abs(x - y) / abs(y) for x, y in zip(losses["flat"], losses["padded"]))
  print(f"losses of the two agree to {gap:.1e} (relative, over {len(losses['flat'])} steps)")
  print("| layout | median step | p10 | time / padded |\n|---|---|---|---|")
  for name in runs:
    print(f"| {name} | {turn_row(times[name], times['padded'])} |")
  cpu = {n: statistics.median(v) * 1e3 for n, v in result["cpu"].items()}
  print("median CPU time per step: " + ", ".join(f"{n} {v:,.1f} ms" for n, v in cpu.items()))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
