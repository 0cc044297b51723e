"""The samples of a prepared listening log's anchors (`dlrm_jax.data.yambda` prepares
the log; docs/dlrmv4.md, "Data preparation").

`PreparedEvents(path)` opens a prepared directory (memory-mapped) and builds samples
on the host, in numpy, a batch at once: `samples(anchors, ...)` gives the fields of
docs/dlrmv4_reference.md section 1.5 (the interleaved history, `histories`; the
candidate; the label; the 8 contextual ids, `cross_hash`), and `batch(window, index,
...)` one batch of a window's anchors in the reference's streaming order
(`window_batch_anchors`).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from dlrm_jax.data import format as fmt
from dlrm_jax.data.yambda import EVENT_COLUMNS, LP_BIT, POOLS, read_metadata

# The 7 contextual crosses (name, keys in order, table size), as the reference's
# YAMBDA_5B_CROSS_SPECS; each id is xxh64(seed 0) of the keys packed as little-endian
# int64s, modulo the table size.
CROSSES = (
    ("user_x_artist", ("uid", "artist"), 100_000_000),
    ("user_x_album", ("uid", "album"), 40_000_000),
    ("user_x_hour", ("uid", "hour"), 24_000_000),
    ("item_x_hour", ("item", "hour"), 40_000_000),
    ("artist_x_hour", ("artist", "hour"), 32_000_000),
    ("user_x_is_organic", ("uid", "is_organic"), 2_000_000),
    ("user_x_artist_x_hour", ("uid", "artist", "hour"), 40_000_000),
)
CONTEXTUAL = ("uid",) + tuple(name for name, _, _ in CROSSES)


def window_batch_anchors(window_anchors: np.ndarray, batch_size: int, batch_index: int,
                         process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """The anchors of one batch of one process, in the reference's streaming order: the
  window's anchors in ascending flat index (user-major), truncated to a multiple of
  `process_count`, process r taking every `process_count`-th from r, in batches of
  `batch_size` with the last partial batch dropped. A pure function of its arguments,
  so that a run resumes mid-window from a batch index."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
  mine = window_anchors[:len(window_anchors) - len(window_anchors) % process_count]
  mine = mine[process_index::process_count]
  if not 0 <= batch_index < len(mine) // batch_size:
    raise IndexError(f"batch {batch_index} of a window with {len(mine) // batch_size} "
                     f"batches of {batch_size} per process")
  return mine[batch_index * batch_size:(batch_index + 1) * batch_size]


# XXH64's primes (xxhash's xxhash.h).
_P1, _P2, _P3, _P4, _P5 = (np.uint64(p) for p in (
    0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63,
    0x27D4EB2F165667C5))


def cross_hash(keys: np.ndarray, table_size: int) -> np.ndarray:
  """xxh64 (seed 0) of each row of KEYS [B, n] (1 <= n <= 3) packed as little-endian
  int64s, modulo the table size, as int64: the reference's contextual cross ids.

  XXH64's path for inputs under 32 bytes, in numpy's (wrapping) uint64 arithmetic:
  each 8-byte lane goes through a round into the state, then the avalanche. The
  `xxhash` package gives the same (tests/test_yambda.py)."""
  lanes = np.asarray(keys, np.int64).view(np.uint64)  # as struct.pack("<q") reads them
  if lanes.ndim != 2 or not 1 <= lanes.shape[1] <= 3:
    raise ValueError(f"keys of shape {lanes.shape}: [B, 1 to 3] expected")
  h = np.full(len(lanes), _P5 + np.uint64(8 * lanes.shape[1]))
  for j in range(lanes.shape[1]):
    h ^= _rotl(lanes[:, j] * _P2, 31) * _P1
    h = _rotl(h, 27) * _P1 + _P4
  for shift, prime in ((33, _P2), (29, _P3)):
    h ^= h >> np.uint64(shift)
    h *= prime
  h ^= h >> np.uint64(32)
  return (h % np.uint64(table_size)).astype(np.int64)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
  return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


_CHUNK_EVENTS = 1 << 20  # anchors x the longest scan window, per chunk of `histories`


def histories(action: np.ndarray, user_start: np.ndarray, anchors: Sequence[int],
              history_length: int = 4086, scan_window: int = 20_000
              ) -> tuple[np.ndarray, np.ndarray]:
  """The anchors' histories: `(lengths, index)`, the flat indices of anchor i's events,
  oldest first, being `index[sum(lengths[:i]):sum(lengths[:i + 1])]`.

  The rule (docs/dlrmv4_reference.md, section 1.4): an anchor's scan window is the
  last `scan_window` events of its user before it (`action[low:anchor]`, `low` no
  earlier than its user's start in `user_start`); of it, the last `max(1, L // 3)`
  events of each pool (the events whose `action` has the pool's bit of `POOLS`) are
  kept, merged in their order in the log, and the most recent `history_length` (L)
  of those.

  In numpy over the batch: the anchors' scan windows, merged where they overlap, are
  read once; per pool, a search in the pool's positions there gives each anchor's
  last members; the picks are sorted by (anchor, position). The work follows the
  scan windows' union and the histories' total length; the anchors go in chunks of
  at most `_CHUNK_EVENTS` scanned events, which bounds the memory."""
  if history_length < 1 or scan_window < 1:
    raise ValueError(f"history_length={history_length} and scan_window={scan_window} "
                     "must be >= 1")
  anchors = np.asarray(anchors, np.int64).reshape(-1)
  action, user_start = np.asarray(action), np.asarray(user_start)  # plain views of memmaps
  start = user_start[np.searchsorted(user_start, anchors, side="right") - 1]
  low = np.maximum(start, anchors - scan_window)
  rows = max(1, _CHUNK_EVENTS // max(1, int((anchors - low).max(initial=0))))
  parts = [_histories(action, low[i:i + rows], anchors[i:i + rows], history_length)
           for i in range(0, len(anchors), rows)]
  if not parts:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  return tuple(np.concatenate(p) for p in zip(*parts))


def _histories(action: np.ndarray, low: np.ndarray, high: np.ndarray,
               history_length: int) -> tuple[np.ndarray, np.ndarray]:
  """`histories` of the scan windows [low, high) of one chunk of anchors."""
  b = len(high)
  # The scan windows' union, as segments of `action` read into one array, `scan`.
  order = np.argsort(low, kind="stable")
  reach = np.maximum.accumulate(high[order])
  new = np.r_[True, low[order][1:] > reach[:-1]]
  first = np.flatnonzero(new)
  seg_low, seg_high = low[order][first], reach[np.r_[first[1:] - 1, b - 1]]
  seg_at = np.r_[0, np.cumsum(seg_high - seg_low)]
  scan = np.concatenate([np.asarray(action[s:t]) for s, t in zip(seg_low.tolist(),
                                                                  seg_high.tolist())])
  segment = np.empty(b, np.int64)
  segment[order] = np.cumsum(new) - 1
  begin = low - seg_low[segment] + seg_at[segment]  # each scan window in `scan`
  end = begin + (high - low)
  # Per pool, each anchor's last members, as keys anchor * width + offset in its window.
  width = max(1, int((high - low).max(initial=0)))
  key_of = np.arange(b) * width - begin  # + the index in `scan`
  per_pool = max(1, history_length // 3)
  keys, count = [], np.zeros(b, np.int64)
  for bit in POOLS:
    members = np.flatnonzero(scan & bit)
    last = np.searchsorted(members, end)
    take = np.minimum(per_pool, last - np.searchsorted(members, begin))
    count += take
    keys.append(members[np.arange(take.sum()) + np.repeat(last - np.cumsum(take), take)]
                + np.repeat(key_of, take))
  keys = np.sort(np.concatenate(keys))  # (anchor, position) order
  repeated = keys[1:] == keys[:-1]  # an event in several pools
  if repeated.any():
    keys = keys[np.r_[True, ~repeated]]
    count = np.bincount(keys // width, minlength=b)
  if count.max(initial=0) > history_length:  # the most recent history_length (L < 3)
    from_end = np.repeat(np.cumsum(count), count) - np.arange(len(keys))  # 1 for the last
    keys, count = keys[from_end <= history_length], np.minimum(count, history_length)
  return count, keys + np.repeat(low - np.arange(b) * width, count)


class PreparedEvents:
  """A prepared directory, memory-mapped, and the samples of its anchors."""

  def __init__(self, path: str):
    self.path = path
    self.metadata = read_metadata(path)
    self._window = (None, None)
    load = lambda n: np.load(os.path.join(path, f"{n}.npy"), mmap_mode="r")  # noqa: E731
    try:
      self.events = {n: load(n) for n in EVENT_COLUMNS}
      self.users, self.user_start, self.user_end = (load(n) for n in ("users", "user_start",
                                                                       "user_end"))
      self.anchors, self.anchor_window = load("anchors"), load("anchor_window")
    except (OSError, ValueError) as e:
      raise fmt.FormatError(f"{path} is damaged ({e}); prepare it again") from None
    if any(len(a) != self.metadata["events"] for a in self.events.values()) or len(
        self.anchors) != self.metadata["anchors"]:
      raise fmt.FormatError(f"{path} is damaged: its files disagree with "
                            f"{fmt.METADATA_FILE}; prepare it again")

  @property
  def num_windows(self) -> int:
    return self.metadata["windows"]

  def window_anchors(self, window: int) -> np.ndarray:
    """The flat indices of the window's anchors, ascending (user-major). A scan of
    `anchor_window`; the last window's result is kept."""
    if not 0 <= window < self.num_windows:
      raise IndexError(f"window {window} is not in [0, {self.num_windows})")
    if self._window[0] != window:
      self._window = (window, np.asarray(self.anchors[np.asarray(self.anchor_window) == window]))
    return self._window[1]

  def num_batches(self, window: int, batch_size: int, process_count: int = 1) -> int:
    """Full batches per process in the window (drop-last)."""
    return len(self.window_anchors(window)) // process_count // batch_size

  def batch(self, window: int, batch_index: int, batch_size: int, *, process_index: int = 0,
            process_count: int = 1, **sample_options) -> dict[str, np.ndarray]:
    """`samples` of one batch of the window (`window_batch_anchors`)."""
    return self.samples(window_batch_anchors(self.window_anchors(window), batch_size,
                                             batch_index, process_index, process_count),
                        **sample_options)

  def batches(self, window: int, batch_size: int, *, start: int = 0, **options):
    """The window's batches from batch `start` on (`batch`'s options)."""
    count = self.num_batches(window, batch_size, options.get("process_count", 1))
    for b in range(start, count):
      yield self.batch(window, b, batch_size, **options)

  def history(self, anchor: int, history_length: int = 4086,
              scan_window: int = 20_000) -> np.ndarray:
    """The flat indices of one anchor's history, oldest first (`histories`)."""
    return histories(self.events["action"], self.user_start, [anchor], history_length,
                     scan_window)[1]

  def samples(self, anchors: Sequence[int], *, history_length: int = 4086,
              scan_window: int = 20_000,
              cross_sizes: Sequence[int] = tuple(s for _, _, s in CROSSES)
              ) -> dict[str, np.ndarray]:
    """The fields of the anchors' samples (docs/dlrmv4_reference.md section 1.5):

    - `history_{item,artist,album,action,timestamp}` [B, history_length], padded with
      zeros after `history_length` [B] events (`histories`);
    - `candidate_{item,artist,album}` [B], `query_time` [B]: the last history
      event's timestamp, or the anchor's where the history is empty;
    - `anchor_timestamp`, `is_organic` [B]; `label` [B] (1.0 for listen-plus);
    - `contextual` [B, 8]: the uid, then the 7 crosses of `CROSSES` (hashed into
      `cross_sizes`) of the anchor's uid, artist, album, item, is_organic and hour
      of day, (timestamp // 3600) % 24.
    """
    if len(cross_sizes) != len(CROSSES):
      raise ValueError(f"{len(cross_sizes)} cross sizes for {len(CROSSES)} crosses")
    anchors = np.asarray(anchors, np.int64)
    b, e = len(anchors), self.events
    lengths, index = histories(e["action"], self.user_start, anchors, history_length,
                               scan_window)
    out = {f"history_{k}": np.zeros((b, history_length), EVENT_COLUMNS[k])
           for k in ("item", "artist", "album", "action", "timestamp")}
    out["history_length"] = lengths.astype(np.int32)
    used = int(lengths.max(initial=0))
    filled = np.arange(used) < lengths[:, None]  # row i's first lengths[i] slots
    for k in ("item", "artist", "album", "action", "timestamp"):
      out[f"history_{k}"][:, :used][filled] = e[k][index]
    for k in ("item", "artist", "album"):
      out[f"candidate_{k}"] = np.asarray(e[k][anchors])
    out["anchor_timestamp"] = np.asarray(e["timestamp"][anchors])
    last = out["history_timestamp"][np.arange(b), np.maximum(out["history_length"] - 1, 0)]
    out["query_time"] = np.where(out["history_length"] > 0, last, out["anchor_timestamp"])
    out["is_organic"] = np.asarray(e["is_organic"][anchors])
    out["label"] = ((np.asarray(e["action"][anchors]) & LP_BIT) != 0).astype(np.float32)
    uid = np.asarray(e["uid"][anchors]).astype(np.int64)
    keys = {"uid": uid, "item": out["candidate_item"], "artist": out["candidate_artist"],
            "album": out["candidate_album"], "is_organic": out["is_organic"],
            "hour": out["anchor_timestamp"] // 3600 % 24}
    out["contextual"] = np.zeros((b, len(CONTEXTUAL)), np.int64)
    out["contextual"][:, 0] = uid
    for j, ((_, names, _), size) in enumerate(zip(CROSSES, cross_sizes)):
      out["contextual"][:, j + 1] = cross_hash(np.stack([keys[n] for n in names], 1), size)
    out["anchor"] = anchors
    return out
