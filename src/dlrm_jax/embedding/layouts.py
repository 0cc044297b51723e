"""The stacked layout of each sharding type and its per-device programs.

`dlrm_jax.embedding.sharded.ShardedEmbedding` keeps the tables of each sharding
type of a plan in one stacked array (`Layout.shape`, split over the mesh by
`Layout.spec`) and runs, inside `jax.shard_map`, each layout's `route` (ids to
the rows' owners, which gather), `exchange` (pooled vectors back to the
samples' devices) and `update` (the sparse optimiser on the owner's rows).

Ids reach a layout as flat rows, [b, L_g]: the ids of the bags that read its
tables end to end, bag by bag, with static widths (`dlrm_jax.embedding.bags.Bags`;
one id per feature is the case of widths 1, padded bags that of equal widths, a
sequence feature's positions bags of width 1 of one table), and each bag gives
one vector. So every gather, every id and gradient a collective moves, and
every row handed to the sparse optimiser is one real id (or a padding slot of a
padded batch or a sequence), never one slot of the widest bag per feature.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dlrm_jax.embedding.bags import Bags
from dlrm_jax.embedding.collection import EmbeddingCollection
from dlrm_jax.embedding.costs import row_capacity
from dlrm_jax.embedding.kernels import LocalLookup, PortableLookup
from dlrm_jax.embedding.mixed import width_key
from dlrm_jax.embedding.planner import (COLUMN_WISE, REPLICATED, ROW_ORDERS, ROW_WISE,
                                        SHARDING_TYPES, TABLE_WISE, Plan, sparse_replica_update)
from dlrm_jax.ops import take_static
from dlrm_jax.parallel import MeshAxes


class Layout:
  """The tables of one sharding type, stacked into one array: their layout and per-device
  programs."""

  kind: str

  def __init__(self, collection: EmbeddingCollection, features: Sequence[int], n: int,
               axes: MeshAxes, kernel: LocalLookup | None = None):
    self.collection, self.features, self.n, self.axes = collection, tuple(features), n, axes
    self.kernel = kernel or PortableLookup()
    widths = {int(collection.dims[t]) for t in self.features}
    if len(widths) != 1:
      raise ValueError(f"a layout's tables share one width, got {sorted(widths)}")
    self.dim = widths.pop()  # its tables' width (mixed-dimension tables: one layout per width)
    self.rows = np.array([collection.rows[t] for t in self.features], np.int64)

  # Layout --------------------------------------------------------------------
  shape: tuple[int, int]  # the stacked tables' rows and values (the slots' shape)
  spec: P

  @property
  def packed(self) -> bool:
    """16-bit values stored in pairs (`dlrm_jax.embedding.collection.PACKED`): where the
    collection packs and each device's slice of the columns is even."""
    return self.collection.packs(local_shape(self)[1])

  @property
  def stored_shape(self) -> tuple[int, int]:
    """The stacked table array's shape: `shape`, or [rows, D / 2] when packed."""
    rows, cols = self.shape
    return (rows, cols // 2) if self.packed else (rows, cols)

  def blocks(self, t: int):
    """(storage_row, table_row, count, stride) blocks where table t's rows are stored:
    storage rows [storage_row, + count) hold table rows table_row + i * stride."""
    raise NotImplementedError

  def local_row_info(self, local_rows: jax.Array):
    """Inside shard_map: (stacked row of the unsharded layout, valid) per local row."""
    raise NotImplementedError

  def local_cols(self) -> jax.Array:
    return jnp.arange(self.dim, dtype=jnp.uint32)

  def init_local(self, seed: jax.Array) -> jax.Array:
    """This device's shard of the initial table, equal to `EmbeddingCollection.init`."""
    return self.collection.init_blocked(seed, local_shape(self)[0], self.local_row_info,
                                        self.local_cols(), packed=self.packed)

  # Per-device programs --------------------------------------------------------
  def route(self, table, ids, scale, bags: Bags, bounded: bool = True) -> dict[str, jax.Array]:
    """Ids [b, L_g] of this device's samples (-1: padding) with per-id pooling scales
    (None: weight 1), laid out as `bags` (tables numbered by their place in `features`)
    -> what the owners gathered. `bounded`: a row-wise owner keeps at most its capacity
    of ids (a train step); False: every id (evaluation, where nothing may be dropped)."""
    raise NotImplementedError

  def exchange(self, lookup: dict[str, jax.Array], bags: Bags) -> jax.Array:
    """What `route` gathered -> pooled vectors of this device's samples, one per bag,
    [b, bags, dim]."""
    raise NotImplementedError

  def update(self, opt, table, state, lookup, grads, lr, step):
    rows = lookup["rows"].reshape(-1)
    grads = grads.reshape(-1, grads.shape[-1])
    if self.axes.replica is not None:  # every replica group applies every group's updates
      rows = jax.lax.all_gather(rows, self.axes.replica, tiled=True)
      grads = jax.lax.all_gather(grads, self.axes.replica, tiled=True)
    return self.kernel.update(opt, table, state, rows, grads, lr, step, **self._update_kwargs())

  def _update_kwargs(self) -> dict:
    """The optimiser's layout-dependent arguments: `element_ids` maps local rows to the
    rows of the unsharded layout and gives the local columns' global numbers, so that a
    16-bit table's stochastic rounding draws the same noise in every layout."""
    return {"element_ids": (lambda rows: self.local_row_info(rows)[0], self.local_cols())}

  def _column_const(self, values, bags: Bags) -> jax.Array:
    """A per-table constant repeated for each id of a bag that reads the table, [1, L_g]
    (against [b, L_g] ids)."""
    return jnp.asarray(bags.per_table_column(np.asarray(values, np.int32)).astype(np.int32)
                       )[None, :]

  def _pool(self, vectors: jax.Array, scale: jax.Array | None, bags: Bags) -> jax.Array:
    """[..., L_g, D] vectors of flat rows -> [..., K_g, D] (one per bag): a reshape and the
    kernel's pool where the bags share one width, its segment sum where they differ."""
    width, k = bags.uniform, len(bags.widths)
    if width is not None:
      vectors = vectors.reshape(*vectors.shape[:-2], k, width, vectors.shape[-1])
      return self.kernel.pool(vectors, None if scale is None else
                              scale.reshape(vectors.shape[:-1]))
    return self.kernel.segment_pool(vectors, scale, jnp.asarray(bags.segments()), k)


class _Slots:
  """Where a table-wise group's ids travel for one layout of bags: each owner's slot of
  `width` positions (the ids of the bags that read its tables, end to end, padded to the
  fullest owner's total), pooled into `bags_per_device` vectors per sample."""

  def __init__(self, group: "TableWise", bags: Bags):
    n, tables = group.n, bags.table_of
    owned = [[k for k, t in enumerate(tables) if group.where[int(t)][0] == d] for d in range(n)]
    kmax = self.bags_per_device = max(1, max(len(o) for o in owned))
    columns = bags.offsets
    equal = bags.uniform
    totals = [sum(bags.widths[k] for k in device) for device in owned]
    # Bags of one width keep whole slots of it (pooled by a reshape); others are padded
    # only to the largest total on a device.
    self.width = kmax * equal if equal is not None else max(1, max(totals))
    self.send = np.full((n, self.width), bags.total, np.int32)  # padding: an extra column
    self.offset = np.zeros((n, self.width), np.int32)  # local row offset of each position
    self.segment = np.full((n, self.width), kmax, np.int32)  # bag slot of each position
    self.receive = np.zeros(len(tables), np.int32)  # bag -> its owner's slot, flattened
    for d, device in enumerate(owned):
      at = 0
      for j, k in enumerate(device):
        w = bags.widths[k]
        self.send[d, at:at + w] = columns[k] + np.arange(w)
        self.offset[d, at:at + w] = group.where[int(tables[k])][2]
        self.segment[d, at:at + w] = j
        self.receive[k] = d * kmax + j
        at += w


class TableWise(Layout):
  """Whole tables on single devices; ids and vectors move with all-to-alls."""

  kind = TABLE_WISE

  def __init__(self, collection, features, n, axes, owners: Sequence[int], kernel=None):
    super().__init__(collection, features, n, axes, kernel)
    self.slot_features = [[g for g, o in enumerate(owners) if o == d] for d in range(n)]
    self.slots_per_device = max(1, max(len(s) for s in self.slot_features))
    fmax = self.slots_per_device
    local_offset = np.zeros((n, fmax), np.int64)
    local_rows = np.zeros(n, np.int64)
    self.where = {}  # group feature -> (device, slot, local offset)
    for d, group_features in enumerate(self.slot_features):
      for j, g in enumerate(group_features):
        local_offset[d, j] = local_rows[d]
        self.where[g] = (d, j, int(local_rows[d]))
        local_rows[d] += self.rows[g]
      # Empty slots start where the device's tables end: `local_row_info` finds a row's
      # slot by its start, so an empty slot at 0 would claim the device's first table.
      local_offset[d, len(group_features):] = local_rows[d]
    self.rows_per_device = int(max(1, local_rows.max()))
    self.local_offset = local_offset
    self.slot_rows = np.zeros((n, fmax), np.int64)  # rows of the table in each slot (0: padding)
    for g, (d, j, _) in self.where.items():
      self.slot_rows[d, j] = self.rows[g]
    self.shape = (n * self.rows_per_device, self.dim)
    self.spec = P(axes.shard, None)
    self._slots_of: dict[Bags, _Slots] = {}

  def slots(self, bags: Bags) -> _Slots:
    """Each owner's slot for ids laid out as `bags` (computed once per layout of bags)."""
    if bags not in self._slots_of:
      self._slots_of[bags] = _Slots(self, bags)
    return self._slots_of[bags]

  def blocks(self, t):
    d, _, offset = self.where[self.features.index(t)]
    return [(d * self.rows_per_device + offset, 0, int(self.collection.rows[t]), 1)]

  def local_row_info(self, local_rows):
    d = jax.lax.axis_index(self.axes.shard)
    starts = jnp.asarray(self.local_offset.astype(np.int32))[d]
    counts = jnp.asarray(self.slot_rows.astype(np.int32))[d]
    slot = jnp.clip(jnp.searchsorted(starts, local_rows, side="right") - 1, 0)
    within = local_rows - starts[slot]
    valid = within < counts[slot]
    table_of_slot = np.zeros((self.n, self.slots_per_device), np.int32)
    for g, (dd, j, _) in self.where.items():
      table_of_slot[dd, j] = self.features[g]
    table = jnp.asarray(table_of_slot)[d][slot]
    offsets = jnp.asarray(self.collection.offsets.astype(np.int32))
    return jnp.where(valid, offsets[table] + within, 0), valid

  def _to_owners(self, x: jax.Array, pad, slots: _Slots) -> jax.Array:
    """[b, L_g] per sample -> [n, b, slot width] per owner (all_to_all)."""
    b = x.shape[0]
    x = jnp.concatenate([x, jnp.full((b, 1), pad, x.dtype)], axis=1)
    x = jnp.take(x, jnp.asarray(slots.send.reshape(-1)), axis=1)
    x = x.reshape(b, self.n, slots.width).transpose(1, 0, 2)
    return jax.lax.all_to_all(x, self.axes.shard, 0, 0, tiled=True)

  def route(self, table, ids, scale, bags, bounded=True):
    slots = self.slots(bags)
    received = self._to_owners(ids, -1, slots)  # [source device, b, slot]: ids of my tables
    d = jax.lax.axis_index(self.axes.shard)
    offset = jnp.asarray(slots.offset)[d][None, None, :]
    rows = jnp.where(received >= 0, received + offset, table.shape[0])
    # Flat [n b slot, D] vectors (and so gradients): a TPU tiles the two minor dimensions,
    # and [n, b, slot, D] would pad the slot to 8 rows and copy at each reshape.
    out = {"vectors": self.kernel.gather(table, rows.reshape(-1)), "rows": rows}
    if scale is not None:
      out["scale"] = self._to_owners(scale, 0.0, slots)
    return out

  def exchange(self, lookup, bags):
    vectors, scale, slots = lookup["vectors"], lookup.get("scale"), self.slots(bags)
    kmax, width = slots.bags_per_device, bags.uniform
    lead = lookup["rows"].shape[:2]  # [source, b]
    if width is not None:  # whole slots of one width: [source, b, slot, width, D]
      vectors = vectors.reshape(*lead, kmax, width, self.dim)
      pooled = self.kernel.pool(vectors, None if scale is None else
                                scale.reshape(vectors.shape[:-1]))
    else:  # the bags of each owner's own tables end to end: its own segments
      segments = jnp.asarray(slots.segment)[jax.lax.axis_index(self.axes.shard)]
      pooled = self.kernel.segment_pool(vectors.reshape(*lead, slots.width, self.dim), scale,
                                        segments, kmax)
    back = jax.lax.all_to_all(pooled, self.axes.shard, 0, 0, tiled=True)  # [owner, b, slot, D]
    b = back.shape[1]
    flat = back.transpose(1, 0, 2, 3).reshape(b, self.n * kmax, self.dim)
    return take_static(flat, slots.receive, axis=1)


class RowWise(Layout):
  """Each table's rows spread over the devices: row r on device r mod n, at local row
  r // n ("cyclic", `Plan.row_order`: the batch's hot rows spread evenly whatever their
  numbers), or in contiguous blocks ("blocks": checkpoints written before).

  Every device sees the ids of the whole batch (an all-gather of int32s) and keeps
  those of its own rows, compacted into a buffer of `capacity(ids)` slots, in the
  batch's order: it gathers, pools and updates those rows only, so its work is its
  share of the batch's ids, not all of them. The partial sums of each sample's bags
  (zero where a device owns none of a bag's ids) are summed over the devices and
  scattered to the samples' devices (`kernel.sum_scatter`: a reduce-scatter). Ids
  beyond a device's capacity are dropped and counted ("dropped"): the trainer stops
  on any, before a checkpoint keeps their step (`dlrm_jax.stopping`).
  """

  kind = ROW_WISE

  def __init__(self, collection, features, n, axes, kernel=None, capacity: float = 0.0,
               order: str = "cyclic"):
    super().__init__(collection, features, n, axes, kernel)
    if order not in ROW_ORDERS:
      raise ValueError(f"row order {order!r} is not one of {ROW_ORDERS}")
    self.order = order
    self.block = -(-self.rows // n)  # rows of each table per device
    self.local_offset = np.concatenate([[0], np.cumsum(self.block)[:-1]])
    self.rows_per_device = int(self.block.sum())
    self.shape = (n * self.rows_per_device, self.dim)
    self.spec = P(axes.shard, None)
    self.capacity_factor = float(capacity)

  def capacity(self, ids: int) -> int:
    """The slots a device keeps for its share of `ids` ids (`costs.row_capacity`)."""
    return row_capacity(ids, self.n, self.capacity_factor)

  def blocks(self, t):
    g = self.features.index(t)
    c, rows, start = int(self.block[g]), int(self.rows[g]), int(self.local_offset[g])
    if self.order == "cyclic":
      return [(d * self.rows_per_device + start, d, -(-(rows - d) // self.n), self.n)
              for d in range(min(self.n, rows))]
    return [(d * self.rows_per_device + start, d * c, min(c, rows - d * c), 1)
            for d in range(self.n) if d * c < rows]

  def owner_and_row(self, ids, block):
    """The device holding each table row `ids` ([..], >= 0) and its row there within its
    table's part (`block`: the table's rows per device, per id)."""
    if self.order == "cyclic":
      return ids % self.n, ids // self.n
    return ids // block, ids % block

  def local_row_info(self, local_rows):
    d = jax.lax.axis_index(self.axes.shard)
    starts = jnp.asarray(self.local_offset.astype(np.int32))
    g = jnp.clip(jnp.searchsorted(starts, local_rows, side="right") - 1, 0)
    within = local_rows - starts[g]
    row = (within * self.n + d if self.order == "cyclic"
           else d * jnp.asarray(self.block.astype(np.int32))[g] + within)
    valid = row < jnp.asarray(self.rows.astype(np.int32))[g]
    offsets = jnp.asarray(self.collection.offsets[list(self.features)].astype(np.int32))
    return jnp.where(valid, offsets[g] + row, 0), valid

  def route(self, table, ids, scale, bags, bounded=True):
    ids = jax.lax.all_gather(ids, self.axes.shard, tiled=True)  # [B_group, L_g]
    batch, width = ids.shape
    d = jax.lax.axis_index(self.axes.shard)
    owner, row = self.owner_and_row(ids, self._column_const(self.block, bags))
    mine = ((ids >= 0) & (owner == d)).reshape(-1)
    at, dropped = _compact(mine, self.capacity(batch * width) if bounded else batch * width)
    kept = at < mine.shape[0]
    at = jnp.where(kept, at, 0)
    column = at % width
    offset = self._column_const(self.local_offset, bags)[0]
    rows = jnp.where(kept, row.reshape(-1)[at] + offset[column], table.shape[0])
    k = len(bags.widths)  # the bag of each kept id, sample by sample; k * batch: none
    bag = jnp.where(kept, (at // width) * k + jnp.asarray(bags.segments())[column], batch * k)
    out = {"vectors": self.kernel.gather(table, rows), "rows": rows, "bag": bag,
           "dropped": dropped[None],
           "samples": jnp.zeros((batch, 0), jnp.int8)}  # B_group, for `exchange`
    # The train step's lookup (bounded) is differentiated with respect to its vectors
    # alone, and the update drops the empty slots' rows: their gradient need not be
    # masked. Any other may be differentiated with respect to the table (through the
    # gather, whose empty slots read a clipped row): masked exactly.
    out["kept_in_update" if bounded else "kept"] = kept
    if scale is not None:
      scale = jax.lax.all_gather(scale, self.axes.shard, tiled=True)
      out["scale"] = jnp.where(kept, scale.reshape(-1)[at], 0.0)
    return out

  def exchange(self, lookup, bags):
    vectors, k = lookup["vectors"], len(bags.widths)
    batch = lookup["samples"].shape[0]
    # The empty slots' vectors zeroed (`kernel.sum_rows` may add them to any bag).
    if "scale" in lookup:  # zero where not kept
      values = vectors * lookup["scale"][:, None].astype(vectors.dtype)
    elif "kept_in_update" in lookup:
      values = _zero_where_not_kept(vectors, lookup["kept_in_update"])
    else:
      values = jnp.where(lookup["kept"][:, None], vectors, 0)
    # My rows' part of each bag, [batch k, D], exchanged flat (the samples' blocks are
    # contiguous rows): on a TPU, [batch, k, D] would pad k to 8 rows and copy.
    partial = self.kernel.sum_rows(lookup["bag"], values, batch * k)
    summed = self.kernel.sum_scatter(partial, self.axes.shard, self.n)
    return summed.reshape(batch // self.n, k, -1)


# A custom VJP (reverse mode only: the train step's; jax.jvp through it is not defined).
@jax.custom_vjp
def _zero_where_not_kept(vectors: jax.Array, kept: jax.Array) -> jax.Array:
  """`vectors` [N, D] with the rows not `kept` [N] zeroed, for the train step. Its
  gradient passes through unmasked: a slot not kept has no row (the sparse update drops
  it), so its gradient is never used, and leaving it unmasked spares a pass over every
  id's gradient. Not for a lookup differentiated with respect to the table."""
  return jnp.where(kept[:, None], vectors, 0)


def _zero_where_not_kept_forward(vectors, kept):
  return _zero_where_not_kept(vectors, kept), None


def _zero_where_not_kept_backward(_, grad):
  return grad, None


_zero_where_not_kept.defvjp(_zero_where_not_kept_forward, _zero_where_not_kept_backward)


def _compact(keep: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """The positions of the first `capacity` True entries of `keep` [N], in order
  (N where fewer), and how many True entries did not fit: a prefix count and a
  scatter with unique indices (no sort, no atomics)."""
  n = keep.shape[0]
  count = jnp.cumsum(keep.astype(jnp.int32))
  # Kept entries go to their rank; the others (and ranks past the capacity) to distinct
  # places past the end, which the scatter drops.
  slot = jnp.where(keep & (count <= capacity), count - 1, capacity + jnp.arange(n))
  at = jnp.full((capacity,), n, jnp.int32).at[slot].set(
      jnp.arange(n, dtype=jnp.int32), mode="drop", unique_indices=True)
  return at, jnp.maximum(count[-1] - capacity, 0)


class WholeTables(Layout):
  """Tables stacked whole, one after another (split on columns, or replicated)."""

  def __init__(self, collection, features, n, axes, kernel=None):
    super().__init__(collection, features, n, axes, kernel)
    self.offset = np.concatenate([[0], np.cumsum(self.rows)[:-1]])
    self.shape = (int(self.rows.sum()), self.dim)

  def blocks(self, t):
    g = self.features.index(t)
    return [(int(self.offset[g]), 0, int(self.rows[g]), 1)]

  def local_row_info(self, local_rows):
    starts = jnp.asarray(self.offset.astype(np.int32))
    g = jnp.clip(jnp.searchsorted(starts, local_rows, side="right") - 1, 0)
    offsets = jnp.asarray(self.collection.offsets[list(self.features)].astype(np.int32))
    return offsets[g] + local_rows - starts[g], jnp.ones(local_rows.shape, bool)

  def _rows(self, ids, bags):
    """Stacked rows of [b, L_g] ids (padding -1 -> one past the end)."""
    return jnp.where(ids >= 0, ids + self._column_const(self.offset, bags), self.shape[0])


class ColumnWise(WholeTables):
  """Whole tables split on the embedding dimension, slice d on device d."""

  kind = COLUMN_WISE

  def __init__(self, collection, features, n, axes, kernel=None):
    super().__init__(collection, features, n, axes, kernel)
    if self.dim % n:
      raise ValueError(f"column_wise needs the dim ({self.dim}) to be a multiple of {n}")
    self.spec = P(None, axes.shard)

  def local_cols(self):
    width = self.dim // self.n
    d = jax.lax.axis_index(self.axes.shard).astype(jnp.uint32)
    return d * width + jnp.arange(width, dtype=jnp.uint32)

  def route(self, table, ids, scale, bags, bounded=True):
    rows = self._rows(jax.lax.all_gather(ids, self.axes.shard, tiled=True), bags)
    out = {"vectors": self.kernel.gather(table, rows), "rows": rows}
    if scale is not None:
      out["scale"] = jax.lax.all_gather(scale, self.axes.shard, tiled=True)
    return out

  def exchange(self, lookup, bags):
    pooled = self._pool(lookup["vectors"], lookup.get("scale"), bags)  # [B_group, K_g, D / n]
    return jax.lax.all_to_all(pooled, self.axes.shard, 0, 2, tiled=True)  # [b, K_g, D]

  def _update_kwargs(self):
    return {**super()._update_kwargs(), "column_axis": self.axes.shard}


class Replicated(WholeTables):
  """Small tables copied to every device. Every copy applies the same update: where the
  batch's ids are fewer than twice the tables' rows (`planner.sparse_replica_update`),
  the ids and their gradients of every device are all-gathered and each copy applies
  the sparse update to the touched rows (cost follows the batch); otherwise a dense
  gradient of the rows is all-reduced (cost follows the table, the smaller). Either way
  the copies stay bit-identical: each device runs the same update on the same values
  in the same order."""

  kind = REPLICATED

  def __init__(self, collection, features, n, axes, kernel=None):
    super().__init__(collection, features, n, axes, kernel)
    self.spec = P(None, None)

  def route(self, table, ids, scale, bags, bounded=True):
    rows = self._rows(ids, bags)
    out = {"vectors": self.kernel.gather(table, rows), "rows": rows}
    if scale is not None:
      out["scale"] = scale
    return out

  def exchange(self, lookup, bags):
    return self._pool(lookup["vectors"], lookup.get("scale"), bags)

  def update(self, opt, table, state, lookup, grads, lr, step):
    n_rows = table.shape[0]
    rows = lookup["rows"].reshape(-1)
    grads = grads.reshape(-1, grads.shape[-1])
    if sparse_replica_update(rows.shape[0] * jax.lax.axis_size(self.axes.batch), n_rows):
      rows = jax.lax.all_gather(rows, self.axes.batch, tiled=True)
      grads = jax.lax.all_gather(grads, self.axes.batch, tiled=True)
      return self.kernel.update(opt, table, state, rows, grads, lr, step,
                                **self._update_kwargs())
    dense, touched = self.kernel.row_gradients(rows, grads, n_rows)
    dense = jax.lax.psum(dense, self.axes.batch)
    touched = jax.lax.psum(touched, self.axes.batch)
    all_rows = jnp.where(touched > 0, jnp.arange(n_rows, dtype=rows.dtype), n_rows)
    return self.kernel.update(opt, table, state, all_rows, dense, lr, step,
                              **self._update_kwargs())


def plan_groups(collection: EmbeddingCollection, plan: Plan, axes: MeshAxes = MeshAxes(),
                kernel: LocalLookup | None = None, row_wise_capacity: float = 0.0
                ) -> dict[str, Layout]:
  """The stacked layout of each sharding type (and table width, for tables of several:
  keys `kind`, `kind_dW`, dlrm_jax.embedding.mixed) of `plan`; needs no mesh (checkpoints
  re-lay out saved tables of another plan with it, on the host). `row_wise_capacity`:
  the row-wise lookups' capacity factor (`RowWise.capacity`)."""
  n = plan.num_shards
  groups: dict[str, Layout] = {}
  for kind in SHARDING_TYPES:
    for width in collection.widths:
      features = [t for t, p in enumerate(plan.placements)
                  if p.kind == kind and collection.dims[t] == width]
      if not features:
        continue
      key = width_key(kind, width, collection.dim)
      if kind == TABLE_WISE:
        owners = [plan.placements[t].device for t in features]
        groups[key] = TableWise(collection, features, n, axes, owners, kernel)
      elif kind == ROW_WISE:
        groups[key] = RowWise(collection, features, n, axes, kernel, row_wise_capacity,
                              plan.row_order)
      else:
        cls = {COLUMN_WISE: ColumnWise, REPLICATED: Replicated}[kind]
        groups[key] = cls(collection, features, n, axes, kernel)
  return groups


def unstack_rows(groups: dict[str, Layout], stored: dict[str, np.ndarray]) -> list[np.ndarray]:
  """Stacked host arrays (tables, or optimiser slots with the tables' rows on their
  leading axis) -> one array per table, in table order."""
  out: list[np.ndarray | None] = [None] * sum(len(g.features) for g in groups.values())
  for kind, g in groups.items():
    storage = np.asarray(stored[kind])
    for t in g.features:
      a = np.empty((int(g.collection.rows[t]),) + storage.shape[1:], storage.dtype)
      for start, row, count, stride in g.blocks(t):
        a[row:row + count * stride:stride] = storage[start:start + count]
      out[t] = a
  return out


def stack_rows(groups: dict[str, Layout], arrays: Sequence[np.ndarray],
               shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """Per-table host arrays -> the stacked layout of each group (`shapes`: the
  stacked shape of each group's array; padding rows are zero)."""
  out = {}
  for kind, g in groups.items():
    storage = np.zeros(shapes[kind], np.asarray(arrays[g.features[0]]).dtype)
    for t in g.features:
      a = np.asarray(arrays[t])
      for start, row, count, stride in g.blocks(t):
        storage[start:start + count] = a[row:row + count * stride:stride]
    out[kind] = storage
  return out


def local_shape(g: Layout) -> tuple[int, int]:
  """One device's shard of a layout's stacked array."""
  rows, cols = g.shape
  if g.spec[0] is not None:
    rows //= g.n
  if g.spec[1] is not None:
    cols //= g.n
  return rows, cols
