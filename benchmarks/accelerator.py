#!/usr/bin/env python3
"""dlrm_jax on one accelerator, measured in one command, beside plain PyTorch.

For each config (`CONFIGS`, `--only` to rerun some), in its own process so a
failure or an out-of-memory ends only that config:

- the planner's dry run before anything is allocated: tables and optimiser
  state per device, plus the compiled step's temporaries
  (`Compiled.memory_analysis()`, compiled from shapes alone), against the
  device's memory; a config that cannot fit is reported, not run;
- samples/s at the median of `--steps` timed steps (random data, uniform ids,
  a small pool of batches made once on the device);
- step time by phase from a `jax.profiler` trace of a few steps
  (`dlrm_jax.profiling`): lookup, exchange, dense forward/backward, updates;
- the bytes the embedding phases move per step, counted over the batch's real
  ids (gathered vectors, and the read and write of each touched row and its
  optimiser state), and the bandwidth that gives over the lookup and update
  phases' time;
- peak device memory (`memory_stats()["peak_bytes_in_use"]`; ru_maxrss on CPU).

`scatter` (in the default list, `--only scatter` alone) times the sparse update's
three forms on the device itself, power-law ids of config a's step (65,536 x 26
ids into 26 x 100K rows, D=128): XLA's float32 scatter-add with the duplicates
(atomics), the portable kernel's sort + segment sum (a sorted scatter-add) and
the GPU kernel's sort + segmented scan (no scatter-add), each followed by its
write; the three must give the same table.

Then the same config of the plain-PyTorch side (`torch_dlrm_gpu.py` of the
shared benchmarks, copied into `.bench/`), alternately, and the ratio.
Results go to `--out` (default `$OUT`, else ./accelerator_out): one JSON file
and one Markdown table; the table is printed too.

  python benchmarks/accelerator.py                 # every config, on the default device
  python benchmarks/accelerator.py --only c_bf16,d # some of them
  python benchmarks/accelerator.py --smoke         # tiny sizes on CPU, seconds (a test runs it)

Precision: `bf16` runs with compute_dtype=bfloat16; `tf32` is float32 at
JAX's default matmul precision (TF32-like on recent NVIDIA GPUs), compared
with PyTorch's tf32; `fp32` sets jax_default_matmul_precision=highest,
compared with PyTorch's fp32. See benchmarks/README.md for the device recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from common import REPO, child_result, parse_settings, random_data_config

TORCH_SCRIPT = os.path.join(REPO, ".bench", "torch_dlrm_gpu.py")
MLPERF_ROWS = ("40000000-39060-17295-7424-20265-3-7122-1543-63-40000000-3067956-405282-10-"
               "2209-11938-155-4-976-14-40000000-40000000-40000000-590152-12973-108-36")

# name: (configs/ file, rows per table (None: the file's), precision, batch, fields,
#        torch_dlrm_gpu.py's config). The a-e letters are torch_dlrm_gpu.py's.
CONFIGS = {
    "a_bf16": ("criteo_kaggle", 100_000, "bf16", 65_536, [], "a"),
    "c_bf16": ("criteo_terabyte", 100_000, "bf16", 65_536, [], "c"),
    "c_tf32": ("criteo_terabyte", 100_000, "tf32", 65_536, [], "c"),
    "c_fp32": ("criteo_terabyte", 100_000, "fp32", 65_536, [], "c"),
    "c_bf16_16k": ("criteo_terabyte", 100_000, "bf16", 16_384, [], "c"),
    "d_bf16": ("mlperf_dcnv2", 100_000, "bf16", 65_536, [], "d"),
    # The 26 MLPerf tables (204M rows, 97 GiB in float32) with one Adagrad accumulator
    # per row: per-element state would double the tables' 97 GiB.
    "e_bf16": ("mlperf_dcnv2", None, "bf16", 65_536,
               ["embedding_optimizer=rowwise_adagrad", f"arch_embedding_size={MLPERF_ROWS}"],
               "e"),
}
# The update probe: ids of one step of config a, power-law distributed, into its tables.
SCATTER = dict(ids=65_536 * 26, rows=26 * 100_000, dim=128, reps=10)
SCATTER_SMOKE = dict(ids=4096, rows=1000, dim=16, reps=2)
# --smoke: every config at tiny sizes, on whatever device there is.
SMOKE = dict(rows=1000, batch=256, steps=3, warmup=1, trace_steps=2,
             fields=["arch_sparse_feature_size=16", "arch_mlp_bot=13-32-16",
                     "arch_mlp_top=32-16-1", "dcn_low_rank_dim=8"])


def _task(name: str, a):
  from dlrm_jax.task import Task

  config, rows, precision, batch, fields, _ = CONFIGS[name]
  fields = list(fields)
  if a.smoke:
    rows, batch = SMOKE["rows"], SMOKE["batch"]
    fields = [f for f in fields if not f.startswith("arch_embedding_size")] + SMOKE["fields"]
  if precision == "bf16":
    fields.append("compute_dtype=bfloat16")
  lr = 0.005 if config == "mlperf_dcnv2" else 0.01  # torch_dlrm_gpu.py's rates
  return Task(random_data_config(rows, batch, lr, None, config=config,
                                 **parse_settings(fields))), batch


def embedding_bytes(task, host_batches) -> dict:
  """Bytes per step the embedding phases move, over the real ids of the batches (mean):
  the gathered vectors, and each touched row and its optimiser state read and written."""
  import numpy as np

  coll, itemsize = task.collection, 4
  # Per table (each its own width with mixed-dimension tables): a vector's bytes, and a
  # touched row's read and written with its optimiser state.
  vector = coll.dims * itemsize
  row = 2 * vector + 2 * itemsize * np.array([task.sparse_opt.slot_values_per_row(int(d))
                                              for d in coll.dims])
  table_of = lambda rows: np.searchsorted(coll.offsets, rows, side="right") - 1
  ids, touched, gather, update = [], [], [], []
  for b in host_batches:  # flat bags [B, sum(hotness)] or one id per feature: every id real
    rows = np.asarray(coll.global_rows(np.asarray(b["sparse"]))).reshape(-1)
    unique = np.unique(rows)
    ids.append(rows.size)
    touched.append(unique.size)
    gather.append(vector[table_of(rows)].sum())
    update.append(row[table_of(unique)].sum())
  gather, update = float(np.mean(gather)), float(np.mean(update))
  return {"ids_per_step": float(np.mean(ids)), "touched_rows_per_step": float(np.mean(touched)),
          "gather_bytes": gather, "update_bytes": update, "embedding_bytes": gather + update}


def _dry_run(task, batch) -> dict:
  """Memory per device before anything is allocated: plan (tables + optimiser state) and
  the step's temporaries from a compile of shapes alone (dlrm_jax.compile's)."""
  import jax

  from dlrm_jax.compile import compile_train_step, memory_of

  plan_bytes = max(task.plan.device_bytes())
  compiled, _ = compile_train_step(task, batch)
  temp = memory_of(compiled)["temporaries"]
  stats = jax.local_devices()[0].memory_stats() or {}
  return {"plan_bytes": plan_bytes, "temp_bytes": temp, "estimate_bytes": plan_bytes + temp,
          "device_bytes": stats.get("bytes_limit")}, compiled


def run_config(name: str, a) -> dict:
  """One config, measured (in a child process)."""
  import jax

  from dlrm_jax.data import make_data
  from dlrm_jax.profiling import format_phases, phase_times

  precision = CONFIGS[name][2]
  if precision == "fp32":
    jax.config.update("jax_default_matmul_precision", "highest")
  task, batch = _task(name, a)
  steps = SMOKE["steps"] if a.smoke else a.steps
  warmup = SMOKE["warmup"] if a.smoke else a.warmup
  trace_steps = SMOKE["trace_steps"] if a.smoke else a.trace_steps
  gen = make_data(task.run)
  host = [gen.batch(i) for i in range(a.pool)]
  out = {"config": name, "model": CONFIGS[name][0], "precision": precision, "batch": batch,
         "table_rows": sum(task.spec.table_rows), "jax": jax.__version__,
         "device": jax.devices()[0].device_kind, "plan": task.plan.describe(),
         **embedding_bytes(task, host)}
  t = time.perf_counter()
  dry, compiled = _dry_run(task, host[0])
  out.update(dry, compile_s=time.perf_counter() - t)
  if dry["device_bytes"] and dry["estimate_bytes"] > dry["device_bytes"]:
    return {**out, "skipped": f"needs {dry['estimate_bytes'] / 2**30:.1f} GiB per device "
                              f"(plan {dry['plan_bytes'] / 2**30:.1f} + step temporaries "
                              f"{dry['temp_bytes'] / 2**30:.1f}), the device has "
                              f"{dry['device_bytes'] / 2**30:.1f}"}
  state = task.init_state(0)
  batches = [task.device_batch(b) for b in host]
  for i in range(warmup):
    state, res = compiled(state, batches[i % len(batches)])
  jax.block_until_ready(state)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, res = compiled(state, batches[i % len(batches)])
    jax.block_until_ready(res["loss"])
    times.append(time.perf_counter() - t)
  med = statistics.median(times)
  out.update(samples_per_s=batch / med, median_step_ms=med * 1e3,
             p10_step_ms=sorted(times)[len(times) // 10] * 1e3, final_loss=float(res["loss"]))
  try:
    with tempfile.TemporaryDirectory() as trace_dir:
      with jax.profiler.trace(trace_dir):
        for i in range(trace_steps):
          state, res = compiled(state, batches[i % len(batches)])
        jax.block_until_ready(state)
      phases = phase_times(trace_dir, compiled.as_text())
    out["phases_ms"] = {k: v / trace_steps * 1e3 for k, v in phases.items()}
    out["phase_table"] = format_phases(phases, trace_steps)
    emb_s = (phases.get("lookup", 0.0) + phases.get("sparse update", 0.0)) / trace_steps
    if emb_s > 0:
      out["embedding_gb_per_s"] = out["embedding_bytes"] / emb_s / 1e9
  except Exception as e:  # a failed trace does not stop the rest
    out["trace_error"] = f"{type(e).__name__}: {e}"
  stats = jax.local_devices()[0].memory_stats() or {}
  out["peak_bytes"] = stats.get("peak_bytes_in_use") or (
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  return out


def run_scatter(a) -> dict:
  """The sparse update's three forms on power-law ids (a child process): median ms."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from dlrm_jax.embedding.optimizers import SparseSGD, sum_duplicates

  size = SCATTER_SMOKE if a.smoke else SCATTER
  n, rows, dim = size["ids"], size["rows"], size["dim"]
  rng = np.random.default_rng(0)
  ids = np.minimum(rng.zipf(1.2, n) - 1, rows - 1).astype(np.int32)  # hot rows repeat
  ids = jax.device_put(ids)
  grads = jax.device_put(rng.normal(size=(n, dim)).astype(np.float32))

  def add(table, ids, grads):
    return table.at[ids].add(grads)

  def deduplicated(method):
    def update(table, ids, grads):  # the kernels' path: SGD's step on the distinct rows
      unique, summed = sum_duplicates(ids, grads, rows, method=method)
      lr = jnp.float32(-1.0)  # w + g, as the scatter-add
      return SparseSGD().apply_rows({"stacked": table}, {}, unique, summed, lr, 0)[0]["stacked"]
    return update

  variants = {"scatter_add": add, "sort_segment_sum": deduplicated("segment_sum"),
              "sort_scan": deduplicated("scan")}
  out = {"config": "scatter", "ids": n, "distinct_rows": int(np.unique(np.asarray(ids)).size),
         "rows": rows, "dim": dim, "device": jax.devices()[0].device_kind, "ms": {}}
  results = {}
  for name, fn in variants.items():
    step = jax.jit(fn, donate_argnums=0)
    table = step(jnp.zeros((rows, dim), jnp.float32), ids, grads)  # compile, warm up
    results[name] = np.asarray(table[:1000])
    times = []
    for _ in range(size["reps"]):
      jax.block_until_ready(table)
      t = time.perf_counter()
      table = step(table, ids, grads)
      jax.block_until_ready(table)
      times.append(time.perf_counter() - t)
    out["ms"][name] = statistics.median(times) * 1e3
    del table
  want = results["scatter_add"]
  out["max_difference"] = max(float(np.abs(v - want).max()) for v in results.values())
  return out


def run_torch(name: str, a) -> dict:
  """The plain-PyTorch side of a config (torch_dlrm_gpu.py's stacked path)."""
  script = a.torch_script
  probe = subprocess.run([a.torch_python, "-c", "import torch"], capture_output=True)
  if probe.returncode != 0:
    return {"skipped": f"torch is not installed for {a.torch_python}"}
  if not os.path.exists(script):
    return {"skipped": f"{script} not found: copy ../shared/bench/torch_dlrm_gpu.py there"}
  _, _, precision, batch, _, letter = CONFIGS[name]
  cmd = [a.torch_python, script, "--_child", letter, "stacked", precision,
         "--batch", str(SMOKE["batch"] if a.smoke else batch),
         "--warmup", str(SMOKE["warmup"] if a.smoke else a.warmup),
         "--steps", str(SMOKE["steps"] if a.smoke else a.steps)]
  if a.smoke:
    cmd += ["--device", "cpu", "--max-table-gib", "0.5"]
  return child_result(cmd, a.timeout)


def _cell(r: dict, key: str, fmt: str) -> str:
  if "skipped" in r:
    return "skipped"
  if "failed" in r:
    return "failed"
  return fmt.format(r[key]) if key in r else "-"


def markdown(results: list[dict]) -> str:
  rows = ["| config | batch | dlrm_jax samples/s | PyTorch samples/s | ratio | embedding GB/s | "
          "peak GiB | estimate GiB | compile s |", "|---" * 9 + "|"]
  probes = [r["dlrm_jax"] for r in results if r["config"] == "scatter"]
  results = [r for r in results if r["config"] != "scatter"]
  for r in results:
    jx, pt = r["dlrm_jax"], r["torch"]
    ratio = (f"{jx['samples_per_s'] / pt['samples_per_s']:.2f}"
             if "samples_per_s" in jx and "samples_per_s" in pt else "-")
    rows.append(" | ".join([
        f"| {r['config']}", str(jx.get("batch", "-")), _cell(jx, "samples_per_s", "{:,.0f}"),
        _cell(pt, "samples_per_s", "{:,.0f}"), ratio, _cell(jx, "embedding_gb_per_s", "{:,.0f}"),
        f"{jx['peak_bytes'] / 2**30:.2f}" if "peak_bytes" in jx else "-",
        f"{jx['estimate_bytes'] / 2**30:.2f}" if "estimate_bytes" in jx else "-",
        f"{jx['compile_s']:.0f}" if "compile_s" in jx else "-"]) + " |")
  notes = [f"- {r['config']}: {side} {r[side].get('skipped') or r[side].get('failed')}"
           for r in results for side in ("dlrm_jax", "torch")
           if "skipped" in r[side] or "failed" in r[side]]
  phases = [f"\n{r['config']} phases (per step):\n{r['dlrm_jax']['phase_table']}"
            for r in results if "phase_table" in r["dlrm_jax"]]
  for p in probes:
    if "ms" not in p:
      notes.append(f"- scatter: {p.get('skipped') or p.get('failed')}")
      continue
    phases.append(f"\nsparse update of {p['ids']:,} ids ({p['distinct_rows']:,} distinct) into "
                  f"{p['rows']:,} rows of {p['dim']} (ms, median; tables differ by at most "
                  f"{p['max_difference']:.2g}):\n| form | ms |\n|---|---|\n"
                  + "".join(f"| {k} | {v:.3f} |\n" for k, v in p["ms"].items()))
  return "\n".join(rows + [""] + notes + phases) + "\n"


# The jax versions tests/run.sh's legs ran when this was written (oldest, newest): the
# GPU image brings its own jax, and carrying another (several hundred MB of wheels) does
# not fit the device tool's 64 MiB, so a run says which it met.
TESTED_JAX = ("0.10.2", "0.12.1")


def jax_versions() -> dict:
  """The installed jax and jaxlib (without starting a backend), and whether a test leg ran
  them."""
  from importlib import metadata

  v = {n: metadata.version(n) for n in ("jax", "jaxlib")}
  return {**v, "tested": v["jax"] in TESTED_JAX}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--only", default=",".join([*CONFIGS, "scatter"]),
                  help=f"comma list of {','.join(CONFIGS)},scatter")
  ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CPU test)")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--trace-steps", type=int, default=3)
  ap.add_argument("--pool", type=int, default=2, help="distinct random batches")
  ap.add_argument("--timeout", type=float, default=240, help="seconds per child process")
  ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "accelerator_out"))
  ap.add_argument("--torch-script", default=TORCH_SCRIPT)
  ap.add_argument("--torch-python", default=sys.executable, help="the PyTorch side's Python")
  ap.add_argument("--_child", metavar="CONFIG", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a._child:
    r = run_scatter(a) if a._child == "scatter" else run_config(a._child, a)
    print("RESULT " + json.dumps(r), flush=True)
    return
  names = a.only.split(",")
  unknown = sorted(set(names) - set(CONFIGS) - {"scatter"})
  if unknown:
    sys.exit(f"--only: no config {unknown}; the configs are {','.join(CONFIGS)},scatter")
  os.makedirs(a.out, exist_ok=True)
  versions = jax_versions()
  print(f"jax {versions['jax']}, jaxlib {versions['jaxlib']}: "
        + ("a version the tests' legs ran" if versions["tested"] else
           f"not a version the tests' legs ran ({', '.join(TESTED_JAX)}): results are marked "
           "so"), flush=True)
  passed = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--trace-steps",
            str(a.trace_steps), "--pool", str(a.pool)] + ["--smoke"] * a.smoke
  results, t0 = [], time.perf_counter()
  for name in names:
    jx = child_result([sys.executable, os.path.abspath(__file__), "--_child", name, *passed],
                a.timeout)
    if name == "scatter":
      results.append({"config": name, "dlrm_jax": jx})
      print(f"scatter: {jx.get('ms') or jx}", flush=True)
      continue
    pt = run_torch(name, a)
    results.append({"config": name, "dlrm_jax": jx, "torch": pt})
    print(f"{name}: dlrm_jax {_cell(jx, 'samples_per_s', '{:,.0f}')} samples/s, "
          f"PyTorch {_cell(pt, 'samples_per_s', '{:,.0f}')} "
          f"({time.perf_counter() - t0:.0f} s so far)", flush=True)
  table = (f"jax {versions['jax']}, jaxlib {versions['jaxlib']}"
           + ("" if versions["tested"] else " (untested by the test legs)") + "\n\n"
           + markdown(results))
  with open(os.path.join(a.out, "accelerator.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "versions": versions, "results": results}, f, indent=1)
  with open(os.path.join(a.out, "accelerator.md"), "w") as f:
    f.write(table)
  print(table, flush=True)


if __name__ == "__main__":
  main()
