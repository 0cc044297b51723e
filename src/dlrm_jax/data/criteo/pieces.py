"""Pieces of raw input files (byte ranges aligned on lines; a .gz file is one piece), read
as blocks of whole lines, so that workers can parse one file in parallel."""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
from typing import Callable, Iterator


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


def read_blocks(piece: Piece, block_bytes: int, hasher, count_bytes: Callable[[int], None]
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


def count_lines(path: str, stop: int) -> int:
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


def plan_pieces(index: int, path: str, piece_bytes: int) -> list[Piece]:
  """The pieces of input file number `index`: about `piece_bytes` each, or one for a .gz file."""
  size = os.path.getsize(path)
  if _is_gz(path):
    return [Piece(index, 0, path, 0, size, True)]
  n = max(1, math.ceil(size / piece_bytes))
  bounds = [size * k // n for k in range(n + 1)]
  return [Piece(index, k, path, bounds[k], bounds[k + 1], False) for k in range(n)]
