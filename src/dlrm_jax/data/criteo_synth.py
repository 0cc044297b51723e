"""Raw Criteo-format click logs, generated: for tests and benchmarks of the real-data path.

The files look like Criteo's own (TAB-separated `label, I1..I13, C1..C26`, no
header): dense counts that are heavy-tailed, sometimes missing and sometimes
negative; categorical values as 8 lowercase hex digits drawn from Zipf-like
per-feature vocabularies that include values >= 0x80000000; some missing
fields. Bad lines of each documented kind can be injected at chosen lines.
"""

from __future__ import annotations

import gzip
import os
from typing import Mapping, Sequence

import numpy as np

NUM_DENSE = 13
NUM_SPARSE = 26

# Kinds of bad line `write_raw` can inject, with the field the error names.
BAD_KINDS = ("columns", "hex", "dense", "label")


def _vocabularies(rng: np.random.Generator, sizes: Sequence[int]) -> list[np.ndarray]:
  """Per-feature distinct 32-bit values, half of them >= 0x80000000."""
  return [rng.choice(2**32, size=int(n), replace=False).astype(np.uint64) for n in sizes]


def default_vocab_sizes(scale: int = 1000) -> list[int]:
  """Cardinalities with Criteo's spread: a few huge features, many small ones."""
  base = [1460, 583, 10_000, 2_000, 305, 24, 1_251, 633, 3, 931, 568, 8_351, 319,
          27, 1_499, 5_461, 10, 565, 217, 4, 7_046, 18, 15, 2_861, 105, 1_425]
  return [max(2, min(b, scale * 10)) for b in base]


def generate_rows(num_rows: int, *, seed: int = 0, vocab_sizes: Sequence[int] | None = None,
                  missing_rate: float = 0.15, negative_rate: float = 0.02,
                  zipf_exponent: float = 1.1) -> list[list[str]]:
  """`num_rows` rows of Criteo fields (strings; "" for missing), clean."""
  rng = np.random.default_rng(seed)
  sizes = list(vocab_sizes) if vocab_sizes is not None else default_vocab_sizes()
  vocab = _vocabularies(np.random.default_rng([seed, 1]), sizes)
  n = int(num_rows)
  label = (rng.random(n) < 0.25).astype(np.int64)
  counts = np.maximum(np.floor(np.exp(rng.normal(1.5, 1.8, (n, NUM_DENSE)))).astype(np.int64) - 1, 0)
  negative = rng.random((n, NUM_DENSE)) < negative_rate
  counts = np.where(negative, -rng.integers(1, 4, (n, NUM_DENSE)), counts)
  dense_missing = rng.random((n, NUM_DENSE)) < missing_rate
  cols: list[np.ndarray] = [label.astype(str)]
  for j in range(NUM_DENSE):
    cols.append(np.where(dense_missing[:, j], "", counts[:, j].astype(str)))
  sparse_missing = rng.random((n, NUM_SPARSE)) < missing_rate
  for j, values in enumerate(vocab):
    u = rng.random(n)
    size = len(values)
    # Bounded power law over ranks, as SyntheticCTR draws ids.
    top = np.power(size + 1.0, 1.0 - zipf_exponent)
    rank = np.floor(np.power(1.0 + u * (top - 1.0), 1.0 / (1.0 - zipf_exponent))).astype(np.int64) - 1
    rank = np.clip(rank, 0, size - 1)
    hexes = np.array([f"{int(v):08x}" for v in values])
    cols.append(np.where(sparse_missing[:, j], "", hexes[rank]))
  return [list(r) for r in zip(*(c.tolist() for c in cols))]


def corrupt(fields: list[str], kind: str) -> tuple[list[str], str]:
  """A bad version of a row's fields, and the field the error must name."""
  fields = list(fields)
  if kind == "columns":
    return fields[:-1], "columns"
  if kind == "hex":
    fields[1 + NUM_DENSE + 4] = "zz12ab34"
    return fields, "C5"
  if kind == "dense":
    fields[1 + 2] = "1.5"
    return fields, "I3"
  if kind == "label":
    fields[0] = "2"
    return fields, "label"
  raise ValueError(f"bad line kind {kind!r} is not one of {BAD_KINDS}")


def write_raw(path: str, num_rows: int, *, seed: int = 0, bad_lines: Mapping[int, str] | None = None,
              vocab_sizes: Sequence[int] | None = None, missing_rate: float = 0.15,
              negative_rate: float = 0.02, compress: bool | None = None) -> dict[int, str]:
  """Writes a raw Criteo-format file of `num_rows` lines (gzipped if `path` ends in .gz).

  `bad_lines` maps 1-based line numbers to a kind in BAD_KINDS; those lines are
  corrupted (the file still has `num_rows` lines). Returns {line: field named}
  for the bad lines.
  """
  rows = generate_rows(num_rows, seed=seed, vocab_sizes=vocab_sizes, missing_rate=missing_rate,
                       negative_rate=negative_rate)
  named = {}
  for line, kind in (bad_lines or {}).items():
    rows[line - 1], named[line] = corrupt(rows[line - 1], kind)
  text = "".join("\t".join(r) + "\n" for r in rows).encode()
  gz = path.endswith(".gz") if compress is None else compress
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if gz:
    with gzip.open(path, "wb", compresslevel=1) as f:
      f.write(text)
  else:
    with open(path, "wb") as f:
      f.write(text)
  return named


def expected_rows(path: str, *, skip_bad_lines: bool = False):
  """Straightforward per-row parse of a raw file: a list of (line, label, dense, raw32).

  The reference's rules, one row at a time in plain Python: missing -> 0,
  dense negatives -> 0, log(1 + x); categorical hex -> int (missing -> 0).
  Bad lines raise ValueError unless `skip_bad_lines`.
  """
  import math

  opener = gzip.open if path.endswith(".gz") else open
  out = []
  with opener(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      fields = raw.rstrip(b"\n").decode().split("\t")
      try:
        if len(fields) != 1 + NUM_DENSE + NUM_SPARSE:
          raise ValueError("columns")
        if fields[0] not in ("0", "1"):
          raise ValueError("label")
        label = int(fields[0])
        dense = []
        for t in fields[1:1 + NUM_DENSE]:
          if t and not (t.lstrip("-").isdigit() and t.count("-") <= 1 and not t.endswith("-")):
            raise ValueError("dense")
          v = int(t) if t else 0
          dense.append(math.log1p(max(v, 0)))
        cats = []
        for t in fields[1 + NUM_DENSE:]:
          if t and (len(t) != 8 or any(c not in "0123456789abcdefABCDEF" for c in t)):
            raise ValueError("hex")
          cats.append(int(t, 16) if t else 0)
      except ValueError:
        if skip_bad_lines:
          continue
        raise
      out.append((number, label, dense, cats))
  return out
