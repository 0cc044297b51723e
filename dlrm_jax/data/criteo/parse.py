"""Parsing raw Criteo lines: blocks of whole TAB-separated lines -> label, dense, raw hex values.

pyarrow's CSV reader splits the fields and a vectorised decoder reads the 8-hex-digit
categorical values; every bad line is reported with its field, never dropped silently.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dlrm_jax.data.format import NUM_DENSE, NUM_SPARSE

NAMES = (["label"] + [f"I{j + 1}" for j in range(NUM_DENSE)]
         + [f"C{j + 1}" for j in range(NUM_SPARSE)])
NUM_COLUMNS = len(NAMES)


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
