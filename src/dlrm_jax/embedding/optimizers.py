"""Sparse embedding optimisers: pure functions that update only touched rows.

The train step differentiates the dense network with respect to the looked-up
vectors, never the tables, and hands those per-lookup gradients here together
with the rows they came from. An update therefore costs O(lookups x D) time
and memory, whatever the table size; the optimiser state has the tables'
row layout and is updated on the same rows.

All optimisers first sum the gradients of a row that appears several times in
the batch (a sort and a segment sum with static sizes), so each touched row is
updated once with its total gradient, which is what a dense gradient of the
gather would hold for that row:

- `sgd`:              w -= lr * g
- `rowwise_adagrad`:  a += mean(g^2) (one accumulator per row);
                      w -= lr * g / (sqrt(a) + eps)            (FBGEMM, TorchRec, MLPerf DLRM-DCNv2)
- `adagrad`:          a += g^2 (per element); w -= lr * g / (sqrt(a) + eps)   (torch.optim.Adagrad)
- `adam` (lazy):      m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
                      w -= lr * m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - b1^t),
                      v_hat = v / (1 - b2^t), t the 1-based global step (FBGEMM's
                      `EmbOptimType.ADAM`, TorchRec's fused Adam). Rows that a step
                      does not touch keep their moments unchanged (they do not decay):
                      that is what makes it lazy, unlike dense Adam. torch.optim.SparseAdam
                      differs in where eps goes: lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps).

The state is float32 whatever the tables' storage type. 16-bit tables (bfloat16,
float16) are updated in float32 and stored with `subtract_rows`, which rounds
stochastically; SGD then also sums a row's gradients first.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from dlrm_jax.config import ConfigError, parse_args
from dlrm_jax.embedding.collection import (Tables, gather_rows, hash_uniform, is_packed, pack,
                                           value_dtype, value_shape)


def sum_duplicates(rows: jax.Array, grads: jax.Array, fill_row: int,
                   method: str = "segment_sum") -> tuple[jax.Array, jax.Array]:
  """Sums gradients of repeated rows.

  Args:
    rows: [N] int32 rows of the stacked table.
    grads: [N, D] gradient of each lookup.
    fill_row: the index given to unused slots; pass the table's row count so
      that scatters with mode="drop" ignore them.
    method: how equal rows' gradients are summed. "segment_sum": the rows alone
      are sorted (a sort of keys only, several times faster on XLA:CPU than one
      that carries a permutation), each lookup finds its row's slot by binary
      search, and a segment sum adds the gradients into their slots as they lie
      (a scatter-add: on a GPU, atomics that contend on every repeated row).
      "scan": the gradients are permuted into row order and runs of equal rows
      summed by a segmented prefix sum (`lax.associative_scan`) read at each
      run's last position: gathers and element-wise work only, no scatter-add
      (the GPU kernel's, `dlrm_jax.embedding.kernels`).

  Returns:
    unique rows [N] (sorted; slots past the number of distinct rows hold
    `fill_row`) and their summed gradients [N, D] (zero in unused slots), each
    row's gradients added in the order of the lookups.
  """
  n = rows.shape[0]
  if method == "segment_sum":
    sorted_rows = jnp.sort(rows)
  elif method == "scan":
    order = jnp.argsort(rows)
    sorted_rows = rows[order]
  else:
    raise ValueError(f"method={method!r} is not 'segment_sum' or 'scan'")
  is_first = jnp.concatenate([jnp.ones((1,), bool), sorted_rows[1:] != sorted_rows[:-1]])
  segment = jnp.cumsum(is_first.astype(jnp.int32)) - 1
  if method == "segment_sum":
    unique = jnp.full((n,), fill_row, rows.dtype).at[segment].set(sorted_rows, mode="drop")
    slot = jnp.searchsorted(unique, rows).astype(jnp.int32)  # padding: the fill's first slot
    return unique, jax.ops.segment_sum(grads, slot, num_segments=n)

  def add_within_runs(a, b):  # associative: a run's first element restarts the sum
    return a[0] | b[0], jnp.where(b[0][:, None], b[1], a[1] + b[1])

  _, totals = jax.lax.associative_scan(add_within_runs, (is_first, grads[order]))
  slot = jnp.arange(n, dtype=segment.dtype)
  last = jnp.searchsorted(segment, slot, side="right") - 1  # where run `slot` ends
  valid = slot <= segment[-1]
  return (jnp.where(valid, sorted_rows[last], fill_row),
          jnp.where(valid[:, None], totals[last], 0).astype(grads.dtype))


def _take(x: jax.Array, rows: jax.Array) -> jax.Array:
  return jnp.take(x, rows, axis=0, mode="clip")  # unused slots are dropped on write.


def _put(x: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
  return x.at[rows].set(values.astype(x.dtype), mode="drop", unique_indices=True,
                        indices_are_sorted=True)


def _accumulate(x: jax.Array, rows: jax.Array, increment: jax.Array) -> jax.Array:
  """`x` with `increment` added to rows [N] (unique, sorted; slots >= its row count
  dropped): the same values as `_put(x, rows, _take(x, rows) + increment)`, with no
  gather of the rows into the scatter that writes them, so that the scatter reads only
  the increments (and updates `x` in place, as `subtract_rows` does the tables). Read
  the new rows from its result, not the old ones from `x`: a read of `x` that could
  come after the update would make the compiler copy `x` first."""
  return x.at[rows].add(increment.astype(x.dtype), mode="drop", unique_indices=True,
                        indices_are_sorted=True)


def stochastic_round(x: jax.Array, dtype, u: jax.Array) -> jax.Array:
  """float32 `x` rounded to the 16-bit `dtype` up or down at random, unbiased: to the
  neighbour on the other side of the nearest with probability (distance to the
  nearest) / (their gap), `u` uniform in [0, 1) of x's shape (as FBGEMM rounds its
  16-bit weights: round-to-nearest would lose every update smaller than half a step
  of the stored value, e.g. lr * g below 2^-9 of a weight in bfloat16)."""
  near = x.astype(dtype)
  near32 = near.astype(jnp.float32)
  toward = jnp.where(near32 < x, jnp.inf, -jnp.inf).astype(dtype)
  other = jnp.nextafter(near, toward)
  gap = other.astype(jnp.float32) - near32
  p = jnp.where(gap != 0, (x - near32) / jnp.where(gap != 0, gap, 1.0), 0.0)
  return jnp.where(u < p, other, near)


def subtract_rows(table: jax.Array, rows: jax.Array, delta: jax.Array, step: jax.Array,
                  element_ids=None) -> jax.Array:
  """`table` with float32 `delta` [N, C] taken from rows [N] (unique, sorted; slots >=
  its row count dropped).

  A float32 table gets a scatter-add of -delta (on distinct rows: no atomics, and the
  same values as gathering the rows, subtracting and writing them back). It does not
  read the rows first: XLA:TPU fused such a gather into the scatter that writes the
  table, and a fusion that reads the array it writes cannot update it in place, so
  the compiled step copied the whole donated table every step (docs/compile.md).

  A 16-bit table's new rows are computed in float32 and stochastically rounded, with
  noise that is a fixed function of (step, row, column) of the unsharded table
  (`element_ids`: (local rows -> those rows, the local columns' numbers), from the
  sharded layout; None: the rows and columns as they are), so that every layout and
  every copy of a replicated table rounds alike. Its gather of the old rows stays
  out of the scatter's fusion (an optimisation barrier) for the same reason.
  """
  dtype = value_dtype(table)
  if dtype.itemsize == 4:
    return table.at[rows].add(-delta.astype(table.dtype), mode="drop", unique_indices=True,
                              indices_are_sorted=True)
  values = jax.lax.optimization_barrier(gather_rows(table, rows)) - delta
  seed = jnp.asarray(step, jnp.uint32) * jnp.uint32(0x9E3779B1) + jnp.uint32(0x5851F42D)
  if element_ids is None:
    global_rows, cols = rows, jnp.arange(values.shape[1], dtype=jnp.uint32)
  else:
    global_rows, cols = element_ids[0](rows), element_ids[1]
  u = (hash_uniform(seed, global_rows.astype(jnp.uint32)[:, None], cols[None, :]) + 1.0) * 0.5
  values = stochastic_round(values, dtype, u)
  if is_packed(table):
    values = pack(values)
  return _put(table, rows, values)


class _RowUpdates:
  """`update` = `sum_duplicates` + `apply_rows`, the optimiser's step on distinct rows
  (which a kernel that de-duplicates its own way calls directly)."""

  def update(self, tables: Tables, state: dict, rows: jax.Array, grads: jax.Array,
             lr: jax.Array, step: jax.Array, column_axis: str | None = None,
             element_ids=None) -> tuple[Tables, dict]:
    """rows [N] (stacked-array rows; repeats allowed, rows >= the table's row count are
    padding), grads [N, D] -> updated tables and state.

    `column_axis` names the mesh axis a column-wise table's width is split
    over (inside `shard_map`), for optimisers whose state spans a whole row;
    `element_ids` is the layout's numbering for 16-bit rounding (`subtract_rows`).
    """
    unique, g = sum_duplicates(rows, grads, tables["stacked"].shape[0])
    return self.apply_rows(tables, state, unique, g, lr, step, column_axis, element_ids)

  def apply_rows(self, tables: Tables, state: dict, rows: jax.Array, grads: jax.Array,
                 lr: jax.Array, step: jax.Array, column_axis: str | None = None,
                 element_ids=None) -> tuple[Tables, dict]:
    """`update` on distinct, sorted rows [N] with their summed gradients (as
    `sum_duplicates` returns them: slots >= the table's row count are dropped)."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SparseSGD(_RowUpdates):
  """Plain SGD, the reference's semantics: row -= lr * (sum of its gradients).

  float32 tables need no de-duplication: the scatter-add accumulates repeated rows.
  """

  def slot_values_per_row(self, dim: int) -> int:
    """float32 values of optimiser state per table row of width `dim` (for the planner)."""
    del dim
    return 0

  def init(self, tables: Tables) -> dict:
    del tables
    return {}

  def update(self, tables, state, rows, grads, lr, step, column_axis=None, element_ids=None):
    table = tables["stacked"]
    if value_dtype(table).itemsize < 4:  # 16-bit rows: sum, step and round each row once
      return super().update(tables, state, rows, grads, lr, step, column_axis, element_ids)
    # Slots with row >= n (padding) add zero to a valid row instead of being
    # dropped: XLA:CPU's scatter-add with mode="drop" is far slower than with
    # in-bounds indices (benchmarks/RESULTS.md).
    n = table.shape[0]
    update = jnp.where((rows < n)[:, None], -lr * grads, 0.0).astype(table.dtype)
    table = table.at[jnp.minimum(rows, n - 1)].add(update, mode="promise_in_bounds")
    return {"stacked": table}, state

  def apply_rows(self, tables, state, rows, grads, lr, step, column_axis=None, element_ids=None):
    del column_axis
    table = tables["stacked"]
    return {"stacked": subtract_rows(table, rows, lr * grads, step, element_ids)}, state


@dataclasses.dataclass(frozen=True)
class SparseRowWiseAdagrad(_RowUpdates):
  """Adagrad with one accumulator per row: a += mean(g^2); w -= lr g / (sqrt(a) + eps)."""

  eps: float = 1e-8
  initial_accumulator_value: float = 0.0

  def slot_values_per_row(self, dim: int) -> int:
    del dim
    return 1

  def init(self, tables: Tables) -> dict:
    t = tables["stacked"]
    return {"accumulator": jnp.full(value_shape(t)[:1], self.initial_accumulator_value,
                                    jnp.float32)}

  def apply_rows(self, tables, state, unique, g, lr, step, column_axis=None, element_ids=None):
    table, acc = tables["stacked"], state["accumulator"]
    mean_square = jnp.mean(jnp.square(g), axis=1)
    if column_axis is not None:  # equal slices of the row on each device: mean of their means
      mean_square = jax.lax.pmean(mean_square, column_axis)
    acc = _accumulate(acc, unique, mean_square)
    a = _take(acc, unique)
    delta = lr * g / (jnp.sqrt(a)[:, None] + self.eps)
    return ({"stacked": subtract_rows(table, unique, delta, step, element_ids)},
            {"accumulator": acc})


@dataclasses.dataclass(frozen=True)
class SparseAdagrad(_RowUpdates):
  """Element-wise Adagrad on touched rows: a += g^2; w -= lr g / (sqrt(a) + eps)."""

  eps: float = 1e-10
  initial_accumulator_value: float = 0.0

  def slot_values_per_row(self, dim: int) -> int:
    return dim

  def init(self, tables: Tables) -> dict:
    t = tables["stacked"]
    return {"accumulator": jnp.full(value_shape(t), self.initial_accumulator_value,
                                    jnp.float32)}

  def apply_rows(self, tables, state, unique, g, lr, step, column_axis=None, element_ids=None):
    del column_axis  # element-wise: a column slice needs nothing from the others.
    table, acc = tables["stacked"], state["accumulator"]
    acc = _accumulate(acc, unique, jnp.square(g))
    a = _take(acc, unique)
    delta = lr * g / (jnp.sqrt(a) + self.eps)
    return ({"stacked": subtract_rows(table, unique, delta, step, element_ids)},
            {"accumulator": acc})


@dataclasses.dataclass(frozen=True)
class SparseLazyAdam(_RowUpdates):
  """Adam on touched rows only; untouched rows keep their moments (lazy Adam).

  `step` is the 0-based global step, so bias corrections use t = step + 1 for
  every row, as FBGEMM's ADAM does with its iteration count.
  """

  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def slot_values_per_row(self, dim: int) -> int:
    return 2 * dim

  def init(self, tables: Tables) -> dict:
    t = tables["stacked"]
    return {"mu": jnp.zeros(value_shape(t), jnp.float32),
            "nu": jnp.zeros(value_shape(t), jnp.float32)}

  def apply_rows(self, tables, state, unique, g, lr, step, column_axis=None, element_ids=None):
    del column_axis  # element-wise: a column slice needs nothing from the others.
    table = tables["stacked"]
    t = jnp.asarray(step, jnp.float32) + 1.0
    m = self.b1 * _take(state["mu"], unique) + (1 - self.b1) * g
    v = self.b2 * _take(state["nu"], unique) + (1 - self.b2) * jnp.square(g)
    m_hat = m / (1 - self.b1**t)
    v_hat = v / (1 - self.b2**t)
    delta = lr * m_hat / (jnp.sqrt(v_hat) + self.eps)
    return ({"stacked": subtract_rows(table, unique, delta, step, element_ids)},
            {"mu": _put(state["mu"], unique, m), "nu": _put(state["nu"], unique, v)})


SPARSE_OPTIMIZERS = {
    "sgd": SparseSGD,
    "rowwise_adagrad": SparseRowWiseAdagrad,
    "adagrad": SparseAdagrad,
    "adam": SparseLazyAdam,
}


def make_sparse_optimizer(name: str, args: str | Mapping[str, float] = ""):
  """The sparse optimiser called `name` in configs (`embedding_optimizer`), with its
  hyper-parameters from `args` ("eps=1e-7,initial_accumulator_value=0.1": the fields
  its dataclass declares; the others keep their defaults)."""
  if name not in SPARSE_OPTIMIZERS:
    raise ConfigError(f"embedding_optimizer={name!r} is not one of {tuple(SPARSE_OPTIMIZERS)}")
  cls = SPARSE_OPTIMIZERS[name]
  fields = [f.name for f in dataclasses.fields(cls)]
  values = parse_args("embedding_optimizer_args", args) if isinstance(args, str) else dict(args)
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(f"embedding_optimizer_args={args!r}: {name} has no {unknown}; its "
                      f"hyper-parameters are {fields or 'none'}")
  return cls(**{k: float(v) for k, v in values.items()})
