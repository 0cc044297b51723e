"""How often `md_solver`'s widths differ from the reference's, computed by torch.

    python benchmarks/md_rule_parity.py [--tables 5000000]   (needs the torch extra)

The reference computes the mixed-dimension rule in float32 with torch's pow;
`dlrm_jax.embedding.mixed.md_solver` computes it in float32 with numpy's, in the
same order. The two pows can differ in the last bit, and then a width differs
where d lies within that bit of a half. For each base width D and temperature,
`--tables` random tables (rows up to 10^7 beside a smallest table of 2 to 999 rows)
are given widths by both, and by the rule in float64 (what md_solver computed
before), and the mismatches counted. Deterministic: no timing.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def reference_widths(torch, n_min: int, rows: np.ndarray, alpha: float, d0: int) -> np.ndarray:
  """The reference's alpha_power_rule (d0 given, no rounding to powers of two) for the
  tables `rows` beside a smallest table of `n_min` rows, vectorised."""
  x = torch.tensor(rows, dtype=torch.long).float()
  lamb = d0 * (torch.tensor(n_min).float() ** alpha)
  d = torch.ones(len(x)) * lamb * (x ** (-alpha))
  return torch.round(torch.clamp(d, min=1)).long().numpy()


def main() -> None:
  import torch

  from dlrm_jax.embedding.mixed import md_solver

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tables", type=int, default=5_000_000)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  out, totals = [], {"tables": 0, "float32": 0, "float64": 0}
  for d0 in (16, 64, 128):
    for alpha in (0.1, 0.3, 0.5, 0.7):
      n_min = int(rng.integers(2, 1000))
      rows = n_min + rng.integers(1, 10**7, args.tables)
      want = reference_widths(torch, n_min, rows, alpha, d0)
      ours = np.asarray(md_solver(np.concatenate([[n_min], rows]), alpha, d0))[1:]
      f64 = np.maximum(1, np.round(d0 * (n_min / rows.astype(np.float64)) ** alpha))
      row = {"D": d0, "temperature": alpha, "float32": int((ours != want).sum()),
             "float64": int((f64 != want).sum())}
      out.append(row)
      totals["tables"] += args.tables
      totals["float32"] += row["float32"]
      totals["float64"] += row["float64"]
      print(json.dumps(row), flush=True)
  print(json.dumps(totals))


if __name__ == "__main__":
  main()
