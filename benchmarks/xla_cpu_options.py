#!/usr/bin/env python3
"""XLA:CPU compiler options for the train step, compared step by step in one process.

On a shared machine the time of one step swings by 10x within seconds, so
runs of one variant after another compare the machine's moods, not the
variants. Here every variant is compiled from the same lowered train step
(`Compiled = lowered.compile(compiler_options=...)`, no XLA_FLAGS), each
with its own copy of the train state, and the variants take turns: round r
runs one step of each, in an order rotated every round. Each variant's
median and fastest-decile (p10) step time are reported, and its time divided
by the default's in the same round (median over rounds), which cancels what
the rounds share.

The model is configs/criteo_kaggle.py's (`--config NAME` for another config's,
`--dim/--bottom/--top` for another shape, `--set KEY=VALUE` for any field), 26
x ROWS rows, one device, random data, SGD.

  python benchmarks/xla_cpu_options.py --rows 100000 --rounds 40
  python benchmarks/xla_cpu_options.py --variants default,fast_compile --rounds 10

A variant whose option this jaxlib does not know is reported and skipped.
"""

import argparse
import os
import sys
import time

from common import (add_shape_arguments, random_batches, random_data_config, shape_overrides,
                    take_turns, turn_row)

# Debug options of XLA:CPU (xla/xla.proto) that may change the train step's speed.
VARIANTS = {
    "default": {},
    "fast_runtime": {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_RUNTIME"},
    "fast_compile": {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE"},
    "onednn": {"xla_cpu_use_onednn": True},
    "onednn_custom_call": {"xla_cpu_experimental_onednn_custom_call": True},
    "xnnpack": {"xla_cpu_use_xnnpack": True},
    "xnn_graph_greedy": {"xla_cpu_experimental_xnn_graph_fusion_mode":
                         "XNN_GRAPH_FUSION_MODE_GREEDY"},
    "fast_math": {"xla_cpu_enable_fast_math": True},
    "no_eigen_threads": {"xla_cpu_multi_thread_eigen": False},
}


def main():
  from dlrm_jax import hugepages

  hugepages.use_huge_pages()  # as train.py runs; DLRM_JAX_HUGE_PAGES=0: without
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--rows", type=int, default=100_000, help="rows of each of the 26 tables")
  ap.add_argument("--batch", type=int, default=2048)
  ap.add_argument("--rounds", type=int, default=40)
  ap.add_argument("--warmup", type=int, default=2, help="rounds not counted")
  add_shape_arguments(ap)
  a = ap.parse_args()

  import jax

  from dlrm_jax.task import Task

  task = Task(random_data_config(a.rows, a.batch, 0.01, "sgd", **shape_overrides(a)))
  batches = random_batches(task, a.batch, pool=4)
  lowered = task.lower_train_step(task.init_state(0), batches[0])
  print(f"# {os.uname().machine} cores={os.cpu_count()} {time.strftime('%Y-%m-%d %H:%M %Z')} "
        f"jax {jax.__version__} rows=26x{a.rows:,} model={a.config} {' '.join(a.set)} "
        f"batch={a.batch} rounds={a.rounds}", flush=True)
  runs = {}
  for name in a.variants.split(","):
    t = time.perf_counter()
    try:
      compiled = lowered.compile(compiler_options=VARIANTS[name])
    except Exception as e:  # an option this jaxlib lacks: say so, go on
      print(f"{name:18s} skipped: {str(e).splitlines()[0][:150]}", flush=True)
      continue
    print(f"{name:18s} compiled in {time.perf_counter() - t:6.1f} s  {VARIANTS[name]}",
          flush=True)
    runs[name] = [compiled, task.init_state(0), batches]
  if "default" not in runs:
    sys.exit("the default variant is the yardstick: include it in --variants")
  result = take_turns(runs, a.rounds, a.warmup)
  times, losses = result["times"], result["losses"]
  print("\n| variant | median step | p10 step | time / default (median over rounds) | "
        "max loss difference |\n|---|---|---|---|---|")
  for name in runs:
    diff = max(abs(x - y) for x, y in zip(losses[name], losses["default"]))
    print(f"| {name} | {turn_row(times[name], times['default'])} | {diff:.1e} |")

if __name__ == "__main__":
  main()
