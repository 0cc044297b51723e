"""What a train step needs besides its state: a model of its temporaries per device.

The planner places tables and optimiser state within a device's budget; the step
also needs room for what it makes and drops each step (XLA's temporaries). This
estimates them from the batch, the plan's layouts and the dense network, before
anything is compiled, from shapes alone (no constants fitted to a compiler):

- per sharding type, the ids a device handles in a step (`ids_per_device`) and
  the width of their vectors: table-wise, every sample's ids of the tables it
  owns (the all-to-all's slots); row-wise, its capacity
  (`layouts.RowWise.capacity`); column-wise, every id of the batch at its slice
  of the width; replicated, its own samples' ids (and, when copies exchange
  touched rows, every device's);
- the embedding's peak, as the compiled steps of configs/mlperf_dcnv2.py hold
  it (XLA's buffer assignments, docs/compile.md), by the devices' platform:
  - TPU and CPU (`PortableLookup`'s update; TPU's kernel, `TpuLookup`, is
    one but for its exchange): every id's gradient, all live when the
    updates start; for the group being updated (one at a time) its summed
    gradients and its optimiser slots' rows; the gradients of row-wise's
    partial sums of every sample's bags (all-gathered);
  - GPU (`SortedLookup`, whose update writes the summed rows and slots in
    place): one group's id gradients at a time, and the largest level of its
    segmented scan over them in row order (pairwise sums: half as many rows),
    and the row-wise partial sums' gradients;
- the dense network's backward pass (`dense_peak_values` per sample: the
  activations it reads and the gradients in flight, in the compute dtype), three
  copies of its parameters (gradients, update, optimiser arithmetic) and a
  device's pooled vectors.

The step's peak is the larger of the two, as the dense activations are gone
before the sparse update starts. A model of buffers, not XLA's schedule (which
fuses, pads TPU arrays to its tiles, and reuses memory differently on each chip):
an estimate, printed beside the compiler's figure by `python -m dlrm_jax.compile`.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from dlrm_jax.embedding.planner import (COLUMN_WISE, REPLICATED, ROW_WISE, TABLE_WISE, Plan,
                                        sparse_replica_update)

# The fewest ids a row-wise device keeps in a train step: below it, a buffer of every id
# costs little and small batches (whose shares vary most) never drop one.
MIN_ROW_CAPACITY = 1024


def row_capacity(ids: int, n: int, factor: float) -> int:
  """The slots a row-wise device keeps for its share of a group's `ids` ids over `n`
  devices: `factor` times an even share, a multiple of 8 and at least MIN_ROW_CAPACITY,
  at most all of them (factor 0: all of them, which never drops one)."""
  if factor <= 0:
    return ids
  share = -(-int(np.ceil(factor * ids / n)) // 8) * 8
  return min(ids, max(share, MIN_ROW_CAPACITY))


def ids_per_device(plan: Plan, capacity: float = 0.0,
                   replicas: int = 1) -> dict[str, tuple[float, float]]:
  """Sharding type -> (ids a device's sparse update handles per train step, the width of
  their vectors there) for `plan`'s global batch over `replicas` groups of its devices:
  each group routes its share of the batch within it, and the update gathers every
  group's (`layouts.Layout.update`); row-wise with the capacity factor `capacity`."""
  n, batch = plan.num_shards, plan.batch_size
  out = {}
  for kind in (TABLE_WISE, ROW_WISE, COLUMN_WISE, REPLICATED):
    tables = [k for k, p in enumerate(plan.placements) if p.kind == kind]
    if not tables:
      continue
    hot = sum(plan.lookups[k] for k in tables)
    dim = max(plan.dims[k] for k in tables)
    if kind == TABLE_WISE:
      served = [sum(plan.lookups[k] for k in tables if plan.placements[k].device == d)
                for d in range(n)]
      out[kind] = (batch * max(served), dim)
    elif kind == ROW_WISE:
      out[kind] = (replicas * row_capacity(int(batch / replicas * hot), n, capacity), dim)
    elif kind == COLUMN_WISE:
      out[kind] = (batch * hot, dim / n)
    else:
      rows = sum(plan.rows[k] for k in tables)
      out[kind] = (batch * hot if sparse_replica_update(batch * hot, rows)
                   else batch * hot / (n * replicas), dim)
  return out


def embedding_temporaries(plan: Plan, slots_per_row: Callable[[int], int],
                          capacity: float = 0.0, replicas: int = 1,
                          platform: str = "cpu") -> int:
  """Bytes of a train step's embedding temporaries per device on `platform`'s devices
  (the module docstring): `slots_per_row(width)`, the sparse optimiser's float32 values
  per row."""
  handled = ids_per_device(plan, capacity, replicas)
  gradients = {kind: ids * width * 4 for kind, (ids, width) in handled.items()}
  row_wise = [k for k, p in enumerate(plan.placements) if p.kind == ROW_WISE]
  partial = 0  # the gradients of the row-wise partial sums of every sample's bags
  if row_wise and plan.num_shards > 1:
    partial = (plan.batch_size / replicas * len(row_wise) * max(plan.dims[k] for k in row_wise)
               * 4)
  if platform == "gpu":  # one group at a time: its gradients, and its scan's pairwise sums
    return int(max(1.5 * g for g in gradients.values()) + partial) if gradients else 0
  update = max((ids * (width + slots_per_row(int(width))) * 4
                for ids, width in handled.values()), default=0)
  return int(sum(gradients.values()) + update + partial)


def dense_peak_values(model) -> int:
  """Values per sample live at the peak of a DLRM's dense backward pass (0 for a model
  without DLRM's MLPs: DLRMv4's encoder is not estimated): what the backward pass reads
  (each layer's output, the interaction's input, and per cross layer its low-rank and
  full-width products and its output) and the gradients in flight (two of the widest
  layer's; with DCN, x0's gradient as one term per cross layer besides, summed at the
  end)."""
  if not hasattr(model, "bottom"):
    return 0
  x0 = (model.num_tables + 1) * model.embedding_dim
  saved = sum(model.bottom[1:]) + x0 + sum(model.top)
  widest = max(x0, model.interaction_width, *model.bottom, *model.top)
  if model.interaction == "dcn":
    layers = model.dcn_num_layers
    return saved + layers * (2 * x0 + model.dcn_low_rank_dim) + layers * x0 + 2 * widest
  return saved + model.interaction_width + 2 * widest


def dense_values_per_sample(model) -> int:
  """Values a DLRM's dense network writes per sample in the forward pass (the MLPs'
  layers, the interaction's input and output, the cross layers); 0 for a model
  without DLRM's MLPs (DLRMv4's encoder: not estimated)."""
  if not hasattr(model, "bottom"):
    return 0
  inputs = (model.num_tables + 1) * model.embedding_dim
  cross = inputs * model.dcn_num_layers if model.interaction == "dcn" else 0
  return int(sum(model.bottom[1:]) + inputs + cross + model.interaction_width
             + sum(model.top))


def dense_temporaries(model, batch_per_device: float, param_bytes: int) -> int:
  """Bytes of the dense network's temporaries per device: its backward pass's peak
  (`dense_peak_values`, in the model's compute dtype) and three copies of its
  parameters."""
  itemsize = jnp.dtype(getattr(model, "compute_dtype", "float32")).itemsize
  return int(dense_peak_values(model) * batch_per_device * itemsize + 3 * param_bytes)


def _pooled(plan: Plan, replicas: int) -> float:
  """Bytes of a device's pooled vectors (float32, its share of the batch)."""
  return plan.batch_size / replicas / plan.num_shards * len(plan.placements) * max(
      plan.dims) * 4


def step_temporaries(plan: Plan, model, slots_per_row: Callable[[int], int],
                     param_bytes: int, capacity: float = 0.0, replicas: int = 1,
                     platform: str = "cpu") -> int:
  """The train step's temporaries per device, `plan`'s devices (of `platform`) in
  `replicas` groups: the larger of its two peaks, the dense network's backward pass
  (with a device's pooled vectors) and the embedding's gradients and sparse update (the
  dense activations are gone by then)."""
  batch_per_device = plan.batch_size / replicas / plan.num_shards
  return max(embedding_temporaries(plan, slots_per_row, capacity, replicas, platform),
             dense_temporaries(model, batch_per_device, param_bytes)
             + int(_pooled(plan, replicas)))
