"""The exact streamed AUC and a whole evaluation pass at MLPerf's scale, with host memory.

    python benchmarks/evaluation.py [--rows 10000000] [--batch 16384]

Two parts, each in a fresh child process so that its peak resident memory is its own:

- metric: `StreamingMetrics` fed `--rows` float32 scores (with ties: scores rounded
  to 1e-4, as a sigmoid's output often is at float32) and 0/1 labels in batches of
  `--batch`, then `result()`; rows/s of feeding and of the AUC, the peak host bytes
  the metric allocated per row (tracemalloc sees numpy's allocations), and
  scikit-learn's roc_auc_score on the same rows for time and agreement.
- pass: `dlrm_jax.evaluation.evaluate` of the default config's model over the `test`
  split of a prepared directory of `--rows` random rows (written once under --data
  with the format's own writer, then read as a Criteo evaluation reads it,
  memory-mapped, batch by batch, the last batch partial): rows/s, and the peak of the
  process's anonymous memory (RssAnon, sampled; the page cache of the mapped files
  is the kernel's) over its value at the start of the pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import common


class AnonPeak:
  """The peak of this process's anonymous resident memory (RssAnon: heap and arrays, not
  the page cache of memory-mapped files), sampled every 20 ms on a thread."""

  def __init__(self):
    import threading

    self.peak, self.start = 0.0, self.now()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  @staticmethod
  def now() -> float:
    with open("/proc/self/status") as f:
      kb = next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))
    return kb / 1024

  def _run(self) -> None:
    while not self._stop.wait(0.02):
      self.peak = max(self.peak, self.now())

  def stop(self) -> float:
    """The peak over the start, MB."""
    self._stop.set()
    self._thread.join()
    return max(self.peak, self.now()) - self.start


def write_prepared(root: str, rows: int, vocab: int = 1000, shard_rows: int = 1 << 21) -> None:
  """A prepared Kaggle-format directory whose `test` split has `rows` random rows (and a
  train split of one shard), written with the format's own writer."""
  import numpy as np

  from dlrm_jax.data import format as fmt

  if os.path.exists(os.path.join(root, fmt.METADATA_FILE)):
    return
  os.makedirs(os.path.join(root, fmt.SHARD_DIR), exist_ok=True)
  rng = np.random.default_rng(0)
  train = shard_rows
  shards, total, i = [], 0, 0
  while total < train + rows:
    n = min(shard_rows, train + rows - total)
    name = f"s{i:03d}"
    values = (("label", (rng.random(n) < 0.25).astype(np.uint8), ()),
              ("dense", rng.random((n, 13), dtype=np.float32) * 5, (13,)),
              ("sparse", rng.integers(0, vocab, (n, 26), dtype=np.int32), (26,)))
    for field, value, shape in values:
      w = fmt.NpyAppender(fmt.shard_path(root, name, field), fmt.DTYPES[field], shape)
      w.append(value)
      w.close()
    shards.append({"name": name, "rows": n})
    total, i = total + n, i + 1
  meta = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "dataset": "kaggle",
          "rows": total, "shards": shards, "hotness": [1] * 26, "vocab_sizes": [vocab] * 26,
          "splits": {"train": [[0, train]], "test": [[train, total]], "val": [[total, total]]},
          "options": {"max_ind_range": None}}
  fmt.write_json_atomic(os.path.join(root, fmt.METADATA_FILE), meta)


def metric(rows: int, batch: int) -> dict:
  import tracemalloc

  import numpy as np
  from sklearn.metrics import roc_auc_score

  from dlrm_jax.metrics import StreamingMetrics

  rng = np.random.default_rng(0)
  labels = (rng.random(rows) < 0.25).astype(np.float32)
  scores = np.round(np.clip(rng.normal(0.25 + 0.1 * labels, 0.15), 0, 1), 4).astype(np.float32)
  tracemalloc.start()
  base = tracemalloc.get_traced_memory()[0]
  m = StreamingMetrics(rows)
  t0 = time.perf_counter()
  for a in range(0, rows, batch):
    m.add(labels[a:a + batch], scores[a:a + batch])
  t1 = time.perf_counter()
  result = m.result()
  t2 = time.perf_counter()
  peak = tracemalloc.get_traced_memory()[1] - base
  tracemalloc.stop()
  want = roc_auc_score(labels, scores)
  t3 = time.perf_counter()
  return {"rows": rows, "add_rows_per_s": rows / (t1 - t0), "auc_s": t2 - t1,
          "auc_rows_per_s": rows / (t2 - t1), "metric_bytes_per_row": peak / rows,
          "auc": result["auc"], "sklearn_auc": want, "sklearn_s": t3 - t2,
          "abs_diff": abs(result["auc"] - want)}


def eval_pass(rows: int, batch: int, path: str) -> dict:
  from dlrm_jax import evaluation
  from dlrm_jax.data import configure_data, make_data
  from dlrm_jax.specs import RunSpec
  from dlrm_jax.task import Task

  config = common.load_config("default", test_mini_batch_size=batch, test_num_batches=0,
                              data={"kind": "criteo_kaggle", "path": path})
  spec = RunSpec.from_config(configure_data(config))
  task = Task(spec)
  state = task.init_state(0)
  data = make_data(spec)
  eval_set = evaluation.EvalSet(data, batch, spec.training.test_num_batches,
                                task.batch_sharding)
  # Compile the scoring program outside the timing.
  evaluation.evaluate(task, state, [next(iter(eval_set))])
  peak, t0 = AnonPeak(), time.perf_counter()
  result = evaluation.evaluate(task, state, eval_set, rows=eval_set.rows)
  seconds = time.perf_counter() - t0
  anon = peak.stop()
  return {"rows": result["rows"], "seconds": seconds, "rows_per_s": result["rows"] / seconds,
          "anon_peak_over_start_mb": anon, "anon_bytes_per_row": anon * 2**20 / result["rows"],
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "auc": result["auc"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=10_000_000)
  parser.add_argument("--batch", type=int, default=16_384)
  parser.add_argument("--data", default="/tmp/dlrm_jax_eval_bench",
                      help="where the prepared directory of --rows rows is written (kept)")
  parser.add_argument("--part", choices=("metric", "pass"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  path = os.path.join(args.data, f"rows_{args.rows}")
  if args.part:
    out = (metric(args.rows, args.batch) if args.part == "metric"
           else eval_pass(args.rows, args.batch, path))
    print("RESULT " + json.dumps(out), flush=True)
    return
  write_prepared(path, args.rows)
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.rows:,} rows, batches of {args.batch:,}")
  for part in ("metric", "pass"):
    result = common.child_result([sys.executable, __file__, "--part", part, "--rows",
                                  str(args.rows), "--batch", str(args.batch), "--data",
                                  args.data])
    print(part, json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
