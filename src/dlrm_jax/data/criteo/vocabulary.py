"""The vocabulary modes (`reference`, `frequency`): counting each feature's distinct values
over the prepared shards in bounded memory, storing them, and applying them to the shards.

The shards hold the raw 32-bit values until `apply_vocabulary` rewrites them, shard by
shard, as table rows; `load_vocabulary` and `vocab_rows` map raw values as prepare did.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from dlrm_jax.data import format as fmt
from dlrm_jax.data.format import NUM_SPARSE
from dlrm_jax.data.workers import WorkerPool, add_count, progress_bar


class _Accumulator:
  """Per-feature (sorted distinct values, first position or count), merged lazily.

  New chunks wait in a list and are merged (one stable sort) once they hold
  half as many entries as the merged arrays: amortised O(n log n) and never
  more than about twice the merged size in memory.
  """

  def __init__(self, mode: str):
    self.mode = mode
    self.keys = np.zeros(0, np.uint32)
    self.vals = np.zeros(0, np.int64)
    self._pending: list[tuple[np.ndarray, np.ndarray]] = []
    self._pending_n = 0

  @property
  def nbytes(self) -> int:
    return 12 * (len(self.keys) + self._pending_n)

  def add(self, keys: np.ndarray, vals: np.ndarray) -> None:
    self._pending.append((keys, vals))
    self._pending_n += len(keys)
    if self._pending_n > max(1 << 20, len(self.keys) // 2):
      self.merge()

  def merge(self) -> None:
    if not self._pending:
      return
    keys = np.concatenate([self.keys] + [k for k, _ in self._pending])
    vals = np.concatenate([self.vals] + [v for _, v in self._pending])
    self._pending, self._pending_n = [], 0
    order = np.argsort(keys, kind="stable")  # Equal keys keep their order: earliest first.
    keys, vals = keys[order], vals[order]
    del order
    start = np.ones(len(keys), bool)
    start[1:] = keys[1:] != keys[:-1]
    first = np.flatnonzero(start)
    if self.mode == "reference":
      self.keys, self.vals = keys[first], vals[first]
    else:
      self.keys, self.vals = keys[first], np.add.reduceat(vals, first) if len(vals) else vals


_STATS_ROWS = 1 << 18  # rows per counting task: its result is at most 12 bytes x 26 x this.


def _stats_task(path: str, lo: int, hi: int, base: int, mode: str, features: tuple[int, ...]):
  """Distinct values of rows [lo, hi) of one raw shard, per feature: (values, global first
  row) or (values, count)."""
  sparse = np.load(path, mmap_mode="r")
  out = {}
  block = np.asarray(sparse[lo:hi])
  for f in features:
    col = block[:, f]
    if mode == "reference":
      keys, first = np.unique(col, return_index=True)
      out[f] = (keys, first.astype(np.int64) + base + lo)
    else:
      keys, counts = np.unique(col, return_counts=True)
      out[f] = (keys, counts.astype(np.int64))
  add_count(0, hi - lo)
  return out


def _vocab_paths(root: str, f: int) -> tuple[str, str]:
  d = os.path.join(root, fmt.VOCAB_DIR)
  return os.path.join(d, f"C{f + 1:02d}.keys.npy"), os.path.join(d, f"C{f + 1:02d}.ids.npy")


def load_vocabulary(root: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """(sorted raw values, their table rows) of each feature of a prepared directory."""
  return [tuple(np.load(p, mmap_mode="r") for p in _vocab_paths(root, f))
          for f in range(NUM_SPARSE)]


def vocab_rows(keys: np.ndarray, ids: np.ndarray, col: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
  """Table rows of raw values `col` (row 0 for values not in `keys`) and which were found."""
  pos = np.minimum(np.searchsorted(keys, col), max(len(keys) - 1, 0))
  found = (keys[pos] == col) if len(keys) else np.zeros(len(col), bool)
  return np.where(found, ids[pos], 0).astype(np.int32), found


def _save_npy(path: str, array: np.ndarray) -> None:
  with open(path + ".tmp", "wb") as f:
    np.save(f, array)
  os.replace(path + ".tmp", path)


def _finish_vocab(acc: _Accumulator, threshold: int) -> tuple[np.ndarray, np.ndarray, int]:
  """(sorted keys, their ids, table rows) of a counted feature."""
  acc.merge()
  if acc.mode == "reference":
    order = np.argsort(acc.vals, kind="stable")
    ids = np.empty(len(order), np.int64)
    ids[order] = np.arange(len(order))
    return acc.keys, ids.astype(np.int32), len(acc.keys)
  keep = acc.vals >= threshold
  keys, counts = acc.keys[keep], acc.vals[keep]
  order = np.lexsort((keys, -counts))  # Decreasing count; ties: smaller value first.
  ids = np.empty(len(keys), np.int64)
  ids[order] = np.arange(1, len(keys) + 1)  # Row 0 is out-of-vocabulary.
  return keys, ids.astype(np.int32), len(keys) + 1


def _apply_task(path: str, root: str, mode: str) -> int:
  """Rewrites one shard's raw values as table rows (via a temporary file, then a rename)."""
  sparse = np.load(path, mmap_mode="r")
  if sparse.dtype == np.int32:
    return 0  # Done in an earlier run.
  vocab = load_vocabulary(root)
  writer = fmt.NpyAppender(path + ".ids", np.int32, (NUM_SPARSE,))
  try:
    step = 1 << 18
    for lo in range(0, len(sparse), step):
      raw = np.asarray(sparse[lo:lo + step])
      out = np.empty(raw.shape, np.int32)
      for f, (keys, ids) in enumerate(vocab):
        out[:, f], found = vocab_rows(keys, ids, raw[:, f])
        if mode == "reference" and not found.all():
          raise RuntimeError(f"{path}: value {int(raw[:, f][~found][0])} of C{f + 1} is missing "
                             "from the vocabulary: the prepared directory is damaged; "
                             "prepare again.")
      writer.append(out)
      add_count(0, len(raw))
    writer.close()
  except BaseException:
    writer.abort()
    raise
  del sparse
  os.replace(path + ".ids", path)
  return 1


def build_vocabulary(root: str, shards: list[dict], mode: str, splits: dict, threshold: int,
                     pool: WorkerPool, memory_bytes: int, progress: bool,
                     log: Callable[[str], None]) -> list[int]:
  """Counts the vocabulary of every feature (resumable per feature); returns table rows."""
  os.makedirs(os.path.join(root, fmt.VOCAB_DIR), exist_ok=True)
  sizes_path = os.path.join(root, fmt.VOCAB_DIR, "sizes.json")
  sizes = fmt.read_json(sizes_path) or {}
  # Rows counted: all (reference: first appearance over the whole input) or train only.
  count_end = sum(b - a for a, b in splits["train"]) if mode == "frequency" else None
  tasks_all, start = [], 0
  for s in shards:
    lo, hi = 0, s["rows"]
    if count_end is not None:
      hi = max(0, min(hi, count_end - start))
    for a in range(lo, hi, _STATS_ROWS):  # Small tasks: bounded results in flight.
      tasks_all.append((fmt.shard_path(root, s["name"], "sparse"), a, min(hi, a + _STATS_ROWS),
                        start))
    start += s["rows"]
  pass_number = 0
  while len(sizes) < NUM_SPARSE:
    pass_number += 1
    remaining = tuple(f for f in range(NUM_SPARSE) if str(f) not in sizes)
    accs = {f: _Accumulator(mode) for f in remaining}
    deferred: list[int] = []
    bar = progress_bar(sum(t[2] - t[1] for t in tasks_all), f"vocabulary pass {pass_number}",
                       "rows", progress)
    tick = pool.rows_ticker(bar)

    def done(task, stats):
      for f, (keys, vals) in stats.items():
        if f in accs:
          accs[f].add(keys, vals)
      while len(accs) > 1 and sum(a.nbytes for a in accs.values()) > memory_bytes:
        big = max(accs, key=lambda f: accs[f].nbytes)
        del accs[big]  # Counted again in a later pass, with fewer features.
        deferred.append(big)

    pool.reset()
    pool.run(_stats_task, [t + (mode, remaining) for t in tasks_all], done, tick,
             max_in_flight=pool.workers + 1)
    tick()
    bar.close()
    for f, acc in accs.items():
      keys, ids, rows = _finish_vocab(acc, threshold)
      kp, ip = _vocab_paths(root, f)
      _save_npy(kp, keys.astype(np.uint32))
      _save_npy(ip, ids)
      sizes[str(f)] = int(rows)
      fmt.write_json_atomic(sizes_path, sizes)
    accs.clear()
    if deferred:
      log(f"Vocabulary pass {pass_number}: {len(deferred)} features did not fit in "
          f"{memory_bytes / 2**30:.1f} GiB with the others; counting them in another pass.")
  return [sizes[str(f)] for f in range(NUM_SPARSE)]


def apply_vocabulary(root: str, shards: list[dict], mode: str, pool: WorkerPool,
                     progress: bool) -> None:
  """Rewrites every shard's raw values as table rows (resumable: done shards are skipped)."""
  paths = [fmt.shard_path(root, s["name"], "sparse") for s in shards]
  pool.reset()
  bar = progress_bar(sum(s["rows"] for s in shards), "apply vocabulary", "rows", progress)
  tick = pool.rows_ticker(bar)

  pool.run(_apply_task, [(p, root, mode) for p in paths], lambda t, r: None, tick)
  tick()
  bar.close()
