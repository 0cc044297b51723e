#!/usr/bin/env python3
"""dlrm_jax against TorchRec + FBGEMM on this machine's CPU, run alternately.

The configs of ../shared/bench/torchrec_dlrm_cpu.py (random data, batch 2048,
uniform ids), dlrm_jax's from configs/ (`CONFIGS`):

  a: configs/criteo_kaggle.py's model (dim 16), 26 x 100,000 rows, one id per feature, SGD
  b: the same model, 26 x 1,000,000 rows
  c: configs/criteo_terabyte.py's model (the 2019 MLPerf one, dim 128), 26 x 100,000 rows
  d: configs/mlperf_dcnv2.py's model (DLRM-DCNv2: dim 128, 3 cross layers of rank
     512), 26 x 100,000 rows, MLPerf's multi-hot bags (214 ids per sample),
     Adagrad (eps 1e-8) on tables and dense layers, lr 0.005

Sides (`--sides`): dlrm_jax (float32), dlrm_jax_bf16 (compute_dtype=bfloat16:
the MLPs and the interaction in bfloat16), fused (TorchRec's fused FBGEMM
path, float32) and fused_bf16 (its dense layers under torch.autocast(bfloat16)).

Each repeat runs, for every config, dlrm_jax's train step
(embedding_scaling.py, sparse path, on huge pages as train.py runs it: see
src/dlrm_jax/hugepages.py) and then TorchRec's fused FBGEMM path (with
--torchrec-huge-pages, also with glibc's malloc on huge pages, as dlrm_jax
runs), each in its own process, so the sides see the same machine state
within a minute of each other. Prints every run, then the
median samples/s of each side and their ratios per config. TorchRec needs
its own virtual environment:

  bash ../shared/bench/setup_torchrec_venv.sh /tmp/torchrec-venv
  python benchmarks/torchrec_side_by_side.py --torchrec-python /tmp/torchrec-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from common import REPO, child_result, load_config

HERE = os.path.dirname(os.path.abspath(__file__))
TORCHREC_SCRIPT = os.path.join(os.path.dirname(REPO), "shared", "bench", "torchrec_dlrm_cpu.py")

# Each config of torchrec_dlrm_cpu.py: the configs/ file of its model, the rows of its tables
# and the fields that differ from that file's (--set arguments of embedding_scaling.py).
CONFIGS = {
    "a": ("criteo_kaggle", 100_000, []),
    "b": ("criteo_kaggle", 1_000_000, []),
    "c": ("criteo_terabyte", 100_000, []),
    "d": ("mlperf_dcnv2", 100_000, ["test_mini_batch_size=2048"]),
}
SIDES = ("dlrm_jax", "dlrm_jax_bf16", "fused", "fused_bf16")


def _result(cmd: list[str], env: dict | None = None) -> dict | None:
  r = child_result(cmd, env=env)
  if "failed" in r:
    print(f"FAILED ({r['failed']}): {' '.join(cmd)}", flush=True)
    return None
  return r


def run_jax(name: str, a, bf16: bool = False) -> dict | None:
  config, rows, settings = CONFIGS[name]
  settings = settings + ["compute_dtype=bfloat16"] * bf16
  lr = load_config(config).learning_rate if name == "d" else 0.01  # torchrec_dlrm_cpu.py's
  return _result([sys.executable, os.path.join(HERE, "embedding_scaling.py"),
                  "--_child", str(rows), "sparse", "--steps", str(a.steps),
                  "--warmup", str(a.warmup), "--lr", str(lr), "--config", config,
                  *[x for s in settings for x in ("--set", s)]])


def run_torchrec(name: str, a, path: str = "fused", env: dict | None = None) -> dict | None:
  return _result([a.torchrec_python, a.torchrec_script, "--_child", name, path,
                  "--steps", str(a.steps), "--warmup", str(a.warmup)], env)


def run_torchrec_huge_pages(name: str, a) -> dict | None:
  from dlrm_jax.hugepages import HUGE_PAGE_TUNABLE

  return run_torchrec(name, a, env={"GLIBC_TUNABLES": HUGE_PAGE_TUNABLE})


RUNNERS = {
    "dlrm_jax": run_jax,
    "dlrm_jax_bf16": lambda name, a: run_jax(name, a, bf16=True),
    "fused": run_torchrec,
    "fused_bf16": lambda name, a: run_torchrec(name, a, "fused_bf16"),
}


def main():
  from dlrm_jax import hugepages

  hugepages.use_huge_pages()  # dlrm_jax's runs inherit it, as train.py's do
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--configs", default="a,b,c,d")
  ap.add_argument("--sides", default="dlrm_jax,fused",
                  help=f"comma list of {','.join(SIDES)} (the first is the ratios' numerator)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--steps", type=int, default=30)
  ap.add_argument("--warmup", type=int, default=5)
  ap.add_argument("--torchrec-python", default="/tmp/torchrec-venv/bin/python")
  ap.add_argument("--torchrec-script", default=TORCHREC_SCRIPT)
  ap.add_argument("--json", default="", help="append one JSON line per run here")
  ap.add_argument("--torchrec-huge-pages", action="store_true",
                  help="also run TorchRec with glibc's malloc on huge pages, as dlrm_jax runs "
                       "(GLIBC_TUNABLES=glibc.malloc.hugetlb=1, see src/dlrm_jax/hugepages.py)")
  a = ap.parse_args()
  if not os.path.exists(a.torchrec_python):
    sys.exit(f"{a.torchrec_python} not found: set up TorchRec's environment first "
             "(see this script's docstring)")
  print(f"# {platform.node()} {platform.machine()} cores={os.cpu_count()} "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')} steps={a.steps} repeats={a.repeats} "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}", flush=True)
  names = a.configs.split(",")
  sides = [(side, RUNNERS[side]) for side in a.sides.split(",")]
  if a.torchrec_huge_pages:
    sides.append(("fused+huge", run_torchrec_huge_pages))
  rates = {(n, side): [] for n in names for side, _ in sides}
  best = {key: [] for key in rates}  # samples/s at each run's fastest-decile step time
  peak = {key: [] for key in rates}  # peak RSS, MB
  for rep in range(a.repeats):
    for n in names:
      for side, fn in sides:
        r = fn(n, a)
        if r is None:
          continue
        rates[(n, side)].append(r["samples_per_s"])
        best[(n, side)].append(r["batch"] / r["p10_step_ms"] * 1e3)
        peak[(n, side)].append(r["peak_rss_mb"])
        print(f"repeat {rep} config {n} {side:15s} {r['samples_per_s']:>9,.0f} samples/s  "
              f"median step {r['median_step_ms']:7.1f} ms  p10 {r['p10_step_ms']:7.1f} ms  "
              f"peak RSS {r['peak_rss_mb']:7,.0f} MB", flush=True)
        if a.json:
          with open(a.json, "a") as f:
            f.write(json.dumps({"config": n, "side": side, "repeat": rep, **r}) + "\n")
  # Interference on a shared machine only ever slows a step down, so besides
  # the median step, each run's fastest decile (p10) estimates what the code
  # does when the machine lets it run.
  for title, table in (("samples/s at the median step", rates),
                       ("samples/s at the fastest-decile step (p10)", best),
                       ("peak RSS (MB)", peak)):
    print_table(title, table, names, [side for side, _ in sides])


def print_table(title: str, table: dict, names: list[str], sides: list[str]) -> None:
  """A markdown table of `table[(config, side)]` (median over runs, each run in brackets),
  with the first side's median divided by each other's."""
  first, others = sides[0], sides[1:]
  print(f"\n{title}, median over runs (each run in brackets)\n"
        f"| config | {' | '.join(sides)} | {' | '.join(f'{first} / {o}' for o in others)} |\n"
        + "|---" * (1 + len(sides) + len(others)) + "|")
  for n in names:
    runs = {side: table[(n, side)] for side in sides}
    if not all(runs.values()):
      continue
    med = {side: statistics.median(v) for side, v in runs.items()}
    cells = [f"{med[side]:,.0f} ({', '.join(f'{x:,.0f}' for x in v)})" for side, v in runs.items()]
    ratios = [f"{med[first] / med[o]:.2f}" for o in others]
    print(f"| {n} | {' | '.join(cells)} | {' | '.join(ratios)} |", flush=True)


if __name__ == "__main__":
  main()
