"""The local lookup: what one device does with the rows it owns, per backend.

A sharded step (`dlrm_jax.embedding.sharded`) moves ids and vectors between
devices with collectives; between those, each device gathers rows of its
shard, pools bags of vectors (of one width, or of several laid end to end:
`dlrm_jax.embedding.bags`), and applies the sparse optimiser to the rows it
owns. Those are a `LocalLookup`, chosen per backend from `KERNELS`: a
GPU- or TPU-specific kernel (a fused gather, a Pallas update) is one class
here, registered under its backend, with a test against `PortableLookup`.

`PortableLookup` sums repeated rows and pools bags of several widths with
sorted segment sums (scatter-adds) and lets plain SGD scatter-add into a
float32 table: the fastest form on XLA:CPU. On a GPU a scatter-add is an
atomic add per element, and atomics on one address serialise: every repeated
id (power-law ids: the hot rows, thousands of times per batch) contends, and
some jaxlib releases emit float32 scatter-adds as compare-and-swap loops,
hundreds of times slower (jax-ml/jax#38806). `SortedLookup`, the GPU's, has
no scatter-add at all: ids (int32: 64-bit sorts are several times slower)
are sorted, runs of equal rows summed by a segmented prefix sum
(`sum_duplicates(method="scan")`), each distinct row written once (a scatter
with unique indices, no atomics), and bags pooled by a matmul with a 0/1
matrix of their columns at float32 precision. A row-wise owner's partial sums of
the bags (`sum_rows`, over the ids it kept, in batch order) stay a sorted segment
sum on every backend: its segments are bags, each added to by at most a bag's
width of ids, so its atomics barely contend, and a segmented scan of the same
(log2 N passes over N vectors) moved many times the bytes in the compiled GPU step.

The TPU's `sum_rows` adds the empty slots' zero vectors to the last bag rather
than dropping them, so that no pass masks every id's gradient; its scatter has no
atomics to contend on that bag.

One collective is here too, as its best form differs by backend: `sum_scatter`,
which sums the row-wise owners' partial sums over the devices and leaves each
device its own samples'. It is a reduce-scatter, except on TPU: XLA:TPU rewrites a
reduce-scatter over a v5p slice of 8 or more chips into an all-reduce of the whole
input (its pass `reduce-scatter-decomposer`; on smaller slices it depends on the size
and layout, docs/compile.md), so on every TPU `TpuLookup` sends each device its
samples' block with an all-to-all and adds the n blocks it receives, in device order.
"""

from __future__ import annotations

import functools
from typing import Protocol

import jax
import jax.numpy as jnp

from dlrm_jax.embedding.bags import pool_equal, pool_segments
from dlrm_jax.embedding.collection import gather_rows
from dlrm_jax.embedding.optimizers import sum_duplicates


class LocalLookup(Protocol):
  """Gather, pool and update of one device's rows."""

  def gather(self, table: jax.Array, rows: jax.Array) -> jax.Array:
    """table[rows] for rows [..., H] -> [..., H, D]; a row past the end (padding) may
    give any value: its vector is left out of its bag (a pooling scale of 0, a padding
    segment, or zeroed) and its update is dropped."""

  def pool(self, vectors: jax.Array, scale: jax.Array | None) -> jax.Array:
    """Bags of one width: [..., H, D] vectors with [..., H] scales (None: weight 1) -> [..., D]."""

  def segment_pool(self, vectors: jax.Array, scale: jax.Array | None, segments: jax.Array,
                   num_segments: int) -> jax.Array:
    """Bags of several widths end to end: [..., L, D] vectors with [..., L] scales (None:
    weight 1) -> [..., K, D]; column l goes to bag segments[l] ([L] int32, sorted; K =
    num_segments), a segment of K or more is padding and left out."""

  def update(self, opt, table: jax.Array, state: dict, rows: jax.Array, grads: jax.Array,
             lr: jax.Array, step: jax.Array, **kwargs) -> tuple[jax.Array, dict]:
    """The sparse optimiser `opt` on rows [N] of `table` with gradients [N, D] (repeats
    allowed; rows >= the table's row count are padding)."""

  def sum_rows(self, rows: jax.Array, values: jax.Array, num_rows: int) -> jax.Array:
    """[num_rows, D]: row r the sum of the values [N, D] whose rows [N] (sorted) are r;
    rows >= num_rows dropped (their values are zero: a kernel may add them to a row
    instead, and their gradient may be any value). Differentiable with respect to
    `values`."""

  def row_gradients(self, rows: jax.Array, grads: jax.Array,
                    num_rows: int) -> tuple[jax.Array, jax.Array]:
    """The dense gradient [num_rows, D] of lookups of rows [N] (rows >= num_rows
    dropped) with gradients [N, D], and how often each row was looked up [num_rows]
    (> 0: touched)."""

  def sum_scatter(self, partial: jax.Array, axis: str, n: int) -> jax.Array:
    """Inside shard_map over mesh axis `axis` of `n` devices: [B, ...] on each device ->
    [B / n, ...], device i's the sum over the devices of their rows [i B / n, (i + 1) B / n)."""


class PortableLookup:
  """XLA's gather, an einsum and the optimiser's own scatter: every backend."""

  def gather(self, table, rows):
    return gather_rows(table, rows)

  def pool(self, vectors, scale):
    return pool_equal(vectors, scale)

  def segment_pool(self, vectors, scale, segments, num_segments):
    return pool_segments(vectors, scale, segments, num_segments)

  def update(self, opt, table, state, rows, grads, lr, step, **kwargs):
    tables, state = opt.update({"stacked": table}, state, rows, grads, lr, step, **kwargs)
    return tables["stacked"], state

  def sum_rows(self, rows, values, num_rows):
    return jax.ops.segment_sum(values, rows, num_segments=num_rows, indices_are_sorted=True)

  def row_gradients(self, rows, grads, num_rows):
    dense = jax.ops.segment_sum(grads, rows, num_segments=num_rows + 1)[:num_rows]
    touched = jax.ops.segment_sum(jnp.ones_like(rows), rows, num_segments=num_rows + 1)
    return dense, touched[:num_rows]

  def sum_scatter(self, partial, axis, n):
    return jax.lax.psum_scatter(partial, axis, scatter_dimension=0, tiled=True)


class SortedLookup(PortableLookup):
  """No scatter-add, so no contended atomics (the module's docstring): for GPUs."""

  def segment_pool(self, vectors, scale, segments, num_segments):
    if scale is not None:
      vectors = vectors * scale[..., None].astype(vectors.dtype)
    # Column l's row of the 0/1 matrix selects its bag; padding (>= K) selects none.
    member = (segments[:, None] == jnp.arange(num_segments, dtype=segments.dtype)[None, :])
    return jnp.einsum("...ld,lk->...kd", vectors, member.astype(vectors.dtype),
                      precision=jax.lax.Precision.HIGHEST)

  def update(self, opt, table, state, rows, grads, lr, step, **kwargs):
    unique, summed = sum_duplicates(rows, grads, table.shape[0], method="scan")
    tables, state = opt.apply_rows({"stacked": table}, state, unique, summed, lr, step, **kwargs)
    return tables["stacked"], state

  def row_gradients(self, rows, grads, num_rows):
    unique, summed = sum_duplicates(rows, grads, num_rows, method="scan")
    dense = jnp.zeros((num_rows, grads.shape[-1]), grads.dtype).at[unique].set(
        summed, mode="drop", unique_indices=True, indices_are_sorted=True)
    touched = jnp.zeros((num_rows,), rows.dtype).at[unique].set(
        1, mode="drop", unique_indices=True, indices_are_sorted=True)
    return dense, touched


class TpuLookup(PortableLookup):
  """The portable lookup, with the row-wise partial sums exchanged by an all-to-all (the
  module's docstring): for TPUs."""

  def sum_rows(self, rows, values, num_rows):
    # The dropped rows' zero values added to the last row: every row in bounds, so
    # neither the sum nor its gradient's gather masks every id (a pass over all of
    # them). A TPU's scatter has no atomics to contend on that row; a GPU's would.
    return jax.ops.segment_sum(values, jnp.minimum(rows, num_rows - 1), num_segments=num_rows,
                               indices_are_sorted=True, mode="promise_in_bounds")

  def sum_scatter(self, partial, axis, n):
    return _all_to_all_sum(partial, axis, n)


# A custom VJP (reverse mode only: the train step's; jax.jvp through it is not defined).
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _all_to_all_sum(partial, axis, n):
  """psum_scatter's value by an all-to-all of the n blocks of samples and a sum of the
  blocks received, in device order."""
  blocks = partial.reshape(n, partial.shape[0] // n, *partial.shape[1:])
  return jax.lax.all_to_all(blocks, axis, 0, 0, tiled=True).sum(0)  # [source, B / n, ...]


def _all_to_all_sum_forward(partial, axis, n):
  return _all_to_all_sum(partial, axis, n), None


def _all_to_all_sum_backward(axis, n, _, grad):
  # Every device's block of the sum had every device's part in it: each device gets
  # every block's gradient, an all-gather (psum_scatter's transpose), rather than an
  # all-to-all of the gradient broadcast n times.
  return (jax.lax.all_gather(grad, axis, tiled=True),)


_all_to_all_sum.defvjp(_all_to_all_sum_forward, _all_to_all_sum_backward)


# A device platform ("cpu", "gpu", "tpu": the mesh's devices') -> the local lookup it runs.
KERNELS: dict[str, LocalLookup] = {
    "cpu": PortableLookup(),
    "gpu": SortedLookup(),
    "tpu": TpuLookup(),
}


def local_lookup(backend: str | None = None) -> LocalLookup:
  """The kernel for `backend` (default: JAX's default backend); the portable one for
  backends without their own."""
  return KERNELS.get(backend or jax.default_backend(), PortableLookup())
