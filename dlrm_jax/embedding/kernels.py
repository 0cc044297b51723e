"""The local lookup: what one device does with the rows it owns, per backend.

A sharded step (`dlrm_jax.embedding.sharded`) moves ids and vectors between
devices with collectives; between those, each device gathers rows of its
shard, pools bags of vectors (of one width, or of several laid end to end:
`dlrm_jax.embedding.bags`), and applies the sparse optimiser to the rows it
owns. Those are a `LocalLookup`, chosen per backend from `KERNELS`: a
GPU- or TPU-specific kernel (a fused gather, a Pallas update) is one class
here, registered under its backend, with a test against `PortableLookup`.
"""

from __future__ import annotations

from typing import Protocol

import jax

from dlrm_jax.embedding.bags import pool_equal, pool_segments
from dlrm_jax.embedding.collection import gather_rows


class LocalLookup(Protocol):
  """Gather, pool and update of one device's rows."""

  def gather(self, table: jax.Array, rows: jax.Array) -> jax.Array:
    """table[rows] for rows [..., H] -> [..., H, D]; a row past the end (padding) may
    give any value: its pooling scale is 0 and its update is dropped."""

  def pool(self, vectors: jax.Array, scale: jax.Array | None) -> jax.Array:
    """Bags of one width: [..., H, D] vectors with [..., H] scales (None: weight 1) -> [..., D]."""

  def segment_pool(self, vectors: jax.Array, scale: jax.Array | None, segments: jax.Array,
                   num_segments: int) -> jax.Array:
    """Bags of several widths end to end: [..., L, D] vectors with [..., L] scales (None:
    weight 1) -> [..., K, D]; column l goes to bag segments[l] ([L] int32, sorted; K =
    num_segments), a segment of K or more is padding and left out."""

  def update(self, opt, table: jax.Array, state: dict, rows: jax.Array, grads: jax.Array,
             lr: jax.Array, step: jax.Array, **kwargs) -> tuple[jax.Array, dict]:
    """The sparse optimiser `opt` on rows [N] of `table` with gradients [N, D]."""


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


# A device platform ("cpu", "gpu", "tpu": the mesh's devices') -> the local lookup it runs.
KERNELS: dict[str, LocalLookup] = {
    "cpu": PortableLookup(),
    "gpu": PortableLookup(),
    "tpu": PortableLookup(),
}


def local_lookup(backend: str | None = None) -> LocalLookup:
  """The kernel for `backend` (default: JAX's default backend); the portable one for
  backends without their own."""
  return KERNELS.get(backend or jax.default_backend(), PortableLookup())
