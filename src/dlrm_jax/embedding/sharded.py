"""Embedding tables sharded over a device mesh, with the collectives written out.

`ShardedEmbedding` stores the tables of a collection as up to four stacked
arrays, one per sharding type of the plan (`dlrm_jax.embedding.planner`), each
laid out over the mesh's shard axis:

  table_wise   [shards * R_max, D]  split on rows: device d holds its own tables, stacked
  row_wise     [shards * R_loc, D]  split on rows: device d holds block d of every table
  column_wise  [R, D]               split on columns
  replicated   [R, D]               a copy on every device

(Tables of several widths, dlrm_jax.embedding.mixed: one such array per type and
width, and the exchange pads the narrower vectors to the widest table's width.)

A train step runs three `jax.shard_map` programs, each a per-device function
whose communication is explicit:

1. `route`: ids travel to the devices that own their rows, which gather the
   rows locally. table_wise: `all_to_all` of ids (the paper's butterfly
   shuffle); row_wise and column_wise: `all_gather` of ids, and a row-wise
   owner keeps only its own ids (up to a capacity in a train step:
   `layouts.RowWise`); replicated: local.
2. `exchange` (differentiated): the looked-up vectors, pooled at their owner,
   travel back to the devices that own the samples. table_wise: `all_to_all`;
   row_wise: `psum_scatter` of the owners' partial sums; column_wise: `all_to_all`
   of column slices; replicated: nothing. Its transpose, which `jax.grad`
   derives, carries the gradients back along the same paths.
3. `update`: each device applies the sparse optimiser to the rows it owns,
   with the gradients that arrived in step 2's transpose. Replicated tables
   all-gather every device's ids and gradients and apply the same sparse
   update on every copy (or, where the tables have at most half as many rows
   as the batch has ids, all-reduce a dense gradient of their rows).

The gradient is taken with respect to the looked-up vectors where they live
(on the owning device), so no gradient the size of a table ever exists and
each device touches only rows of its own shard.

A batch's ids are flat bags [B, sum(hotness)] (feature f's h_f ids end to end,
as the prepared Criteo files store a row), one id per feature [B, F], or bags
padded to H with a mask [B, F, H] (lengths that vary). Every layout sees flat
rows with static bag widths (`dlrm_jax.embedding.bags`), so the ids moved,
the rows gathered and the rows updated are one per id: table_wise pads each
owner's slot only to the most ids one device serves, and bags of several
widths are pooled by a sorted segment sum. The layouts and their per-device
programs are `dlrm_jax.embedding.layouts`.

A batch may also carry sequence features (the collection's `SequenceSpec`s):
"sequences", name -> ids [B, L], and "sequence_lengths", name -> [B]. Each
sequence position is one more bag of width 1 of its table, routed, gathered and
updated with the pooled features' ids in the same collectives, and returned
unpooled: `embed_sequences` gives name -> [B, L, D], zeros from each sample's
length on. Their gradients reach the sparse update per position, and repeated
rows are summed there as repeated ids of bags are.

Over a 2-D mesh (replica, shard) each replica group holds a full copy of the
sharded tables and serves its own slice of the batch; updates gather the
touched rows and gradients of all replica groups so that copies stay equal.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlrm_jax.embedding.bags import Bags, with_sequences
from dlrm_jax.embedding.collection import EmbeddingCollection, Tables, pad_to, unpack
from dlrm_jax.embedding.kernels import LocalLookup, local_lookup
from dlrm_jax.embedding.layouts import (Layout, RowWise, local_shape, plan_groups, stack_rows,
                                        unstack_rows)
from dlrm_jax.embedding.planner import Plan
from dlrm_jax.ops import take_static
from dlrm_jax.parallel import MeshAxes, gather_to_host

Lookups = dict[str, dict[str, jax.Array]]


class Embedded(NamedTuple):
  """A batch's embeddings: the pooled features' [B, F, D] ([B, 0, D] for a batch of
  sequences only) and each sequence feature's [B, L, D] (zeros at padding)."""

  pooled: jax.Array
  sequences: dict[str, jax.Array]


class ShardedEmbedding:
  """A collection's tables laid out over a mesh by a plan, with sharded lookups and updates.

  The tables pytree maps sharding type -> stacked array; `init`, `from_arrays`
  and `to_arrays` convert between it and per-table arrays. A train step calls
  `forward` once: its `Forward` holds the looked-up vectors to differentiate
  with respect to, `exchange` (differentiable: the pooled features' and the
  sequences' vectors; `embed` for the pooled ones alone) and `apply_gradients`
  (the sparse update). The per-device gathers, pooling and updates are the
  `kernel`'s (`dlrm_jax.embedding.kernels`). With one device and an
  all-table-wise plan the layout is exactly `EmbeddingCollection`'s stacked array.
  """

  def __init__(self, collection: EmbeddingCollection, plan: Plan, mesh: Mesh,
               axes: MeshAxes = MeshAxes(), kernel: LocalLookup | None = None,
               row_wise_capacity: float = 0.0):
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
    self.groups: dict[str, Layout] = plan_groups(collection, plan, axes, self.kernel,
                                                 row_wise_capacity)
    # Whether a train step can leave out ids (row-wise groups with a capacity below every
    # id: `layouts.RowWise.capacity`); `Forward.dropped` is 0 otherwise.
    self.may_drop_ids = any(isinstance(g, RowWise) and g.capacity_factor > 0
                            for g in self.groups.values())

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
    arrays = [np.asarray(a) for a in arrays]
    for t, a in enumerate(arrays):
      if a.shape != (self.specs[t].rows, self.specs[t].dim):
        raise ValueError(f"table {self.specs[t].name}: expected shape "
                         f"{(self.specs[t].rows, self.specs[t].dim)}, got {a.shape}")
    out = {}
    for kind, g in self.groups.items():  # each group in its storage type, packed or not
      stored = [self.collection.store(a, g.packed) if t in g.features else None
                for t, a in enumerate(arrays)]
      stacked = stack_rows({kind: g}, stored, {kind: g.stored_shape})[kind]
      out[kind] = jax.device_put(stacked, NamedSharding(self.mesh, g.spec))
    return out

  def to_arrays(self, tables: Tables) -> list[np.ndarray]:
    """The sharded layout -> one host array of [rows, D] values per table."""
    stored = {kind: gather_to_host(tables[kind]) for kind in self.groups}
    return [unpack(a) for a in unstack_rows(self.groups, stored)]

  def relayout(self, collection: EmbeddingCollection, plan: Plan, tables: dict,
               slots: dict, target_slots: dict) -> tuple[Tables, dict]:
    """Tables and sparse optimiser slots stored by another `plan` (host arrays of
    `collection`'s tables) -> this layout, placed on the mesh. `target_slots`: the
    abstract slots of this layout (their shapes)."""
    old, new = plan_groups(collection, plan), self.groups
    shardings = self.state_shardings(target_slots)
    per_table = unstack_rows(old, {k: np.asarray(v) for k, v in tables.items()})
    placed_tables = self.from_arrays([unpack(a) for a in per_table])
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
          local_shape(g), jnp.float32)})
      specs = self._state_specs({kind: abstract})[kind]
      out[kind] = jax.shard_map(lambda t: opt.init({"stacked": t}), mesh=self.mesh,
                                in_specs=g.spec, out_specs=specs)(tables[kind])
    return out

  # Per-step programs -------------------------------------------------------------
  def bags(self, batch) -> Bags:
    """The static layout of a batch's ids: flat bags [B, sum(hotness)], one id per
    feature [B, F] or padded bags [B, F, H] (`EmbeddingCollection.bags`), then one bag
    of width 1 per position of each sequence feature (`bags.with_sequences`)."""
    pooled = self.collection.bags(batch["sparse"].shape) if "sparse" in batch else Bags(())
    capacities = [length for _, length in self.sequence_shapes(batch)]
    return with_sequences(pooled, self.collection.sequence_tables, capacities)

  def sequence_shapes(self, batch) -> tuple[tuple[str, int], ...]:
    """Each sequence feature's name and capacity L in `batch` (none if it has no
    "sequences"), after checking the fields' names and shapes."""
    if "sequences" not in batch:
      if "sequence_lengths" in batch:
        raise ValueError("the batch has sequence_lengths but no sequences")
      if "sparse" not in batch:
        raise ValueError("a batch needs categorical ids (sparse), sequences, or both")
      return ()
    names = [q.name for q in self.collection.sequences]
    ids, lengths = batch["sequences"], batch.get("sequence_lengths")
    if sorted(ids) != sorted(names):
      raise ValueError(f"the batch's sequences {sorted(ids)} are not the collection's "
                       f"sequence features {sorted(names)}")
    if lengths is None or sorted(lengths) != sorted(names):
      raise ValueError(f"sequence_lengths must give the length of each sequence {sorted(names)}"
                       f", got {None if lengths is None else sorted(lengths)}")
    batch_size = batch["sparse"].shape[0] if "sparse" in batch else ids[names[0]].shape[0]
    for name in names:
      if len(ids[name].shape) != 2 or ids[name].shape[0] != batch_size:
        raise ValueError(f"sequence {name!r}: ids must have shape [batch={batch_size}, "
                         f"capacity], got {tuple(ids[name].shape)}")
      if tuple(lengths[name].shape) != (batch_size,):
        raise ValueError(f"sequence_lengths[{name!r}] must have shape ({batch_size},), got "
                         f"{tuple(lengths[name].shape)}")
    shapes = tuple((name, int(ids[name].shape[1])) for name in names)
    if "sparse" not in batch and not any(length for _, length in shapes):
      raise ValueError("a batch of sequences only needs a sequence of capacity >= 1")
    return shapes

  def _sample_side(self, fields):
    """Ids as flat rows [b, L] (-1: padding), and per-id pooling scales (None: weight 1):
    the pooled features' ids, then each sequence's positions (`bags`)."""
    ids, scale = self._pooled_side(fields) if "sparse" in fields else (None, None)
    if "sequences" not in fields:
      return ids, scale
    seq_ids, seq_scale = [], []
    for q in self.collection.sequences:
      x = fields["sequences"][q.name].astype(jnp.int32)
      valid = (jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]
               < fields["sequence_lengths"][q.name].astype(jnp.int32)[:, None])
      seq_ids.append(jnp.where(valid, x, -1))
      seq_scale.append(valid.astype(jnp.float32))
    if ids is not None:
      seq_ids.insert(0, ids)
      seq_scale.insert(0, jnp.ones(ids.shape, jnp.float32) if scale is None else scale)
    return jnp.concatenate(seq_ids, axis=1), jnp.concatenate(seq_scale, axis=1)

  def _pooled_side(self, fields):
    """The pooled features' part of `_sample_side`."""
    ids = fields["sparse"].astype(jnp.int32)
    weights, mask = fields.get("sparse_weights"), fields.get("sparse_mask")
    if weights is not None and weights.shape != ids.shape:
      raise ValueError(f"sparse_weights {weights.shape} must have the ids' shape {ids.shape}")
    if ids.ndim == 2:
      if mask is not None:
        raise ValueError("a mask goes with padded bags [batch, features, H]; flat bags "
                         "[batch, sum(hotness)] have none")
      return ids, None if weights is None else weights.astype(jnp.float32)
    if mask is not None:
      ids = jnp.where(mask, ids, -1)
    scale = self.collection.bag_scale(ids.shape, weights, mask)
    return ids.reshape(ids.shape[0], -1), scale.reshape(ids.shape[0], -1)

  def lookup(self, tables: Tables, batch, bounded: bool = False) -> Lookups:
    """Step 1: each device gathers the rows it owns for the ids that reach it (groups
    whose tables no bag of the batch reads have no entry). `bounded`: row-wise owners
    keep at most their capacity of ids (a train step, `forward`); by default every id."""
    fields = {k: batch[k] for k in ("sparse", "sparse_weights", "sparse_mask", "sequences",
                                    "sequence_lengths") if k in batch}
    bags = self.bags(batch)

    def route(tables, fields):
      ids, scale = self._sample_side(fields)
      out = {}
      for kind, g in self.groups.items():
        ks, bags_g = bags.of_tables(g.features)
        if not len(ks):
          continue
        cols = bags.columns(ks)
        if not np.array_equal(cols, np.arange(bags.total)):  # this group's ids, in its order
          ids_g = jnp.take(ids, cols, axis=1)
          scale_g = None if scale is None else jnp.take(scale, cols, axis=1)
        else:
          ids_g, scale_g = ids, scale
        out[kind] = g.route(tables[kind], ids_g, scale_g, bags_g, bounded)
      return out

    return jax.shard_map(route, mesh=self.mesh,
                         in_specs=(self._table_specs(), self.batch_spec),
                         out_specs=self.batch_spec)(tables, fields)

  def exchange(self, lookups: Lookups, bags: Bags,
               sequences: tuple[tuple[str, int], ...] = ()) -> Embedded:
    """Step 2 (differentiable): pooled vectors to their samples' devices. `bags`: the
    layout of the looked-up batch's ids (`bags(batch)`); `sequences`: its sequence
    features' names and capacities (`sequence_shapes(batch)`), the last bags."""
    def exchange(lookups):
      dim = self.collection.dim  # narrower tables' vectors zero-padded to the widest's
      parts, order = [], []
      for kind, g in self.groups.items():
        if kind in lookups:
          ks, bags_g = bags.of_tables(g.features)
          parts.append(pad_to(g.exchange(lookups[kind], bags_g), dim))
          order.append(ks)
      emb = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
      emb = take_static(emb, np.argsort(np.concatenate(order)), axis=1)  # -> bag order
      if bags.divisors is not None:  # "mean" of flat bags: by the static hotness
        emb = emb / jnp.asarray(bags.divisors, emb.dtype)[None, :, None]
      return emb

    emb = jax.shard_map(exchange, mesh=self.mesh, in_specs=self.batch_spec,
                        out_specs=self.batch_spec)(lookups)
    if not sequences:
      return Embedded(emb, {})
    start = pooled = len(bags.widths) - sum(length for _, length in sequences)
    out = {}
    for name, length in sequences:
      out[name] = emb[:, start:start + length]
      start += length
    return Embedded(emb[:, :pooled], out)

  def embed_all(self, tables: Tables, batch) -> Embedded:
    """Lookup and exchange: the pooled features' and the sequences' embeddings."""
    return self.exchange(self.lookup(tables, batch), self.bags(batch),
                         self.sequence_shapes(batch))

  def embed(self, tables: Tables, batch) -> jax.Array:
    """The pooled embedding of every feature, [B, F, D] (`embed_all`)."""
    return self.embed_all(tables, batch).pooled

  def embed_sequences(self, tables: Tables, batch) -> dict[str, jax.Array]:
    """Each sequence feature's vectors, name -> [B, L, D], zeros from each sample's
    length on (`embed_all`)."""
    return self.embed_all(tables, batch).sequences

  def forward(self, tables: Tables, batch) -> "Forward":
    """Step 1 now (each device gathers the rows it owns), steps 2 and 3 as functions."""
    with jax.named_scope("lookup"):
      lookups = self.lookup(tables, batch, bounded=True)
    return Forward(self, lookups, self.bags(batch), self.sequence_shapes(batch))

  def update(self, opt, tables: Tables, state, lookups: Lookups,
             grads: dict[str, jax.Array], lr, step) -> tuple[Tables, dict]:
    """Step 3: each device applies `opt` to the touched rows of its own shards."""
    state_specs = self._state_specs(state)

    def update(tables, state, lookups, grads, lr, step):
      new_tables, new_state = {}, {}
      for kind, g in self.groups.items():
        if kind not in lookups:  # no bag of the batch reads its tables
          new_tables[kind], new_state[kind] = tables[kind], state[kind]
          continue
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

  def __init__(self, embedding: ShardedEmbedding, lookups: Lookups, bags: Bags,
               sequences: tuple[tuple[str, int], ...] = ()):
    self._embedding, self._lookups, self.bags = embedding, lookups, bags
    self.sequences = sequences  # the sequence features' names and capacities
    self.vectors: dict[str, jax.Array] = {k: v["vectors"] for k, v in lookups.items()}
    # Row-wise ids past their owner's capacity, left out of this step (0: none).
    self.dropped: jax.Array = sum((jnp.sum(v["dropped"]) for v in lookups.values()
                                   if "dropped" in v), jnp.zeros((), jnp.int32))

  def exchange(self, vectors: dict[str, jax.Array]) -> Embedded:
    """Step 2 (differentiable): `vectors` pooled and sent to their samples -> the pooled
    features' [B, F, D] and each sequence's [B, L, D] (`Embedded`)."""
    with jax.named_scope("exchange"):
      return self._embedding.exchange(
          {k: {**v, "vectors": vectors[k]} for k, v in self._lookups.items()}, self.bags,
          self.sequences)

  def embed(self, vectors: dict[str, jax.Array]) -> jax.Array:
    """`exchange(vectors).pooled`: the pooled features' embeddings, [B, F, D]."""
    return self.exchange(vectors).pooled

  def apply_gradients(self, opt, tables: Tables, state, grads: dict[str, jax.Array], lr,
                      step) -> tuple[Tables, dict]:
    """Step 3: `opt` applied to the touched rows with the gradients of `vectors`."""
    with jax.named_scope("sparse update"):
      return self._embedding.update(opt, tables, state, self._lookups, grads, lr, step)
