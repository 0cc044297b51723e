"""Negative subsampling of the training rows (the reference's `--data-sub-sample-rate`):
after parsing, when the splits are known, train shards are rewritten without the dropped
negatives, before any vocabulary is counted."""

from __future__ import annotations

import os

import numpy as np

from dlrm_jax.data import format as fmt
from dlrm_jax.data.synthetic import mix64
from dlrm_jax.data.workers import WorkerPool, add_count, progress_bar


def sub_sample_keep(label: np.ndarray, rows: np.ndarray, rate: float, seed: int) -> np.ndarray:
  """Which rows a negative subsampling at `rate` keeps: every positive, and a negative
  unless hash(seed, row) / 2**64 < rate. `rows` are global row numbers before any
  row was dropped, so the choice is a pure function of (seed, row) whatever the
  pieces, shards or workers."""
  if rate <= 0:
    return np.ones(len(label), bool)
  if rate >= 1:
    return label != 0
  key = np.uint64((int(seed) * 0x9E3779B97F4A7C15 + 0x5B5E) & (2**64 - 1))
  with np.errstate(over="ignore"):
    h = mix64(np.asarray(rows, np.uint64) * np.uint64(0xD1B54A32D192ED03) + key)
  return (label != 0) | (h >= np.uint64(min(int(rate * 2.0**64), 2**64 - 1)))


def _sub_sample_task(root: str, name: str, train_rows: int, first_row: int, rate: float,
                     seed: int) -> int:
  """Writes shard NAME without its dropped train negatives as NAME.FIELD.npy.sub; returns
  its rows."""
  arrays = {f: np.load(fmt.shard_path(root, name, f), mmap_mode="r") for f in fmt.FIELDS}
  n = len(arrays["label"])
  writers = {f: fmt.NpyAppender(fmt.shard_path(root, name, f) + ".sub", a.dtype, a.shape[1:])
             for f, a in arrays.items()}
  kept = 0
  try:
    step = 1 << 18
    for lo in range(0, n, step):
      hi = min(n, lo + step)
      keep = np.ones(hi - lo, bool)
      t = min(hi, max(lo, train_rows))  # Rows [lo, t) of this shard are train rows.
      if t > lo:
        label = np.asarray(arrays["label"][lo:t])
        keep[:t - lo] = sub_sample_keep(label, np.arange(first_row + lo, first_row + t), rate,
                                        seed)
      for f, w in writers.items():
        w.append(np.asarray(arrays[f][lo:hi])[keep])
      kept += int(keep.sum())
      add_count(0, hi - lo)
    for w in writers.values():
      w.close()
  except BaseException:
    for w in writers.values():
      w.abort()
    raise
  return kept


def sub_sample_shards(root: str, shards: list[dict], train_rows: int, rate: float, seed: int,
                      pool: WorkerPool, progress: bool) -> list[dict]:
  """Drops train negatives shard by shard (resumable); returns the shards with their new rows.

  A shard's record is written once its three new files are complete, and only
  then are they renamed over the old ones: a rerun redoes a shard without a
  record from its untouched files, and finishes the renames of one with a record.
  """
  progress_dir = os.path.join(root, fmt.PROGRESS_DIR)
  new, tasks, start = {}, [], 0
  for s in shards:
    rec = fmt.read_json(os.path.join(progress_dir, f"sub-{s['name']}.json"))
    if rec is not None:
      new[s["name"]] = rec["rows"]
    elif start < train_rows:
      tasks.append((root, s["name"], train_rows - start, start, float(rate), int(seed)))
    else:
      new[s["name"]] = s["rows"]  # Evaluation rows only: untouched.
    start += s["rows"]
  bar = progress_bar(sum(t[2] for t in tasks), "subsample negatives", "rows", progress)
  tick = pool.rows_ticker(bar)

  def done(task, kept):
    name = task[1]
    fmt.write_json_atomic(os.path.join(progress_dir, f"sub-{name}.json"), {"rows": kept})
    new[name] = kept

  pool.reset()
  pool.run(_sub_sample_task, tasks, done, tick)
  tick()
  bar.close()
  for s in shards:  # The renames (again after an interruption: they are idempotent).
    for f in fmt.FIELDS:
      p = fmt.shard_path(root, s["name"], f)
      if os.path.exists(p + ".sub"):
        os.replace(p + ".sub", p)
  return [dict(s, rows=int(new[s["name"]])) for s in shards]
