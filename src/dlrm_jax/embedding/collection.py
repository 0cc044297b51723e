"""Embedding tables as their own pytree, stacked into one array per width.

All tables of a collection that share an embedding width are stored in one
`[total_rows, D]` array with per-table row offsets, so that one gather serves
every table (as FBGEMM's table-batched embeddings do) and one scatter applies
the sparse optimiser update to all of them.

Out-of-range ids: XLA clamps an out-of-range gather index and silently drops an
out-of-range scatter update, and `jnp.take` fills NaN by default. None of that
is acceptable for training data, so ids are checked on the host at the data
boundary (`EmbeddingCollection.check_ids`, called by the training loop on every
batch) and an id outside its table raises `IdOutOfRangeError` naming the
feature, the sample and the value. Inside the jitted step ids are trusted.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlrm_jax.embedding.bags import Bags, batch_bags, pool as pool_bags
from dlrm_jax.embedding.mixed import split_width_key, width_key
from dlrm_jax.ops import take_static


class IdOutOfRangeError(ValueError):
  """A categorical id is negative or not smaller than its table's row count."""


POOLINGS = ("sum", "mean")
# embedding_dtype -> the tables' storage type. Lookups return float32 vectors and the
# optimiser state is float32 whatever the storage; 16-bit tables get the update rounded
# stochastically (dlrm_jax.embedding.optimizers.subtract_rows).
STORAGE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# A 16-bit table of even width is stored packed, two values in each 32-bit element
# ([rows, D / 2]; the 32-bit type names the 16-bit one): XLA:CPU updates rows of a 32-bit
# array in place but copies a whole 16-bit array to scatter rows into it, which made
# 16-bit tables slower and larger in memory than float32 ones (benchmarks/RESULTS.md).
# `pack` / `unpack` convert (on device or host); lookups and updates unpack the rows
# they touch, and `to_arrays` / `from_arrays` deal in plain [rows, D] 16-bit arrays.
PACKED = {np.dtype(jnp.bfloat16): np.dtype(np.uint32), np.dtype(jnp.float16): np.dtype(np.int32)}
UNPACKED = {v: k for k, v in PACKED.items()}
INIT_BLOCK_ROWS = 1 << 18  # rows initialised at a time (EmbeddingCollection.init_blocked)


def is_packed(x) -> bool:
  """Whether a table array (or its shape struct) holds packed 16-bit values."""
  return np.dtype(x.dtype) in UNPACKED


def value_dtype(x) -> np.dtype:
  """The type of a table's values: its own, or the 16-bit type packed in it."""
  return UNPACKED.get(np.dtype(x.dtype), np.dtype(x.dtype))


def value_shape(x) -> tuple[int, ...]:
  """A table's shape in values ([rows, D] for a packed [rows, D / 2])."""
  return (*x.shape[:-1], 2 * x.shape[-1]) if is_packed(x) else tuple(x.shape)


def pack(x):
  """16-bit values [..., C] (C even) -> [..., C / 2] 32-bit elements (numpy or JAX)."""
  if isinstance(x, np.ndarray):
    return np.ascontiguousarray(x).view(PACKED[x.dtype])
  pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
  return jax.lax.bitcast_convert_type(pairs, PACKED[np.dtype(x.dtype)])


def unpack(x):
  """The inverse of `pack`; any other array as it is."""
  if not is_packed(x):
    return x
  if isinstance(x, np.ndarray):
    return np.ascontiguousarray(x).view(UNPACKED[x.dtype])
  pairs = jax.lax.bitcast_convert_type(x, UNPACKED[np.dtype(x.dtype)])
  return pairs.reshape(*x.shape[:-1], 2 * x.shape[-1])


@dataclasses.dataclass(frozen=True)
class TableSpec:
  """One embedding table: `rows` vectors of width `dim` for one feature.

  Attributes:
    name: the table's name (shown in errors).
    rows: number of rows (ids are in [0, rows)).
    dim: embedding width.
    pooling: how a multi-hot bag of ids becomes one vector: "sum" or "mean"
      (of the weighted vectors, over the ids present).
    init_scale: rows start U(-init_scale, init_scale); None means the
      reference's sqrt(1 / rows).
    hotness: ids per sample of its feature in flat batches ([B, sum of the
      tables' hotness], `dlrm_jax.embedding.bags`); "mean" divides by it.
  """

  name: str
  rows: int
  dim: int
  pooling: str = "sum"
  init_scale: float | None = None
  hotness: int = 1

  def __post_init__(self):
    if self.rows <= 0 or self.dim <= 0:
      raise ValueError(f"table {self.name!r}: rows={self.rows} and dim={self.dim} must be >= 1")
    if self.hotness < 1:
      raise ValueError(f"table {self.name!r}: hotness={self.hotness} must be >= 1")
    if self.pooling not in POOLINGS:
      raise ValueError(f"table {self.name!r}: pooling={self.pooling!r} is not one of {POOLINGS}")

  @property
  def init_bound(self) -> float:
    """Rows are U(-bound, bound); the reference's bound is sqrt(1 / rows)."""
    return float(np.sqrt(1.0 / self.rows)) if self.init_scale is None else float(self.init_scale)


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
  """A sequence feature: per-sample sequences of ids of table `table` (a table's name),
  looked up without pooling (one vector per position; `dlrm_jax.embedding.bags`)."""

  name: str
  table: str


Tables = dict[str, jax.Array]


class EmbeddingCollection:
  """Static description of a set of tables, one per categorical feature.

  The tables themselves are a pytree (`Tables`: group name -> stacked array)
  created by `init` and passed explicitly to `lookup` and to the optimisers;
  `dtype` (a value of STORAGE_DTYPES) is their storage type. `sequences` are
  the sequence features, each reading one of the tables (`SequenceSpec`).
  """

  def __init__(self, specs: Sequence[TableSpec], dtype=jnp.float32,
               sequences: Sequence[SequenceSpec] = ()):
    if not specs:
      raise ValueError("an embedding collection needs at least one table")
    self.specs = tuple(specs)
    self.sequences = tuple(sequences)
    names = [s.name for s in self.specs]
    for seq in self.sequences:
      if seq.table not in names:
        raise ValueError(f"sequence feature {seq.name!r} reads table {seq.table!r}, which is "
                         f"not one of the tables {names}")
    if len({seq.name for seq in self.sequences}) != len(self.sequences):
      raise ValueError(f"sequence feature names repeat: {[q.name for q in self.sequences]}")
    self.sequence_tables = tuple(names.index(seq.table) for seq in self.sequences)
    self.dtype = jnp.dtype(dtype)
    if self.dtype not in [jnp.dtype(d) for d in STORAGE_DTYPES.values()]:
      raise ValueError(f"table storage dtype {self.dtype} is not one of {tuple(STORAGE_DTYPES)}")
    # Tables may differ in width (mixed-dimension tables, dlrm_jax.embedding.mixed): those
    # of one width are stacked together, and lookups give vectors `dim` = the widest
    # table's width wide, the narrower ones zero-padded to it.
    self.dims = np.array([s.dim for s in specs], np.int64)
    self.dim = int(self.dims.max())
    self.widths = tuple(sorted({int(d) for d in self.dims}, reverse=True))
    # Packed storage (see PACKED): 16-bit values of an even width.
    self.packed = self.packs(self.dim)
    self.hotness = tuple(s.hotness for s in specs)
    rows = np.array([s.rows for s in specs], dtype=np.int64)
    self.rows = rows
    self.offsets = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
    self.total_rows = int(rows.sum())
    if self.total_rows >= 2**31:
      raise ValueError(
          f"{self.total_rows:,} rows in total do not fit int32 row indices; "
          "split the tables over several collections")
    self._of_width: dict[int, EmbeddingCollection] = {}

  def packs(self, width: int) -> bool:
    """Whether tables (or slices) `width` values wide are stored packed (see PACKED)."""
    return self.dtype.itemsize == 2 and width % 2 == 0

  def features_of(self, width: int) -> list[int]:
    """The tables `width` values wide, in order."""
    return [t for t, d in enumerate(self.dims) if d == width]

  def of_width(self, width: int) -> "EmbeddingCollection":
    """A collection of just the tables `width` values wide (their own stacked array)."""
    if width not in self._of_width:
      self._of_width[width] = (self if self.widths == (width,) else EmbeddingCollection(
          [self.specs[t] for t in self.features_of(width)], self.dtype))
    return self._of_width[width]

  @classmethod
  def uniform(cls, table_rows: Sequence[int], dim: int, pooling: str = "sum",
              hotness: int | Sequence[int] = 1, dtype=jnp.float32) -> "EmbeddingCollection":
    """One table per feature, named t0, t1, ..., with the given row counts and the
    hotness of each (or one for all), stored as `dtype`."""
    hot = [hotness] * len(table_rows) if isinstance(hotness, int) else list(hotness)
    if len(hot) != len(table_rows):
      raise ValueError(f"{len(hot)} hotness values for {len(table_rows)} tables")
    return cls([TableSpec(f"t{i}", int(r), dim, pooling, hotness=int(h))
                for i, (r, h) in enumerate(zip(table_rows, hot))], dtype)

  @property
  def num_tables(self) -> int:
    return len(self.specs)

  @property
  def nbytes(self) -> int:
    return int((self.rows * self.dims).sum()) * self.dtype.itemsize

  def init(self, seed: int | jax.Array) -> Tables:
    """Fresh tables, each row U(-sqrt(1/rows), sqrt(1/rows)) of its own table.

    Every value is a counter-based hash of (seed, row, column), so a table is
    the same whatever the device layout it is created in, and it can be
    created in place, shard by shard, under `jax.jit` with output shardings.
    (jax.random's threefry takes XLA:CPU seconds to compile per call and
    would give layout-dependent values under some partitionings.) The row is
    the table's offset plus its own row, whatever the tables' widths.
    """
    out = {}
    for w in self.widths:
      part = self.of_width(w)
      starts = jnp.asarray(part.offsets.astype(np.int32))
      firsts = jnp.asarray(self.offsets[self.features_of(w)].astype(np.int32))

      def row_info(rows, starts=starts, firsts=firsts):
        t = jnp.clip(jnp.searchsorted(starts, rows, side="right") - 1, 0)
        return firsts[t] + rows - starts[t], None

      out[self.key(w)] = self.init_blocked(
          seed, part.total_rows, (lambda rows: (rows, None)) if part is self else row_info,
          jnp.arange(w, dtype=jnp.uint32), packed=self.packs(w))
    return out

  def key(self, width: int, name: str = "stacked") -> str:
    """The key of the stacked array (or quantised set's array `name`) of a width."""
    return width_key(name, width, self.dim)

  def tables_of(self, tables: Tables, width: int) -> Tables:
    """The arrays of one width of a table set, under their plain names."""
    out = {}
    for k, v in tables.items():
      name, w = split_width_key(k, self.dim)
      if w == width:
        out[name] = v
    return out

  def init_blocked(self, seed: int | jax.Array, num_rows: int,
                   row_info: Callable[[jax.Array], tuple[jax.Array, jax.Array | None]],
                   cols: jax.Array, block_rows: int | None = None,
                   packed: bool | None = None) -> jax.Array:
    """`init_rows` of rows 0..num_rows-1, `block_rows` at a time, into one [num_rows, C] array
    of the storage dtype (each block rounded to it; `store(..., packed)`).

    `row_info(local_rows)` gives (stacked rows, valid) as `init_rows` takes
    them; `block_rows` defaults to INIT_BLOCK_ROWS. Computing block by block
    keeps the per-row temporaries (row numbers, table indices, bounds) at one
    block's size instead of the whole table's.
    """
    block = max(1, min(block_rows or INIT_BLOCK_ROWS, num_rows))

    def values(start):
      rows, valid = row_info(start + jnp.arange(block, dtype=jnp.int32))
      return self.store(self.init_rows(seed, rows, cols, valid), packed)

    first = values(0)
    if block == num_rows:
      return first

    def body(i, out):  # The last block is shifted back to end at num_rows: its
      start = jnp.minimum(i * block, num_rows - block)  # overlap gets the same values.
      return jax.lax.dynamic_update_slice(out, values(start), (start, 0))

    out = jnp.zeros((num_rows, first.shape[1]), first.dtype)
    varying = tuple(getattr(jax.typeof(first), "vma", ()))  # inside shard_map: per device
    if varying:
      out = jax.lax.pcast(out, varying, to="varying")
    out = jax.lax.dynamic_update_slice(out, first, (0, 0))
    return jax.lax.fori_loop(1, -(-num_rows // block), body, out)

  def store(self, values, packed: bool | None = None):
    """Values [..., C] (numpy or JAX) as the tables store them: the storage dtype
    (rounded to nearest; updates round stochastically), packed in pairs if `packed`
    (None: `self.packed`; a layout whose slices have an odd width stores them unpacked)."""
    values = values.astype(self.dtype)
    return pack(values) if (self.packed if packed is None else packed) else values

  def init_rows(self, seed: int | jax.Array, rows: jax.Array, cols: jax.Array,
                valid: jax.Array | None = None) -> jax.Array:
    """Initial values of stacked rows [R] (int32) at columns [C] -> [R, C].

    Row r of the stacked array belongs to the table whose offset range holds
    it and gets that table's bound; rows where `valid` is False (padding of a
    sharded layout) are zero. Temporaries are per row, never per element.
    """
    offsets = jnp.asarray(self.offsets.astype(np.int32))
    table = jnp.clip(jnp.searchsorted(offsets, rows, side="right") - 1, 0)
    bounds = jnp.asarray(np.array([s.init_bound for s in self.specs], np.float32))
    bound = bounds[table] if valid is None else jnp.where(valid, bounds[table], 0.0)
    values = hash_uniform(jnp.asarray(seed, jnp.uint32), rows.astype(jnp.uint32)[:, None],
                          cols[None, :])
    return values * bound[:, None]

  def from_arrays(self, arrays: Sequence[np.ndarray]) -> Tables:
    """Stacks per-table arrays (e.g. weights trained elsewhere) into our layout."""
    if len(arrays) != self.num_tables:
      raise ValueError(f"expected {self.num_tables} tables, got {len(arrays)}")
    for spec, a in zip(self.specs, arrays):
      if a.shape != (spec.rows, spec.dim):
        raise ValueError(f"table {spec.name}: expected shape {(spec.rows, spec.dim)}, got {a.shape}")
    return {self.key(w): jnp.asarray(self.store(np.concatenate(
        [arrays[t] for t in self.features_of(w)], axis=0), self.packs(w))) for w in self.widths}

  def to_arrays(self, tables: Tables) -> list[np.ndarray]:
    """Splits the stacked storage back into one array per table ([rows, D] values)."""
    out: list[np.ndarray] = [None] * self.num_tables
    for w in self.widths:
      part = self.of_width(w)
      stacked = unpack(np.asarray(tables[self.key(w)]))
      for t, o, r in zip(self.features_of(w), part.offsets, part.rows):
        out[t] = stacked[o:o + r]
    return out

  def bags(self, shape: tuple[int, ...]) -> Bags:
    """The layout of ids of `shape`: flat bags [B, sum(hotness)], one id per feature
    [B, F], or padded bags [B, F, H] (`dlrm_jax.embedding.bags.batch_bags`)."""
    return batch_bags(self.hotness, [s.pooling == "mean" for s in self.specs], tuple(shape))

  def check_ids(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
    """Raises IdOutOfRangeError unless 0 <= id < rows of its table for every id.

    `ids` is [B, sum(hotness)] (flat bags), [B, F] (one id per feature) or
    [B, F, H] (bags padded to H); entries where `mask` ([B, F, H]) is False are
    padding and not checked.
    """
    ids = np.asarray(ids)
    bags = self.bags(ids.shape)
    flat = ids.ndim == 2
    rows = bags.per_column(self.rows)[None, :] if flat else self.rows.reshape(1, -1, 1)
    bad = (ids < 0) | (ids >= rows)
    if mask is not None:
      bad &= np.asarray(mask, bool)
    if bad.any():
      where = tuple(int(i) for i in np.argwhere(bad)[0])
      sample, feature, position = (where[0], int(bags.segments()[where[1]]),
                                   where[1] - int(bags.offsets[bags.segments()[where[1]]])
                                   ) if flat else where
      spec = self.specs[feature]
      position = f", position {position} of its bag" if bags.widths[feature] > 1 else ""
      raise IdOutOfRangeError(
          f"feature {feature} (table {spec.name!r}, {spec.rows} rows) has id "
          f"{int(ids[where])} at sample {sample} of the batch{position} "
          f"({int(bad.sum())} out-of-range ids in this batch); ids must be in [0, {spec.rows})")

  def check_sequence_ids(self, sequences: dict, lengths: dict) -> None:
    """Raises IdOutOfRangeError unless 0 <= id < rows of its table at every position of
    every sequence below its sample's length (`sequences`: name -> ids [B, L];
    `lengths`: name -> [B]), ValueError unless every length is in [0, L]; positions
    from the length on are padding and not checked."""
    for seq, t in zip(self.sequences, self.sequence_tables):
      ids, length = np.asarray(sequences[seq.name]), np.asarray(lengths[seq.name])
      wrong = (length < 0) | (length > ids.shape[1])
      if wrong.any():
        sample = int(np.argmax(wrong))
        raise ValueError(f"sequence {seq.name!r} has length {int(length[sample])} at sample "
                         f"{sample}; lengths must be in [0, {ids.shape[1]}] (its capacity)")
      valid = np.arange(ids.shape[1])[None, :] < length[:, None]
      bad = valid & ((ids < 0) | (ids >= self.rows[t]))
      if bad.any():
        sample, position = (int(i) for i in np.argwhere(bad)[0])
        spec = self.specs[t]
        raise IdOutOfRangeError(
            f"sequence {seq.name!r} (table {spec.name!r}, {spec.rows} rows) has id "
            f"{int(ids[sample, position])} at sample {sample}, position {position} "
            f"({int(bad.sum())} out-of-range ids in this batch); ids must be in [0, {spec.rows})")

  def global_rows(self, ids: jax.Array) -> jax.Array:
    """Per-table ids [B, L], [B, F] or [B, F, H] (see `bags`) -> rows of the stacked
    array (int32)."""
    if ids.ndim == 3:
      offsets = self.offsets.reshape(-1, 1)
    else:
      offsets = self.bags(ids.shape).per_column(self.offsets)
    return ids.astype(jnp.int32) + jnp.asarray(offsets, jnp.int32)

  def bag_scale(self, shape: tuple[int, int, int], weights: jax.Array | None = None,
                mask: jax.Array | None = None) -> jax.Array:
    """The factor of each id's vector in its bag's pooled vector, [B, F, H].

    Each id counts with its weight (default 1) and padding entries (mask
    False) count for nothing; "sum" tables add the bag up, "mean" tables
    divide by the number of ids present (at least 1, so an empty bag gives a
    zero vector).
    """
    scale = jnp.ones(shape, jnp.float32)
    if weights is not None:
      scale = scale * weights.astype(jnp.float32)
    if mask is not None:
      scale = jnp.where(mask, scale, 0.0)
    mean = np.array([s.pooling == "mean" for s in self.specs])
    if mean.any():
      present = (jnp.ones(shape, bool) if mask is None else mask).sum(-1)
      divisor = jnp.where(jnp.asarray(mean)[None, :], jnp.maximum(present, 1), 1)
      scale = scale / divisor[..., None].astype(jnp.float32)
    return scale

  def pool(self, vectors: jax.Array, weights: jax.Array | None = None,
           mask: jax.Array | None = None) -> jax.Array:
    """Bags of vectors [B, F, H, D] -> one vector per feature [B, F, D] (see `bag_scale`)."""
    scale = self.bag_scale(vectors.shape[:3], weights, mask).astype(vectors.dtype)
    return jnp.einsum("bfh,bfhd->bfd", scale, vectors)

  def lookup(self, tables: Tables, ids: jax.Array, weights: jax.Array | None = None,
             mask: jax.Array | None = None) -> jax.Array:
    """Flat bags [B, sum(hotness)], ids [B, F] or padded bags [B, F, H] (with optional
    per-id weights of the ids' shape, and a mask for padded bags) -> [B, F, D].

    `tables`: {"stacked": [sum of rows, D]}, or a quantised set
    (`dlrm_jax.embedding.quantized.quantize`) for inference; tables of several widths
    have one of each per width (`key`), and their vectors come zero-padded to the
    widest, `dim`.
    The plain single-array lookup; training on a mesh goes through
    `dlrm_jax.embedding.sharded.ShardedEmbedding`, which this is the reference for.
    """
    if len(self.widths) > 1:
      return self._lookup_widths(tables, ids, weights, mask)
    vectors = gather_table(tables, self.global_rows(ids), self.dim)
    if ids.ndim == 3:  # before `bags`: an exported function's H is symbolic
      return self.pool(vectors, weights, mask)
    bags = self.bags(ids.shape)
    if bags.uniform == 1 and weights is None:
      return vectors
    pooled = pool_bags(vectors, weights, bags)
    if bags.divisors is not None:
      pooled = pooled / jnp.asarray(bags.divisors, pooled.dtype)[None, :, None]
    return pooled

  def _lookup_widths(self, tables, ids, weights, mask) -> jax.Array:
    """`lookup` of tables of several widths: each width's own, padded to `dim`."""
    columns = None if ids.ndim == 3 else self.bags(ids.shape).columns
    parts, order = [], []
    for w in self.widths:
      features = self.features_of(w)
      index = np.array(features) if columns is None else columns(features)
      pick = lambda x: None if x is None else jnp.take(x, jnp.asarray(index), axis=1)
      vectors = self.of_width(w).lookup(self.tables_of(tables, w), pick(ids), pick(weights),
                                        pick(mask))
      parts.append(pad_to(vectors, self.dim))
      order += features
    return take_static(jnp.concatenate(parts, axis=1), np.argsort(order), axis=1)


def pad_to(vectors: jax.Array, dim: int) -> jax.Array:
  """Vectors [..., d] -> [..., dim], zeros after the first d (narrower tables' vectors)."""
  pad = dim - vectors.shape[-1]
  return vectors if pad == 0 else jnp.pad(vectors, [(0, 0)] * (vectors.ndim - 1) + [(0, pad)])


def gather_table(tables: Tables, rows: jax.Array, dim: int) -> jax.Array:
  """Rows of a table set of width `dim` as float32: the stacked table's, or a quantised
  set's (`dlrm_jax.embedding.quantized`), dequantised."""
  if "stacked" in tables:
    return gather_rows(tables["stacked"], rows)
  from dlrm_jax.embedding.quantized import dequantize_rows

  return dequantize_rows(tables, rows, dim)


def gather_rows(table: jax.Array, rows: jax.Array) -> jax.Array:
  """table[rows] for valid rows (checked at the data boundary), as float32 (16-bit tables:
  the vectors and their gradients are float32 from here on; packed rows are unpacked)."""
  return unpack(jnp.take(table, rows, axis=0, mode="clip")).astype(jnp.float32)


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijective, well-mixing hash."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_uniform(seed: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """Uniform values in [-1, 1), a fixed function of (seed, row, column)."""
  h = _fmix32(cols * jnp.uint32(0x9E3779B9) + _fmix32(seed + jnp.uint32(0x632BE5AB)))
  h = _fmix32(rows * jnp.uint32(0x27D4EB2F) ^ h)
  return (h >> 8).astype(jnp.float32) * (2.0 / (1 << 24)) - 1.0
