"""The planner's model of the embedding's time in a train step, per table and device.

For each table and each way of placing it, the bytes a device moves per step in
each of the embedding's phases, through its memory (HBM) and over the
interconnect, and the time they take at the device's bandwidths (`Bandwidths`:
an accelerator's peak figures from `dlrm_jax.targets`, or this kind of CPU's,
measured). With B the global batch, n devices, h ids per sample and D the width
(ids int32, vectors and gradients float32, rows and optimiser slots as stored; a
collective's bytes are those that cross a device's links, sent or received,
(n - 1) / n of what it holds for all):

- table-wise, on its owner: lookup, the batch's B h rows read and B pooled
  vectors written; exchange, B h ids in, B vectors out, B gradients in (and
  every device its B / n samples' share of those); sparse update, B h ids'
  gradients read, their rows (at most the table's) and slots read and written;
- row-wise, on each device: lookup, its B h / n rows and every sample's partial
  sum written; exchange, B h ids all-gathered, B partial sums reduce-scattered
  and their gradients all-gathered; sparse update, its B h / n ids (at most its
  rows);
- column-wise, on each device: every one of the B h ids at D / n wide; the ids
  all-gathered, slices of B / n samples' vectors and gradients exchanged;
- replicated, on each device: lookup, its B / n samples' rows; sparse update,
  every device's B h ids (their ids and gradients all-gathered) or every row
  (a dense gradient all-reduced: twice its bytes), whichever moves fewer
  (`sparse_replica_update`).

A device's time is the sum over its tables and phases of HBM bytes / HBM
bandwidth and interconnect bytes / interconnect bandwidth (no overlap of the
two); the step's embedding time is the slowest device's. The planner chooses
column- against row-wise splits by it (`planner.plan_tables`), and the plan
prints each table's time per phase. A model from sizes and peak figures, not a
measurement: `python -m dlrm_jax.compile` prints it beside the compiled step's
traffic and roofline.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

PHASES = ("lookup", "exchange", "sparse update")

# The sharding types (`dlrm_jax.embedding.planner` gives their rules and re-exports them).
TABLE_WISE = "table_wise"
ROW_WISE = "row_wise"
COLUMN_WISE = "column_wise"
REPLICATED = "replicated"
SHARDING_TYPES = (TABLE_WISE, ROW_WISE, COLUMN_WISE, REPLICATED)


def sparse_replica_update(ids: int, rows: int) -> bool:
  """Whether replicated tables of `rows` rows in all, read by `ids` ids per step over all
  devices, keep their copies equal by exchanging the touched rows (an all-gather of
  ids x (D + 1) values) rather than by all-reducing a dense gradient of every row
  (about 2 x rows x (D + 1) values moved): whichever moves fewer."""
  return ids < 2 * rows


def replica_exchange_bytes(ids: float, rows: int, dim: int) -> float:
  """Bytes a device moves per step to keep a replicated table's copies equal: the touched
  rows' ids and gradients of every device, or a dense gradient (and touch counts)
  all-reduced (`sparse_replica_update`)."""
  if sparse_replica_update(ids, rows):
    return ids * (dim + 1) * 4
  return 2 * rows * (dim + 1) * 4


@dataclasses.dataclass(frozen=True)
class Bandwidths:
  """A device's bytes per second through its memory and to its peers, and their source."""

  hbm: float
  interconnect: float
  source: str


# XLA:CPU's simulated devices share the host's memory: a collective is a copy through
# it. `python benchmarks/host_bandwidth.py` on a 2-core Intel Xeon, 2026-12-08: 23.6 GB/s
# read and written by copies of 256 MiB (benchmarks/RESULTS.md).
CPU = Bandwidths(hbm=23.6e9, interconnect=23.6e9, source="this CPU's measured copies")


@dataclasses.dataclass
class TableTime:
  """Bytes per step of one table's placement: [device, phase] through HBM and over the
  interconnect (`PHASES` order)."""

  hbm: np.ndarray
  link: np.ndarray

  def seconds(self, bw: Bandwidths) -> np.ndarray:
    """[device, phase] seconds at `bw`."""
    return self.hbm / bw.hbm + self.link / bw.interconnect


def table_time(kind: str, device: int, *, rows: int, dim: int, hot: float, batch: int,
               n: int, itemsize: int, slots: Callable[[int], int]) -> TableTime:
  """The bytes one table moves per step on each of `n` devices placed as `kind` (on
  `device` for table-wise), by the module docstring's table."""
  hbm, link = np.zeros((n, len(PHASES))), np.zeros((n, len(PHASES)))
  lookup, exchange, update = range(len(PHASES))
  part = (n - 1) / n  # what a device sends of what it holds for all
  ids, vec = batch * hot * 4, batch * dim * 4  # the batch's int32 ids, float32 vectors

  def per_id(count, width, rows_held=rows):  # a gradient read per id; each distinct row
    # (at most the rows held) and its slots read and written
    return count * width * 4 + min(count, rows_held) * (2 * width * itemsize
                                                        + 2 * slots(width) * 4)

  if n == 1:
    kind, device = TABLE_WISE, 0
  if kind == TABLE_WISE:
    hbm[device, lookup] = batch * hot * dim * itemsize + vec
    hbm[device, exchange] = 2 * vec
    link[device, exchange] = part * (ids + 2 * vec)
    link[:, exchange] += part * (ids + 2 * vec) / n
    hbm[device, update] = per_id(batch * hot, dim)
  elif kind == ROW_WISE:
    hbm[:, lookup] = batch * hot / n * dim * itemsize + vec
    hbm[:, exchange] = 2 * vec
    link[:, exchange] = part * (ids + 2 * vec)
    hbm[:, update] = per_id(batch * hot / n, dim, rows / n)
  elif kind == COLUMN_WISE:
    width = dim // n
    hbm[:, lookup] = batch * hot * width * itemsize + batch * width * 4
    hbm[:, exchange] = 2 * batch * width * 4
    link[:, exchange] = part * (ids + 2 * batch * width * 4)
    hbm[:, update] = per_id(batch * hot, width)
  else:
    hbm[:, lookup] = (batch * hot * dim * itemsize + vec) / n
    link[:, update] = part * replica_exchange_bytes(batch * hot, rows, dim)
    hbm[:, update] = (per_id(batch * hot, dim) if sparse_replica_update(batch * hot, rows)
                      else per_id(rows, dim) + rows * dim * 4)
  return TableTime(hbm, link)


def device_seconds(times: list[TableTime], bw: Bandwidths) -> np.ndarray:
  """[device, phase] seconds of every table together at `bw`."""
  return sum((t.seconds(bw) for t in times), np.zeros((1, len(PHASES))))


def slowest_device(times: list[TableTime], bw: Bandwidths) -> tuple[int, np.ndarray]:
  """The device whose tables take longest at `bw`, and its seconds per phase."""
  total = device_seconds(times, bw)
  slowest = int(total.sum(1).argmax())
  return slowest, total[slowest]


def describe(times: list[TableTime], names: list[str], bw: Bandwidths) -> list[str]:
  """Lines of the plan's time estimate: each table's seconds per phase on its busiest
  device, and the slowest device's total."""
  lines = [f"  estimated time per step (a model: bytes at {bw.source}; the table's busiest "
           "device)", f"  {'table':<10} " + " ".join(f"{p:>14}" for p in PHASES)]
  for name, t in zip(names, times):
    s = t.seconds(bw)
    lines.append(f"  {name:<10} " + " ".join(f"{_ms(x):>14}" for x in s[s.sum(1).argmax()]))
  slowest, phases = slowest_device(times, bw)
  lines.append(f"  {'step':<10} " + " ".join(f"{_ms(x):>14}" for x in phases)
               + f"   = {_ms(phases.sum())} on device {slowest} (the slowest)")
  return lines


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.3f} ms"
