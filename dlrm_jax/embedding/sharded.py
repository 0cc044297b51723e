"""Embedding tables sharded over a device mesh, with the collectives written out.

`ShardedEmbedding` stores the tables of a collection as up to four stacked
arrays, one per sharding type of the plan (`dlrm_jax.embedding.planner`), each
laid out over the mesh's shard axis:

  table_wise   [shards * R_max, D]  split on rows: device d holds its own tables, stacked
  row_wise     [shards * R_loc, D]  split on rows: device d holds block d of every table
  column_wise  [R, D]               split on columns
  replicated   [R, D]               a copy on every device

A train step runs three `jax.shard_map` programs, each a per-device function
whose communication is explicit:

1. `route`: ids travel to the devices that own their rows, which gather the
   rows locally. table_wise: `all_to_all` of ids (the paper's butterfly
   shuffle); row_wise and column_wise: `all_gather` of ids; replicated: local.
2. `exchange` (differentiated): the looked-up vectors, pooled at their owner,
   travel back to the devices that own the samples. table_wise: `all_to_all`;
   row_wise: `psum_scatter` of masked partial sums; column_wise: `all_to_all`
   of column slices; replicated: nothing. Its transpose, which `jax.grad`
   derives, carries the gradients back along the same paths.
3. `update`: each device applies the sparse optimiser to the rows it owns,
   with the gradients that arrived in step 2's transpose. Replicated tables
   all-reduce a dense gradient of their (small) rows instead.

The gradient is taken with respect to the looked-up vectors where they live
(on the owning device), so no gradient the size of a table ever exists and
each device touches only rows of its own shard.

Over a 2-D mesh (replica, shard) each replica group holds a full copy of the
sharded tables and serves its own slice of the batch; updates gather the
touched rows and gradients of all replica groups so that copies stay equal.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlrm_jax.embedding.collection import EmbeddingCollection, Tables
from dlrm_jax.embedding.kernels import LocalLookup, PortableLookup, local_lookup
from dlrm_jax.embedding.planner import (COLUMN_WISE, REPLICATED, ROW_WISE, SHARDING_TYPES,
                                        TABLE_WISE, Plan)
from dlrm_jax.ops import take_static
from dlrm_jax.parallel import MeshAxes, gather_to_host

Lookups = dict[str, dict[str, jax.Array]]


class _Layout:
  """The tables of one sharding type, stacked into one array: their layout and per-device
  programs."""

  kind: str

  def __init__(self, collection: EmbeddingCollection, features: Sequence[int], n: int,
               axes: MeshAxes, kernel: LocalLookup | None = None):
    self.collection, self.features, self.n, self.axes = collection, tuple(features), n, axes
    self.kernel = kernel or PortableLookup()
    self.dim = collection.dim
    self.rows = np.array([collection.rows[t] for t in self.features], np.int64)

  # Layout --------------------------------------------------------------------
  shape: tuple[int, int]
  spec: P

  def blocks(self, t: int):
    """(storage_row, table_row, count) blocks where table t's rows are stored."""
    raise NotImplementedError

  def local_row_info(self, local_rows: jax.Array):
    """Inside shard_map: (stacked row of the unsharded layout, valid) per local row."""
    raise NotImplementedError

  def local_cols(self) -> jax.Array:
    return jnp.arange(self.dim, dtype=jnp.uint32)

  def init_local(self, seed: jax.Array) -> jax.Array:
    """This device's shard of the initial table, equal to `EmbeddingCollection.init`."""
    return self.collection.init_blocked(seed, _local_shape(self)[0], self.local_row_info,
                                        self.local_cols())

  # Per-device programs --------------------------------------------------------
  def route(self, table, ids, scale) -> dict[str, jax.Array]:
    raise NotImplementedError

  def exchange(self, lookup: dict[str, jax.Array]) -> jax.Array:
    raise NotImplementedError

  def update(self, opt, table, state, lookup, grads, lr, step):
    rows = lookup["rows"].reshape(-1)
    grads = grads.reshape(-1, grads.shape[-1])
    if self.axes.replica is not None:  # every replica group applies every group's updates
      rows = jax.lax.all_gather(rows, self.axes.replica, tiled=True)
      grads = jax.lax.all_gather(grads, self.axes.replica, tiled=True)
    return self.kernel.update(opt, table, state, rows, grads, lr, step, **self._update_kwargs())

  def _update_kwargs(self) -> dict:
    return {}

  def _feature_const(self, values) -> jax.Array:
    """A per-feature constant shaped to broadcast against [batch, features, hotness]."""
    return jnp.asarray(np.asarray(values, np.int32))[None, :, None]


class _TableWise(_Layout):
  """Whole tables on single devices; ids and vectors move with all-to-alls."""

  kind = TABLE_WISE

  def __init__(self, collection, features, n, axes, owners: Sequence[int], kernel=None):
    super().__init__(collection, features, n, axes, kernel)
    slots = [[g for g, o in enumerate(owners) if o == d] for d in range(n)]
    self.slots_per_device = max(1, max(len(s) for s in slots))
    fmax = self.slots_per_device
    local_offset = np.zeros((n, fmax), np.int64)
    local_rows = np.zeros(n, np.int64)
    self.where = {}  # group feature -> (device, slot, local offset)
    send = np.full((n, fmax), len(self.features), np.int32)  # padding: an extra column of -1
    for d, group_features in enumerate(slots):
      for j, g in enumerate(group_features):
        local_offset[d, j] = local_rows[d]
        self.where[g] = (d, j, int(local_rows[d]))
        send[d, j] = g
        local_rows[d] += self.rows[g]
    self.rows_per_device = int(max(1, local_rows.max()))
    self.local_offset = local_offset
    self.slot_rows = np.zeros((n, fmax), np.int64)  # rows of the table in each slot (0: padding)
    for g, (d, j, _) in self.where.items():
      self.slot_rows[d, j] = self.rows[g]
    self.send_index = send.reshape(-1)
    self.receive_index = np.array([self.where[g][0] * fmax + self.where[g][1]
                                   for g in range(len(self.features))], np.int32)
    self.shape = (n * self.rows_per_device, self.dim)
    self.spec = P(axes.shard, None)

  def blocks(self, t):
    d, _, offset = self.where[self.features.index(t)]
    return [(d * self.rows_per_device + offset, 0, int(self.collection.rows[t]))]

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

  def _to_owners(self, x: jax.Array, pad) -> jax.Array:
    """[b, F_g, H] per sample -> [n, b, slots, H] per owner (all_to_all)."""
    b, _, h = x.shape
    x = jnp.concatenate([x, jnp.full((b, 1, h), pad, x.dtype)], axis=1)
    x = jnp.take(x, jnp.asarray(self.send_index), axis=1)
    x = x.reshape(b, self.n, self.slots_per_device, h).transpose(1, 0, 2, 3)
    return jax.lax.all_to_all(x, self.axes.shard, 0, 0, tiled=True)

  def route(self, table, ids, scale):
    received = self._to_owners(ids, -1)  # [source device, b, slot, H]: ids of my tables
    d = jax.lax.axis_index(self.axes.shard)
    offset = jnp.asarray(self.local_offset.astype(np.int32))[d][None, None, :, None]
    rows = jnp.where(received >= 0, received + offset, table.shape[0])
    out = {"vectors": self.kernel.gather(table, rows), "rows": rows}
    if scale is not None:
      out["scale"] = self._to_owners(scale, 0.0)
    return out

  def exchange(self, lookup):
    pooled = self.kernel.pool(lookup["vectors"], lookup.get("scale"))  # [source, b, slot, D]
    back = jax.lax.all_to_all(pooled, self.axes.shard, 0, 0, tiled=True)  # [owner, b, slot, D]
    b = back.shape[1]
    flat = back.transpose(1, 0, 2, 3).reshape(b, self.n * self.slots_per_device, self.dim)
    return take_static(flat, self.receive_index, axis=1)


class _RowWise(_Layout):
  """Each table's rows split into equal contiguous blocks, block d on device d."""

  kind = ROW_WISE

  def __init__(self, collection, features, n, axes, kernel=None):
    super().__init__(collection, features, n, axes, kernel)
    self.block = -(-self.rows // n)  # rows of each table per device
    self.local_offset = np.concatenate([[0], np.cumsum(self.block)[:-1]])
    self.rows_per_device = int(self.block.sum())
    self.shape = (n * self.rows_per_device, self.dim)
    self.spec = P(axes.shard, None)

  def blocks(self, t):
    g = self.features.index(t)
    c, rows = int(self.block[g]), int(self.rows[g])
    return [(d * self.rows_per_device + int(self.local_offset[g]), d * c,
             min(c, rows - d * c)) for d in range(self.n) if d * c < rows]

  def local_row_info(self, local_rows):
    d = jax.lax.axis_index(self.axes.shard)
    starts = jnp.asarray(self.local_offset.astype(np.int32))
    g = jnp.clip(jnp.searchsorted(starts, local_rows, side="right") - 1, 0)
    row = d * jnp.asarray(self.block.astype(np.int32))[g] + local_rows - starts[g]
    valid = row < jnp.asarray(self.rows.astype(np.int32))[g]
    offsets = jnp.asarray(self.collection.offsets[list(self.features)].astype(np.int32))
    return jnp.where(valid, offsets[g] + row, 0), valid

  def route(self, table, ids, scale):
    ids = jax.lax.all_gather(ids, self.axes.shard, tiled=True)  # [B_group, F_g, H]
    d = jax.lax.axis_index(self.axes.shard)
    block = self._feature_const(self.block)
    mine = (ids >= 0) & (ids // block == d)
    rows = jnp.where(mine, ids - d * block + self._feature_const(self.local_offset),
                     table.shape[0])
    if scale is None:
      scale = mine.astype(table.dtype)
    else:
      scale = jnp.where(mine, jax.lax.all_gather(scale, self.axes.shard, tiled=True), 0.0)
    return {"vectors": self.kernel.gather(table, rows), "rows": rows, "scale": scale}

  def exchange(self, lookup):
    partial = self.kernel.pool(lookup["vectors"], lookup["scale"])  # [B_group, F_g, D], mine
    return jax.lax.psum_scatter(partial, self.axes.shard, scatter_dimension=0, tiled=True)


class _WholeTables(_Layout):
  """Tables stacked whole, one after another (split on columns, or replicated)."""

  def __init__(self, collection, features, n, axes, kernel=None):
    super().__init__(collection, features, n, axes, kernel)
    self.offset = np.concatenate([[0], np.cumsum(self.rows)[:-1]])
    self.shape = (int(self.rows.sum()), self.dim)

  def blocks(self, t):
    g = self.features.index(t)
    return [(int(self.offset[g]), 0, int(self.rows[g]))]

  def local_row_info(self, local_rows):
    starts = jnp.asarray(self.offset.astype(np.int32))
    g = jnp.clip(jnp.searchsorted(starts, local_rows, side="right") - 1, 0)
    offsets = jnp.asarray(self.collection.offsets[list(self.features)].astype(np.int32))
    return offsets[g] + local_rows - starts[g], jnp.ones(local_rows.shape, bool)

  def _rows(self, ids):
    """Stacked rows of [b, F_g, H] ids (padding -1 -> one past the end)."""
    return jnp.where(ids >= 0, ids + self._feature_const(self.offset), self.shape[0])


class _ColumnWise(_WholeTables):
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

  def route(self, table, ids, scale):
    rows = self._rows(jax.lax.all_gather(ids, self.axes.shard, tiled=True))
    out = {"vectors": self.kernel.gather(table, rows), "rows": rows}
    if scale is not None:
      out["scale"] = jax.lax.all_gather(scale, self.axes.shard, tiled=True)
    return out

  def exchange(self, lookup):
    pooled = self.kernel.pool(lookup["vectors"], lookup.get("scale"))  # [B_group, F_g, D / n]
    return jax.lax.all_to_all(pooled, self.axes.shard, 0, 2, tiled=True)  # [b, F_g, D]

  def _update_kwargs(self):
    return {"column_axis": self.axes.shard}


class _Replicated(_WholeTables):
  """Small tables copied to every device; a dense all-reduced gradient keeps copies equal."""

  kind = REPLICATED

  def __init__(self, collection, features, n, axes, kernel=None):
    super().__init__(collection, features, n, axes, kernel)
    self.spec = P(None, None)

  def route(self, table, ids, scale):
    rows = self._rows(ids)
    out = {"vectors": self.kernel.gather(table, rows), "rows": rows}
    if scale is not None:
      out["scale"] = scale
    return out

  def exchange(self, lookup):
    return self.kernel.pool(lookup["vectors"], lookup.get("scale"))

  def update(self, opt, table, state, lookup, grads, lr, step):
    n_rows = table.shape[0]
    rows = lookup["rows"].reshape(-1)
    grads = grads.reshape(-1, grads.shape[-1])
    dense = jax.ops.segment_sum(grads, rows, num_segments=n_rows + 1)[:n_rows]
    touched = jax.ops.segment_sum(jnp.ones_like(rows), rows, num_segments=n_rows + 1)[:n_rows]
    dense = jax.lax.psum(dense, self.axes.batch)
    touched = jax.lax.psum(touched, self.axes.batch)
    all_rows = jnp.where(touched > 0, jnp.arange(n_rows, dtype=rows.dtype), n_rows)
    return self.kernel.update(opt, table, state, all_rows, dense, lr, step)


def plan_groups(collection: EmbeddingCollection, plan: Plan, axes: MeshAxes = MeshAxes(),
                kernel: LocalLookup | None = None) -> dict[str, _Layout]:
  """The stacked layout of each sharding type of `plan`; needs no mesh (checkpoints
  re-lay out saved tables of another plan with it, on the host)."""
  n = plan.num_shards
  groups: dict[str, _Layout] = {}
  for kind in SHARDING_TYPES:
    features = [t for t, p in enumerate(plan.placements) if p.kind == kind]
    if not features:
      continue
    if kind == TABLE_WISE:
      owners = [plan.placements[t].device for t in features]
      groups[kind] = _TableWise(collection, features, n, axes, owners, kernel)
    else:
      cls = {ROW_WISE: _RowWise, COLUMN_WISE: _ColumnWise, REPLICATED: _Replicated}[kind]
      groups[kind] = cls(collection, features, n, axes, kernel)
  return groups


def unstack_rows(groups: dict[str, _Layout], stored: dict[str, np.ndarray]) -> list[np.ndarray]:
  """Stacked host arrays (tables, or optimiser slots with the tables' rows on their
  leading axis) -> one array per table, in table order."""
  out: list[np.ndarray | None] = [None] * sum(len(g.features) for g in groups.values())
  for kind, g in groups.items():
    storage = np.asarray(stored[kind])
    for t in g.features:
      a = np.empty((int(g.collection.rows[t]),) + storage.shape[1:], storage.dtype)
      for start, row, count in g.blocks(t):
        a[row:row + count] = storage[start:start + count]
      out[t] = a
  return out


def stack_rows(groups: dict[str, _Layout], arrays: Sequence[np.ndarray],
               shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """Per-table host arrays -> the stacked layout of each group (`shapes`: the
  stacked shape of each group's array; padding rows are zero)."""
  out = {}
  for kind, g in groups.items():
    storage = np.zeros(shapes[kind], np.asarray(arrays[g.features[0]]).dtype)
    for t in g.features:
      a = np.asarray(arrays[t])
      for start, row, count in g.blocks(t):
        storage[start:start + count] = a[row:row + count]
    out[kind] = storage
  return out


class ShardedEmbedding:
  """A collection's tables laid out over a mesh by a plan, with sharded lookups and updates.

  The tables pytree maps sharding type -> stacked array; `init`, `from_arrays`
  and `to_arrays` convert between it and per-table arrays. A train step calls
  `forward` once: its `Forward` holds the looked-up vectors to differentiate
  with respect to, `embed` (the exchange, differentiable) and `apply_gradients`
  (the sparse update). The per-device gathers, pooling and updates are the
  `kernel`'s (`dlrm_jax.embedding.kernels`). With one device and an
  all-table-wise plan the layout is exactly `EmbeddingCollection`'s stacked array.
  """

  def __init__(self, collection: EmbeddingCollection, plan: Plan, mesh: Mesh,
               axes: MeshAxes = MeshAxes(), kernel: LocalLookup | None = None):
    if len(plan.placements) != collection.num_tables:
      raise ValueError(f"the plan places {len(plan.placements)} tables, the collection has "
                       f"{collection.num_tables}")
    n = mesh.shape[axes.shard]
    if plan.num_shards != n:
      raise ValueError(f"the plan is for {plan.num_shards} devices, the mesh's "
                       f"{axes.shard!r} axis has {n}")
    self.collection, self.plan, self.mesh, self.axes = collection, plan, mesh, axes
    self.specs = collection.specs
    self.kernel = kernel or local_lookup(mesh.devices.flat[0].platform)
    self.groups: dict[str, _Layout] = plan_groups(collection, plan, axes, self.kernel)
    order = [t for g in self.groups.values() for t in g.features]
    self._feature_order = np.argsort(np.array(order))  # group-concatenated -> table order

  # Shardings ------------------------------------------------------------------
  def table_shardings(self) -> dict[str, NamedSharding]:
    return {k: NamedSharding(self.mesh, g.spec) for k, g in self.groups.items()}

  def _state_specs(self, state) -> dict:
    """Optimiser state leaves follow their table's row (and column) split."""
    def spec(kind, leaf):
      table_spec = self.groups[kind].spec
      return table_spec if leaf.ndim == 2 else P(table_spec[0])
    return {k: jax.tree.map(functools.partial(spec, k), v) for k, v in state.items()}

  def state_shardings(self, state) -> dict:
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self._state_specs(state))

  @property
  def batch_spec(self) -> P:
    return P(self.axes.batch)

  # Tables ---------------------------------------------------------------------
  def init(self, seed) -> Tables:
    """Fresh tables created shard by shard on their devices (call under jit)."""
    seed = jnp.asarray(seed, jnp.uint32)
    out = {}
    for kind, g in self.groups.items():
      out[kind] = jax.shard_map(g.init_local, mesh=self.mesh, in_specs=P(),
                                out_specs=g.spec)(seed)
    return out

  def from_arrays(self, arrays: Sequence[np.ndarray]) -> Tables:
    """Per-table arrays -> the sharded layout (placed on the mesh)."""
    if len(arrays) != self.collection.num_tables:
      raise ValueError(f"expected {self.collection.num_tables} tables, got {len(arrays)}")
    arrays = [np.asarray(a, np.float32) for a in arrays]
    for t, a in enumerate(arrays):
      if a.shape != (self.specs[t].rows, self.specs[t].dim):
        raise ValueError(f"table {self.specs[t].name}: expected shape "
                         f"{(self.specs[t].rows, self.specs[t].dim)}, got {a.shape}")
    stacked = stack_rows(self.groups, arrays, {k: g.shape for k, g in self.groups.items()})
    return {kind: jax.device_put(stacked[kind], NamedSharding(self.mesh, g.spec))
            for kind, g in self.groups.items()}

  def to_arrays(self, tables: Tables) -> list[np.ndarray]:
    """The sharded layout -> one host array per table."""
    return unstack_rows(self.groups, {kind: gather_to_host(tables[kind]) for kind in self.groups})

  def relayout(self, collection: EmbeddingCollection, plan: Plan, tables: dict,
               slots: dict, target_slots: dict) -> tuple[Tables, dict]:
    """Tables and sparse optimiser slots stored by another `plan` (host arrays of
    `collection`'s tables) -> this layout, placed on the mesh. `target_slots`: the
    abstract slots of this layout (their shapes)."""
    old, new = plan_groups(collection, plan), self.groups
    shardings = self.state_shardings(target_slots)
    per_table = unstack_rows(old, {k: np.asarray(v) for k, v in tables.items()})
    placed_tables = self.from_arrays(per_table)
    placed_slots = {k: {} for k in new}
    leaf_names = next(iter(slots.values()), {}).keys()
    for name in leaf_names:
      per_table = unstack_rows(old, {k: np.asarray(v[name]) for k, v in slots.items()})
      stacked = stack_rows(new, per_table, {k: v[name].shape for k, v in target_slots.items()})
      for k, v in stacked.items():
        placed_slots[k][name] = jax.device_put(v, shardings[k][name])
    return placed_tables, placed_slots

  def init_optimizer(self, opt, tables: Tables):
    """The sparse optimiser's state for each group, created on the tables' devices."""
    out = {}
    for kind, g in self.groups.items():
      abstract = jax.eval_shape(opt.init, {"stacked": jax.ShapeDtypeStruct(
          _local_shape(g), jnp.float32)})
      specs = self._state_specs({kind: abstract})[kind]
      out[kind] = jax.shard_map(lambda t: opt.init({"stacked": t}), mesh=self.mesh,
                                in_specs=g.spec, out_specs=specs)(tables[kind])
    return out

  # Per-step programs -------------------------------------------------------------
  def _sample_side(self, batch):
    """Ids [b, F, H] with -1 for padding, and per-id pooling scales (None: one-hot)."""
    ids = batch["sparse"]
    weights, mask = batch.get("sparse_weights"), batch.get("sparse_mask")
    if ids.ndim == 2:
      if weights is not None or mask is not None:
        raise ValueError("weights and masks go with bags of ids [batch, features, hotness]")
      return ids[..., None].astype(jnp.int32), None
    ids = ids.astype(jnp.int32)
    if mask is not None:
      ids = jnp.where(mask, ids, -1)
    return ids, self.collection.bag_scale(ids.shape, weights, mask)

  def lookup(self, tables: Tables, batch) -> Lookups:
    """Step 1: each device gathers the rows it owns for the ids that reach it."""
    fields = {k: batch[k] for k in ("sparse", "sparse_weights", "sparse_mask") if k in batch}

    def route(tables, fields):
      ids, scale = self._sample_side(fields)
      out = {}
      for kind, g in self.groups.items():
        cols = jnp.asarray(np.array(g.features, np.int32))
        out[kind] = g.route(tables[kind], jnp.take(ids, cols, axis=1),
                            None if scale is None else jnp.take(scale, cols, axis=1))
      return out

    return jax.shard_map(route, mesh=self.mesh,
                         in_specs=(self._table_specs(), self.batch_spec),
                         out_specs=self.batch_spec)(tables, fields)

  def exchange(self, lookups: Lookups) -> jax.Array:
    """Step 2 (differentiable): pooled vectors to their samples' devices -> [B, F, D]."""
    def exchange(lookups):
      parts = [g.exchange(lookups[kind]) for kind, g in self.groups.items()]
      emb = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
      return take_static(emb, self._feature_order, axis=1)

    return jax.shard_map(exchange, mesh=self.mesh, in_specs=self.batch_spec,
                         out_specs=self.batch_spec)(lookups)

  def embed(self, tables: Tables, batch) -> jax.Array:
    """Lookup and exchange: the pooled embedding of every feature, [B, F, D]."""
    return self.exchange(self.lookup(tables, batch))

  def forward(self, tables: Tables, batch) -> "Forward":
    """Step 1 now (each device gathers the rows it owns), steps 2 and 3 as functions."""
    with jax.named_scope("lookup"):
      lookups = self.lookup(tables, batch)
    return Forward(self, lookups)

  def update(self, opt, tables: Tables, state, lookups: Lookups,
             grads: dict[str, jax.Array], lr, step) -> tuple[Tables, dict]:
    """Step 3: each device applies `opt` to the touched rows of its own shards."""
    state_specs = self._state_specs(state)

    def update(tables, state, lookups, grads, lr, step):
      new_tables, new_state = {}, {}
      for kind, g in self.groups.items():
        new_tables[kind], new_state[kind] = g.update(
            opt, tables[kind], state[kind], lookups[kind], grads[kind], lr, step)
      return new_tables, new_state

    rows = {k: {"rows": v["rows"]} for k, v in lookups.items()}
    # Copies that the out_specs declare replicated (replicated tables, the row
    # accumulators of column-wise tables, every shard across replica groups)
    # are computed from all-reduced or all-gathered values, identical on each
    # device by construction; the static replication check cannot see through
    # the ids' round trip, so it is off here and the tests compare the copies.
    return jax.shard_map(
        update, mesh=self.mesh,
        in_specs=(self._table_specs(), state_specs, self.batch_spec, self.batch_spec, P(), P()),
        out_specs=(self._table_specs(), state_specs), check_vma=False)(
            tables, state, rows, grads, lr, step)

  def _table_specs(self) -> dict[str, P]:
    return {k: g.spec for k, g in self.groups.items()}


class Forward:
  """A batch's lookup: the vectors the loss is differentiated with respect to (where
  they live, on their rows' devices), and the two steps that follow."""

  def __init__(self, embedding: ShardedEmbedding, lookups: Lookups):
    self._embedding, self._lookups = embedding, lookups
    self.vectors: dict[str, jax.Array] = {k: v["vectors"] for k, v in lookups.items()}

  def embed(self, vectors: dict[str, jax.Array]) -> jax.Array:
    """Step 2 (differentiable): `vectors` pooled and sent to their samples -> [B, F, D]."""
    with jax.named_scope("exchange"):
      return self._embedding.exchange(
          {k: {**v, "vectors": vectors[k]} for k, v in self._lookups.items()})

  def apply_gradients(self, opt, tables: Tables, state, grads: dict[str, jax.Array], lr,
                      step) -> tuple[Tables, dict]:
    """Step 3: `opt` applied to the touched rows with the gradients of `vectors`."""
    with jax.named_scope("sparse update"):
      return self._embedding.update(opt, tables, state, self._lookups, grads, lr, step)


def _local_shape(g: _Layout) -> tuple[int, int]:
  rows, cols = g.shape
  if g.spec[0] is not None:
    rows //= g.n
  if g.spec[1] is not None:
    cols //= g.n
  return rows, cols
