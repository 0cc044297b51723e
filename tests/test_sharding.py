"""Sharded embeddings on 8 simulated devices equal the single-device run.

conftest.py gives this process 8 host CPU devices. Every case trains a few
steps on the mesh and on one device from the same initial values and batches
and compares predictions, dense parameters, tables and optimiser slots.
"""

import re

import jax
import numpy as np
import pytest

from conftest import load_config, update_scatters
from dlrm_jax import stopping, trainer
from dlrm_jax.task import Task
from dlrm_jax.config import ConfigError
from dlrm_jax.data import RandomData
from dlrm_jax.embedding import EmbeddingCollection
from dlrm_jax.embedding.planner import (COLUMN_WISE, REPLICATED, ROW_WISE, TABLE_WISE, PlanError,
                                        parse_overrides, plan_tables)

BATCH = 96  # global batch: a size no layer width shares, so the HLO check can spot it.
NUM_TABLES = 8


def _config(devices, overrides="", optimizer="sgd", replicas=1, hotness=1):
  c = load_config("tiny", devices=devices)
  c.arch_sparse_feature_size = 8
  c.arch_mlp_bot = "13-8-8"
  c.arch_embedding_size = "-".join(str(r) for r in (500, 300, 200, 120, 500, 64, 40, 250))
  c.mini_batch_size = BATCH
  c.learning_rate = 0.3
  c.embedding_optimizer = optimizer
  c.dense_optimizer = "adagrad" if optimizer != "sgd" else "sgd"
  c.sharding.min_column_width = 1
  c.sharding.overrides = overrides
  c.mesh.replicas = replicas
  c.data.kind = "random"
  c.data.hotness = hotness
  c.data.variable_hotness = hotness > 1
  return c


def _batches(task, hotness, n=3):
  data = RandomData(task.spec.table_rows, 13, BATCH, seed=5, hotness=hotness,
                    variable_hotness=hotness > 1)
  out = []
  for i in range(n):
    b = data.batch(i)
    if hotness > 1:  # per-id weights too, so that pooling scales travel with the ids
      b["sparse_weights"] = np.random.default_rng(i).uniform(0.5, 1.5, b["sparse"].shape).astype(
          np.float32)
    out.append(b)
  return out


def _train(config, steps=2, make_batches=None):
  task = Task(config)
  state = task.init_state(0)
  batches = (make_batches or (lambda t: _batches(t, int(config.data.hotness))))(task)
  for batch in batches[:steps]:
    state, _ = task.train_step(state, batch)
  return {
      "task": task,
      "state": state,
      "predictions": np.asarray(task.predict(state.params, state.tables, batches[steps])),
      "tables": task.embedding.to_arrays(state.tables),
      "params": [np.asarray(x) for x in jax.tree.leaves(state.params)],
  }


_REFERENCE = {}


def _reference(optimizer, hotness):
  key = (optimizer, hotness)
  if key not in _REFERENCE:
    _REFERENCE[key] = _train(_config(1, optimizer=optimizer, hotness=hotness))
  return _REFERENCE[key]


def _assert_same(got, want, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(got["predictions"], want["predictions"], rtol=rtol, atol=atol)
  for a, b in zip(got["tables"], want["tables"], strict=True):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
  for a, b in zip(got["params"], want["params"], strict=True):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def _assert_same_slots(got, want, rtol=1e-5, atol=1e-9):
  """Every sparse optimiser slot of every table row, through the layouts, against a
  one-device run (whose single table-wise group is the plain stacked layout)."""
  emb = got["task"].embedding
  offsets = want["task"].collection.offsets
  want_state = want["state"].emb_opt_state[TABLE_WISE]
  assert all(set(v) == set(want_state) for v in got["state"].emb_opt_state.values())
  for name, want_leaf in want_state.items():
    leaf = {k: np.asarray(v[name]) for k, v in got["state"].emb_opt_state.items()}
    want_leaf = np.asarray(want_leaf)
    for t, spec in enumerate(emb.specs):
      g = emb.groups[emb.plan.placements[t].kind]
      mine = np.empty((spec.rows,) + leaf[g.kind].shape[1:], np.float32)
      for start, row, count, stride in g.blocks(t):
        mine[row:row + count * stride:stride] = leaf[g.kind][start:start + count]
      np.testing.assert_allclose(mine, want_leaf[offsets[t]:offsets[t] + spec.rows],
                                 rtol=rtol, atol=atol, err_msg=f"{name} of table {t}")


def _all(kind):
  return ",".join(f"t{i}:{kind}" for i in range(NUM_TABLES))


MIXED = "t0:table_wise:3,t1:row_wise,t2:column_wise,t3:replicated,t4:row_wise"


def test_mixed_plan_matches_single_device_and_moves_only_what_it_plans():
  """All four sharding types in one plan: same numbers, own shards, planned collectives."""
  got = _train(_config(8, MIXED))
  assert {p.kind for p in got["task"].plan.placements} == {
      TABLE_WISE, ROW_WISE, COLUMN_WISE, REPLICATED}
  _assert_same(got, _reference("sgd", 1))
  task, state = got["task"], got["state"]

  # Each device holds only its shards: an eighth of each split layout's
  # storage, or a whole copy of the replicated one.
  for kind, array in state.tables.items():
    per_device = [s.data.nbytes for s in array.addressable_shards]
    assert len(per_device) == 8
    assert per_device == [array.nbytes // (1 if kind == REPLICATED else 8)] * 8
  d = 8 * 4  # bytes of a row of width 8
  assert task.plan.table_device_bytes(1) == -(-300 * d // 8)  # t1 row-wise: an eighth
  assert task.plan.table_device_bytes(3) == 120 * d  # t3 replicated: the whole table

  # The compiled step moves ids and vectors with the planned collectives, never
  # gathers a whole sharded table, never all-reduces global-batch activations
  # (only dense-parameter gradients and the replicated tables' gradient).
  batch = task.device_batch(_batches(task, 1)[0])
  hlo = task.lower_train_step(state, batch).compile().as_text()
  ops = {}
  for line in hlo.splitlines():
    m = re.search(r"= (.*?) (all-to-all|all-gather|reduce-scatter|all-reduce)(-start)?\(", line)
    if m:
      ops.setdefault(m.group(2), []).append(m.group(1))
  assert {"all-to-all", "all-gather", "reduce-scatter", "all-reduce"} <= set(ops), ops
  sharded_shapes = {tuple(a.shape) for k, a in state.tables.items() if k != REPLICATED}
  for op, shapes in ops.items():
    for shape in shapes:
      for dims in re.findall(r"\w+\[([\d,]*)\]", shape):
        dim = tuple(int(x) for x in dims.split(",") if x)
        assert dim not in sharded_shapes, (op, shape)
        if op == "all-reduce":
          assert BATCH not in dim, (op, shape)


# The single types alone: each is also part of the mixed plan above.
@pytest.mark.parametrize("kind", [TABLE_WISE, ROW_WISE, COLUMN_WISE, REPLICATED])
def test_each_sharding_type_alone_matches_single_device_sgd(kind):
  got = _train(_config(8, _all(kind)))
  assert {p.kind for p in got["task"].plan.placements} == {kind}
  _assert_same(got, _reference("sgd", 1))


@pytest.mark.parametrize("replicas", [1, 2])
def test_mixed_plan_bags_rowwise_adagrad_match_single_device(replicas):
  """Weighted multi-hot bags and row-wise Adagrad, on a 1-D and on a 2 x 4 mesh.

  Row-wise Adagrad divides by the root of a row's accumulated squared
  gradient, which magnifies the float differences of a different summation
  order where that gradient is small: hence the looser tolerance.
  """
  got = _train(_config(8, MIXED, optimizer="rowwise_adagrad", replicas=replicas, hotness=3))
  want = _reference("rowwise_adagrad", 3)
  _assert_same(got, want, rtol=1e-4, atol=1e-4)
  _assert_same_slots(got, want)


def _repeated_id_batches(task, n=3):
  """Each table's ids take 4 values (its first, last and two middle rows), each value on
  every device's slice of the batch: rows that all 8 devices update in the same step."""
  rows = np.asarray(task.spec.table_rows)
  values = np.stack([0 * rows, rows - 1, rows // 2, rows // 3]).astype(np.int32)  # [4, F]
  rng = np.random.default_rng(11)
  out = []
  for i in range(n):
    sparse = values[(np.arange(BATCH) + i) % 4]
    assert all(len(np.unique(s)) == 4 for s in sparse.reshape(8, BATCH // 8, -1)[..., 1])
    out.append({"dense": rng.random((BATCH, 13), dtype=np.float32), "sparse": sparse,
                "label": rng.integers(0, 2, BATCH).astype(np.float32)})
  return out


@pytest.mark.parametrize("optimizer", ["adagrad", "adam"])
def test_ids_repeated_across_devices_match_single_device(optimizer):
  """Element-wise Adagrad and lazy Adam on every sharding type (row-wise included), with
  the same rows looked up from every device's slice of the batch: updates of a row from
  several devices must add up before the optimiser sees them."""
  got = _train(_config(8, MIXED, optimizer=optimizer), make_batches=_repeated_id_batches)
  want = _train(_config(1, optimizer=optimizer), make_batches=_repeated_id_batches)
  assert ROW_WISE in got["task"].embedding.groups
  _assert_same(got, want, rtol=1e-4, atol=1e-4)
  _assert_same_slots(got, want, rtol=1e-4, atol=1e-8)


def test_explicit_and_auto_mesh_axes_give_the_same_step():
  c = _config(8, MIXED)
  c.mesh.axis_types = "auto"
  _assert_same(_train(c), _reference("sgd", 1))


def test_mesh_and_batch_errors(tmp_path):
  c = _config(8)
  c.mesh.replicas = 3
  with pytest.raises(ConfigError, match="replicas=3"):
    Task(c)
  c = _config(8)
  c.mini_batch_size = 100
  with pytest.raises(ConfigError, match="multiple of the number of devices"):
    trainer.train_and_evaluate(c, str(tmp_path))


# The planner, from sizes alone ---------------------------------------------------


def _specs(rows, dim=16):
  return EmbeddingCollection.uniform(rows, dim).specs


def test_planner_replicates_small_tables_and_balances_the_rest():
  rows = [3, 10, 200_000, 90_000, 50_000, 40_000, 30_000, 20_000]
  plan = plan_tables(_specs(rows), 2, batch_size=2048)
  kinds = [p.kind for p in plan.placements]
  assert kinds[:2] == [REPLICATED, REPLICATED]  # all-reducing them moves less than lookups
  # 200,000 rows is over half an even share (215,000 / 2): table-wise it would
  # pad the other device to its size, so it is split (row-wise: 16 / 2 < 32).
  assert kinds[2] == ROW_WISE
  assert kinds[3:] == [TABLE_WISE] * 5
  per_device = {0: 0, 1: 0}
  for r, p in zip(rows[3:], plan.placements[3:], strict=True):
    per_device[p.device] += r
  assert sorted(per_device.values()) == [110_000, 120_000]  # 90k+20k | 50k+40k+30k
  text = plan.describe()
  assert "200,000" in text and "table_wise" in text and "all_to_all" in text


def test_planner_balances_one_width_by_memory_and_traffic():
  """Tables of one width go where the memory and lookup traffic so far are least, even
  where the stacked array then grows (the rule before tables of several widths, kept
  so that such plans, and the checkpoints laid out by them, stay as they were): after
  t0 t2 t4 on device 0 (2,500 rows) and t1 t3 on device 1 (2,000 rows, but t3 takes 30
  ids a sample), t5 goes to device 0, padding device 1 by its 100 rows."""
  specs = _specs([1000, 1000, 1000, 1000, 500, 100])
  plan = plan_tables(specs, 2, batch_size=8, lookups=[1, 1, 1, 30, 1, 1])
  assert [(p.kind, p.device) for p in plan.placements] == [
      (TABLE_WISE, 0), (TABLE_WISE, 1), (TABLE_WISE, 0), (TABLE_WISE, 1), (TABLE_WISE, 0),
      (TABLE_WISE, 0)]
  assert plan.device_bytes() == [2600 * specs[0].dim * 4] * 2


def test_planner_splits_tables_too_big_for_one_device():
  mb = 2**20
  specs = EmbeddingCollection.uniform([1_000_000, 1_000_000], 64).specs  # 244 MiB each
  plan = plan_tables(specs, 4, batch_size=1024, memory_budget=130 * mb, min_column_width=16)
  assert [p.kind for p in plan.placements] == [COLUMN_WISE, COLUMN_WISE]
  plan = plan_tables(specs, 4, batch_size=1024, memory_budget=130 * mb, min_column_width=32)
  assert [p.kind for p in plan.placements] == [ROW_WISE, ROW_WISE]
  assert plan.device_bytes() == [2 * 1_000_000 * 64 * 4 // 4] * 4


def test_planner_places_a_replicable_table_otherwise_when_copies_do_not_fit():
  """A table whose copies are kept equal with fewer bytes than its lookups move (10 ids a
  sample) is replicated, but not where a copy on every device is over the budget: then
  it is split, without an error, within the budget. Each rule with the case that forces
  it."""
  specs = _specs([500])  # 31 KiB with sgd; a dense all-reduce of 66 KiB a device
  free = plan_tables(specs, 4, batch_size=2048, lookups=10)  # against 84 KiB table-wise
  assert [p.kind for p in free.placements] == [REPLICATED]
  assert not plan_tables(_specs([700]), 4, batch_size=2048, lookups=10).placements[0].kind \
      == REPLICATED  # 93 KiB to keep its copies equal
  budget = 16_000  # a copy does not fit, nor does the whole table on one device
  tight = plan_tables(specs, 4, batch_size=2048, lookups=10, memory_budget=budget)
  assert [p.kind for p in tight.placements] == [ROW_WISE]  # 16 / 4 columns < 32
  assert max(tight.device_bytes()) <= budget
  # Overrides win over every rule: the replicable table row-wise, a big one on device 3.
  pinned = plan_tables(_specs([500, 200_000]), 4, batch_size=2048, lookups=[10, 1],
                       overrides={"t0": "row_wise", "t1": "table_wise:3"})
  assert [(p.kind, p.device) for p in pinned.placements] == [(ROW_WISE, -1), (TABLE_WISE, 3)]


def test_planner_errors_give_the_numbers():
  specs = _specs([10_000_000])  # 610 MiB with sgd
  with pytest.raises(PlanError, match=r"need 76\.3 MiB on device 0, over the per-device budget "
                                     r"of 50\.0 MiB \(610\.4 MiB"):
    plan_tables(specs, 8, batch_size=512, memory_budget=50 * 2**20)
  with pytest.raises(PlanError, match="a whole copy on one device"):
    plan_tables(specs, 8, batch_size=512, memory_budget=500 * 2**20,
                overrides={"t0": "table_wise"})
  with pytest.raises(PlanError, match="unknown tables"):
    plan_tables(specs, 2, batch_size=512, overrides={"nope": "row_wise"})
  with pytest.raises(PlanError, match="multiple of the number of devices"):
    plan_tables(_specs([10], dim=6), 4, batch_size=8, overrides={"t0": "column_wise"})
  with pytest.raises(PlanError, match="TABLE:TYPE"):
    parse_overrides("t0=row_wise")
  assert parse_overrides("t1:row_wise, t2:table_wise:3") == {"t1": "row_wise",
                                                               "t2": "table_wise:3"}


def test_planner_counts_optimizer_state():
  specs = _specs([1000])
  sgd = plan_tables(specs, 1, batch_size=8, optimizer="sgd")
  adam = plan_tables(specs, 1, batch_size=8, optimizer="adam")
  assert sgd.table_bytes == (1000 * 16 * 4,)
  assert adam.table_bytes == (1000 * 48 * 4,)
  assert plan_tables(specs, 1, batch_size=8).traffic() == {
      "all_to_all": 0, "all_gather": 0, "reduce_scatter": 0, "all_reduce": 0}


def test_train_and_evaluate_on_1_and_8_devices_agree(tmp_path):
  """The whole loop (data, steps, evaluation) gives the same metrics on 1 and 8 devices."""
  results = []
  for devices in (1, 8):
    c = load_config("tiny", devices=devices)
    c.arch_sparse_feature_size, c.arch_mlp_bot = 8, "13-8-8"
    c.sharding.min_column_width = 1
    c.sharding.overrides = MIXED if devices > 1 else ""
    results.append(trainer.train_and_evaluate(c, str(tmp_path / str(devices))))
  one, eight = (r.records for r in results)
  assert [r["step"] for r in one] == [r["step"] for r in eight]
  for a, b in zip(one, eight, strict=True):
    for key in ("auc", "logloss", "accuracy", "train_loss"):
      assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_the_backend_kernel_serves_every_layout(monkeypatch):
  """The local lookup registered for the backend (`kernels.KERNELS`) does every gather,
  pooling and sparse update of all four layouts, and a kernel that computes as the
  portable one gives the portable result."""
  from dlrm_jax.embedding import kernels

  calls = []

  class Recording(kernels.PortableLookup):
    def gather(self, table, rows):
      calls.append("gather")
      return super().gather(table, rows)

    def pool(self, vectors, scale):
      calls.append("pool")
      return super().pool(vectors, scale)

    def segment_pool(self, vectors, scale, segments, num_segments):
      calls.append("pool")
      return super().segment_pool(vectors, scale, segments, num_segments)

    def sum_rows(self, rows, values, num_rows):
      calls.append("pool")
      return super().sum_rows(rows, values, num_rows)

    def update(self, *args, **kwargs):
      calls.append("update")
      return super().update(*args, **kwargs)

  assert isinstance(kernels.local_lookup("cpu"), kernels.PortableLookup)
  assert isinstance(kernels.local_lookup("a_backend_without_one"), kernels.PortableLookup)
  monkeypatch.setitem(kernels.KERNELS, "cpu", Recording())
  got = _train(_config(8, MIXED))
  assert len(got["task"].embedding.groups) == 4
  assert all(isinstance(g.kernel, Recording) for g in got["task"].embedding.groups.values())
  # Each layout traced once per program: gathers and pools (train step, predict), updates.
  assert calls.count("update") == 4 and calls.count("gather") >= 8 and calls.count("pool") >= 8
  _assert_same(got, _reference("sgd", 1))


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad", "adam"])
def test_the_gpu_kernel_matches_the_portable_one_and_adds_no_scatter(monkeypatch, optimizer):
  """`SortedLookup` (the GPU's kernel: repeated rows summed by a segmented scan, bags
  pooled by a 0/1 matmul), run here on the 8 CPU devices with every layout in one plan
  and the same rows looked up from every device, gives the portable kernel's
  single-device numbers; every scatter of its compiled sparse update declares unique
  indices (no contended atomics), where the portable one's do not."""
  from dlrm_jax.embedding import kernels

  want = _train(_config(1, optimizer=optimizer), make_batches=_repeated_id_batches)
  portable = Task(_config(8, MIXED, optimizer=optimizer))
  monkeypatch.setitem(kernels.KERNELS, "cpu", kernels.SortedLookup())
  got = _train(_config(8, MIXED, optimizer=optimizer), make_batches=_repeated_id_batches)
  assert all(isinstance(g.kernel, kernels.SortedLookup)
             for g in got["task"].embedding.groups.values())
  _assert_same(got, want, rtol=1e-4, atol=1e-4)
  if optimizer != "sgd":
    _assert_same_slots(got, want, rtol=1e-4, atol=1e-8)
  scatters = {}
  for name, task in (("sorted", got["task"]), ("portable", portable)):
    batch = task.device_batch(_repeated_id_batches(task)[0])
    scatters[name] = update_scatters(
        task.lower_train_step(task.init_state(0), batch).compile().as_text())
  assert scatters["sorted"] and all("unique_indices=true" in s for s in scatters["sorted"])
  assert any("unique_indices=true" not in s for s in scatters["portable"])


def test_the_tpu_kernel_exchanges_row_wise_sums_by_all_to_all(monkeypatch):
  """`TpuLookup` (the portable kernel, with the row-wise owners' partial sums sent by an
  all-to-all and added where they land, as XLA:TPU makes a reduce-scatter an all-reduce)
  run on the 8 CPU devices with every layout in one plan and rows repeated across
  devices gives the single-device numbers; its compiled step has no reduce-scatter,
  where the portable kernel's has the row-wise one."""
  from dlrm_jax import traffic
  from dlrm_jax.embedding import kernels

  want = _train(_config(1), make_batches=_repeated_id_batches)
  portable = Task(_config(8, MIXED))
  monkeypatch.setitem(kernels.KERNELS, "cpu", kernels.TpuLookup())
  got = _train(_config(8, MIXED), make_batches=_repeated_id_batches)
  assert all(isinstance(g.kernel, kernels.TpuLookup)
             for g in got["task"].embedding.groups.values())
  _assert_same(got, want)
  ops = {}
  for name, task in (("tpu", got["task"]), ("portable", portable)):
    batch = task.device_batch(_repeated_id_batches(task)[0])
    ops[name] = traffic.collectives(
        task.lower_train_step(task.init_state(0), batch).compile().as_text())
  assert "reduce-scatter" in ops["portable"] and "reduce-scatter" not in ops["tpu"], ops
  assert ops["tpu"]["all-to-all"]["count"] > ops["portable"]["all-to-all"]["count"], ops


# Flat bags: feature f's h_f ids end to end, [B, sum(hotness)] --------------------

HOTNESS = (3, 1, 2, 5, 1, 4, 2, 1)  # 19 ids per sample; padded, 8 x 5 = 40 slots
BAG_POOLINGS = ("sum", "mean", "mean", "sum", "sum", "mean", "sum", "mean")
TABLE_ROWS = (500, 300, 200, 120, 500, 64, 40, 250)


def _bag_collection():
  from dlrm_jax.embedding import TableSpec

  return EmbeddingCollection([TableSpec(f"t{i}", r, 8, p, hotness=h) for i, (r, p, h)
                              in enumerate(zip(TABLE_ROWS, BAG_POOLINGS, HOTNESS))])


def _flat_and_padded(seed=0):
  """Weighted flat bags (ids repeated within and across bags and devices, and spread over
  every row-wise block) and the same bags padded to the widest with a mask."""
  rng = np.random.default_rng(seed)
  rows = np.repeat(TABLE_ROWS, HOTNESS)
  spread = rng.integers(0, 1 << 20, (BATCH, len(rows))) % rows
  ids = np.where(rng.random((BATCH, len(rows))) < 0.4, rng.integers(0, 3, (BATCH, len(rows))),
                 spread).astype(np.int32)
  weights = rng.uniform(0.5, 1.5, ids.shape).astype(np.float32)
  width, offsets = max(HOTNESS), np.concatenate([[0], np.cumsum(HOTNESS)[:-1]])
  padded = {"sparse": np.zeros((BATCH, len(HOTNESS), width), np.int32),
            "sparse_weights": np.zeros((BATCH, len(HOTNESS), width), np.float32),
            "sparse_mask": np.zeros((BATCH, len(HOTNESS), width), bool)}
  for f, (o, h) in enumerate(zip(offsets, HOTNESS)):
    padded["sparse"][:, f, :h] = ids[:, o:o + h]
    padded["sparse_weights"][:, f, :h] = weights[:, o:o + h]
    padded["sparse_mask"][:, f, :h] = True
  return {"sparse": ids, "sparse_weights": weights}, padded


def _embedding_step(devices, overrides, batch, replicas=1, row_capacity=0.0):
  """One row-wise Adagrad step of the tables alone on `devices` devices (in `replicas`
  groups): a fixed nonlinear loss of the pooled vectors. Returns the pooled vectors, the
  loss, the updated tables and accumulators (per table), the lookups (unbounded), the
  train step's (bounded by `row_capacity`) and the ids it dropped."""
  from jax.sharding import NamedSharding

  from dlrm_jax import parallel
  from dlrm_jax.embedding import make_sparse_optimizer
  from dlrm_jax.embedding.layouts import unstack_rows
  from dlrm_jax.embedding.sharded import ShardedEmbedding
  from dlrm_jax.specs import MeshSpec

  coll = _bag_collection()
  mesh, axes = parallel.make_mesh(MeshSpec(devices, replicas, "explicit"))
  plan = plan_tables(coll.specs, devices // replicas, batch_size=BATCH, lookups=coll.hotness,
                     min_column_width=1, overrides=parse_overrides(overrides))
  emb = ShardedEmbedding(coll, plan, mesh, axes, row_wise_capacity=row_capacity)
  opt = make_sparse_optimizer("rowwise_adagrad")
  tables = jax.jit(emb.init, out_shardings=emb.table_shardings())(np.uint32(4))
  state = emb.init_optimizer(opt, tables)
  rows = NamedSharding(mesh, emb.batch_spec)
  batch = {k: jax.device_put(v, rows) for k, v in batch.items()}
  target = jax.device_put(np.random.default_rng(9).normal(size=(BATCH, 8, 8)).astype(
      np.float32), rows)

  @jax.jit
  def step(tables, state, batch):
    forward = emb.forward(tables, batch)

    def loss(vectors):
      pooled = forward.embed(vectors)
      return jax.numpy.mean(jax.numpy.sin(40.0 * pooled) * target), pooled

    (value, pooled), grads = jax.value_and_grad(loss, has_aux=True)(forward.vectors)
    tables, state = forward.apply_gradients(opt, tables, state, grads, 0.3, 0)
    return value, pooled, tables, state, forward.dropped

  lookups = jax.jit(emb.lookup)(tables, batch)
  bounded = jax.jit(lambda t, b: emb.lookup(t, b, bounded=True))(tables, batch)
  value, pooled, tables, state, dropped = step(tables, state, batch)
  return {"loss": float(value), "pooled": np.asarray(pooled), "tables": emb.to_arrays(tables),
          "accumulators": unstack_rows(emb.groups, {k: np.asarray(v["accumulator"])
                                                    for k, v in state.items()}),
          "lookups": lookups, "bounded": bounded, "dropped": int(dropped), "embedding": emb}


def _assert_same_step(got, want):
  """Pooled vectors to 1e-5 relative (1e-6 absolute), the loss to 1e-5 relative, updated
  rows to 2e-6 absolute (1e-5 relative), row-wise Adagrad accumulators to 1e-5 relative:
  float rounding of another summation order (the mean divides the sum by the hotness
  where the padded layout scales each id by 1 / count)."""
  np.testing.assert_allclose(got["pooled"], want["pooled"], rtol=1e-5, atol=1e-6)
  assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
  for name, atol in (("tables", 2e-6), ("accumulators", 1e-12)):
    for t, (a, b) in enumerate(zip(got[name], want[name], strict=True)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol, err_msg=f"{name} of table {t}")


_PADDED_ONE_DEVICE = {}


def _padded_one_device():
  if not _PADDED_ONE_DEVICE:
    _PADDED_ONE_DEVICE.update(_embedding_step(1, "", _flat_and_padded()[1]))
  return _PADDED_ONE_DEVICE


# Each layout alone, and all four in one plan; t3 (5 ids) and t5 (4) share device 2, whose
# table-wise slot is then 9 ids wide (the padded layout's would be 2 x 5).
FLAT_PLANS = {"table_wise": "t3:table_wise:2,t5:table_wise:2," + ",".join(
                  f"t{i}:table_wise:{d}" for i, d in ((0, 0), (1, 0), (2, 1), (4, 3), (6, 4),
                                                      (7, 5))),
              "row_wise": _all(ROW_WISE), "column_wise": _all(COLUMN_WISE),
              "replicated": _all(REPLICATED), "mixed": MIXED, "mixed_2x4": MIXED}


@pytest.mark.parametrize("plan", [None, *FLAT_PLANS])
def test_flat_bags_step_as_padded_bags_with_a_mask(plan):
  """The same weighted bags, flat [B, 19] and padded with a mask [B, 8, 5], with sum and
  mean tables side by side: the same pooled vectors, loss, updated rows and row-wise
  Adagrad accumulators (tolerances in `_assert_same_step`; the largest differences seen
  are 6e-7 on a row, 2e-6 relative on an accumulator), on one device (plan None) and on 8
  for every sharding type, and on a 2 x 4 mesh (replica groups). The table-wise plan gives
  device 2 two tables and devices 6 and 7 none, which also checks that a device's empty
  slots claim none of its rows."""
  flat, _ = _flat_and_padded()
  got = _embedding_step(1 if plan is None else 8, FLAT_PLANS.get(plan, ""), flat,
                        replicas=2 if plan == "mixed_2x4" else 1)
  if plan not in (None, "mixed", "mixed_2x4"):
    assert {p.kind for p in got["embedding"].plan.placements} == {plan}
  _assert_same_step(got, _padded_one_device())


def test_the_gpu_kernel_pools_flat_bags_as_the_portable_one(monkeypatch):
  """Flat bags of several widths through every layout with `SortedLookup`: its matmul
  pooling and scan-summed row-wise Adagrad give the portable one-device step."""
  from dlrm_jax.embedding import kernels

  want = _padded_one_device()
  monkeypatch.setitem(kernels.KERNELS, "cpu", kernels.SortedLookup())
  got = _embedding_step(8, MIXED, _flat_and_padded()[0])
  assert all(isinstance(g.kernel, kernels.SortedLookup) for g in got["embedding"].groups.values())
  _assert_same_step(got, want)


def test_flat_bags_cost_per_id_in_every_layout():
  """What each layout gathers, moves and updates is one slot per id of the flat rows
  (and of each table-wise owner's tables, padded to the fullest owner's), never one per
  slot of the widest bag."""
  flat, _ = _flat_and_padded()
  total, n = sum(HOTNESS), 8
  one = _embedding_step(1, "", flat)["lookups"]["table_wise"]
  assert one["rows"].shape == (1, BATCH, total) and one["vectors"].shape == (BATCH * total, 8)
  assert _padded_one_device()["lookups"]["table_wise"]["rows"].size == BATCH * 8 * max(HOTNESS)
  got = _embedding_step(n, MIXED, flat)
  emb, lookups = got["embedding"], got["lookups"]
  for kind, g in emb.groups.items():
    ids = sum(HOTNESS[t] for t in g.features)
    rows = lookups[kind]["rows"]
    if kind == TABLE_WISE:  # every device receives each source's slot of its tables' ids
      per_device = {}
      for t in g.features:
        device = emb.plan.placements[t].device
        per_device[device] = per_device.get(device, 0) + HOTNESS[t]
      assert rows.shape == (n * n, BATCH // n, max(per_device.values()))
    elif kind == REPLICATED:  # local
      assert rows.shape == (BATCH, ids)
    elif kind == ROW_WISE:  # unbounded (evaluation): room for every id of the group
      assert rows.shape == (n * BATCH * ids,)
      bag = np.asarray(lookups[kind]["bag"]).reshape(n, -1)  # sorted on each device, as
      assert (bag >= 0).all() and (np.diff(bag, axis=1) >= 0).all()  # its sum declares
    else:  # all-gathered ids: each device has every sample's ids of the group
      assert rows.shape == (n * BATCH, ids)
    vectors = lookups[kind]["vectors"].shape[:-1]  # table-wise: flat, one per id
    assert vectors == ((rows.size,) if kind == TABLE_WISE else rows.shape)
  wide = _embedding_step(n, FLAT_PLANS["table_wise"], flat)["lookups"]["table_wise"]
  assert wide["rows"].shape == (n * n, BATCH // n, HOTNESS[3] + HOTNESS[5])


def _task_step(devices, overrides, pooling, batch):
  """One train step of the whole model (row-wise Adagrad tables, Adagrad MLPs) on
  MLPerf-like bags of `HOTNESS`: loss, tables, accumulators and dense parameters after it."""
  from dlrm_jax.config import dash_list
  from dlrm_jax.embedding.layouts import unstack_rows

  c = _config(devices, overrides, optimizer="rowwise_adagrad")
  c.data.hotness, c.embedding_pooling = dash_list(HOTNESS), pooling
  task = Task(c)
  assert task.collection.hotness == HOTNESS
  dense = np.random.default_rng(3).random((BATCH, 13), dtype=np.float32)
  label = (np.arange(BATCH) % 3 == 0).astype(np.float32)
  state, out = task.train_step(task.init_state(0), {**batch, "dense": dense, "label": label})
  slots = state.emb_opt_state
  return {"loss": float(out["loss"]), "tables": task.embedding.to_arrays(state.tables),
          "accumulators": unstack_rows(task.embedding.groups, {
              k: np.asarray(v["accumulator"]) for k, v in slots.items()}),
          "params": [np.asarray(x) for x in jax.tree.leaves(state.params)]}


@pytest.mark.parametrize("devices,pooling", [(1, "mean"), (8, "sum")])
def test_flat_bags_train_step_as_padded_bags(devices, pooling):
  """The whole train step on flat bags equals the step on the same bags padded with a
  mask on one device: loss, updated rows, accumulators and dense parameters (one device
  with mean pooling, the mixed plan on 8 with sum; tolerances as `_assert_same_step`)."""
  flat, padded = _flat_and_padded(1)
  got = _task_step(devices, MIXED if devices > 1 else "", pooling, flat)
  want = _task_step(1, "", pooling, padded)
  assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
  for name, atol in (("tables", 2e-6), ("accumulators", 1e-12), ("params", 2e-6)):
    for a, b in zip(got[name], want[name], strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol, err_msg=name)


def test_planner_counts_16_bit_tables_at_half_their_bytes():
  specs = _specs([1000])
  f32 = plan_tables(specs, 1, batch_size=8, optimizer="adagrad")
  bf16 = plan_tables(specs, 1, batch_size=8, optimizer="adagrad", table_itemsize=2)
  # Per-element Adagrad: the 16-wide rows shrink to half, the float32 state does not.
  assert f32.table_bytes == (1000 * (16 * 4 + 16 * 4),)
  assert bf16.table_bytes == (1000 * (16 * 2 + 16 * 4),)
  assert plan_tables(specs, 1, batch_size=8, table_itemsize=2).table_bytes == (1000 * 16 * 2,)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_tables_in_every_layout(dtype):
  """16-bit tables through the mixed plan on 8 devices: stored (and placed) in their
  type at half the bytes, the planner's figures halved too, two row-wise Adagrad steps
  as on one device (the stochastic rounding draws its noise by the unsharded table's
  rows and columns, so the layouts round alike)."""
  import jax.numpy as jnp

  def config(devices, overrides=""):
    c = _config(devices, overrides, optimizer="rowwise_adagrad")
    c.embedding_dtype = dtype
    return c

  got, want = _train(config(8, MIXED)), _train(config(1))
  full = _train(_config(8, MIXED, optimizer="rowwise_adagrad"))
  from dlrm_jax.embedding.collection import PACKED, value_dtype

  for kind, array in got["state"].tables.items():
    assert value_dtype(array) == jnp.dtype(dtype), kind
    assert array.nbytes * 2 == full["state"].tables[kind].nbytes
    # Stored in pairs of 16-bit values (updated in place on XLA:CPU) but where a device's
    # slice of the columns is odd: column_wise's 8 columns over 8 devices.
    packed = got["task"].embedding.groups[kind].packed
    assert packed == (kind != "column_wise"), kind
    assert array.dtype == (PACKED[jnp.dtype(dtype)] if packed else jnp.dtype(dtype)), kind
  task = got["task"]
  assert task.collection.nbytes * 2 == full["task"].collection.nbytes
  rows_bytes = [r * 8 for r in task.spec.table_rows]  # 8-wide rows: 16 B vs 32 B of values
  assert [f - h for f, h in zip(full["task"].plan.table_bytes, task.plan.table_bytes)] == \
      [r * 2 for r in rows_bytes]
  for a, b in zip(got["tables"], want["tables"], strict=True):
    assert a.dtype == jnp.dtype(dtype)
    # Equal but where the float32 sums' order flips a rounding (1 of 2,000 values when
    # written), and then by one step of the type, or by 1e-6 where an update all but
    # cancels a value (jax 0.12.1: -2.98e-7 against -2.79e-7, in rows of about 0.1).
    assert np.mean(a != b) < 0.005
    step = 2.0 ** (-7 if dtype == "bfloat16" else -10)
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=step,
                               atol=1e-6)
  np.testing.assert_allclose(got["predictions"], want["predictions"], rtol=1e-5, atol=1e-6)
  # The 16-bit run follows the float32 one closely.
  np.testing.assert_allclose(got["predictions"], full["predictions"], rtol=2e-2, atol=2e-3)


def test_row_wise_owners_gather_only_their_share_of_the_ids_and_match_one_device(monkeypatch):
  """In a train step each device gathers, pools and updates only the ids of its own rows
  (row r on device r mod 8), compacted into `capacity` slots (2 x an even share): its
  work is a share of the batch's ids, not all of them, and the step equals one device's."""
  from dlrm_jax.embedding import costs

  monkeypatch.setattr(costs, "MIN_ROW_CAPACITY", 8)
  flat, _ = _flat_and_padded()
  n, ids = 8, BATCH * sum(HOTNESS)
  got = _embedding_step(n, FLAT_PLANS["row_wise"], flat, row_capacity=2.0)
  g = got["embedding"].groups[ROW_WISE]
  capacity = g.capacity(ids)
  assert capacity == -(-2 * ids // n // 8) * 8 < ids // 3
  rows = np.asarray(got["bounded"][ROW_WISE]["rows"]).reshape(n, capacity)
  assert got["bounded"][ROW_WISE]["vectors"].shape == (n * capacity, 8)
  owners = flat["sparse"] % n  # each id's device: the same count of real rows on each
  assert [(r < g.rows_per_device).sum() for r in rows] == [(owners == d).sum() for d in range(n)]
  assert got["dropped"] == 0
  _assert_same_step(got, _padded_one_device())


def test_row_wise_ids_past_capacity_are_counted():
  """Ids past a device's capacity are left out of the step and counted, never silently:
  every id a multiple of 8 falls on device 0, which keeps MIN_ROW_CAPACITY of them."""
  from dlrm_jax.embedding import costs

  flat, _ = _flat_and_padded()
  ids = flat["sparse"] // 8 * 8
  total = ids.size
  assert total > costs.MIN_ROW_CAPACITY * 1.5
  got = _embedding_step(8, FLAT_PLANS["row_wise"], {**flat, "sparse": ids}, row_capacity=2.0)
  assert got["embedding"].groups[ROW_WISE].capacity(total) == costs.MIN_ROW_CAPACITY
  assert got["dropped"] == total - costs.MIN_ROW_CAPACITY


def test_a_train_step_past_the_row_wise_capacity_stops_the_run_before_any_checkpoint(
    tmp_path, monkeypatch):
  from dlrm_jax.embedding import costs

  monkeypatch.setattr(costs, "MIN_ROW_CAPACITY", 8)
  c = _config(8, _all(ROW_WISE))
  c.sharding.row_wise_capacity = 0.5  # half an even share: every device drops ids
  c.num_batches = 4
  with pytest.raises(stopping.DroppedIdsError, match=r"^step 1 had [\d,]+ row-wise ids more "
                     r"than their devices' capacity \(sharding.row_wise_capacity=0.5 x an even "
                     r"share of the batch's ids\): training stopped. No checkpoint was saved "
                     r"before it; raise sharding.row_wise_capacity"):
    trainer.train_and_evaluate(c, str(tmp_path / "run"), log=lambda s: None)
  assert not any((tmp_path / "run").rglob("_CHECKPOINT_METADATA"))


@pytest.mark.parametrize("rows,dense", [((500, 300, 200, 120, 500, 64, 40, 250), False),
                                        ((12, 15, 13, 16, 14, 12, 17, 18), True)])
def test_replicated_copies_stay_bit_identical_and_equal_one_device(rows, dense):
  """Replicated tables exchange the batch's touched rows (ids and gradients all-gathered,
  the same sparse update on every copy) where the batch has fewer ids than the tables
  rows, else all-reduce a dense gradient; with the same rows looked up from every device,
  every copy ends bit-identical and equal to the one-device run."""
  from dlrm_jax.embedding.planner import sparse_replica_update

  def config(devices, overrides=""):
    c = _config(devices, overrides, optimizer="rowwise_adagrad")
    c.arch_embedding_size = "-".join(map(str, rows))
    return c

  assert sparse_replica_update(BATCH * NUM_TABLES, sum(rows)) != dense
  got = _train(config(8, _all(REPLICATED)), make_batches=_repeated_id_batches)
  want = _train(config(1), make_batches=_repeated_id_batches)
  _assert_same(got, want, rtol=1e-4, atol=1e-4)
  for leaf in (got["state"].tables[REPLICATED],
               *jax.tree.leaves(got["state"].emb_opt_state[REPLICATED])):
    copies = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(copies) == 8 and all(np.array_equal(c, copies[0]) for c in copies[1:])
  hlo = got["task"].lower_train_step(got["task"].init_state(0), got["task"].device_batch(
      _repeated_id_batches(got["task"])[0])).compile().as_text()
  table_shaped = re.findall(rf"f32\[{sum(rows)},8\][^\n]*all-reduce\(", hlo)
  assert bool(table_shaped) == dense


def test_row_wise_tables_saved_in_contiguous_blocks_relayout_into_the_cyclic_order():
  """A plan saved before row-wise rows were spread cyclically (its JSON has no row_order)
  reads as contiguous blocks, is not the same layout, and its stored tables and slots
  re-lay out into the cyclic one value for value."""
  from dlrm_jax import parallel
  from dlrm_jax.embedding.layouts import plan_groups, stack_rows, unstack_rows
  from dlrm_jax.embedding.planner import Plan
  from dlrm_jax.embedding.sharded import ShardedEmbedding
  from dlrm_jax.specs import MeshSpec

  coll = _bag_collection()
  plan = plan_tables(coll.specs, 8, batch_size=BATCH, overrides=parse_overrides(_all(ROW_WISE)))
  saved = plan.to_json()
  del saved["row_order"]
  old = Plan.from_json(saved)
  assert (plan.row_order, old.row_order) == ("cyclic", "blocks") and not old.same_layout(plan)
  rng = np.random.default_rng(0)
  tables = [rng.normal(size=(s.rows, s.dim)).astype(np.float32) for s in coll.specs]
  sums = [rng.random(s.rows).astype(np.float32) for s in coll.specs]
  old_groups, shape = plan_groups(coll, old), {ROW_WISE: plan_groups(coll, plan)[ROW_WISE].shape}
  stored = stack_rows(old_groups, tables, shape)
  stored_sums = stack_rows(old_groups, sums, {ROW_WISE: shape[ROW_WISE][:1]})
  mesh, axes = parallel.make_mesh(MeshSpec(8, 1, "explicit"))
  emb = ShardedEmbedding(coll, plan, mesh, axes)
  assert not np.array_equal(stored[ROW_WISE], stack_rows(emb.groups, tables, shape)[ROW_WISE])
  target = {ROW_WISE: {"accumulator": jax.ShapeDtypeStruct(shape[ROW_WISE][:1], np.float32)}}
  placed, slots = emb.relayout(coll, old, stored, {ROW_WISE: {"accumulator": stored_sums[
      ROW_WISE]}}, target)
  for got, want in zip(emb.to_arrays(placed), tables, strict=True):
    np.testing.assert_array_equal(got, want)
  got_sums = unstack_rows(emb.groups, {ROW_WISE: np.asarray(slots[ROW_WISE]["accumulator"])})
  for got, want in zip(got_sums, sums, strict=True):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("replicas", [1, 2])
def test_the_temporaries_model_counts_the_ids_each_layout_handles(monkeypatch, replicas):
  """`costs.ids_per_device`, the planner's model of what a device handles in a step, is
  what the step's lookups hold, per layout: table-wise the owners' slots, row-wise the
  capacity, column-wise every id at a slice of the width, replicated its own (or, where
  copies exchange touched rows, every device's); on a 2 x 4 mesh the update gathers
  every replica group's."""
  from dlrm_jax.embedding import costs
  from dlrm_jax.embedding.planner import sparse_replica_update

  monkeypatch.setattr(costs, "MIN_ROW_CAPACITY", 8)
  flat, _ = _flat_and_padded()
  got = _embedding_step(8, MIXED, flat, replicas=replicas, row_capacity=2.0)
  emb = got["embedding"]
  model = costs.ids_per_device(emb.plan, 2.0, replicas)
  assert set(model) == set(emb.groups)
  for kind, (ids, width) in model.items():
    rows = got["bounded"][kind]["rows"]
    handled = rows.size // 8  # a device's lookups
    if kind == REPLICATED and sparse_replica_update(rows.size, emb.groups[kind].shape[0]):
      handled *= 8  # every device's ids, all-gathered for the update
    elif kind != REPLICATED:
      handled *= replicas  # every replica group's, gathered for the update
    assert (handled, width) == (ids, emb.groups[kind].dim / (emb.plan.num_shards if kind == COLUMN_WISE else 1))
