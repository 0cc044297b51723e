"""Parsing raw Criteo lines: blocks of whole TAB-separated lines -> label, dense, raw hex values.

The accepted grammar is written down in docs/criteo.md ("The raw line grammar"). A clean
block takes the fast path: pyarrow's CSV reader splits the fields and vectorised decoders
read the label and the 8-hex-digit categorical values. A block with any bad line takes
the strict path, which finds every bad line exactly (one report per line, with the
first field that breaks the grammar) and parses the others; no line is dropped silently.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from dlrm_jax.data.format import NUM_DENSE, NUM_SPARSE

NAMES = (["label"] + [f"I{j + 1}" for j in range(NUM_DENSE)]
         + [f"C{j + 1}" for j in range(NUM_SPARSE)])
NUM_COLUMNS = len(NAMES)
_INT64 = (-2**63, 2**63 - 1)


class InputError(ValueError):
  """An input file cannot be used as a whole (empty, truncated, unreadable)."""


class BadLineError(ValueError):
  """A raw line is malformed; names the file, the line (1-based) and the field."""

  def __init__(self, path: str, line: int, field: str, message: str,
               hint: str = "rerun the same command with --skip-bad-lines to skip, count and "
                           "report such lines instead"):
    self.path, self.line, self.field, self.message = path, int(line), field, message
    super().__init__(f"{path}:{line}: {field}: {message} ({hint})")

  def __reduce__(self):
    return (BadLineError, (self.path, self.line, self.field, self.message))


@dataclasses.dataclass
class Block:
  """Parsed rows of a block of raw lines, and its bad lines.

  `bad` holds one (local line, field, message) per bad line, in line order, with
  local lines 1-based within the block; `lines` is the number of lines the block
  held. The rows are those of the good lines, in order.
  """

  label: np.ndarray  # uint8 [n]
  dense: np.ndarray  # float32 [n, 13]
  raw: np.ndarray  # uint32 [n, 26]: the hex values, missing -> 0
  lines: int
  bad: list[tuple[int, str, str]]


_ALLOWED = b"0123456789abcdefABCDEF-\t\n"  # every byte of a block of good lines
_LINE_BYTES = _ALLOWED[:-1]  # every byte of a good line (without its LF)
_INTEGER = re.compile(rb"-?[0-9]+")
_HEX8 = re.compile(rb"[0-9a-fA-F]{8}")
_U64 = np.uint64


def names(labelled: bool = True) -> list[str]:
  """The fields of a line: with the label column (40) or without it (39)."""
  return list(NAMES if labelled else NAMES[1:])


def _show(token: bytes) -> str:
  """A field for a message: quoted, undecodable bytes escaped, long ones shortened."""
  text = token[:40].decode("utf-8", "backslashreplace")
  return repr(text) + ("..." if len(token) > 40 else "") if token else "an empty field"


def _fits_int64(token: bytes) -> bool:
  """Whether an integer token (`_INTEGER`) lies in the 64-bit range, leading zeros aside
  (Python's int() refuses more than 4,300 digits)."""
  digits = token.lstrip(b"-").lstrip(b"0") or b"0"
  if len(digits) > 19:
    return False
  value = -int(digits) if token.startswith(b"-") else int(digits)
  return _INT64[0] <= value <= _INT64[1]


def line_error(line: bytes, labelled: bool = True) -> tuple[str, str] | None:
  """(field, reason) of the first rule a line breaks (docs/criteo.md's order), or None.

  `line` is one line without its LF; a CR at its end is a line ending and is dropped.
  """
  if line.endswith(b"\r"):
    line = line[:-1]
  fields = line.split(b"\t")
  fields_names = names(labelled)
  if len(fields) != len(fields_names):
    if not line:
      return "columns", f"an empty line, expected {len(fields_names)} fields"
    what = "label, I1-I13, C1-C26" if labelled else "I1-I13, C1-C26"
    plural = "s" * (len(fields) != 1)
    return "columns", (f"has {len(fields)} field{plural}, expected {len(fields_names)} "
                       f"({what})")
  for name, token in zip(fields_names, fields):
    if name == "label":
      if token not in (b"0", b"1"):
        return name, f"{_show(token)} is not 0 or 1"
    elif name[0] == "I":
      if token and not _INTEGER.fullmatch(token):
        return name, f"{_show(token)} is not an integer"
      if token and not _fits_int64(token):
        return name, f"{_show(token)} is out of the 64-bit integer range"
    elif token and not _HEX8.fullmatch(token):
      return name, f"{_show(token)} is not 8 hex digits"
  return None


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


def _chunks(column) -> list:
  return column.chunks if hasattr(column, "chunks") else [column]


def _buffers(arr) -> tuple[np.ndarray, np.ndarray]:
  """(offsets [n + 1], bytes) of a pyarrow binary array."""
  bufs = arr.buffers()
  offsets = np.frombuffer(bufs[1], np.int32, len(arr) + 1, arr.offset * 4)
  data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
  return offsets, data


def _concat(parts: list, dtype) -> np.ndarray:
  return np.concatenate(parts) if parts else np.zeros(0, dtype)


def decode_hex(column) -> tuple[np.ndarray, np.ndarray]:
  """8-hex-digit tokens of a pyarrow binary column -> (uint32 values, bad mask).

  Empty tokens are missing values (-> 0). Anything but 0 or 8 hex digits is
  bad. Vectorised over all values of the column (see `_hex8`).
  """
  values, bads = [], []
  for arr in _chunks(column):
    n = len(arr)
    offsets, data = _buffers(arr)
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
  return _concat(values, np.uint32), _concat(bads, bool)


def _decode_label(column) -> tuple[np.ndarray, np.ndarray]:
  """Label tokens of a pyarrow binary column -> (uint8 values, bad mask): "0" or "1" only."""
  values, bads = [], []
  for arr in _chunks(column):
    offsets, data = _buffers(arr)
    one_byte = np.diff(offsets) == 1
    value = np.zeros(len(arr), np.uint8)
    value[one_byte] = data[offsets[:-1][one_byte]] - np.uint8(48)  # wraps below '0'
    bad = ~one_byte | (value > 1)
    value[bad] = 0
    values.append(value)
    bads.append(bad)
  return _concat(values, np.uint8), _concat(bads, bool)


def _integer_suspects(column) -> np.ndarray:
  """Integer tokens of a binary column (its bytes those of `_ALLOWED`) that may break the
  integer rule: a byte other than a digit or a leading '-', a lone '-', or 19 characters
  or more (the 64-bit range is left to `line_error`)."""
  out = []
  for arr in _chunks(column):
    offsets, data = _buffers(arr)
    n, lengths = len(arr), np.diff(offsets)
    seg = data[offsets[0]:offsets[-1]]
    start = np.zeros(len(seg), bool)
    start[(offsets[:-1] - offsets[0])[lengths > 0]] = True
    odd = ((seg - np.uint8(48)) >= 10) & ~((seg == 45) & start)
    suspect = lengths >= 19
    suspect[np.repeat(np.arange(n), lengths)[odd]] = True
    lone = np.flatnonzero(lengths == 1)
    suspect[lone[seg[offsets[lone] - offsets[0]] == 45]] = True
    out.append(suspect)
  return _concat(out, bool)


def _read_csv(data: bytes, types: dict, threads: bool, wrong: list):
  """pyarrow parse of TAB-separated lines; rows with a wrong field count are skipped and
  counted in `wrong` (the caller's bytes are ASCII, so pyarrow can show them)."""
  import pyarrow as pa
  from pyarrow import csv as pacsv

  def on_invalid(row):
    wrong.append(row.number)
    return "skip"

  return pacsv.read_csv(
      pa.py_buffer(data),
      read_options=pacsv.ReadOptions(column_names=list(types), use_threads=threads,
                                     block_size=1 << 20),
      parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False,
                                       escape_char=False, newlines_in_values=False,
                                       ignore_empty_lines=False, invalid_row_handler=on_invalid),
      convert_options=pacsv.ConvertOptions(column_types=types, check_utf8=False,
                                           null_values=[""], strings_can_be_null=False,
                                           quoted_strings_can_be_null=False))


def _types(labelled: bool, text: bool) -> dict:
  """pyarrow types of the fields: the integers as int64, or every field as binary (text)."""
  import pyarrow as pa

  return {name: pa.int64() if name[0] == "I" and not text else pa.binary()
          for name in names(labelled)}


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
  return _concat(parts, column.type.to_pandas_dtype())


def _typed(body: bytes, labelled: bool, threads: bool) -> Block | None:
  """The rows of a block whose lines are all good (bytes of `_ALLOWED` only, no CR);
  None where any line is not (the strict path then finds which)."""
  import pyarrow as pa

  wrong: list = []
  try:
    table = _read_csv(body, _types(labelled, text=False), threads, wrong)
  except pa.ArrowInvalid:  # A field that does not convert: not an integer, out of range.
    return None
  if wrong:
    return None
  n = table.num_rows
  label = np.zeros(n, np.uint8)
  if labelled:
    label, bad = _decode_label(table.column("label"))
    if bad.any():
      return None
  raw = np.empty((n, NUM_SPARSE), np.uint32)
  for j in range(NUM_SPARSE):
    raw[:, j], bad = decode_hex(table.column(f"C{j + 1}"))
    if bad.any():
      return None
  dense = np.empty((n, NUM_DENSE), np.float32)
  for j in range(NUM_DENSE):
    x = _filled(table.column(f"I{j + 1}"), 0)
    dense[:, j] = np.log1p(np.maximum(x, 0).astype(np.float64))
  return Block(label=label, dense=dense, raw=raw, lines=0, bad=[])


def _strict(data: bytes, lines: int, labelled: bool, skip_bad_lines: bool,
            threads: bool) -> Block:
  """Every bad line of a block (`line_error` on each line the screens below flag), and
  with `skip_bad_lines` the rows of the others; without, no rows."""
  raw_lines = data.split(b"\n")
  if data.endswith(b"\n"):
    raw_lines.pop()
  tabs = len(names(labelled)) - 1
  bad: dict[int, tuple[str, str]] = {}
  kept: list[int] = []  # lines whose bytes and field count are right
  for i, line in enumerate(raw_lines):
    body = line[:-1] if line.endswith(b"\r") else line
    raw_lines[i] = body
    if body.count(b"\t") != tabs or body.translate(None, _LINE_BYTES):
      bad[i + 1] = line_error(body, labelled)
    else:
      kept.append(i)
  if kept:  # The field rules, vectorised over the kept lines, flag the suspects.
    wrong: list = []
    table = _read_csv(b"\n".join(raw_lines[i] for i in kept), _types(labelled, True),
                      threads, wrong)
    if wrong or table.num_rows != len(kept):
      raise RuntimeError("internal error: the text parse of screened lines lost rows")
    suspect = np.zeros(len(kept), bool)
    for name in table.column_names:
      column = table.column(name)
      suspect |= (_decode_label(column)[1] if name == "label" else
                  _integer_suspects(column) if name[0] == "I" else decode_hex(column)[1])
    for r in np.flatnonzero(suspect):
      error = line_error(raw_lines[kept[r]], labelled)
      if error is not None:
        bad[kept[r] + 1] = error
  if None in bad.values():
    raise RuntimeError("internal error: a screened line breaks no rule of the grammar")
  report = [(line, field, message) for line, (field, message) in sorted(bad.items())]
  good = [raw_lines[i] for i in kept if i + 1 not in bad]
  if (report and not skip_bad_lines) or not good:
    return _empty_block(lines, report)
  block = _typed(b"\n".join(good), labelled, threads)
  if block is None or len(block.label) != len(good):
    raise RuntimeError("internal error: lines found good do not parse")
  block.lines, block.bad = lines, report
  return block


def parse_block(data: bytes, *, skip_bad_lines: bool = False, threads: bool = False,
                labelled: bool = True) -> Block:
  """Parses whole raw lines (docs/criteo.md's grammar). Bad lines are listed in
  `Block.bad`, one each, never dropped silently.

  With `skip_bad_lines` the returned arrays hold the good rows only; without,
  a block with bad lines returns its bad lines and no rows (the caller stops).
  `labelled=False` reads lines of 39 fields, without the label (label 0).
  """
  lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
  if not data:
    return _empty_block(0, [])
  body = data
  if b"\r" in body:  # CRLF line ends (and a CR at the end of the last line) are dropped.
    body = body.replace(b"\r\n", b"\n")
    body = body[:-1] if body.endswith(b"\r") else body
  # pyarrow reads an empty line as a row of empty fields: such blocks go the strict way.
  if not body.translate(None, _ALLOWED) and b"\n\n" not in body and body[:1] != b"\n":
    block = _typed(body, labelled, threads)
    if block is not None:
      block.lines = lines
      return block
  return _strict(data, lines, labelled, skip_bad_lines, threads)


def _empty_block(lines: int, bad) -> Block:
  return Block(label=np.zeros(0, np.uint8), dense=np.zeros((0, NUM_DENSE), np.float32),
               raw=np.zeros((0, NUM_SPARSE), np.uint32), lines=lines, bad=list(bad))
