"""Sharded embeddings on 8 simulated devices equal the single-device run.

conftest.py gives this process 8 host CPU devices. Every case trains a few
steps on the mesh and on one device from the same initial values and batches
and compares predictions, dense parameters, tables and optimiser slots.
"""

import re

import jax
import numpy as np
import pytest

from conftest import load_config
from dlrm_jax import trainer
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
      for start, row, count in g.blocks(t):
        mine[row:row + count] = leaf[g.kind][start:start + count]
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


def test_planner_splits_tables_too_big_for_one_device():
  mb = 2**20
  specs = EmbeddingCollection.uniform([1_000_000, 1_000_000], 64).specs  # 244 MiB each
  plan = plan_tables(specs, 4, batch_size=1024, memory_budget=130 * mb, min_column_width=16)
  assert [p.kind for p in plan.placements] == [COLUMN_WISE, COLUMN_WISE]
  plan = plan_tables(specs, 4, batch_size=1024, memory_budget=130 * mb, min_column_width=32)
  assert [p.kind for p in plan.placements] == [ROW_WISE, ROW_WISE]
  assert plan.device_bytes() == [2 * 1_000_000 * 64 * 4 // 4] * 4


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
