"""Batches from a prepared Criteo directory: shuffled, per process, resumable.

Training order, epoch by epoch (every epoch a new order from `seed`):

1. Block shuffle: the train rows are cut into blocks of `block_rows`
   consecutive rows and the blocks are permuted.
2. Per process: process p of P takes blocks p, p + P, p + 2P, ... of that
   permutation, and reads only those (contiguous reads of whole blocks).
3. Shuffle buffer: a process's blocks are taken `shuffle_buffer` rows at a
   time (a window of whole blocks) and the rows of each window are permuted.
   This is a shuffle buffer that is filled, shuffled and drained as a unit,
   which makes every batch a pure function of (seed, epoch, position): a
   resumed run continues with exactly the batches it would have seen.
4. Every process yields the same number of batches: each takes its first
   `m` rows (m: the smallest process's row count, rounded down to the local
   batch size); the few rows left over (at most about a block per process)
   are pooled, shuffled and dealt out evenly in the epoch's last batches.
   Each train row appears exactly once per epoch across processes; with
   `drop_remainder` (the default) a last partial global batch (fewer than
   `batch_size` rows) is left out of that epoch.

Evaluation splits ("test", "val"; "eval" names `eval_split`) are read in
order: global batch i is rows [i * B, (i + 1) * B) of the split, and each
process reads its contiguous part.

Batches are dicts as the synthetic generators make them: "dense" float32
[B, 13], "sparse" int32 [B, sum(hotness)] (the stored rows as they are: [B, 26]
for one-hot data; for multi-hot data feature f's ids in columns offsets[f] ..
offsets[f] + hotness[f], no padding and no mask), "label" float32 [B]; B is the
process-local batch size (batch_size / process_count).
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Iterator

import numpy as np

from dlrm_jax.data.format import NUM_SPARSE, PreparedData
from dlrm_jax.data.prefetch import prefetch

Batch = dict[str, np.ndarray]


class CriteoData:
  """A prepared Criteo directory as a source of batches (see the module docstring).

  Args:
    path: the prepared directory.
    batch_size: the global batch size (all processes together).
    seed: shuffling seed.
    eval_split: the split that "eval" names ("test", as the reference evaluates, or "val").
    shuffle: block shuffle and shuffle buffer for training (False: rows in order).
    block_rows: rows per shuffled block.
    shuffle_buffer: rows per shuffled window (rounded to whole blocks).
    process_index, process_count: this process and how many read the data.
    drop_remainder: leave out a last partial training batch of each epoch.
  """

  process_local = True  # Batches hold this process's rows only (not the global batch).

  def __init__(self, path: str, batch_size: int, *, seed: int = 0, eval_split: str = "test",
               shuffle: bool = True, block_rows: int = 1024, shuffle_buffer: int = 1 << 18,
               process_index: int = 0, process_count: int = 1, drop_remainder: bool = True):
    self.store = PreparedData(path)
    self.path = path
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.eval_split = eval_split
    self.shuffle = bool(shuffle)
    self.block_rows = int(block_rows)
    self.window_blocks = max(1, int(shuffle_buffer) // self.block_rows)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.drop_remainder = bool(drop_remainder)
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    if self.block_rows < 1:
      raise ValueError(f"block_rows={block_rows} must be >= 1")
    self._check_batch_size(self.batch_size)
    self._epochs: dict[tuple[int, int], _Epoch] = {}
    # One window's rows in block order, reused from window to window; the lock
    # keeps a batch's reads whole when several threads ask for train batches.
    self._lock = threading.Lock()
    self._buffer: dict[str, np.ndarray] | None = None
    self._buffer_key: tuple[int, int] | None = None
    self._buffer_rows: Batch = {}

  # -- what the trainer and configs read ------------------------------------------------------

  @property
  def table_rows(self) -> tuple[int, ...]:
    return self.store.vocab_sizes

  @property
  def hotness(self) -> tuple[int, ...]:
    """Ids per feature in a batch's flat rows (all 1: one-hot data)."""
    return self.store.hotness

  def teacher_probability(self, batch: Batch) -> None:
    """None: the best achievable model of real clicks is unknown."""
    del batch
    return None

  def split_name(self, split: str) -> str:
    return self.eval_split if split == "eval" else split

  def num_rows(self, split: str) -> int:
    return self.store.split_rows(self.split_name(split))

  def num_batches(self, split: str = "train", batch_size: int | None = None) -> int:
    """Global batches per epoch of a split (train: as the shuffled stream yields them)."""
    size = self.batch_size if batch_size is None else int(batch_size)
    n = self.num_rows(split)
    if self.split_name(split) == "train" and self.drop_remainder:
      return n // size
    return math.ceil(n / size)

  def batch(self, index: int, split: str = "train", batch_size: int | None = None) -> Batch:
    """Batch `index` of a split: evaluation splits in order, train as `batches` yields it."""
    size = self.batch_size if batch_size is None else int(batch_size)
    self._check_batch_size(size)
    name = self.split_name(split)
    if name == "train":
      return self._train_batch(int(index), size)
    n = self.store.split_rows(name)
    lo, hi = int(index) * size, min((int(index) + 1) * size, n)
    if not 0 <= lo < n:
      raise IndexError(f"batch {index} of {size} rows is past the end of split {name!r} "
                       f"({n} rows, {math.ceil(n / size)} batches)")
    mine = np.array_split(np.arange(lo, hi), self.process_count)[self.process_index]
    if len(mine) == 0:
      return self._finish(self.store.empty(0))
    return self._finish(self._read_positions(name, int(mine[0]), int(mine[-1]) + 1))

  def batches(self, start: int = 0, split: str = "train",
              batch_size: int | None = None) -> "BatchIterator":
    """Batches from number `start` on: train endlessly (epoch after epoch), other splits once."""
    return BatchIterator(self, split, int(start), batch_size)

  # -- training order -------------------------------------------------------------------------

  def _check_batch_size(self, size: int) -> None:
    if size < 1 or size % self.process_count:
      raise ValueError(f"batch size {size} must be a positive multiple of process_count="
                       f"{self.process_count} (it is the global batch size)")

  def _epoch(self, epoch: int, batch_size: int) -> "_Epoch":
    key = (epoch, batch_size)
    order = self._epochs.get(key)
    if order is None:
      if len(self._epochs) > 2:
        self._epochs.clear()
      order = self._epochs[key] = _Epoch(self, epoch, batch_size)
    return order

  def _train_batch(self, index: int, batch_size: int) -> Batch:
    per_epoch = self.num_batches("train", batch_size)
    if per_epoch == 0:
      raise ValueError(f"the train split ({self.num_rows('train')} rows) holds no full batch of "
                       f"{batch_size}")
    epoch, k = divmod(index, per_epoch)
    with self._lock:
      rows = self._epoch(epoch, batch_size).local_batch(k)
    return self._finish(rows)

  def _window_rows(self, epoch: "_Epoch", window: int) -> Batch:
    """Rows of a window of this process in `epoch`, in block order, in the reused buffer."""
    key = (epoch.epoch, window)
    if self._buffer_key == key:
      return self._buffer_rows
    self._buffer_key = None  # Valid again only once the window is fully read.
    first, lengths = epoch._window_blocks(self.process_index, window)
    n = int(lengths.sum())
    if self._buffer is None or len(self._buffer["label"]) < n:
      self._buffer = self.store.empty(max(n, self.window_blocks * self.block_rows))
    rows = {field: values[:n] for field, values in self._buffer.items()}
    ranges = self.store.split_ranges("train")
    if len(ranges) == 1:
      self.store.read_ranges(ranges[0][0] + first, lengths, rows)
    else:
      at = 0
      for start, length in zip(first.tolist(), lengths.tolist()):
        self._read_positions("train", start, start + length, rows, at)
        at += length
    self._buffer_rows, self._buffer_key = rows, key
    return rows

  def _read_positions(self, split: str, lo: int, hi: int, out=None, offset: int = 0) -> Batch:
    """Rows at positions [lo, hi) of a split (its ranges concatenated)."""
    if out is None:
      out = self.store.empty(hi - lo)
      offset = 0
    pos = 0  # The split position where each range starts.
    for start, end in self.store.split_ranges(split):
      n = end - start
      first, last = max(lo, pos), min(hi, pos + n)
      if first < last:
        self.store.read(start + first - pos, start + last - pos, out, offset + first - lo)
      pos += n
    return out

  def _global_rows(self, split: str, positions: np.ndarray) -> np.ndarray:
    ranges = self.store.split_ranges(split)
    starts = np.array([start for start, _ in ranges], np.int64)
    sizes = np.array([end - start for start, end in ranges], np.int64)
    cum = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(cum, positions, side="right") - 1
    return starts[which] + positions - cum[which]

  def _finish(self, rows: Batch) -> Batch:
    """The stored rows as a batch: flat bags of ids as stored, labels as float32."""
    return {"dense": rows["dense"], "label": rows["label"].astype(np.float32),
            "sparse": rows["sparse"]}


class _Epoch:
  """One epoch's order for one process: its blocks, windows and the pooled leftover rows.

  A window's rows are read once, block by block (contiguous copies), into the
  loader's window buffer in block order; a batch is then one gather of its
  rows from that buffer in the window's permuted order. Nothing the size of a
  window is allocated per window or per batch.
  """

  def __init__(self, data: CriteoData, epoch: int, batch_size: int):
    self.data = data
    processes = data.process_count
    self.local_batch_size = batch_size // processes
    self.global_batch_size = batch_size
    num_rows = data.num_rows("train")
    block_rows = data.block_rows
    num_blocks = math.ceil(num_rows / block_rows)
    rng = np.random.default_rng([data.seed, epoch, 0xB10C])
    self.block_order = rng.permutation(num_blocks) if data.shuffle else np.arange(num_blocks)
    self.num_rows, self.num_blocks, self.epoch = num_rows, num_blocks, epoch
    last_block_rows = num_rows - (num_blocks - 1) * block_rows
    rows_per_process = []
    for process in range(processes):
      blocks = self.block_order[process::processes]
      short = block_rows - last_block_rows if (num_blocks - 1) in blocks else 0
      rows_per_process.append(len(blocks) * block_rows - short)
    # Every process's first `main_rows` stream rows, in whole local batches.
    self.main_rows = (min(rows_per_process) // self.local_batch_size) * self.local_batch_size
    self._window_orders: dict[tuple[int, int], np.ndarray] = {}
    self._window_starts_of: dict[int, list[int]] = {}
    # Leftover rows of every process, pooled and shuffled (as split positions).
    leftover = [self._stream_positions(process, self.main_rows, rows_per_process[process])
                for process in range(processes)]
    leftover = np.concatenate(leftover) if leftover else np.zeros(0, np.int64)
    if data.shuffle:
      leftover = np.random.default_rng([data.seed, epoch, 0x7A11]).permutation(leftover)
    self.leftover = leftover

  def _blocks(self, process: int) -> np.ndarray:
    return self.block_order[process::self.data.process_count]

  def _block_lengths(self, blocks: np.ndarray) -> np.ndarray:
    block_rows = self.data.block_rows
    last = self.num_blocks - 1
    return np.where(blocks == last, self.num_rows - last * block_rows, block_rows)

  def _window_blocks(self, process: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(first split position, length) of each block of a window of a process, in order."""
    per_window = self.data.window_blocks
    blocks = self._blocks(process)[window * per_window:(window + 1) * per_window]
    return blocks.astype(np.int64) * self.data.block_rows, self._block_lengths(blocks)

  def _window_order(self, process: int, window: int) -> np.ndarray:
    """The permutation of a window's rows (indices into the window in block order)."""
    key = (process, window)
    order = self._window_orders.get(key)
    if order is None:
      n = int(self._window_blocks(process, window)[1].sum())
      seed = [self.data.seed, self.epoch, process, window]
      order = np.random.default_rng(seed).permutation(n) if self.data.shuffle else np.arange(n)
      if process == self.data.process_index:  # Keep the windows of the batches now being read.
        for old in [k for k in self._window_orders
                    if k[0] == process and not window - 1 <= k[1] <= window]:
          del self._window_orders[old]
      self._window_orders[key] = order
    return order

  def _window_starts(self, process: int) -> list[int]:
    """Stream position where each window of a process starts (and the stream's end)."""
    cached = self._window_starts_of.get(process)
    if cached is not None:
      return cached
    blocks = self._blocks(process)
    lengths = self._block_lengths(blocks)
    per_window = self.data.window_blocks
    window_rows = (np.add.reduceat(lengths, np.arange(0, len(blocks), per_window))
                   if len(blocks) else [])
    starts = [0] + np.cumsum(window_rows).astype(np.int64).tolist()
    self._window_starts_of[process] = starts
    return starts

  def _stream_positions(self, process: int, lo: int, hi: int) -> np.ndarray:
    """Split positions at stream positions [lo, hi) of a process."""
    if hi <= lo:
      return np.zeros(0, np.int64)
    out = []
    for window, start, stop in self._overlapping_windows(process, lo, hi):
      first, lengths = self._window_blocks(process, window)
      # Position of every row of the window in block order, then in shuffled order.
      ends = np.cumsum(lengths)
      positions = np.arange(int(ends[-1]), dtype=np.int64) + np.repeat(first - (ends - lengths),
                                                                        lengths)
      out.append(positions[self._window_order(process, window)[start:stop]])
    return np.concatenate(out)

  def _overlapping_windows(self, process: int, lo: int, hi: int):
    """(window, start, stop) within each of a process's windows that [lo, hi) covers."""
    starts = self._window_starts(process)
    window = bisect.bisect_right(starts, lo) - 1
    while window < len(starts) - 1 and starts[window] < hi:
      yield (window, max(lo, starts[window]) - starts[window],
             min(hi, starts[window + 1]) - starts[window])
      window += 1

  def local_batch(self, k: int) -> Batch:
    """Local batch k of this epoch for this process (raw rows, uint8 labels)."""
    size, me = self.local_batch_size, self.data.process_index
    main_batches = self.main_rows // size
    if k < main_batches:
      out = self.data.store.empty(size)
      at = 0
      for window, start, stop in self._overlapping_windows(me, k * size, (k + 1) * size):
        rows = self.data._window_rows(self, window)
        index = self._window_order(me, window)[start:stop]
        for field, values in rows.items():
          # mode="clip": the indices are in range by construction, and numpy
          # buffers `out` for the default mode="raise" (one more copy).
          np.take(values, index, axis=0, out=out[field][at:at + stop - start], mode="clip")
        at += stop - start
      return out
    j = k - main_batches
    chunk = self.leftover[j * self.global_batch_size:(j + 1) * self.global_batch_size]
    mine = np.array_split(chunk, self.data.process_count)[me]
    return self.data.store.gather(self.data._global_rows("train", np.sort(mine)))


class BatchIterator:
  """Batches of a split from a position on, with a data position for checkpoints.

  `state()` is a small dict of ints and strings (JSON- and Orbax-friendly);
  `restore(state)` continues from it exactly. Wrap with `prefetched()` for a
  background thread that keeps `state()` at the next batch to be consumed.
  """

  def __init__(self, data: CriteoData, split: str, start: int = 0, batch_size: int | None = None):
    self.data = data
    self.split = split
    self.batch_size = data.batch_size if batch_size is None else int(batch_size)
    data._check_batch_size(self.batch_size)
    self.position = int(start)

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> Batch:
    if self.data.split_name(self.split) != "train":
      if self.position >= self.data.num_batches(self.split, self.batch_size):
        raise StopIteration
    batch = self.data.batch(self.position, self.split, self.batch_size)
    self.position += 1
    return batch

  def state(self) -> dict:
    return self.state_at(self.position)

  def state_at(self, position: int) -> dict:
    data = self.data
    return {"position": int(position), "split": self.split, "batch_size": self.batch_size,
            "seed": data.seed, "shuffle": int(data.shuffle), "block_rows": data.block_rows,
            "window_blocks": data.window_blocks, "process_index": data.process_index,
            "process_count": data.process_count, "drop_remainder": int(data.drop_remainder),
            "rows": data.store.num_rows, "created": data.store.meta.get("created", "")}

  def restore(self, state: dict) -> None:
    """Continues from `state()` of an earlier run; refuses a state of another order."""
    mine = self.state_at(int(state["position"]))
    diff = {k: (state.get(k), v) for k, v in mine.items() if k != "position" and state.get(k) != v}
    if diff:
      raise ValueError("the saved data position belongs to another data order: " + ", ".join(
          f"{k} was {saved!r}, is {now!r}" for k, (saved, now) in sorted(diff.items())))
    self.position = int(state["position"])

  def prefetched(self, size: int = 2) -> "PrefetchIterator":
    return PrefetchIterator(self, size)


class PrefetchIterator:
  """A BatchIterator read `size` batches ahead by a background thread (dlrm_jax.data.prefetch)."""

  def __init__(self, iterator: BatchIterator, size: int = 2):
    self._iterator = iterator
    self._start = iterator.position
    self._consumed = 0
    self._stream = prefetch(iterator, size)

  def __iter__(self) -> "PrefetchIterator":
    return self

  def __next__(self) -> Batch:
    batch = next(self._stream)
    self._consumed += 1
    return batch

  def state(self) -> dict:
    """The position of the next batch this iterator will return."""
    return self._iterator.state_at(self._start + self._consumed)


def iterate_epoch(data: CriteoData, epoch: int = 0, batch_size: int | None = None
                  ) -> Iterator[Batch]:
  """The training batches of one epoch (for inspection and tests)."""
  size = data.batch_size if batch_size is None else int(batch_size)
  n = data.num_batches("train", size)
  for k in range(n):
    yield data.batch(epoch * n + k, "train", size)


__all__ = ["BatchIterator", "CriteoData", "PrefetchIterator", "iterate_epoch", "NUM_SPARSE"]
