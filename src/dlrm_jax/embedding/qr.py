"""Quotient-remainder tables: one feature's table as two smaller ones.

The compositional embeddings of Shi et al. (2020), the reference's `--qr-flag`,
`--qr-collisions`, `--qr-operation` and `--qr-threshold`: a feature whose table
has n rows, n > threshold, gets a quotient table of ceil(n / c) rows looked up
at id // c and a remainder table of min(c, n) rows looked up at id % c (c the
collisions), and its vector is the two rows combined:

  mult    q * r (element-wise), D wide        add     q + r, D wide
  concat  [q, r], each half D / 2 wide, so the feature's vector is D wide

Tables at or below the threshold stay as they are for mult and add. For concat,
where every table then has D / 2 columns, such a table is the pair with c = n: a
remainder table with a row per id and a quotient table of a single row, which
makes every feature's vector D wide (the reference instead requires the bottom
MLP to end in 2 D and leaves small tables at D, which its interaction then
cannot take; here `arch_sparse_feature_size` is the combined width, as the
bottom MLP's output, in every case).

The pairs are ordinary tables of the collection (named `tNq`, `tNr`): the
planner places them, the sparse optimisers update both, checkpoints hold them.
`QRTables.split` turns a batch's ids (and per-id weights and masks) into the
tables' ids, `combine` the looked-up [B, tables, D'] into [B, features, D].
Differences from the reference: each table is initialised uniformly in
+-sqrt(1 / its own rows), as every table here, where the reference draws both
halves of a pair from the feature's full row count.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

from dlrm_jax.embedding.collection import TableSpec

OPERATIONS = ("mult", "add", "concat")


class QRTables:
  """The tables of features under quotient-remainder (or none: `enabled` False)."""

  def __init__(self, table_rows: Sequence[int], hotness: Sequence[int], dim: int, *,
               enabled: bool = False, collisions: int = 4, operation: str = "mult",
               threshold: int = 200, dims: Sequence[int] | None = None):
    """`dims`: the width of each feature's plain table (mixed-dimension tables,
    dlrm_jax.embedding.mixed); None: D for all."""
    self.feature_rows, self.feature_hotness = tuple(table_rows), tuple(hotness)
    self.enabled, self.operation = enabled, operation
    self.collisions = []  # per feature: c, or None for a plain table
    for n in table_rows:
      if not enabled:
        self.collisions.append(None)
      elif n > threshold:
        self.collisions.append(int(collisions))
      else:
        self.collisions.append(int(n) if operation == "concat" else None)
    self.table_dim = dim // 2 if enabled and operation == "concat" else dim
    names, rows, hot, widths = [], [], [], []
    for f, (n, h, c) in enumerate(zip(table_rows, hotness, self.collisions)):
      if c is None:
        names.append(f"t{f}")
        rows.append(int(n))
        hot.append(int(h))
        widths.append(self.table_dim if dims is None else int(dims[f]))
      else:
        names += [f"t{f}q", f"t{f}r"]
        rows += [math.ceil(n / c), min(c, int(n))]
        hot += [int(h), int(h)]
        widths += [self.table_dim] * 2
    self.table_names, self.table_rows, self.table_hotness = names, rows, hot
    self.table_dims = widths

  def table_specs(self, pooling: str = "sum") -> list[TableSpec]:
    """The tables, in order (a feature's pair side by side)."""
    return [TableSpec(name, rows, d, pooling, hotness=h) for name, rows, d, h in zip(
        self.table_names, self.table_rows, self.table_dims, self.table_hotness)]

  @classmethod
  def from_config(cls, config, hotness: Sequence[int] | None = None) -> "QRTables":
    """The tables of a config (a ConfigDict or its JSON; fields it lacks: the defaults),
    mixed-dimension widths included."""
    from dlrm_jax.config import parse_widths
    from dlrm_jax.embedding.mixed import dims_from_config

    rows = parse_widths("arch_embedding_size", config["arch_embedding_size"])
    get = lambda key, default: config[key] if key in config else default
    return cls(rows, hotness or [1] * len(rows), int(config["arch_sparse_feature_size"]),
               enabled=bool(get("qr_flag", False)), collisions=int(get("qr_collisions", 4)),
               operation=str(get("qr_operation", "mult")),
               threshold=int(get("qr_threshold", 200)), dims=dims_from_config(config))

  def split(self, batch: dict) -> dict:
    """A batch with "sparse" (flat [B, sum hotness], or padded [B, F, H]) and its optional
    "sparse_weights" and "sparse_mask" for the features -> the same for the tables."""
    if not self.enabled:
      return batch
    ids = batch["sparse"]
    padded = ids.ndim == 3
    starts = [0]
    for h in self.feature_hotness:
      starts.append(starts[-1] + (1 if padded else h))

    def columns(x, f):
      a, b = starts[f], starts[f + 1]
      return x[:, a:b] if x.ndim == 2 else x[:, a:b, :]

    out_ids, keep = [], []  # keep[f]: how many blocks of feature f's columns
    for f, c in enumerate(self.collisions):
      block = columns(ids, f)
      if c is None:
        out_ids.append(block)
        keep.append(1)
      else:
        out_ids += [jnp.where(block >= 0, block // c, block),
                    jnp.where(block >= 0, block % c, block)]
        keep.append(2)
    out = dict(batch, sparse=jnp.concatenate(out_ids, axis=1))
    for name in ("sparse_weights", "sparse_mask"):
      if name in batch:
        x = batch[name]
        out[name] = jnp.concatenate([columns(x, f) for f in range(len(keep))
                                     for _ in range(keep[f])], axis=1)
    return out

  def combine(self, emb):
    """Looked-up vectors [B, tables, D'] -> [B, features, D]."""
    if not self.enabled:
      return emb
    vectors, j = [], 0
    for c in self.collisions:
      if c is None:
        vectors.append(emb[:, j])
        j += 1
        continue
      q, r = emb[:, j], emb[:, j + 1]
      j += 2
      if self.operation == "mult":
        vectors.append(q * r)
      elif self.operation == "add":
        vectors.append(q + r)
      else:
        vectors.append(jnp.concatenate([q, r], axis=-1))
    return jnp.stack(vectors, axis=1)
