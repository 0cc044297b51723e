"""The reference DLRM's Kaggle preprocessing, re-implemented in plain Python as a yardstick.

    python benchmarks/criteo_reference.py --input RAW --output DIR [--rows N] [--max-ind-range M]

Our own code for the algorithm of facebookresearch/dlrm `data_utils.py` (`getCriteoAdData`,
`processCriteoAdData`, `concatCriteoAdData`; Kaggle, one process, no sub-sampling, no memory
map), so that `criteo_prepare.py` can time it on the same file in the same minutes:

  1. count the lines and copy them into 7 consecutive "day" text files;
  2. per day and line: split on tab, an empty field is "0"; the label and the 13 dense fields
     as int32; the 26 categorical fields int(x, 16) (% max_ind_range when it is > 0), kept as
     int32 (wrapping, as the numpy of the reference's day did), each noted in a dict per
     feature; the day saved as a compressed .npz;
  3. each feature's distinct values numbered 0, 1, ... in first-seen order, saved with the
     counts;
  4. per day: the categorical values replaced by their numbers (float64, as the reference
     does), negative dense values clipped to 0, saved compressed;
  5. the days concatenated into one compressed .npz.

The reference applies log(x + 1) to the dense values, shuffles and splits into train/val/test
at load time, so none of that is done here. Also left out, which makes this yardstick faster
than the reference rather than slower: its progress line printed for every row, and its
re-reading of `X_cat_t` from the .npz for each of the 26 features in step 4 (once per day here).
`--rows N` processes only the first N lines, as if the file ended there.

Prints one JSON line: the rows processed and the seconds of each step ("core" is the sum of
the per-value passes 2-4 without their file writes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np

DAYS = 7
NUM_DENSE, NUM_SPARSE = 13, 26


def _lines(path: str, limit: int):
  """The file's lines, only the first `limit` when it is > 0."""
  with open(path) as f:
    yield from (itertools.islice(f, limit) if limit > 0 else f)


def split_days(raw: str, out: str, limit: int) -> list[int]:
  """Steps 1: count the lines, then copy them into DAYS files of consecutive lines (the first
  `rows % DAYS` one longer). Returns the lines per day."""
  total = sum(1 for _ in _lines(raw, limit))
  per_day, extra = divmod(total, DAYS)
  sizes = [per_day + (d < extra) for d in range(DAYS)]
  lines = _lines(raw, limit)
  for d, n in enumerate(sizes):
    with open(os.path.join(out, f"day_{d}"), "w") as f:
      f.writelines(itertools.islice(lines, n))
  return sizes


def parse_day(path: str, n: int, max_ind_range: int,
              seen: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Step 2 for one day file of `n` lines: (labels, dense [n, 13], categorical [n, 26]), all
  int32; each categorical value is noted in `seen[feature]`."""
  y = np.zeros(n, dtype=np.int32)
  dense = np.zeros((n, NUM_DENSE), dtype=np.int32)
  cat = np.zeros((n, NUM_SPARSE), dtype=np.int32)
  for i, line in enumerate(_lines(path, 0)):
    fields = [x if x not in ("", "\n") else "0" for x in line.split("\t")]
    y[i] = np.int32(fields[0])
    dense[i] = np.array(fields[1:1 + NUM_DENSE], dtype=np.int32)
    if max_ind_range > 0:
      values = [int(x, 16) % max_ind_range for x in fields[1 + NUM_DENSE:]]
    else:
      values = [int(x, 16) for x in fields[1 + NUM_DENSE:]]
    cat[i] = np.array(values, dtype=np.int64)  # Wraps to int32 on assignment.
    for counts, v in zip(seen, cat[i]):
      counts[v] = 1
  return y, dense, cat


def number_values(seen: list[dict]) -> None:
  """Step 3: each feature's distinct values numbered 0, 1, ... in first-seen order, in place."""
  for values in seen:
    for k, v in enumerate(values):
      values[v] = k


def map_day(cat_t: np.ndarray, dense: np.ndarray, seen: list[dict]) -> np.ndarray:
  """Step 4 for one day: [26, n] categorical values to their numbers (float64); the negative
  dense values are clipped to 0 in place."""
  out = np.zeros(cat_t.shape)
  for j, numbers in enumerate(seen):
    for k, v in enumerate(cat_t[j]):
      out[j, k] = numbers[v]
  dense[dense < 0] = 0
  return out


def prepare(raw: str, out: str, limit: int = 0, max_ind_range: int = -1) -> dict:
  """Steps 1-5 on `raw` (its first `limit` lines when > 0), writing into `out`. Returns the
  rows and the seconds of each step."""
  t: dict[str, float] = dict.fromkeys(("split", "parse", "number", "map", "write"), 0.0)
  clock = time.perf_counter()

  def lap(step: str) -> None:
    nonlocal clock
    now = time.perf_counter()
    t[step] += now - clock
    clock = now

  os.makedirs(out, exist_ok=True)
  sizes = split_days(raw, out, limit)
  lap("split")
  seen: list[dict] = [{} for _ in range(NUM_SPARSE)]
  for d, n in enumerate(sizes):
    y, dense, cat = parse_day(os.path.join(out, f"day_{d}"), n, max_ind_range, seen)
    lap("parse")
    np.savez_compressed(os.path.join(out, f"day_{d}.npz"), X_int=dense, X_cat_t=cat.T, y=y)
    lap("write")
  number_values(seen)
  lap("number")
  counts = np.array([len(v) for v in seen], dtype=np.int32)
  for j, values in enumerate(seen):
    np.savez_compressed(os.path.join(out, f"fea_dict_{j}.npz"),
                        unique=np.array(list(values), dtype=np.int32))
  np.savez_compressed(os.path.join(out, "fea_count.npz"), counts=counts)
  lap("write")
  for d in range(DAYS):
    with np.load(os.path.join(out, f"day_{d}.npz")) as data:
      cat_t, dense, y = data["X_cat_t"], data["X_int"], data["y"]
    lap("write")
    cat_t = map_day(cat_t, dense, seen)
    lap("map")
    np.savez_compressed(os.path.join(out, f"day_{d}_processed.npz"), X_cat=cat_t.T, X_int=dense,
                        y=y)
    lap("write")
  parts: dict[str, np.ndarray] = {}
  for d in range(DAYS):  # Concatenated day by day, as the reference does.
    with np.load(os.path.join(out, f"day_{d}_processed.npz")) as data:
      for k in ("X_cat", "X_int", "y"):
        parts[k] = data[k] if d == 0 else np.concatenate((parts[k], data[k]))
  np.savez_compressed(os.path.join(out, "processed.npz"), counts=counts, **parts)
  lap("write")
  t["core"] = t["parse"] + t["number"] + t["map"]
  return {"rows": int(sum(sizes)), "seconds": t}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--input", required=True, help="a raw Kaggle-format file (not compressed)")
  p.add_argument("--output", required=True, help="a directory for the intermediate files")
  p.add_argument("--rows", type=int, default=0, help="only the first ROWS lines (0: all)")
  p.add_argument("--max-ind-range", type=int, default=-1)
  args = p.parse_args()
  print(json.dumps(prepare(args.input, args.output, args.rows, args.max_ind_range)), flush=True)


if __name__ == "__main__":
  main()
