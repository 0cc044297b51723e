"""Compile one config for several accelerator targets: the table of docs/compile.md.

    python benchmarks/compile_targets.py --config=configs/mlperf_dcnv2.py \
        --targets=v5p-8,v5p-32,v5p-128,v6e-8,v6e-64,h100x8,h200x1,h200x8,b200x8 --out DIR

Each target is compiled in a child process (`python -m dlrm_jax.compile`, whose
report it reads back from JSON), one after another: a compile of the MLPerf model
takes 1-5 minutes and 1-3 GB on 2 cores. Prints a Markdown table (also DIR/targets.md)
with the plan's fit, memory, XLA's cost, the collectives and the roofline samples/s,
all models of the compiled program, not measurements. Needs Python 3.12+ with libtpu
and the CUDA plugin (see docs/compile.md). Extra arguments after `--` go to every
compile (e.g. `-- --config.compute_dtype=bfloat16`).
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "src"))  # the package, uninstalled too


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/mlperf_dcnv2.py")
  p.add_argument("--targets", default="v5p-8,v5p-32,v5p-128,v6e-8,v6e-64,h100x8,h200x1,"
                                      "h200x8,b200x8")
  p.add_argument("--out", default="compile_targets")
  p.add_argument("--timeout", type=int, default=1800, help="seconds per target")
  a, extra = p.parse_known_args()
  extra = [x for x in extra if x != "--"]
  from dlrm_jax.compile import MD_HEADER, Report, markdown_row

  os.makedirs(a.out, exist_ok=True)
  rows, notes = [], []
  name = os.path.splitext(os.path.basename(a.config))[0]
  for target in a.targets.split(","):
    out = os.path.join(a.out, target)
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dlrm_jax.compile", f"--config={a.config}", f"--target={target}",
         "--out", out, *extra], capture_output=True, text=True, cwd=REPO, timeout=a.timeout)
    seconds = time.perf_counter() - t
    with open(os.path.join(a.out, f"{target}.txt"), "w") as f:
      f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
      why = (proc.stderr.strip().splitlines() or ["(no message)"])[0]
      rows.append(f"| {name} / {target} | - | - | - | - | - | no | - | - | - | - | "
                  f"{seconds:.0f} |")
      notes.append(f"- {target}: {why}")
    else:
      with open(os.path.join(out, "compile.json")) as f:
        report = Report(**json.load(f))
      rows.append(markdown_row(report))
      if report.fits is False:
        notes.append(f"- {target}: {report.verdict}")
    print(rows[-1], flush=True)
  table = "\n".join([MD_HEADER, *rows]) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")
  with open(os.path.join(a.out, "targets.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
