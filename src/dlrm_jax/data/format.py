"""The prepared Criteo format: fixed-width, memory-mappable, columnar shards.

A prepared directory holds

```
metadata.json              written last: its presence means the directory is complete
shards/NAME.label.npy      uint8   [rows]          0/1 click labels
shards/NAME.dense.npy      float32 [rows, 13]      log(1 + max(x, 0)), missing -> 0
shards/NAME.sparse.npy     int32   [rows, sum(hotness)]  table rows, feature f in columns
                                                   offsets[f] .. offsets[f] + hotness[f]
vocab/C01.keys.npy ...     (vocabulary modes) sorted raw values and their ids
```

Shards are plain `.npy` files, so `np.load(path, mmap_mode="r")` maps them and
a batch is a slice, with no per-row work. Rows are numbered globally in shard
order; splits are row ranges over that numbering (see `metadata["splits"]`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

FORMAT_NAME = "dlrm_jax.criteo"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SHARD_DIR = "shards"
VOCAB_DIR = "vocab"
PROGRESS_DIR = "progress"
NUM_DENSE = 13
NUM_SPARSE = 26
FIELDS = ("label", "dense", "sparse")
DTYPES = {"label": np.dtype(np.uint8), "dense": np.dtype(np.float32), "sparse": np.dtype(np.int32)}
_HEADER_BYTES = 128  # .npy v1.0 header size for our shapes (padded to a multiple of 64).


class FormatError(ValueError):
  """A prepared directory is missing, incomplete or from an incompatible version."""


def feature_names() -> list[str]:
  return [f"C{j + 1}" for j in range(NUM_SPARSE)]


def shard_path(root: str, name: str, field: str) -> str:
  return os.path.join(root, SHARD_DIR, f"{name}.{field}.npy")


class NpyAppender:
  """Writes a .npy file whose row count is known only at the end.

  A placeholder header of fixed size is written first, rows are appended as
  they come, and `close()` rewrites the header with the final shape. The file
  is written as PATH.tmp and renamed to PATH on close, so PATH exists only
  when complete.
  """

  def __init__(self, path: str, dtype: np.dtype, row_shape: tuple[int, ...] = ()):
    self.path = path
    self.dtype = np.dtype(dtype)
    self.row_shape = tuple(row_shape)
    self.rows = 0
    self._file = open(path + ".tmp", "wb")
    self._file.write(_header(self.dtype, (0,) + self.row_shape))

  def append(self, array: np.ndarray) -> None:
    a = np.ascontiguousarray(array, dtype=self.dtype)
    if a.shape[1:] != self.row_shape:
      raise ValueError(f"{self.path}: rows of shape {a.shape[1:]}, expected {self.row_shape}")
    self._file.write(memoryview(a).cast("B"))
    self.rows += a.shape[0]

  def close(self) -> None:
    self._file.seek(0)
    self._file.write(_header(self.dtype, (self.rows,) + self.row_shape))
    self._file.close()
    os.replace(self.path + ".tmp", self.path)

  def abort(self) -> None:
    try:
      self._file.close()
    except OSError:
      pass  # The flush of a full disk fails too; the file is closed and removed anyway.
    if os.path.exists(self.path + ".tmp"):
      os.remove(self.path + ".tmp")


def _header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
  import io

  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
  data = buf.getvalue()
  if len(data) != _HEADER_BYTES:
    raise ValueError(f"unexpected .npy header size {len(data)} for shape {shape}")
  return data


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON to PATH.tmp, then renames: readers never see half a file."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def read_json(path: str) -> Any:
  """The JSON at PATH (written by `write_json_atomic`), or None where there is no file."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


# What `prepare` reads for each dataset (the advice of a missing directory).
RAW_INPUTS = {"kaggle": "train.txt", "terabyte": "day_{0..23}.gz"}


def read_metadata(root: str, dataset: str = "kaggle") -> dict:
  """The metadata of a complete prepared directory of this format version, checked.

  Raises FormatError saying why a directory cannot be used: not there (with the
  `prepare` command for `dataset`, "kaggle" or "terabyte"), not finished (preparation
  interrupted), a different format or version, or shard files missing or of the
  wrong size.
  """
  if not os.path.isdir(root):
    raise FormatError(f"{root}: no such directory. Prepare the Criteo data first: "
                      f"python -m dlrm_jax.data.criteo prepare --dataset {dataset} "
                      f"--input {RAW_INPUTS.get(dataset, 'FILES')} --output {root}")
  path = os.path.join(root, METADATA_FILE)
  if not os.path.exists(path):
    if os.path.isdir(os.path.join(root, PROGRESS_DIR)):
      raise FormatError(f"{root} is incomplete: its preparation has not finished (no "
                        f"{METADATA_FILE}). Run the same prepare command again to resume it.")
    raise FormatError(f"{root} is not a prepared Criteo directory (no {METADATA_FILE}).")
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise FormatError(f"{path} is unreadable: {e}") from None
  if meta.get("format") != FORMAT_NAME:
    raise FormatError(f"{path}: format {meta.get('format')!r} is not {FORMAT_NAME!r}")
  version = meta.get("format_version")
  if version != FORMAT_VERSION:
    raise FormatError(
        f"{root} was prepared in format version {version}, and this dlrm_jax reads version "
        f"{FORMAT_VERSION}: prepare the raw files again into a new directory.")
  for key in ("rows", "shards", "splits", "vocab_sizes", "hotness"):
    if key not in meta:
      raise FormatError(f"{path} lacks {key!r}: the file is damaged; prepare again.")
  width = int(sum(meta["hotness"]))
  widths = {"label": 1, "dense": NUM_DENSE, "sparse": width}
  for shard in meta["shards"]:
    for field in FIELDS:
      p = shard_path(root, shard["name"], field)
      want = _HEADER_BYTES + shard["rows"] * widths[field] * DTYPES[field].itemsize
      try:
        size = os.path.getsize(p)
      except OSError:
        raise FormatError(f"{root} is incomplete: {p} is missing.") from None
      if size != want:
        raise FormatError(f"{root} is damaged: {p} has {size} bytes, expected {want} "
                          f"({shard['rows']} rows).")
  return meta


class PreparedData:
  """Random access to the rows of a prepared directory, by global row number."""

  def __init__(self, root: str):
    self.root = root
    self.meta = read_metadata(root)
    self.hotness = tuple(int(h) for h in self.meta["hotness"])
    self.vocab_sizes = tuple(int(v) for v in self.meta["vocab_sizes"])
    self.shard_rows = np.array([s["rows"] for s in self.meta["shards"]], dtype=np.int64)
    self.starts = np.concatenate([[0], np.cumsum(self.shard_rows)])
    self.num_rows = int(self.starts[-1])
    if self.num_rows != int(self.meta["rows"]):
      raise FormatError(f"{root}: shards hold {self.num_rows} rows, metadata says {self.meta['rows']}")
    self._maps: dict[int, dict[str, np.ndarray]] = {}

  @property
  def sparse_width(self) -> int:
    return int(sum(self.hotness))

  def split_ranges(self, split: str) -> list[tuple[int, int]]:
    splits = self.meta["splits"]
    if split not in splits:
      raise ValueError(f"split {split!r} is not one of {sorted(splits)} in {self.root}")
    return [(int(a), int(b)) for a, b in splits[split]]

  def split_rows(self, split: str) -> int:
    return sum(b - a for a, b in self.split_ranges(split))

  def _shard(self, i: int) -> dict[str, np.ndarray]:
    m = self._maps.get(i)
    if m is None:
      name = self.meta["shards"][i]["name"]
      # Plain ndarray views of the maps: slicing a np.memmap costs a Python-level
      # __getitem__ per slice, a measurable share of a 2048-row batch.
      m = {f: np.load(shard_path(self.root, name, f), mmap_mode="r").view(np.ndarray)
           for f in FIELDS}
      self._maps[i] = m
    return m

  def read(self, start: int, stop: int, out: dict[str, np.ndarray] | None = None,
           offset: int = 0) -> dict[str, np.ndarray]:
    """Rows [start, stop) as arrays (copied), written into `out` at `offset` if given."""
    n = stop - start
    if out is None:
      out = self.empty(n)
      offset = 0
    self.read_ranges(np.array([start], np.int64), np.array([n], np.int64), out, offset)
    return out

  def read_ranges(self, starts: np.ndarray, lengths: np.ndarray, out: dict[str, np.ndarray],
                  offset: int = 0) -> None:
    """Row ranges [starts[i], starts[i] + lengths[i]), one after another, into `out` at `offset`.

    Contiguous copies from the memory maps (one per range and shard it spans),
    with the shard lookups done for all ranges at once.
    """
    starts = np.asarray(starts, np.int64)
    lengths = np.asarray(lengths, np.int64)
    if len(starts) and (starts.min() < 0 or (starts + lengths).max() > self.num_rows):
      raise IndexError(f"rows out of [0, {self.num_rows}) in {self.root}")
    first = np.searchsorted(self.starts, starts, side="right") - 1
    bounds = self.starts.tolist()
    at = int(offset)
    label, dense, sparse = out["label"], out["dense"], out["sparse"]
    for i, pos, n in zip(first.tolist(), starts.tolist(), lengths.tolist()):
      stop = pos + n
      while pos < stop:
        shard = self._shard(i)
        lo = pos - bounds[i]
        hi = min(stop, bounds[i + 1]) - bounds[i]
        k = hi - lo
        label[at:at + k] = shard["label"][lo:hi]
        dense[at:at + k] = shard["dense"][lo:hi]
        sparse[at:at + k] = shard["sparse"][lo:hi]
        at += k
        pos += k
        i += 1

  def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The given global rows (any order), as arrays."""
    rows = np.asarray(rows, dtype=np.int64)
    out = self.empty(len(rows))
    if len(rows) == 0:
      return out
    shard_of = np.searchsorted(self.starts, rows, side="right") - 1
    for i in np.unique(shard_of):
      sel = np.flatnonzero(shard_of == i)
      local = rows[sel] - self.starts[i]
      shard = self._shard(int(i))
      for f in FIELDS:
        out[f][sel] = shard[f][local]
    return out

  def empty(self, n: int) -> dict[str, np.ndarray]:
    return {"label": np.empty(n, np.uint8), "dense": np.empty((n, NUM_DENSE), np.float32),
            "sparse": np.empty((n, self.sparse_width), np.int32)}


def sparse_offsets(hotness: Sequence[int]) -> list[int]:
  return [int(x) for x in np.concatenate([[0], np.cumsum(hotness)])[:-1]]
