#!/usr/bin/env python3
"""Sharded train step on 1, 2, 4, 8 devices: step time and bytes per collective.

The model of configs/criteo_kaggle.py (the reference's Kaggle shape: 26
tables of ROWS rows, or with `--rows kaggle` the config's 33.8M rows of the
Kaggle set's tables, one id each, SGD), global batch 2048, random data, with
the planner's plan for each device count (or `--overrides`). Each device
count runs in its own process; on a CPU host the devices are simulated
(XLA_FLAGS=--xla_force_host_platform_device_count=N), so they share the
host's cores and the step time measures the program's overhead, not a
speed-up. On a GPU/TPU host, `--real` uses the real devices.

For each run it prints the median step time, the plan's traffic estimate and
the bytes each collective of the compiled step moves per device (read from
the optimised HLO: the size of every all-to-all, all-gather, reduce-scatter
and all-reduce result).

  python benchmarks/sharding_scaling.py --devices 1,2,4,8 --rows 100000
  python benchmarks/sharding_scaling.py --devices 1,2,4,8 --rows kaggle
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

from common import REPO, random_batches, random_data_config

COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "s8": 1, "u8": 1, "pred": 1,
          "f64": 8, "s64": 8, "u64": 8}


def collective_bytes(hlo: str) -> dict[str, int]:
  """Bytes of the results of each collective in an optimised HLO module (per device)."""
  out = {name: 0 for name in COLLECTIVES}
  for line in hlo.splitlines():
    m = re.search(r"= (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
    if not m or m.group(2) + "-done" in line:
      continue
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      out[m.group(2)] += n * _BYTES.get(dtype, 4)
  return out


def run_one(devices: int, rows: str, batch: int, warmup: int, steps: int, overrides: str) -> dict:
  import jax

  from dlrm_jax.task import Task

  # "kaggle": the config's own table sizes, those of the Kaggle set.
  task = Task(random_data_config(None if rows == "kaggle" else int(rows), batch, 0.01, "sgd",
                                 devices=devices, sharding={"overrides": overrides}))
  state = task.init_state(0)
  batches = random_batches(task, batch, 4)
  t = time.perf_counter()
  step = task.lower_train_step(state, batches[0]).compile()
  compile_s = time.perf_counter() - t
  hlo = step.as_text()
  for i in range(warmup):
    state, out = step(state, batches[i % 4])
  jax.block_until_ready(state)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, out = step(state, batches[i % 4])
    jax.block_until_ready(out["loss"])
    times.append(time.perf_counter() - t)
  med = statistics.median(times)
  kinds = {}
  for p in task.plan.placements:
    kinds[p.kind] = kinds.get(p.kind, 0) + 1
  return {"devices": devices, "rows": rows, "batch": batch, "median_step_ms": med * 1e3,
          "samples_per_s": batch / med, "compile_s": compile_s, "plan": kinds,
          "hlo_bytes_per_device": collective_bytes(hlo),
          "planned_bytes_all_devices": task.plan.traffic(),
          "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


def main():
  from dlrm_jax import hugepages

  hugepages.use_huge_pages()  # as train.py runs; DLRM_JAX_HUGE_PAGES=0: without
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--devices", default="1,2,4,8")
  ap.add_argument("--rows", default="100000", help="rows of every table, or 'kaggle'")
  ap.add_argument("--batch", type=int, default=2048)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--overrides", default="", help="sharding.overrides for every run")
  ap.add_argument("--real", action="store_true", help="use real devices, do not simulate")
  ap.add_argument("--json", default="", help="append one JSON line per run here")
  ap.add_argument("--_child", type=int, help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a._child:
    r = run_one(a._child, a.rows, a.batch, a.warmup, a.steps, a.overrides)
    print("RESULT " + json.dumps(r), flush=True)
    return
  print(f"# {platform.node()} {platform.machine()} cores={os.cpu_count()} "
        f"{time.strftime('%Y-%m-%d %H:%M')} rows={a.rows} batch={a.batch}", flush=True)
  for n in [int(x) for x in a.devices.split(",")]:
    env = dict(os.environ)
    if not a.real:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={n}").strip()
      env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", str(n), "--rows", str(a.rows),
           "--batch", str(a.batch), "--warmup", str(a.warmup), "--steps", str(a.steps),
           "--overrides", a.overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
      print(f"devices={n}: FAILED (exit {proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
      continue
    r = json.loads(lines[-1][len("RESULT "):])
    hlo = ", ".join(f"{k} {v / 2**10:,.0f} KiB" for k, v in r["hlo_bytes_per_device"].items() if v)
    print(f"devices={n}  {r['median_step_ms']:8.1f} ms/step  {r['samples_per_s']:>8,.0f} "
          f"samples/s  plan {r['plan']}  per device: {hlo or 'no collectives'}", flush=True)
    if a.json:
      with open(a.json, "a") as f:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
