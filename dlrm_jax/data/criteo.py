"""Criteo click logs, from raw TSV (or .gz) files to the prepared format.

    python -m dlrm_jax.data.criteo prepare --dataset kaggle --input train.txt --output DIR
    python -m dlrm_jax.data.criteo prepare --dataset terabyte --input day_{0..23}.gz \\
        --output DIR --categorical hash --max-ind-range 40000000
    python -m dlrm_jax.data.criteo info DIR

Each raw line is `label, I1..I13, C1..C26`, TAB-separated. Dense features:
missing -> 0, negative -> 0, then log(1 + x) (as the reference does; stored as
float32). Categorical features: 8 hex digits -> a 32-bit value (missing -> 0,
as the reference maps an empty field), then one of three modes:

- `hash`: value modulo `max_ind_range` (per feature if 26 values are given),
  what TorchRec's Criteo scripts do. Deterministic, no vocabulary pass.
- `reference`: modulo `max_ind_range` if given, then renumbered consecutively
  per feature in order of first appearance over all input rows in input order,
  as the reference's `getCriteoAdData` numbers them.
- `frequency`: a vocabulary counted on the training rows (modulo
  `max_ind_range` first, if given); values seen at least `frequency_threshold`
  times get rows 1..V in order of decreasing count (ties: smaller value
  first); rare and unseen values share row 0, the out-of-vocabulary row, as
  NVIDIA's DLRM preprocessing does with its frequency limit.

Splits are those of the reference, so that results are comparable: Kaggle
(one `train.txt`, or its parts in order): the rows are cut into 7 "days" as the
reference cuts them (`divmod(rows, 7)`, the first `rows % 7` days one row
longer); days 0-5 train, day 6 split into test (first half, rounded up) and
val (the rest). Terabyte: every file but the last (`day_0` .. `day_22`) trains,
the last (`day_23`) is split the same way into test and val.

How it runs: each input is cut into pieces (byte ranges of about
`piece_bytes`, aligned on lines; a .gz file is one piece), worker processes
(forked, so they start at once, when the parent runs a single thread;
spawned otherwise) parse pieces in blocks of `block_bytes` (a few MB, so that
a block's parsed columns stay in the CPU caches) with pyarrow's CSV reader
and a vectorised hex decoder, and each piece writes its own shard files. A piece is recorded as done only when its
files are complete, so an interrupted run resumes where it stopped (run the
same command again). Memory: a worker holds one block of `block_bytes` of raw
text and its parsed arrays (a few hundred MB); the `hash` mode needs nothing
else. The vocabulary modes keep one entry of 12 bytes (value, first position
or count) per distinct value per feature being counted, merged in sorted
arrays (a merge briefly needs about twice the entries of the feature being
merged); when they exceed `vocab_memory_bytes` the largest features are left
to a further pass over the prepared shards, so the bound holds whatever the
input size (a single feature must fit by itself). No intermediate copy is
written: the vocabulary modes store the raw 32-bit values in the shards'
sparse files and rewrite them shard by shard (one shard of temporary space).

Negative subsampling (`sub_sample_rate`, the reference's
`--data-sub-sample-rate`) runs after parsing, when the splits are known:
train shards are rewritten without the dropped negatives (see
`sub_sample_keep`), before any vocabulary is counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Iterator, Sequence

import numpy as np

from dlrm_jax.data.synthetic import mix64
from dlrm_jax.data import format as fmt
from dlrm_jax.data.format import FormatError, NUM_DENSE, NUM_SPARSE

DATASETS = ("kaggle", "terabyte")
CATEGORICAL_MODES = ("hash", "reference", "frequency")
KAGGLE_DAYS = 7
NAMES = (["label"] + [f"I{j + 1}" for j in range(NUM_DENSE)]
         + [f"C{j + 1}" for j in range(NUM_SPARSE)])
NUM_COLUMNS = len(NAMES)
_MAX_INT32 = 2**31 - 1


class InputError(ValueError):
  """An input file cannot be used as a whole (empty, truncated, unreadable)."""


class BadLineError(ValueError):
  """A raw line is malformed; names the file, the line (1-based) and the field."""

  def __init__(self, path: str, line: int, field: str, message: str):
    self.path, self.line, self.field, self.message = path, int(line), field, message
    super().__init__(f"{path}:{line}: {field}: {message} (prepare with --skip-bad-lines "
                     "to skip, count and report such lines instead)")

  def __reduce__(self):
    return (BadLineError, (self.path, self.line, self.field, self.message))


# ----------------------------------------------------------------------------
# Parsing one block of whole lines.

@dataclasses.dataclass
class Block:
  """Parsed rows of a block of raw lines, and its bad lines.

  `bad` holds (local line, field, message) with local lines 1-based within the
  block; `lines` is the number of physical lines the block held.
  """

  label: np.ndarray  # uint8 [n]
  dense: np.ndarray  # float32 [n, 13]
  raw: np.ndarray  # uint32 [n, 26]: the hex values, missing -> 0
  lines: int
  bad: list[tuple[int, str, str]]


_ALLOWED = b"0123456789abcdefABCDEF-\t\n"  # every byte of a well-formed block


_U64 = np.uint64


def _hex8(chars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[m, 8] ASCII hex digits -> (uint32 values, bad mask), eight digits per uint64 at once.

  Each byte c is a digit if c - '0' < 10 or (c | 0x20) - 'a' < 6 (uint8
  arithmetic wraps); its value is (c & 0xF) + 9 * (c >> 6 & 1). The eight
  nibbles are then packed pairwise, big-endian (the first digit is the most
  significant), so values >= 0x80000000 come out exact.
  """
  ok = ((chars - np.uint8(48)) < 10) | (((chars | np.uint8(32)) - np.uint8(97)) < 6)
  bad = ok.view(np.uint64).ravel() != _U64(0x0101010101010101)
  x = np.ascontiguousarray(chars).view("<u8").ravel()
  nib = (x & _U64(0x0F0F0F0F0F0F0F0F)) + ((x >> _U64(6)) & _U64(0x0101010101010101)) * _U64(9)
  pairs = (((nib & _U64(0x000F000F000F000F)) << _U64(4))
           | ((nib >> _U64(8)) & _U64(0x000F000F000F000F)))
  quads = (pairs | (pairs >> _U64(8))) & _U64(0x0000FFFF0000FFFF)
  value = ((quads | (quads >> _U64(16))) & _U64(0xFFFFFFFF)).astype(np.uint32)
  return value.byteswap(), bad


def decode_hex(column) -> tuple[np.ndarray, np.ndarray]:
  """8-hex-digit tokens of a pyarrow binary column -> (uint32 values, bad mask).

  Empty tokens are missing values (-> 0). Anything but 0 or 8 hex digits is
  bad. Vectorised over all values of the column (see `_hex8`).
  """
  chunks = column.chunks if hasattr(column, "chunks") else [column]
  values, bads = [], []
  for arr in chunks:
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], np.int32, n + 1, arr.offset * 4)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    present = lengths == 8
    bad = (lengths != 0) & ~present
    out = np.zeros(n, np.uint32)
    m = int(present.sum())
    if m:
      if not bad.any():  # Tokens of 0 or 8 bytes: the 8-byte ones are contiguous.
        chars = data[offsets[0]:offsets[-1]].reshape(m, 8)
      else:
        starts = offsets[:-1][present]
        chars = data[starts[:, None] + np.arange(8)]
      values_8, bad_8 = _hex8(chars)
      bad[present] |= bad_8
      out[present] = values_8
    values.append(out)
    bads.append(bad)
  if not values:
    return np.zeros(0, np.uint32), np.zeros(0, bool)
  return np.concatenate(values), np.concatenate(bads)


def _read_csv(data: bytes, types: dict, threads: bool):
  """pyarrow parse of TAB-separated lines; rows with a wrong field count are skipped and listed."""
  import pyarrow as pa
  from pyarrow import csv as pacsv

  wrong: list[tuple[int, int]] = []

  def on_invalid(row):
    wrong.append((int(row.number) if row.number is not None else -1, int(row.actual_columns)))
    return "skip"

  table = pacsv.read_csv(
      pa.py_buffer(data),
      read_options=pacsv.ReadOptions(column_names=NAMES, use_threads=threads,
                                     block_size=1 << 20),
      parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False,
                                       escape_char=False, newlines_in_values=False,
                                       ignore_empty_lines=False, invalid_row_handler=on_invalid),
      convert_options=pacsv.ConvertOptions(column_types=types, check_utf8=False,
                                           null_values=[""], strings_can_be_null=False,
                                           quoted_strings_can_be_null=False))
  if any(n < 0 for n, _ in wrong):
    raise RuntimeError("pyarrow did not report the line numbers of malformed rows")
  return table, wrong


def _types(text: bool) -> dict:
  import pyarrow as pa

  if text:
    return {name: pa.binary() for name in NAMES}
  types = {"label": pa.int8()}
  types.update({f"I{j + 1}": pa.int64() for j in range(NUM_DENSE)})
  types.update({f"C{j + 1}": pa.binary() for j in range(NUM_SPARSE)})
  return types


def _physical_lines(num_rows: int, skipped: Sequence[int]) -> np.ndarray:
  """Local line numbers (1-based) of the rows a table kept, given the skipped lines."""
  if not skipped:
    return np.arange(1, num_rows + 1)
  keep = np.ones(num_rows + len(skipped) + 1, bool)
  keep[0] = False
  keep[np.asarray(skipped)] = False
  return np.flatnonzero(keep)


def _column_count_bad(wrong) -> list[tuple[int, str, str]]:
  return [(n, "columns", f"has {c} fields, expected {NUM_COLUMNS} (label, I1-I13, C1-C26)")
          for n, c in wrong]


def _locate_bad(data: bytes, threads: bool) -> list[tuple[int, str, str]]:
  """Every bad line of a block, found with all fields read as text."""
  import pyarrow.compute as pc

  table, wrong = _read_csv(data, _types(text=True), threads)
  bad = _column_count_bad(wrong)
  lines = _physical_lines(table.num_rows, [n for n, _ in wrong])

  def report(mask, name, what):
    for i in np.flatnonzero(mask):
      token = table.column(name)[int(i)].as_py()
      bad.append((int(lines[i]), name, f"{token!r} {what}"))

  label = table.column("label")
  ok = pc.is_in(label, value_set=_binary_array([b"0", b"1"]))
  report(~ok.to_numpy(zero_copy_only=False), "label", "is not 0 or 1")
  for j in range(NUM_DENSE):
    name = f"I{j + 1}"
    ok = pc.match_substring_regex(table.column(name), r"^(-?[0-9]{1,19})?$")
    report(~ok.to_numpy(zero_copy_only=False), name, "is not an integer")
  for j in range(NUM_SPARSE):
    name = f"C{j + 1}"
    _, hex_bad = decode_hex(table.column(name))
    report(hex_bad, name, "is not 8 hex digits")
  return bad


def _binary_array(values):
  import pyarrow as pa

  return pa.array(values, pa.binary())


def _drop_lines(data: bytes, lines: set[int]) -> bytes:
  """The block without the given (1-based) lines."""
  parts = data.split(b"\n")
  kept = [p for i, p in enumerate(parts, start=1) if i not in lines]
  return b"\n".join(kept)


def _filled(column, fill: int) -> np.ndarray:
  """A pyarrow integer column as one numpy array, nulls replaced by `fill`.

  Read from the chunks' buffers with numpy: pyarrow.compute's fill_null would
  cost every worker process the import of pyarrow.compute (seconds here).
  """
  if column.null_count == 0:
    return column.to_numpy()
  parts = []
  for chunk in column.chunks:
    n, off = len(chunk), chunk.offset
    validity, values = chunk.buffers()[:2]
    x = np.frombuffer(values, chunk.type.to_pandas_dtype(), n + off)[off:]
    if validity is not None and chunk.null_count:
      bits = np.unpackbits(np.frombuffer(validity, np.uint8), count=n + off, bitorder="little")
      x = np.where(bits[off:].astype(bool), x, fill)
    parts.append(x)
  return np.concatenate(parts) if parts else np.zeros(0, column.type.to_pandas_dtype())


def parse_block(data: bytes, *, skip_bad_lines: bool = False, threads: bool = False) -> Block:
  """Parses whole raw lines. Bad lines are listed in `Block.bad`, never dropped silently.

  With `skip_bad_lines` the returned arrays hold the good rows only; without,
  a block with bad lines returns its bad lines and no rows (the caller stops).
  """
  import pyarrow as pa

  lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
  try:
    # pyarrow's integer parser also takes "0x10" and " 5": bytes other than
    # these (hex digits, '-', TAB, newline) send the block to the strict checks.
    if data.translate(None, _ALLOWED):
      raise pa.ArrowInvalid("unexpected characters")
    table, wrong = _read_csv(data, _types(text=False), threads)
    dropped: list[tuple[int, str, str]] = []
  except pa.ArrowInvalid:
    # A field that does not convert (a dense value that is not an integer, a
    # label out of range): find every bad line with a text parse.
    dropped = sorted(_locate_bad(data, threads))
    if not dropped:
      raise
    if not skip_bad_lines:
      return _empty_block(lines, dropped)
    table, wrong = _read_csv(_drop_lines(data, {n for n, _, _ in dropped}), _types(False), threads)
    if wrong:
      raise RuntimeError("internal error: malformed rows left after removing bad lines")
  n = table.num_rows
  bad = dropped + _column_count_bad(wrong)
  if dropped:  # Rows now map to the lines that were kept.
    kept_lines = np.setdiff1d(np.arange(1, lines + 1), [d[0] for d in dropped])
  else:
    kept_lines = _physical_lines(n, [w[0] for w in wrong])
  row_bad = np.zeros(n, bool)
  label = _filled(table.column("label"), -1)
  label_bad = (label != 0) & (label != 1)
  for i in np.flatnonzero(label_bad):
    token = table.column("label")[int(i)].as_py()
    shown = "an empty field" if token is None else repr(str(token))
    bad.append((int(kept_lines[i]), "label", f"{shown} is not 0 or 1"))
  row_bad |= label_bad
  raw = np.empty((n, NUM_SPARSE), np.uint32)
  for j in range(NUM_SPARSE):
    values, hex_bad = decode_hex(table.column(f"C{j + 1}"))
    raw[:, j] = values
    if hex_bad.any():
      row_bad |= hex_bad
      for i in np.flatnonzero(hex_bad):
        token = table.column(f"C{j + 1}")[int(i)].as_py()
        bad.append((int(kept_lines[i]), f"C{j + 1}", f"{token!r} is not 8 hex digits"))
  if bad and not skip_bad_lines:
    return _empty_block(lines, sorted(bad))
  dense = np.empty((n, NUM_DENSE), np.float32)
  for j in range(NUM_DENSE):
    x = _filled(table.column(f"I{j + 1}"), 0)
    dense[:, j] = np.log1p(np.maximum(x, 0).astype(np.float64))
  label = label.astype(np.uint8)
  if row_bad.any():
    keep = ~row_bad
    label, dense, raw = label[keep], dense[keep], raw[keep]
  return Block(label=label, dense=dense, raw=raw, lines=lines, bad=sorted(bad))


def _empty_block(lines: int, bad) -> Block:
  return Block(label=np.zeros(0, np.uint8), dense=np.zeros((0, NUM_DENSE), np.float32),
               raw=np.zeros((0, NUM_SPARSE), np.uint32), lines=lines, bad=list(bad))


# ----------------------------------------------------------------------------
# Pieces of input files, read as blocks of whole lines.

@dataclasses.dataclass(frozen=True)
class Piece:
  """Lines of one input file whose first byte lies in [start, end); a .gz file is one piece."""

  file: int
  index: int
  path: str
  start: int
  end: int
  gz: bool

  @property
  def name(self) -> str:
    return f"{self.file:04d}-{self.index:05d}"


class _HashingReader:
  """A read-only file wrapper that hashes and counts what is read through it."""

  def __init__(self, f, hasher, counter: Callable[[int], None]):
    self._f, self._hasher, self._counter = f, hasher, counter

  def read(self, n=-1):
    data = self._f.read(n)
    self._hasher.update(data)
    self._counter(len(data))
    return data

  def readable(self):
    return True


def _is_gz(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(2) == b"\x1f\x8b"


def _blocks(piece: Piece, block_bytes: int, hasher, count_bytes: Callable[[int], None]
            ) -> Iterator[tuple[bytes, int]]:
  """(block, byte offset of its first line) for the piece's lines; offsets are -1 in .gz files."""
  if piece.gz:
    with open(piece.path, "rb") as raw:
      g = gzip.GzipFile(fileobj=_HashingReader(raw, hasher, count_bytes), mode="rb")
      while True:
        buf = g.read(block_bytes)
        if not buf:
          return
        if not buf.endswith(b"\n"):
          buf += g.readline()
        yield buf, -1
  with open(piece.path, "rb") as f:
    pos = piece.start
    if piece.start > 0:
      f.seek(piece.start - 1)
      if f.read(1) != b"\n":  # Skip the line begun in the previous piece.
        skipped = f.readline()
        hasher.update(memoryview(skipped)[:piece.end - piece.start])
        pos += len(skipped)
    while pos < piece.end:
      buf = f.read(min(block_bytes, piece.end - pos))
      if not buf:
        return
      if not buf.endswith(b"\n"):
        buf += f.readline()  # This line began before `end`: it is ours.
      hasher.update(memoryview(buf)[:max(0, piece.end - pos)])  # A view: no copy.
      count_bytes(min(len(buf), piece.end - pos))
      yield buf, pos
      pos += len(buf)


def _count_lines(path: str, stop: int) -> int:
  """Newlines in the first `stop` bytes of a file (for line numbers in errors)."""
  n = 0
  with open(path, "rb") as f:
    left = stop
    while left > 0:
      buf = f.read(min(64 << 20, left))
      if not buf:
        break
      n += buf.count(b"\n")
      left -= len(buf)
  return n


# ----------------------------------------------------------------------------
# Writing a piece's shards.

class _PieceWriter:
  """Appends rows to shard files of at most `shard_rows` rows: NAME-000, NAME-001, ..."""

  def __init__(self, root: str, name: str, shard_rows: int, sparse_dtype):
    self.root, self.name, self.shard_rows = root, name, int(shard_rows)
    self.sparse_dtype = np.dtype(sparse_dtype)
    self.parts: list[dict] = []
    self._open: dict[str, fmt.NpyAppender] | None = None

  def _start(self):
    part = f"{self.name}-{len(self.parts):03d}"
    self.parts.append({"name": part, "rows": 0})
    p = lambda f: fmt.shard_path(self.root, part, f)  # noqa: E731
    self._open = {"label": fmt.NpyAppender(p("label"), np.uint8),
                  "dense": fmt.NpyAppender(p("dense"), np.float32, (NUM_DENSE,)),
                  "sparse": fmt.NpyAppender(p("sparse"), self.sparse_dtype, (NUM_SPARSE,))}

  def append(self, label, dense, sparse):
    i, n = 0, len(label)
    while i < n:
      if self._open is None:
        self._start()
      room = self.shard_rows - self.parts[-1]["rows"]
      k = min(room, n - i)
      for f, a in (("label", label), ("dense", dense), ("sparse", sparse)):
        self._open[f].append(a[i:i + k])
      self.parts[-1]["rows"] += k
      i += k
      if self.parts[-1]["rows"] >= self.shard_rows:
        self._finish()

  def _finish(self):
    for w in self._open.values():
      w.close()
    self._open = None

  def close(self):
    if self._open is not None:
      self._finish()
    if self.parts and self.parts[-1]["rows"] == 0:
      self.parts.pop()

  def abort(self):
    if self._open is not None:
      for w in self._open.values():
        w.abort()
      self._open = None
    for part in self.parts:
      for f in fmt.FIELDS:
        p = fmt.shard_path(self.root, part["name"], f)
        if os.path.exists(p):
          os.remove(p)


# ----------------------------------------------------------------------------
# Workers.

_COUNTERS = None  # (rows, bytes) shared counters, set in each worker.


def _init_worker(counters):
  global _COUNTERS
  _COUNTERS = counters


def _add(i: int, n: int) -> None:
  if _COUNTERS is not None and n:
    with _COUNTERS[i].get_lock():
      _COUNTERS[i].value += n


def _piece_task(piece: Piece, cfg: dict) -> dict:
  """Parses one piece into its shards; returns its record (rows, shards, bad lines, checksum)."""
  hasher = hashlib.sha256()
  moduli = None if cfg["moduli"] is None else np.asarray(cfg["moduli"], np.uint32)
  sparse_dtype = np.int32 if cfg["categorical"] == "hash" else np.uint32
  writer = _PieceWriter(cfg["output"], piece.name, cfg["shard_rows"], sparse_dtype)
  lines_before, rows, bad_count, examples = 0, 0, 0, []
  line_base: list[int] = []

  def line_number(block_start: int, local: int) -> int:
    if piece.gz or piece.start == 0:
      return lines_before + local
    if not line_base:  # Lines before this piece, counted only when an error needs them.
      line_base.append(_count_lines(piece.path, first_line_offset[0]))
    return line_base[0] + lines_before + local

  first_line_offset = [piece.start]
  try:
    for data, offset in _blocks(piece, cfg["block_bytes"], hasher, lambda n: _add(1, n)):
      if lines_before == 0 and offset >= 0:
        first_line_offset[0] = offset
      block = parse_block(data, skip_bad_lines=cfg["skip_bad_lines"], threads=cfg["threads"])
      if block.bad:
        if not cfg["skip_bad_lines"]:
          local, field, message = block.bad[0]
          raise BadLineError(piece.path, line_number(offset, local), field, message)
        bad_count += len(block.bad)
        for local, field, message in block.bad[:max(0, 20 - len(examples))]:
          examples.append(f"{piece.path}:{line_number(offset, local)}: {field}: {message}")
      raw = block.raw
      if moduli is not None:
        raw = raw % moduli
      sparse = raw.astype(np.int32) if sparse_dtype == np.int32 else raw
      writer.append(block.label, block.dense, sparse)
      lines_before += block.lines
      rows += len(block.label)
      _add(0, len(block.label))
    writer.close()
  except EOFError as e:
    writer.abort()
    raise InputError(f"{piece.path}: truncated gzip file ({e}); {lines_before} lines were read "
                     "before the end. The file is incomplete: download or copy it again.") from None
  except (zlib.error, gzip.BadGzipFile, OSError) as e:
    writer.abort()
    if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile) and not piece.gz:
      raise
    raise InputError(f"{piece.path}: corrupt gzip data after {lines_before} lines ({e}).") from None
  except BaseException:
    writer.abort()
    raise
  if piece.gz and lines_before == 0:
    raise InputError(f"{piece.path}: empty file (the gzip stream holds no lines).")
  return {"piece": piece.name, "file": piece.file, "start": piece.start, "end": piece.end,
          "parts": writer.parts, "rows": rows, "lines": lines_before, "bad_lines": bad_count,
          "bad_examples": examples, "sha256": hasher.hexdigest()}


# Libraries whose threads may hold locks at a fork (numpy's BLAS and pyarrow's pools
# handle fork themselves).
_FORK_UNSAFE_MODULES = ("jax", "jaxlib", "tensorflow", "torch")


def _start_method() -> str:
  """"fork" (workers start at once, modules already imported) on Linux when this process
  runs no other Python thread and none of `_FORK_UNSAFE_MODULES`; else "spawn"."""
  import threading

  if (sys.platform.startswith("linux") and threading.active_count() == 1
      and not any(m in sys.modules for m in _FORK_UNSAFE_MODULES)):
    return "fork"
  return "spawn"


def _ready() -> bool:
  """A no-op task: returns once a worker is up."""
  return True


class _Pool:
  """Worker processes (or inline execution), with shared progress counters."""

  def __init__(self, workers: int):
    import multiprocessing as mp

    self.workers = max(1, int(workers))
    self.executor = None
    if self.workers > 1:
      self._ctx = mp.get_context(_start_method())
      self.counters = (self._ctx.Value("q", 0), self._ctx.Value("q", 0))
      # Forked workers start at once, with numpy and pyarrow imported once, here
      # (pyarrow's import costs seconds per process on a busy machine); they are
      # started before any helper thread (a progress bar's) exists.
      if self._ctx.get_start_method() == "fork":
        import pyarrow.csv  # noqa: F401
      self.executor = ProcessPoolExecutor(self.workers, mp_context=self._ctx,
                                          initializer=_init_worker, initargs=(self.counters,))
      if self._ctx.get_start_method() == "fork":
        for f in [self.executor.submit(_ready) for _ in range(self.workers)]:
          f.result()
    else:
      self.counters = (_Counter(), _Counter())

  def run(self, fn, tasks: list, on_done: Callable[[object, object], None],
          on_tick: Callable[[], None] = lambda: None, max_in_flight: int | None = None) -> None:
    """Runs fn(*task) for every task; on_done(task, result) in the main process, in task order."""
    if self.workers == 1 or len(tasks) <= 1:
      global _COUNTERS
      saved, _COUNTERS = _COUNTERS, self.counters
      try:
        for task in tasks:
          result = fn(*task)
          on_tick()
          on_done(task, result)
      finally:
        _COUNTERS = saved
      return
    limit = max_in_flight or 2 * self.workers
    pending = list(tasks)
    futures: list = []
    try:
      while pending or futures:
        while pending and len(futures) < limit:
          task = pending.pop(0)
          futures.append((task, self.executor.submit(fn, *task)))
        wait([f for _, f in futures[:1]], timeout=0.5, return_when=FIRST_COMPLETED)
        on_tick()
        while futures and futures[0][1].done():
          task, future = futures.pop(0)
          on_done(task, future.result())
    except BaseException:
      for _, f in futures:
        f.cancel()
      raise

  def reset(self) -> None:
    for c in self.counters:
      c.value = 0

  def close(self):
    if self.executor is not None:
      self.executor.shutdown(wait=True, cancel_futures=True)
      self.executor = None


class _Counter:
  def __init__(self):
    self.value = 0

  def get_lock(self):
    import contextlib

    return contextlib.nullcontext()


# ----------------------------------------------------------------------------
# Vocabulary modes: counting (in bounded memory) and applying.

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
  """Distinct values of rows [lo, hi) of one raw shard: (values, global first row) or (values, count)."""
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
  _add(0, hi - lo)
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
                             "from the vocabulary: the prepared directory is damaged; prepare again.")
      writer.append(out)
      _add(0, len(raw))
    writer.close()
  except BaseException:
    writer.abort()
    raise
  del sparse
  os.replace(path + ".ids", path)
  return 1


# ----------------------------------------------------------------------------
# Negative subsampling of the training rows.

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
  """Writes shard NAME without its dropped train negatives as NAME.FIELD.npy.sub; returns its rows."""
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
      _add(0, hi - lo)
    for w in writers.values():
      w.close()
  except BaseException:
    for w in writers.values():
      w.abort()
    raise
  return kept


def _sub_sample(root, shards, train_rows, rate, seed, pool, progress) -> list[dict]:
  """Drops train negatives shard by shard (resumable); returns the shards with their new rows.

  A shard's record is written once its three new files are complete, and only
  then are they renamed over the old ones: a rerun redoes a shard without a
  record from its untouched files, and finishes the renames of one with a record.
  """
  progress_dir = os.path.join(root, fmt.PROGRESS_DIR)
  new, tasks, start = {}, [], 0
  for s in shards:
    rec = _read_json(os.path.join(progress_dir, f"sub-{s['name']}.json"))
    if rec is not None:
      new[s["name"]] = rec["rows"]
    elif start < train_rows:
      tasks.append((root, s["name"], train_rows - start, start, float(rate), int(seed)))
    else:
      new[s["name"]] = s["rows"]  # Evaluation rows only: untouched.
    start += s["rows"]
  bar = _progress(sum(t[2] for t in tasks), "subsample negatives", "rows", progress)
  tick = _rows_ticker(pool, bar)

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


# ----------------------------------------------------------------------------
# Orchestration.

def _sort_inputs(dataset: str, inputs: Sequence[str]) -> list[str]:
  """Terabyte days in numeric order (day_2 before day_10); other inputs as given."""
  if dataset != "terabyte":
    return list(inputs)
  days = [re.search(r"day_(\d+)", os.path.basename(p)) for p in inputs]
  if all(days):
    return [p for _, p in sorted(zip([int(d.group(1)) for d in days], inputs))]
  return list(inputs)


def parse_max_ind_range(value) -> list[int] | None:
  """None, one int for every feature, or 26 comma-separated ints -> 26 moduli (or None)."""
  if value is None or value == "" or value == -1 or value == 0:
    return None
  if isinstance(value, str):
    parts = [int(v) for v in value.split(",")]
  elif isinstance(value, int):
    parts = [value]
  else:
    parts = [int(v) for v in value]
  if len(parts) == 1:
    parts = parts * NUM_SPARSE
  if len(parts) != NUM_SPARSE or any(not 1 <= p <= _MAX_INT32 for p in parts):
    raise ValueError(f"max_ind_range={value!r}: give one value or {NUM_SPARSE}, each in "
                     f"[1, {_MAX_INT32}] (table rows are int32)")
  return parts


def kaggle_days(rows: int) -> list[int]:
  """The reference's cut of Kaggle's rows into 7 days: divmod, the first days one longer."""
  per, extra = divmod(rows, KAGGLE_DAYS)
  return [per + (1 if d < extra else 0) for d in range(KAGGLE_DAYS)]


def make_splits(dataset: str, file_rows: Sequence[int]) -> dict[str, list[list[int]]]:
  """Row ranges of train, test and val over all prepared rows, as the reference splits."""
  total = int(sum(file_rows))
  if dataset == "kaggle":
    eval_start = total - kaggle_days(total)[-1]
  else:
    eval_start = total - int(file_rows[-1])
  eval_rows = total - eval_start
  test_end = eval_start + (eval_rows + 1) // 2
  return {"train": [[0, eval_start]], "test": [[eval_start, test_end]], "val": [[test_end, total]]}


def _fingerprint(path: str) -> dict:
  st = os.stat(path)
  return {"path": os.path.abspath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _plan_pieces(index: int, path: str, piece_bytes: int) -> list[Piece]:
  size = os.path.getsize(path)
  if _is_gz(path):
    return [Piece(index, 0, path, 0, size, True)]
  n = max(1, math.ceil(size / piece_bytes))
  bounds = [size * k // n for k in range(n + 1)]
  return [Piece(index, k, path, bounds[k], bounds[k + 1], False) for k in range(n)]


def _rows_ticker(pool, bar) -> Callable[[], None]:
  """A callback that moves `bar` on by the rows the pool's workers have counted since."""
  last = [0]

  def tick():
    v = pool.counters[0].value
    bar.update(v - last[0])
    last[0] = v

  return tick


def _progress(total: int | None, desc: str, unit: str, enabled: bool):
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
              disable=not enabled, mininterval=0.5, smoothing=0.1)


def prepare(dataset: str, inputs: Sequence[str], output: str, *, categorical: str = "reference",
            max_ind_range=None, frequency_threshold: int = 3, skip_bad_lines: bool = False,
            workers: int | None = None, shard_rows: int = 1 << 21, piece_bytes: int = 64 << 20,
            block_bytes: int = 4 << 20, vocab_memory_bytes: int = 1 << 30,
            sub_sample_rate: float = 0.0, sub_sample_seed: int = 0,
            progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
  """Prepares raw Criteo files into OUTPUT (see the module docstring); returns the metadata.

  Rerunning the same call after an interruption resumes it: finished pieces
  are kept. A call with other options on an unfinished directory is refused.
  `sub_sample_rate` drops that fraction of the negative train rows (the
  reference's `--data-sub-sample-rate`; see `sub_sample_keep`).
  """
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  if dataset not in DATASETS:
    raise ValueError(f"dataset={dataset!r} is not one of {DATASETS}")
  if categorical not in CATEGORICAL_MODES:
    raise ValueError(f"categorical={categorical!r} is not one of {CATEGORICAL_MODES}")
  moduli = parse_max_ind_range(max_ind_range)
  if categorical == "hash" and moduli is None:
    raise ValueError("categorical='hash' needs max_ind_range (e.g. 40000000): the table "
                     "rows are the values modulo it")
  if categorical == "frequency" and int(frequency_threshold) < 1:
    raise ValueError(f"frequency_threshold={frequency_threshold} must be >= 1")
  if not 0.0 <= float(sub_sample_rate) <= 1.0:
    raise ValueError(f"sub_sample_rate={sub_sample_rate} must be in [0, 1] (the fraction of "
                     "negative train rows to drop)")
  if not inputs:
    raise ValueError("no input files")
  inputs = _sort_inputs(dataset, inputs)
  for p in inputs:
    if not os.path.isfile(p):
      raise InputError(f"{p}: no such file")
    if os.path.getsize(p) == 0:
      raise InputError(f"{p}: empty file (0 bytes)")
  if dataset == "terabyte" and len(inputs) < 2:
    raise ValueError("terabyte needs at least two day files: the last one is split into test "
                     "and val, the others train")
  workers = int(workers or os.cpu_count() or 1)
  options = {"dataset": dataset, "categorical": categorical, "max_ind_range": moduli,
             "frequency_threshold": int(frequency_threshold) if categorical == "frequency" else None,
             "skip_bad_lines": bool(skip_bad_lines), "shard_rows": int(shard_rows),
             "piece_bytes": int(piece_bytes), "inputs": [os.path.abspath(p) for p in inputs]}
  if sub_sample_rate:  # Only when used: directories prepared without it keep their options.
    options["sub_sample"] = {"rate": float(sub_sample_rate), "seed": int(sub_sample_seed)}
  progress_dir = os.path.join(output, fmt.PROGRESS_DIR)
  meta_path = os.path.join(output, fmt.METADATA_FILE)
  if os.path.exists(meta_path):
    meta = fmt.read_metadata(output)
    if meta.get("options") == options:
      log(f"{output} is already prepared with these options.")
      return meta
    raise FormatError(f"{output} already holds data prepared with other options "
                      f"({_diff(meta.get('options', {}), options)}); choose a new --output.")
  os.makedirs(os.path.join(output, fmt.SHARD_DIR), exist_ok=True)
  os.makedirs(progress_dir, exist_ok=True)
  plan_path = os.path.join(progress_dir, "options.json")
  if os.path.exists(plan_path):
    with open(plan_path) as f:
      previous = json.load(f)
    if previous != options:
      raise FormatError(f"{output} holds an unfinished preparation with other options "
                        f"({_diff(previous, options)}); rerun it with the same options to "
                        "resume, or choose a new --output.")
  else:
    others = [n for n in os.listdir(output) if n not in (fmt.SHARD_DIR, fmt.PROGRESS_DIR)]
    if others or os.listdir(os.path.join(output, fmt.SHARD_DIR)):
      raise FormatError(f"{output} is not empty and holds no unfinished preparation; "
                        "choose an empty or new --output.")
    fmt.write_json_atomic(plan_path, options)

  # Stage 1: parse every piece not yet done.
  pieces: list[Piece] = []
  records: dict[str, dict] = {}
  sources = []
  for i, path in enumerate(inputs):
    fp = _fingerprint(path)
    file_pieces = _plan_pieces(i, path, piece_bytes)
    fp_path = os.path.join(progress_dir, f"file-{i:04d}.json")
    old = _read_json(fp_path)
    if old is not None and old != fp:  # The file changed since: redo its pieces.
      _forget_file(output, i)
    fmt.write_json_atomic(fp_path, fp)
    sources.append(fp)
    for piece in file_pieces:
      rec = _read_json(os.path.join(progress_dir, f"piece-{piece.name}.json"))
      if rec is not None:
        records[piece.name] = rec
      else:
        _remove_piece_files(output, piece.name)
        pieces.append(piece)
  done_before = len(records)
  if done_before:
    log(f"Resuming: {done_before} of {done_before + len(pieces)} pieces already done.")
  cfg = {"output": output, "moduli": moduli, "categorical": categorical,
         "shard_rows": int(shard_rows), "block_bytes": int(block_bytes),
         "skip_bad_lines": bool(skip_bad_lines), "threads": len(pieces) < workers}
  pool = _Pool(workers)
  try:
    meta = _prepare_stages(dataset, inputs, output, pieces, records, sources, options, cfg,
                           pool, moduli, categorical, frequency_threshold, piece_bytes,
                           vocab_memory_bytes, sub_sample_rate, sub_sample_seed, progress, log)
  finally:
    pool.close()
  return meta


def _prepare_stages(dataset, inputs, output, pieces, records, sources, options, cfg, pool,
                    moduli, categorical, frequency_threshold, piece_bytes, vocab_memory_bytes,
                    sub_sample_rate, sub_sample_seed, progress, log) -> dict:
  """Parsing, the vocabulary (for its modes) and the metadata, on one pool of workers."""
  progress_dir = os.path.join(output, fmt.PROGRESS_DIR)
  _parse_pieces(pieces, cfg, pool, records, progress_dir, progress, log)
  all_pieces = [_plan_pieces(i, p, piece_bytes) for i, p in enumerate(inputs)]
  shards, file_rows, bad_lines, examples = [], [], 0, []
  for i, file_pieces in enumerate(all_pieces):
    rows = 0
    for piece in file_pieces:
      rec = records[piece.name]
      shards.extend(rec["parts"])
      rows += rec["rows"]
      bad_lines += rec["bad_lines"]
      examples.extend(rec["bad_examples"])
    file_rows.append(rows)
    digests = [records[p.name]["sha256"] for p in file_pieces]
    if len(file_pieces) == 1:
      sources[i]["sha256"] = digests[0]
    else:
      sources[i]["sha256_pieces"] = {
          "ranges": [[p.start, p.end] for p in file_pieces], "sha256": digests,
          "combined": hashlib.sha256(b"".join(bytes.fromhex(d) for d in digests)).hexdigest()}
    sources[i]["rows"] = rows
    sources[i]["lines"] = sum(records[p.name]["lines"] for p in file_pieces)
  total = int(sum(file_rows))
  if total == 0:
    raise InputError("the inputs hold no rows")
  splits = make_splits(dataset, file_rows)
  sub_sample = None
  if sub_sample_rate:  # Drop train negatives; the evaluation rows follow the kept ones.
    train_before = splits["train"][0][1]
    shards = _sub_sample(output, shards, train_before, sub_sample_rate, sub_sample_seed, pool,
                         progress)
    dropped = total - sum(s["rows"] for s in shards)
    total -= dropped
    splits = {k: [[max(0, a - dropped) if k != "train" else a,
                   b - dropped] for a, b in v] for k, v in splits.items()}
    sub_sample = {"rate": float(sub_sample_rate), "seed": int(sub_sample_seed),
                  "train_rows_before": int(train_before), "dropped": int(dropped)}
    log(f"Negative subsampling at rate {sub_sample_rate}: dropped {dropped:,} of "
        f"{train_before:,} train rows.")

  # Stages 2 and 3: vocabulary.
  if categorical == "hash":
    vocab_sizes = list(moduli)
  else:
    vocab_sizes = _build_vocabulary(output, shards, categorical, splits, int(frequency_threshold),
                                    pool, vocab_memory_bytes, progress, log)
    _apply_vocabulary(output, shards, categorical, pool, progress)

  meta_path = os.path.join(output, fmt.METADATA_FILE)
  meta = {
      "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "dataset": dataset,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "options": options,
      "rows": total, "file_rows": file_rows, "splits": splits, "sub_sample": sub_sample,
      "split_rows": {k: sum(b - a for a, b in v) for k, v in splits.items()},
      "num_dense": NUM_DENSE, "num_sparse": NUM_SPARSE, "hotness": [1] * NUM_SPARSE,
      "vocab_sizes": [int(v) for v in vocab_sizes],
      "oov_row": 0 if categorical == "frequency" else None,
      "dtypes": {k: v.str for k, v in fmt.DTYPES.items()},
      "shards": shards, "sources": sources, "bad_lines": bad_lines,
      "bad_line_examples": examples[:20],
  }
  fmt.write_json_atomic(meta_path, meta)
  shutil.rmtree(progress_dir, ignore_errors=True)
  if bad_lines:
    log(f"Skipped {bad_lines:,} bad lines; the first ones:\n  " + "\n  ".join(examples[:20]))
  log(f"Prepared {total:,} rows in {len(shards)} shards into {output} "
      f"(train {meta['split_rows']['train']:,}, test {meta['split_rows']['test']:,}, "
      f"val {meta['split_rows']['val']:,}).")
  return meta


def _parse_pieces(pieces, cfg, pool, records, progress_dir, progress, log) -> None:
  """Stage 1: every piece not yet done, in parallel; each done piece gets its record on disk."""
  bar = _progress(sum(p.end - p.start for p in pieces), "parse", "B", progress)
  t0, last = time.perf_counter(), [0]
  pool.reset()

  def tick():
    b = pool.counters[1].value
    bar.update(b - last[0])
    last[0] = b
    rows = pool.counters[0].value
    bar.set_postfix_str(f"{rows:,} rows, {rows / max(time.perf_counter() - t0, 1e-9):,.0f} rows/s",
                        refresh=False)

  def done(task, rec):
    records[task[0].name] = rec
    fmt.write_json_atomic(os.path.join(progress_dir, f"piece-{task[0].name}.json"), rec)

  pool.run(_piece_task, [(p, cfg) for p in pieces], done, tick)
  tick()
  bar.close()
  seconds, rows = time.perf_counter() - t0, pool.counters[0].value
  if pieces:
    log(f"Parsed {rows:,} rows in {seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} rows/s).")


def _diff(old: dict, new: dict) -> str:
  keys = sorted(set(old) | set(new))
  return ", ".join(f"{k}: {old.get(k)!r} before, {new.get(k)!r} now"
                   for k in keys if old.get(k) != new.get(k)) or "none"


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def _remove_piece_files(root: str, piece_name: str) -> None:
  d = os.path.join(root, fmt.SHARD_DIR)
  for n in os.listdir(d):
    if n.startswith(piece_name + "-"):
      os.remove(os.path.join(d, n))
  d = os.path.join(root, fmt.PROGRESS_DIR)
  for n in os.listdir(d):  # Records of the later stages on its shards.
    if n.startswith(f"sub-{piece_name}-"):
      os.remove(os.path.join(d, n))


def _forget_file(root: str, index: int) -> None:
  prefixes = (f"piece-{index:04d}-", f"sub-{index:04d}-")
  d = os.path.join(root, fmt.PROGRESS_DIR)
  for n in os.listdir(d):
    if n.startswith(prefixes):
      os.remove(os.path.join(d, n))
  sd = os.path.join(root, fmt.SHARD_DIR)
  for n in os.listdir(sd):
    if n.startswith(f"{index:04d}-"):
      os.remove(os.path.join(sd, n))


def _build_vocabulary(root, shards, mode, splits, threshold, pool, memory_bytes,
                      progress, log) -> list[int]:
  """Counts the vocabulary of every feature (resumable per feature); returns table rows."""
  os.makedirs(os.path.join(root, fmt.VOCAB_DIR), exist_ok=True)
  sizes_path = os.path.join(root, fmt.VOCAB_DIR, "sizes.json")
  sizes = _read_json(sizes_path) or {}
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
    bar = _progress(sum(t[2] - t[1] for t in tasks_all), f"vocabulary pass {pass_number}",
                    "rows", progress)
    tick = _rows_ticker(pool, bar)

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


def _apply_vocabulary(root, shards, mode, pool, progress) -> None:
  paths = [fmt.shard_path(root, s["name"], "sparse") for s in shards]
  pool.reset()
  bar = _progress(sum(s["rows"] for s in shards), "apply vocabulary", "rows", progress)
  tick = _rows_ticker(pool, bar)

  pool.run(_apply_task, [(p, root, mode) for p in paths], lambda t, r: None, tick)
  tick()
  bar.close()


# ----------------------------------------------------------------------------
# Multi-hot: the MLPerf DLRM-DCNv2 "Criteo multi-hot" shape, derived from one-hot data.

def multi_hot_ids(ids: np.ndarray, feature: int, hotness: int, rows: int, seed: int) -> np.ndarray:
  """[n] one-hot ids of a feature -> [n, hotness]: the id itself, then hotness-1 fixed
  pseudo-random rows of the table, a pure function of (seed, feature, id, k)."""
  out = np.empty((len(ids), hotness), np.int32)
  out[:, 0] = ids
  if hotness > 1:
    base = ids.astype(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)
    k = np.arange(1, hotness, dtype=np.uint64)[None, :]
    key = np.uint64((seed * 1_000_003 + feature * 7919 + 1) & (2**64 - 1))
    with np.errstate(over="ignore"):
      h = mix64(base + k * np.uint64(0xD1B54A32D192ED03) + key)
    out[:, 1:] = (h % np.uint64(rows)).astype(np.int32)
  return out


def make_multi_hot(source: str, output: str, hotness: Sequence[int], *, seed: int = 0,
                   progress: bool = True) -> dict:
  """Writes a multi-hot copy of a one-hot prepared directory (labels and dense hard-linked).

  Feature f gets hotness[f] ids per row: its one-hot id first, then ids that
  are a fixed function of (seed, f, id), as MLPerf's synthetic multi-hot
  Criteo draws a fixed random bag per id (the values differ from MLPerf's own
  files; the shapes and the structure are the same).
  """
  meta = fmt.read_metadata(source)
  hotness = [int(h) for h in hotness]
  if len(hotness) == 1:
    hotness = hotness * NUM_SPARSE
  if len(hotness) != NUM_SPARSE or min(hotness) < 1:
    raise ValueError(f"hotness={hotness}: give {NUM_SPARSE} values >= 1 (or one for all)")
  if any(h != 1 for h in meta["hotness"]):
    raise ValueError(f"{source} is already multi-hot")
  if os.path.exists(os.path.join(output, fmt.METADATA_FILE)):
    raise FormatError(f"{output} already holds prepared data; choose a new output")
  os.makedirs(os.path.join(output, fmt.SHARD_DIR), exist_ok=True)
  sizes = meta["vocab_sizes"]
  for s in _progress_iter(meta["shards"], "multi-hot", progress):
    for f in ("label", "dense"):
      dst = fmt.shard_path(output, s["name"], f)
      if os.path.exists(dst):
        os.remove(dst)
      try:
        os.link(fmt.shard_path(source, s["name"], f), dst)
      except OSError:
        shutil.copyfile(fmt.shard_path(source, s["name"], f), dst)
    sparse = np.load(fmt.shard_path(source, s["name"], "sparse"), mmap_mode="r")
    writer = fmt.NpyAppender(fmt.shard_path(output, s["name"], "sparse"), np.int32,
                             (sum(hotness),))
    for lo in range(0, len(sparse), 1 << 18):
      one = np.asarray(sparse[lo:lo + (1 << 18)])
      writer.append(np.concatenate([multi_hot_ids(one[:, f], f, hotness[f], sizes[f], seed)
                                    for f in range(NUM_SPARSE)], axis=1))
    writer.close()
  new = dict(meta, hotness=hotness, multi_hot={"source": os.path.abspath(source), "seed": seed})
  fmt.write_json_atomic(os.path.join(output, fmt.METADATA_FILE), new)
  return new


def _progress_iter(items, desc, enabled):
  from tqdm.auto import tqdm

  return tqdm(items, desc=desc, disable=not enabled, dynamic_ncols=True)


# ----------------------------------------------------------------------------
# Command line.

def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m dlrm_jax.data.criteo",
                                   description="Criteo click logs -> prepared shards for dlrm_jax.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prepare", help="parse raw TSV/.gz files into a prepared directory")
  p.add_argument("--dataset", choices=DATASETS, required=True)
  p.add_argument("--input", nargs="+", required=True, help="raw files (train.txt; day_0 .. day_23[.gz])")
  p.add_argument("--output", required=True, help="the prepared directory (new or unfinished)")
  p.add_argument("--categorical", choices=CATEGORICAL_MODES, default="reference",
                 help="hash: value mod --max-ind-range; reference: the reference's renumbering "
                      "in order of first appearance; frequency: vocabulary of values seen "
                      ">= --frequency-threshold times in train, others -> row 0")
  p.add_argument("--max-ind-range", default=None,
                 help="modulus for the values: one int, or 26 comma-separated ints")
  p.add_argument("--frequency-threshold", type=int, default=3)
  p.add_argument("--skip-bad-lines", action="store_true",
                 help="skip, count and report malformed lines instead of stopping at the first")
  p.add_argument("--data-sub-sample-rate", type=float, default=0.0,
                 help="drop this fraction of the negative train rows (seeded, reproducible), "
                      "as the reference's --data-sub-sample-rate")
  p.add_argument("--sub-sample-seed", type=int, default=0)
  p.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
  p.add_argument("--shard-rows", type=int, default=1 << 21)
  p.add_argument("--piece-mb", type=int, default=64, help="input bytes per parallel piece")
  p.add_argument("--vocab-memory-gb", type=float, default=1.0,
                 help="bound for vocabulary counting; features beyond it wait for another pass")
  p.add_argument("--no-progress", action="store_true")
  m = sub.add_parser("multihot", help="derive a multi-hot directory (fixed hotness per feature)")
  m.add_argument("--input", required=True, help="a prepared one-hot directory")
  m.add_argument("--output", required=True)
  m.add_argument("--hotness", required=True, help="one int or 26 comma-separated ints")
  m.add_argument("--seed", type=int, default=0)
  i = sub.add_parser("info", help="print a prepared directory's metadata summary")
  i.add_argument("path")
  args = parser.parse_args(argv)
  try:
    if args.command == "prepare":
      prepare(args.dataset, args.input, args.output, categorical=args.categorical,
              max_ind_range=args.max_ind_range, frequency_threshold=args.frequency_threshold,
              skip_bad_lines=args.skip_bad_lines, workers=args.workers or None,
              shard_rows=args.shard_rows, piece_bytes=args.piece_mb << 20,
              vocab_memory_bytes=int(args.vocab_memory_gb * 2**30),
              sub_sample_rate=args.data_sub_sample_rate, sub_sample_seed=args.sub_sample_seed,
              progress=not args.no_progress)
    elif args.command == "multihot":
      make_multi_hot(args.input, args.output, [int(h) for h in args.hotness.split(",")],
                     seed=args.seed)
    else:
      meta = fmt.read_metadata(args.path)
      summary = {k: meta[k] for k in ("dataset", "rows", "split_rows", "vocab_sizes", "hotness",
                                      "bad_lines", "options")}
      print(json.dumps(summary, indent=1))
  except (BadLineError, InputError, FormatError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
