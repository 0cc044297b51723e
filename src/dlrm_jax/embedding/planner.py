"""The sharding planner: which sharding type and which devices for each table.

Four sharding types, as TorchRec offers them (`dlrm_jax.embedding.sharded`
implements them with explicit collectives):

- `table_wise`:  the whole table on one device; lookups reach it through an
                 all-to-all (the paper's butterfly shuffle).
- `row_wise`:    rows spread evenly over all devices (row r on device r mod n),
                 for tables too big for one; ids are all-gathered, each device
                 gathers its own, and partial results are reduce-scattered.
- `column_wise`: the embedding dimension split over all devices; ids are
                 all-gathered and column slices exchanged with an all-to-all.
- `replicated`:  a copy on every device (data parallel), for small tables whose
                 copies are kept equal (the touched rows all-gathered, or a dense
                 gradient all-reduced) with fewer bytes than table-wise lookups.

The planner works from sizes alone, before anything is allocated, and refuses
a plan that does not fit with an error that gives the numbers. Its rules, in
order, for each table (largest first):

1. a per-table override from the config wins (`table_wise[:DEVICE]`,
   `row_wise`, `column_wise`, `replicated`);
2. on one device every table is table-wise (one stacked array);
3. `replicated` if keeping its copies equal (`replica_exchange_bytes`) moves
   fewer bytes per device than serving its lookups table-wise (a device's share
   of the batch's ids out, pooled vectors and gradients back), and a copy fits
   on every device (by bytes, not by the time model below: choosing by its time
   replicated more tables, and the compiled MLPerf step moved more, docs/compile.md);
4. `table_wise` if it is no bigger than half an even share of all
   non-replicated bytes (table-wise storage is one array per table width with
   an equal share per device, so one big table would pad every device up to
   its size), on the device with room that holds the least so far: its share
   of the width's table bytes plus its share of all lookup traffic. With
   tables of several widths, where a table alone in its width pads every
   device by its size, the padding of all the widths' arrays together (each
   array's fullest device less its mean) must stay within that half share
   too, and the device where the table grows its width's array least (not at
   all, where it fits under the fullest device's share) comes first;
5. otherwise split it: `column_wise` when its width splits into slices of at
   least `min_column_width` values (`MIN_COLUMN_WIDTH`: 128 on TPU, 32
   elsewhere) and the time model gives it no more time than `row_wise`, else
   `row_wise`.

The plan prints the time model's estimate per table and phase, and the slowest
device's step (`Plan.step_seconds`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from dlrm_jax.embedding.collection import TableSpec
from dlrm_jax.embedding.optimizers import SPARSE_OPTIMIZERS
from dlrm_jax.embedding.step_time import (COLUMN_WISE, CPU, PHASES, REPLICATED, ROW_WISE,
                                          SHARDING_TYPES, TABLE_WISE, Bandwidths, TableTime,
                                          replica_exchange_bytes, slowest_device,
                                          sparse_replica_update, table_time)
from dlrm_jax.embedding.step_time import describe as describe_times

# Which rows of a row-wise table a device holds: "cyclic", row r on device r mod n
# (hot rows spread over the devices whatever their numbers); "blocks", contiguous
# blocks (the layout of checkpoints written before the cyclic one).
ROW_ORDERS = ("cyclic", "blocks")

# The narrowest column slice worth making, by the devices' platform (`jax.Device.platform`):
# on TPU an array's last dimension is laid out in tiles of 128 lanes, so a narrower slice
# is padded to 128 (a [rows, 32] slice takes the memory and traffic of [rows, 128]).
MIN_COLUMN_WIDTH = {"tpu": 128}
DEFAULT_MIN_COLUMN_WIDTH = 32  # other platforms (GPU, CPU)


def min_column_width(platform: str) -> int:
  """The narrowest column slice for devices of `platform` ("tpu", "gpu", "cpu")."""
  return MIN_COLUMN_WIDTH.get(platform, DEFAULT_MIN_COLUMN_WIDTH)


class PlanError(ValueError):
  """The tables cannot be placed on the devices; the message gives the numbers."""


class OverBudgetError(PlanError):
  """No placement keeps the tables within the budget: `summary`, the numbers in one line;
  `plan`, the placement that came closest (the message adds its description)."""

  def __init__(self, summary: str, plan: "Plan"):
    super().__init__(f"{summary}\n{plan.describe()}")
    self.summary, self.plan = summary, plan


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where one table lives: its sharding type and, for table-wise, its device."""

  kind: str
  device: int = -1  # the owning device's index along the mesh's shard axis (table_wise).

  def __post_init__(self):
    if self.kind not in SHARDING_TYPES:
      raise PlanError(f"sharding type {self.kind!r} is not one of {SHARDING_TYPES}")


@dataclasses.dataclass(frozen=True)
class Plan:
  """A placement for every table of a collection over `num_shards` devices."""

  placements: tuple[Placement, ...]
  num_shards: int
  table_bytes: tuple[int, ...]  # table plus optimiser state, unsharded.
  lookups: tuple[float, ...]  # ids per sample of each table.
  batch_size: int  # global batch the traffic estimates are for.
  dims: tuple[int, ...]
  rows: tuple[int, ...]
  names: tuple[str, ...]
  row_order: str = "cyclic"  # ROW_ORDERS
  # Per device, beside the tables: the train step's temporaries (an estimate,
  # `dlrm_jax.embedding.costs`) and the dense network's parameters and optimiser state.
  temporaries: int = 0
  dense_bytes: int = 0
  # What the time model (`dlrm_jax.embedding.step_time`) needs besides: the stored value's
  # bytes, the sparse optimiser, the devices' bandwidths (None: not known, e.g. a plan
  # read from a checkpoint written before).
  table_itemsize: int = 4
  optimizer: str = "sgd"
  bandwidths: Bandwidths | None = None

  def to_json(self) -> dict:
    """The plan as JSON values (checkpoints keep the plan their tables were laid out by)."""
    d = dataclasses.asdict(self)
    d["placements"] = [[p.kind, p.device] for p in self.placements]
    return d

  @classmethod
  def from_json(cls, d: dict) -> "Plan":
    """The inverse of `to_json`."""
    d = dict(d)
    d["placements"] = tuple(Placement(kind, int(device)) for kind, device in d["placements"])
    for k in ("table_bytes", "lookups", "dims", "rows", "names"):
      d[k] = tuple(d[k])
    d.setdefault("row_order", "blocks")  # saved before row-wise tables went cyclic
    if d.get("bandwidths") is not None:
      d["bandwidths"] = Bandwidths(**d["bandwidths"])
    return cls(**d)

  def same_layout(self, other: "Plan") -> bool:
    """Whether two plans store the tables in identical stacked arrays."""
    return (self.num_shards == other.num_shards
            and tuple(self.placements) == tuple(other.placements)
            and tuple(self.rows) == tuple(other.rows) and tuple(self.dims) == tuple(other.dims)
            and (self.row_order == other.row_order
                 or all(p.kind != ROW_WISE for p in self.placements)))

  def device_bytes(self) -> list[int]:
    """Bytes of tables and optimiser state that each device holds.

    Table-wise tables (of one width) are stacked into one array with an equal
    share per device, so every device holds as many table-wise bytes (of each
    width) as the fullest one.
    """
    table_wise, other = {}, [0] * self.num_shards
    for p, size, dim in zip(self.placements, self.table_bytes, self.dims):
      _account(p, size, dim, self.num_shards, table_wise, other)
    return [_stacked(table_wise) + o for o in other]

  def table_device_bytes(self, k: int) -> int:
    """Bytes of table k on each device that holds part of it."""
    p, size = self.placements[k], self.table_bytes[k]
    if p.kind in (TABLE_WISE, REPLICATED):
      return size
    return -(-size // self.num_shards)

  def traffic(self) -> dict[str, int]:
    """Estimated bytes each collective moves per train step, over all devices.

    Counts what crosses between devices (a device's own share stays local):
    ids are int32, vectors and gradients float32.
    """
    n, b = self.num_shards, self.batch_size
    frac = (n - 1) / n
    out = {"all_to_all": 0, "all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}
    if n == 1:
      return out
    for p, d, h, rows in zip(self.placements, self.dims, self.lookups, self.rows):
      ids, vec = b * h * 4, b * d * 4
      if p.kind == TABLE_WISE:  # ids out, pooled vectors back, their gradients out again.
        out["all_to_all"] += int(frac * (ids + 2 * vec))
      elif p.kind == ROW_WISE:  # every device receives all ids; partial vectors reduce-scattered;
        out["all_gather"] += int(frac * n * (ids + vec))  # gradients all-gathered back.
        out["reduce_scatter"] += int(frac * n * vec)
      elif p.kind == COLUMN_WISE:  # all ids to every device; column slices exchanged both ways.
        out["all_gather"] += int(frac * n * ids)
        out["all_to_all"] += int(frac * 2 * vec)
      else:  # replicated: touched rows' ids and gradients, or a dense gradient all-reduced
        key = "all_gather" if sparse_replica_update(b * h, rows) else "all_reduce"
        out[key] += int(frac * n * replica_exchange_bytes(b * h, rows, d))
    return out

  def table_times(self) -> list[TableTime]:
    """Each table's bytes per device and phase per step (`step_time.table_time`)."""
    slots = SPARSE_OPTIMIZERS[self.optimizer]().slot_values_per_row
    return [table_time(p.kind, p.device, rows=r, dim=d, hot=h, batch=self.batch_size,
                       n=self.num_shards, itemsize=self.table_itemsize, slots=slots)
            for p, r, d, h in zip(self.placements, self.rows, self.dims, self.lookups)]

  def step_seconds(self) -> dict[str, float]:
    """The embedding's estimated seconds per step by phase on the slowest device (at
    `bandwidths`), and their sum ("total"); {} where the bandwidths are not known."""
    if self.bandwidths is None:
      return {}
    _, slowest = slowest_device(self.table_times(), self.bandwidths)
    return {**dict(zip(PHASES, map(float, slowest))), "total": float(slowest.sum())}

  def describe(self) -> str:
    """The plan as a table, with per-device totals and the traffic estimate."""
    lines = [f"Embedding sharding plan: {len(self.placements)} tables over {self.num_shards} "
             f"device(s), global batch {self.batch_size}",
             f"  {'table':<10} {'rows':>12} {'dim':>5} {'type':<12} {'devices':<10} "
             f"{'bytes/device':>14}"]
    for k, p in enumerate(self.placements):
      devices = (str(p.device) if p.kind == TABLE_WISE else
                 f"0-{self.num_shards - 1}" if self.num_shards > 1 else "0")
      lines.append(f"  {self.names[k]:<10} {self.rows[k]:>12,} {self.dims[k]:>5} {p.kind:<12} "
                   f"{devices:<10} {fmt_bytes(self.table_device_bytes(k)):>14}")
    per = self.device_bytes()
    lines.append(f"  per device: min {fmt_bytes(min(per))}, max {fmt_bytes(max(per))} "
                 "(tables + optimiser state)")
    if self.temporaries or self.dense_bytes:
      lines.append(f"  and the step's temporaries {fmt_bytes(self.temporaries)} (an estimate), "
                   f"the dense network's state {fmt_bytes(self.dense_bytes)}: "
                   f"{fmt_bytes(max(per) + self.temporaries + self.dense_bytes)} in all")
    traffic = self.traffic()
    lines.append("  per step (estimate): " + ", ".join(
        f"{name} {fmt_bytes(v)}" for name, v in traffic.items()))
    if self.bandwidths is not None:
      lines += describe_times(self.table_times(), list(self.names), self.bandwidths)
    return "\n".join(lines)


def fmt_bytes(n: float, digits: int = 1) -> str:
  """Bytes in B, KiB, MiB, GiB or TiB, with `digits` decimals above B."""
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
    n /= 1024
  raise AssertionError


def parse_overrides(value: str | Mapping[str, str] | None) -> dict[str, str]:
  """'t3:row_wise,t7:table_wise:2' (or a mapping) -> {table name: placement}."""
  if not value:
    return {}
  if isinstance(value, Mapping):
    return {str(k): str(v) for k, v in value.items()}
  out = {}
  for item in str(value).split(","):
    name, sep, kind = item.strip().partition(":")
    if not sep or not name or not kind:
      raise PlanError(f"sharding override {item!r} must look like TABLE:TYPE or "
                      f"TABLE:table_wise:DEVICE (types: {', '.join(SHARDING_TYPES)})")
    out[name] = kind
  return out


def _parse_placement(name: str, text: str, num_shards: int) -> Placement:
  kind, _, device = text.partition(":")
  if kind not in SHARDING_TYPES:
    raise PlanError(f"table {name}: sharding type {kind!r} is not one of {SHARDING_TYPES}")
  if device:
    if kind != TABLE_WISE:
      raise PlanError(f"table {name}: only table_wise takes a device, got {text!r}")
    if not device.isdigit() or int(device) >= num_shards:
      raise PlanError(f"table {name}: device {device!r} is not in [0, {num_shards})")
    return Placement(kind, int(device))
  return Placement(kind)


def plan_tables(specs: Sequence[TableSpec], num_shards: int, *, batch_size: int,
                lookups: Sequence[float] | float = 1.0, optimizer: str = "sgd",
                memory_budget: int | None = None,
                min_column_width: int = DEFAULT_MIN_COLUMN_WIDTH,
                overrides: Mapping[str, str] | None = None, table_itemsize: int = 4,
                bandwidths: Bandwidths | None = CPU) -> Plan:
  """Places every table over `num_shards` devices (see the module docstring).

  Args:
    specs: the tables.
    num_shards: devices along the mesh's shard axis.
    batch_size: global batch size (for the traffic estimates).
    lookups: ids per sample of each table (its hotness), or one value for all.
    optimizer: the sparse optimiser (its state counts towards memory).
    memory_budget: bytes each device may hold for tables and optimiser state;
      None for no limit.
    min_column_width: the narrowest column slice column-wise splitting may make (the
      devices' figure: `min_column_width(platform)`).
    overrides: table name -> placement text, e.g. {"t3": "row_wise"}.
    table_itemsize: bytes per stored table value (4: float32, 2: bfloat16 or float16);
      optimiser state is float32 either way.
    bandwidths: the devices' memory and interconnect bandwidths, for the time model that
      chooses column- against row-wise splits and estimates each table's time
      (`dlrm_jax.embedding.step_time`); None (not known): no estimate, and column-wise
      wherever its width allows.

  Raises:
    PlanError: an unknown table or type in the overrides, a column-wise table
      whose width does not split evenly, or tables that do not fit.
  """
  if num_shards < 1:
    raise PlanError(f"num_shards={num_shards} must be >= 1")
  if optimizer not in SPARSE_OPTIMIZERS:
    raise PlanError(f"embedding_optimizer={optimizer!r} is not one of {tuple(SPARSE_OPTIMIZERS)}")
  hot = ([float(lookups)] * len(specs) if isinstance(lookups, (int, float))
         else [float(h) for h in lookups])
  if len(hot) != len(specs):
    raise PlanError(f"got {len(hot)} lookup counts for {len(specs)} tables")
  slots = SPARSE_OPTIMIZERS[optimizer]().slot_values_per_row
  sizes = [s.rows * (s.dim * int(table_itemsize) + slots(s.dim) * 4) for s in specs]
  names = [s.name for s in specs]
  overrides = dict(overrides or {})
  unknown = sorted(set(overrides) - set(names))
  if unknown:
    raise PlanError(f"sharding overrides name unknown tables {unknown}; tables are "
                    f"{names[:6]}{' ...' if len(names) > 6 else ''}")
  budget = float("inf") if memory_budget is None else int(memory_budget)
  placer = _Placer(specs, num_shards, batch_size, hot, sizes, budget,
                   lambda k, kind: 0.0 if bandwidths is None else float(table_time(
                       kind, 0, rows=specs[k].rows, dim=specs[k].dim, hot=hot[k],
                       batch=batch_size, n=num_shards, itemsize=int(table_itemsize),
                       slots=slots).seconds(bandwidths).sum()))
  pinned_table_wise = placer.place_overrides(overrides)
  for k in sorted(range(len(specs)), key=lambda k: -sizes[k]):
    if placer.placements[k] is None:
      placer.place(k, k in pinned_table_wise, min_column_width)
  plan = Plan(placements=tuple(placer.placements), num_shards=num_shards,
              table_bytes=tuple(sizes), lookups=tuple(hot), batch_size=int(batch_size),
              dims=tuple(s.dim for s in specs), rows=tuple(s.rows for s in specs),
              names=tuple(names), table_itemsize=int(table_itemsize), optimizer=optimizer,
              bandwidths=bandwidths)
  per = plan.device_bytes()
  if max(per) > budget:
    worst = max(range(num_shards), key=lambda d: per[d])
    raise OverBudgetError(
        f"the embedding tables need {fmt_bytes(per[worst])} on device {worst}, over the "
        f"per-device budget of {fmt_bytes(budget)} ({fmt_bytes(sum(sizes))} of tables and "
        f"optimiser state in all, over {num_shards} device(s)); use more devices, a smaller "
        f"model, or a larger embedding memory budget", plan)
  return plan


class _Placer:
  """The planner's running account: each device's bytes and lookup traffic so far."""

  def __init__(self, specs, n: int, batch_size: int, hot: list[float], sizes: list[int],
               budget: float, seconds):
    self.specs, self.n, self.batch_size, self.hot = specs, n, batch_size, hot
    self.sizes, self.budget = sizes, budget
    self.seconds = seconds  # (table, sharding type) -> its estimated time summed over devices
    self.placements: list[Placement | None] = [None] * len(specs)
    self.table_wise: dict[int, list[int]] = {}  # table-wise bytes per device, per width
    self.other = [0] * n  # bytes of split and replicated tables per device
    self.load = [0.0] * n  # lookup bytes served per device
    # A table bigger than half an even share of the sharded bytes would pad
    # every device's table-wise storage up towards its size: such tables are split.
    self.fair_share = sum(sizes[k] for k in range(len(specs)) if not self.replicable(k)) / n / 2
    self.total_bytes = max(1, sum(sizes))
    self.mixed = len({s.dim for s in specs}) > 1  # tables of several widths
    self.total_load = max(1.0, sum(batch_size * h * s.dim for h, s in zip(hot, specs)))

  def replicable(self, k: int) -> bool:
    """Whether keeping copies of the table equal moves fewer bytes per device than
    serving its lookups table-wise would (ids out, pooled vectors and their gradients
    back: a device's share of the batch's)."""
    spec, b, h = self.specs[k], self.batch_size, self.hot[k]
    table_wise = b * (4 * h + 2 * spec.dim * 4) / self.n
    return self.n > 1 and replica_exchange_bytes(b * h, spec.rows, spec.dim) < table_wise

  def add(self, k: int, p: Placement) -> None:
    self.placements[k] = p
    _account(p, self.sizes[k], self.specs[k].dim, self.n, self.table_wise, self.other)
    traffic = self.batch_size * self.hot[k] * self.specs[k].dim
    if p.kind == TABLE_WISE:
      self.load[p.device] += traffic
    else:
      for d in range(self.n):
        self.load[d] += traffic / self.n

  def width_bytes(self, k: int) -> list[int]:
    """Table-wise bytes per device of table k's width (tables of one width share an array)."""
    return self.table_wise.get(self.specs[k].dim, [0] * self.n)

  def growth(self, k: int, d: int) -> int:
    """Bytes table k on device d adds to every device (its width's array grows to it)."""
    mine = self.width_bytes(k)
    return max(0, mine[d] + self.sizes[k] - max(mine))

  def padding(self, k: int, d: int) -> float:
    """Bytes of padding per device over every width's table-wise array, with table k on
    device d: each array's fullest device's bytes less its mean."""
    out = 0.0
    for w, v in self.table_wise.items():
      if w != self.specs[k].dim:
        out += max(v) - sum(v) / self.n
    v = list(self.width_bytes(k))
    v[d] += self.sizes[k]
    return out + max(v) - sum(v) / self.n

  def fits_table_wise(self, k: int, d: int) -> bool:
    return _stacked(self.table_wise) + self.growth(k, d) + max(self.other) <= self.budget

  def place_overrides(self, overrides: Mapping[str, str]) -> set[int]:
    """Places the overridden tables; returns those pinned table-wise with no device named."""
    pinned = set()
    for k, spec in enumerate(self.specs):
      if spec.name not in overrides:
        continue
      p = _parse_placement(spec.name, overrides[spec.name], self.n)
      if p.kind == COLUMN_WISE and spec.dim % self.n:
        raise PlanError(f"table {spec.name}: column_wise needs its dim ({spec.dim}) to be a "
                        f"multiple of the number of devices ({self.n})")
      if p.kind == TABLE_WISE and p.device < 0:
        pinned.add(k)
      else:
        self.add(k, p)
    return pinned

  def place(self, k: int, pinned_table_wise: bool, min_column_width: int) -> None:
    """Rules 2-5 of the module docstring for table k."""
    spec, n = self.specs[k], self.n
    if n == 1:
      return self.add(k, Placement(TABLE_WISE, 0))
    if (not pinned_table_wise and self.replicable(k)
        and _stacked(self.table_wise) + max(self.other) + self.sizes[k] <= self.budget):
      return self.add(k, Placement(REPLICATED))
    room = [d for d in range(n) if self.fits_table_wise(k, d)]
    if self.mixed and not pinned_table_wise:  # the padding over all widths' arrays, bounded
      room = [d for d in room if self.padding(k, d) <= self.fair_share]
    if room and (self.sizes[k] <= self.fair_share or pinned_table_wise):
      # The device holding the least memory (of the table's width) and lookup traffic,
      # each as a share of all; with tables of several widths, first the device where
      # the table pads its width's stacked array least.
      mine = self.width_bytes(k)
      return self.add(k, Placement(TABLE_WISE, min(room, key=lambda d: (
          self.growth(k, d) if self.mixed else 0,
          mine[d] / self.total_bytes + self.load[d] / self.total_load, d))))
    if pinned_table_wise:
      mine = self.width_bytes(k)
      free = (self.budget - max(self.other) - _stacked(self.table_wise) + max(mine)
              - min(mine))
      raise PlanError(f"table {spec.name} ({spec.rows:,} rows x {spec.dim}) needs "
                      f"{fmt_bytes(self.sizes[k])} for a whole copy on one device, but the "
                      f"most any device has left is {fmt_bytes(free)} of its "
                      f"{fmt_bytes(self.budget)} budget")
    if (spec.dim % n == 0 and spec.dim // n >= min_column_width
        and self.seconds(k, COLUMN_WISE) <= self.seconds(k, ROW_WISE)):
      return self.add(k, Placement(COLUMN_WISE))
    return self.add(k, Placement(ROW_WISE))


def _account(p: Placement, size: int, dim: int, n: int, table_wise: dict[int, list[int]],
             other: list[int]):
  """Adds a table's bytes to the devices that hold it (table-wise: per width)."""
  if p.kind == TABLE_WISE:
    table_wise.setdefault(dim, [0] * n)[p.device] += size
    return
  share = size if p.kind == REPLICATED else -(-size // n)
  for d in range(n):
    other[d] += share


def _stacked(table_wise: dict[int, list[int]]) -> int:
  """Bytes of the table-wise arrays on every device: the fullest device's, per width."""
  return sum(max(v) for v in table_wise.values())
