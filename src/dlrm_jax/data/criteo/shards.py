"""Parsing one piece into its own shard files: the worker task of prepare's first stage."""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from functools import partial

import numpy as np

from dlrm_jax.data import format as fmt
from dlrm_jax.data.criteo.parse import BadLineError, InputError, parse_block
from dlrm_jax.data.criteo.pieces import Piece, count_lines, read_blocks
from dlrm_jax.data.format import NUM_DENSE, NUM_SPARSE
from dlrm_jax.data.workers import add_count


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


def _input_blocks(piece: Piece, block_bytes: int, hasher):
  """`read_blocks`, with the input's read errors (a truncated or corrupt .gz, a read that
  fails) as InputError; errors of the output are left as they are."""
  blocks = read_blocks(piece, block_bytes, hasher, partial(add_count, 1))
  lines = 0
  while True:
    try:
      data, offset = next(blocks)
    except StopIteration:
      return
    except EOFError as e:
      raise InputError(f"{piece.path}: truncated gzip file ({e}); {lines} lines were read "
                       "before the end. The file is incomplete: download or copy it again."
                       ) from None
    except (zlib.error, gzip.BadGzipFile) as e:
      raise InputError(f"{piece.path}: corrupt gzip data after {lines} lines ({e}).") from None
    except OSError as e:
      raise InputError(f"{piece.path}: cannot be read ({e.strerror or e}).") from None
    lines += data.count(b"\n")
    yield data, offset


def piece_task(piece: Piece, cfg: dict) -> dict:
  """Parses one piece into its shards; returns its record (rows, shards, bad lines, checksum)."""
  hasher = hashlib.sha256()
  moduli = None if cfg["moduli"] is None else np.asarray(cfg["moduli"], np.uint32)
  sparse_dtype = np.int32 if cfg["categorical"] == "hash" else np.uint32
  writer = _PieceWriter(cfg["output"], piece.name, cfg["shard_rows"], sparse_dtype)
  lines_before, rows, bad_count, examples = 0, 0, 0, []
  line_base: list[int] = []

  def line_number(local: int) -> int:
    if piece.gz or piece.start == 0:
      return lines_before + local
    if not line_base:  # Lines before this piece, counted only when an error needs them.
      line_base.append(count_lines(piece.path, first_line_offset[0]))
    return line_base[0] + lines_before + local

  first_line_offset = [piece.start]
  try:
    for data, offset in _input_blocks(piece, cfg["block_bytes"], hasher):
      if lines_before == 0 and offset >= 0:
        first_line_offset[0] = offset
      block = parse_block(data, skip_bad_lines=cfg["skip_bad_lines"], threads=cfg["threads"])
      if block.bad:
        if not cfg["skip_bad_lines"]:
          local, field, message = block.bad[0]
          raise BadLineError(piece.path, line_number(local), field, message)
        bad_count += len(block.bad)
        for local, field, message in block.bad[:max(0, 20 - len(examples))]:
          examples.append(f"{piece.path}:{line_number(local)}: {field}: {message}")
      raw = block.raw
      if moduli is not None:
        raw = raw % moduli
      sparse = raw.astype(np.int32) if sparse_dtype == np.int32 else raw
      writer.append(block.label, block.dense, sparse)
      lines_before += block.lines
      rows += len(block.label)
      add_count(0, len(block.label))
    writer.close()
  except BaseException:
    writer.abort()
    raise
  if piece.gz and lines_before == 0:
    raise InputError(f"{piece.path}: empty file (the gzip stream holds no lines).")
  return {"piece": piece.name, "file": piece.file, "start": piece.start, "end": piece.end,
          "parts": writer.parts, "rows": rows, "lines": lines_before, "bad_lines": bad_count,
          "bad_examples": examples, "sha256": hasher.hexdigest()}
