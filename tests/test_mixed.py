"""Mixed-dimension tables (dlrm_jax.embedding.mixed): the width rule against a numpy
re-derivation of the reference's, lookups and projections against numpy, a run through
train.py, 8 devices against 1, resuming and restoring on another mesh, the export, and
the Kaggle rows."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import CRITEO_DIR, REPO, load_config
from dlrm_jax import predict, trainer
from dlrm_jax.config import ConfigError
from dlrm_jax.embedding import EmbeddingCollection
from dlrm_jax.embedding.collection import TableSpec
from dlrm_jax.embedding.mixed import md_solver, table_dims
from dlrm_jax.model import DLRM, ModelSpec, init_params
from dlrm_jax.specs import RunSpec
from dlrm_jax.task import Task


def reference_rule(rows, alpha, d0, round_dims):
  """The reference's md_solver, step by step in float32: sort the row counts, lambda =
  d0 * n_min ** alpha, d = lambda * n ** -alpha, the first d0 and the others at least 1,
  rounded (to a power of two with round_dims), and the sort undone."""
  n = np.asarray(rows).astype(np.float32)
  order = np.argsort(n, kind="stable")
  sorted_n = n[order]
  lamb = d0 * sorted_n[0] ** np.float32(alpha)
  d = np.ones_like(sorted_n) * lamb * sorted_n ** np.float32(-alpha)
  d[0] = d0
  d[1:] = np.maximum(d[1:], 1.0)
  d = np.round(d)
  if round_dims:
    d = 2.0 ** np.round(np.log2(d))
  undo = np.empty_like(order)
  undo[order] = np.arange(len(order))
  return d[undo].astype(int).tolist()


@pytest.mark.parametrize("round_dims", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7])
def test_width_rule_matches_the_reference(alpha, round_dims):
  rng = np.random.default_rng(int(alpha * 10) + round_dims)
  for d0 in (4, 16, 64):
    rows = rng.integers(2, 10**7, 26)
    assert md_solver(rows, alpha, d0, round_dims) == reference_rule(rows, alpha, d0, round_dims)
  # By hand: 8 (20 / 3000) ** 0.3 = 1.78 and 8 (20 / 900) ** 0.3 = 2.55; 3 -> 4 by powers of 2.
  assert md_solver([20, 3000, 900], 0.3, 8, False) == [8, 2, 3]
  assert md_solver([20, 3000, 900], 0.3, 8, True) == [8, 2, 4]


def test_width_rule_matches_torchs_arithmetic():
  """The reference's rule as torch computes it (float32, its pow; the sort, the loop and
  the rounding as its md_solver has them), over 300 random sets of 26 tables: the same
  widths. (Its pow and numpy's can differ in the last bit: benchmarks/md_rule_parity.py
  found 8 widths in 60 million that differ.)"""
  torch = pytest.importorskip("torch")

  def reference(rows, alpha, d0, round_dim):
    n, indices = torch.sort(torch.tensor(rows, dtype=torch.long))
    x = n.type(torch.float) / torch.ones(len(n))
    d = torch.ones(len(x)) * (d0 * (x[0].type(torch.float) ** alpha)) * (x ** (-alpha))
    d[0] = d0
    d[1:] = torch.clamp(d[1:], min=1)
    d = torch.round(d).type(torch.long)
    if round_dim:
      d = 2 ** torch.round(torch.log2(d.type(torch.float)))
    undo = torch.empty_like(indices)
    undo[indices] = torch.arange(len(indices))
    return [int(v) for v in d[undo]]

  rng = np.random.default_rng(5)
  for _ in range(300):
    alpha, d0 = float(rng.uniform(0, 1)), int(rng.choice([4, 16, 64, 128]))
    rows, round_dim = rng.integers(2, 10 ** int(rng.integers(3, 9)), 26).tolist(), bool(
        rng.integers(2))
    assert md_solver(rows, alpha, d0, round_dim) == reference(rows, alpha, d0, round_dim), (
        rows, alpha, d0, round_dim)


def test_small_tables_keep_d_and_explicit_widths():
  """Tables at or below the threshold keep D (where the reference crashes); md_dims
  replaces the rule; without md_flag every table is D wide."""
  rows = [20, 3000, 900, 150]
  assert table_dims(rows, 8, enabled=True, threshold=200) == (8, 2, 3, 8)
  assert table_dims(rows, 8, enabled=True, threshold=0) == tuple(md_solver(rows, 0.3, 8))
  assert table_dims(rows, 8) == (8,) * 4
  assert table_dims(rows, 8, enabled=True, explicit=(1, 2, 8, 4)) == (1, 2, 8, 4)
  for bad in ((1, 2, 3), (1, 2, 9, 4)):
    with pytest.raises(ConfigError, match="md_dims"):
      table_dims(rows, 8, enabled=True, explicit=bad)
  c = load_config("tiny")
  c.md_flag, c.qr_flag = True, True
  with pytest.raises(ConfigError, match="qr_flag and md_flag"):
    RunSpec.from_config(c)


def test_checkpoints_compare_the_widths_not_the_md_fields():
  """A checkpoint's config and the run's differ only where the saved arrays would: the
  md_* fields through the widths they give (none with md_flag off), the qr_* ones only
  with qr_flag on."""
  from dlrm_jax.checkpoint import config_differences

  def config(**fields):
    c = _md_config(1)
    c.md_flag = False
    for k, v in fields.items():
      setattr(c, k, v)
    return json.loads(c.to_json())

  diff = lambda saved, current: config_differences(config(**saved), config(**current))
  assert diff({"md_temperature": 0.3}, {"md_temperature": 0.9, "md_dims": "1-1-1-1-1-1-1-1",
                                         "qr_collisions": 7}) == []
  assert diff({"md_flag": True, "md_dims": "2-8-3-8-3-1-8-4"},
              {"md_flag": True, "md_temperature": 0.9, "md_dims": "2-8-3-8-3-1-8-4"}) == []
  # threshold 500: the 400- and 250-row tables keep D too
  assert diff({"md_flag": True, "md_threshold": 100}, {"md_flag": True, "md_threshold": 500}
              ) == ["table widths (md_*): checkpoint 2-8-3-8-3-1-8-4, config 2-8-3-8-8-1-8-8"]
  assert diff({}, {"md_flag": True, "md_threshold": 100}) == [
      "table widths (md_*): checkpoint 8-8-8-8-8-8-8-8, config 2-8-3-8-3-1-8-4"]
  assert diff({"qr_flag": True}, {"qr_flag": True, "qr_collisions": 7}) == [
      "qr_collisions: checkpoint 4, config 7"]


SPECS = [TableSpec("a", 30, 8, hotness=2), TableSpec("b", 1000, 2),
         TableSpec("c", 500, 3, hotness=3), TableSpec("d", 40, 8)]


def test_mixed_lookup_against_numpy():
  """Tables of widths 8, 2, 3, 8 stacked by width: flat weighted bags and padded bags
  with a mask look up as numpy's weighted sums, narrow ones zero-padded to D = 8; the
  per-table arrays round-trip; init gives each row its table's bound whatever the width."""
  coll = EmbeddingCollection(SPECS)
  assert coll.widths == (8, 3, 2) and coll.dim == 8
  rng = np.random.default_rng(0)
  arrays = [rng.normal(size=(s.rows, s.dim)).astype(np.float32) for s in SPECS]
  tables = coll.from_arrays(arrays)
  assert sorted(tables) == ["stacked", "stacked_d2", "stacked_d3"]
  assert tables["stacked"].shape == (70, 8) and tables["stacked_d3"].shape == (500, 3)
  for a, b in zip(coll.to_arrays(tables), arrays, strict=True):
    np.testing.assert_array_equal(a, b)

  ids = np.concatenate([rng.integers(0, s.rows, (5, s.hotness)) for s in SPECS], 1)
  weights = rng.uniform(0.5, 2, ids.shape).astype(np.float32)
  got = np.asarray(coll.lookup(tables, jnp.asarray(ids, jnp.int32), jnp.asarray(weights)))
  start = 0
  for f, s in enumerate(SPECS):
    bag, w = ids[:, start:start + s.hotness], weights[:, start:start + s.hotness, None]
    start += s.hotness
    want = np.zeros((5, 8), np.float32)
    want[:, :s.dim] = (arrays[f][bag] * w).sum(1)
    np.testing.assert_allclose(got[:, f], want, rtol=1e-5, atol=1e-6, err_msg=s.name)

  padded, pw, mask = predict.pad_bags(coll.hotness, ids, weights)
  mask[:, 0, 1] = False
  got = np.asarray(coll.lookup(tables, jnp.asarray(padded), jnp.asarray(pw), jnp.asarray(mask)))
  want = (arrays[0][ids[:, :1]] * weights[:, :1, None]).sum(1)
  np.testing.assert_allclose(got[:, 0], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[:, 1, 2:], 0)

  fresh = coll.to_arrays(coll.init(3))
  for a, s in zip(fresh, SPECS):
    assert a.shape == (s.rows, s.dim)
    assert np.abs(a).max() <= np.sqrt(1 / s.rows) and np.abs(a).max() > 0.8 * np.sqrt(1 / s.rows)


def test_projection_against_numpy():
  """The model's projections: feature f's first d_f values times its own [d_f, D] matrix,
  D-wide features unchanged; drawn xavier-uniform (|w| <= sqrt(6 / (d_f + D)))."""
  dims = (8, 2, 3, 8, 2)
  spec = ModelSpec(num_dense=13, embedding_dim=8, bottom=(13, 8), top=(4, 1),
                   table_rows=(30, 1000, 500, 40, 900), table_dims=dims)
  params = init_params(spec, 0)
  model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: DLRM(spec, rngs=nnx.Rngs(0)))), params)
  kernels = {w: np.asarray(k[...]) for w, k in zip(model.projection.widths,
                                                   model.projection.kernels)}
  assert sorted((w, k.shape) for w, k in kernels.items()) == [(2, (2, 2, 8)), (3, (1, 3, 8))]
  for w, k in kernels.items():
    bound = np.sqrt(6 / (w + 8))
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.5 * bound
  rng = np.random.default_rng(1)
  emb = rng.normal(size=(6, 5, 8)).astype(np.float32)
  for f, d in enumerate(dims):
    emb[:, f, d:] = 0.0
  got = np.asarray(model.projection(jnp.asarray(emb)))
  seen = {2: 0, 3: 0}
  for f, d in enumerate(dims):
    if d == 8:
      np.testing.assert_array_equal(got[:, f], emb[:, f])
      continue
    want = emb[:, f, :d].astype(np.float64) @ kernels[d][seen[d]]
    seen[d] += 1
    np.testing.assert_allclose(got[:, f], want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ConfigError, match="table widths"):
    ModelSpec(num_dense=13, embedding_dim=8, bottom=(13, 8), top=(4, 1), table_rows=(30, 40),
              table_dims=(8, 9))


def test_plan_counts_each_widths_stacked_arrays():
  """Table-wise tables of one width share a stacked array padded to its fullest device:
  the plan's per-device bytes are those arrays' (and the split tables') exactly, and the
  planner spreads each width's tables so as to pad its array least."""
  from dlrm_jax.embedding.layouts import local_shape, plan_groups
  from dlrm_jax.embedding.planner import plan_tables

  specs = [TableSpec(f"t{i}", r, d) for i, (r, d) in enumerate(
      [(1000, 16), (1000, 16), (1000, 16), (1000, 4), (1000, 4), (3000, 2), (50_000, 16)])]
  plan = plan_tables(specs, 2, batch_size=8)
  groups = plan_groups(EmbeddingCollection(specs), plan)
  assert {"table_wise", "table_wise_d4", "table_wise_d2", "row_wise"} <= set(groups)
  stored = sum(np.prod(local_shape(g)) * 4 for g in groups.values())
  assert plan.device_bytes() == [stored] * 2
  assert {plan.placements[3].device, plan.placements[4].device} == {0, 1}  # the two 4-wide


def test_plan_bounds_the_padding_of_tables_alone_in_their_width():
  """Six tables of six widths, S = 336,000 bytes each, over 2 devices: table-wise, each
  pads the other device by its size (every device would hold 6 S, all six tables). The
  padding over all widths stays within half an even share (6 S / 2 / 2 = 1.5 S): three
  go table-wise (S / 2 padding each), three row-wise, and each device holds 3 S + 1.5 S."""
  from dlrm_jax.embedding.planner import ROW_WISE, TABLE_WISE, plan_tables

  specs = [TableSpec(f"t{i}", 84_000 // d, d) for i, d in enumerate([8, 7, 6, 5, 4, 3])]
  size = 336_000
  assert {s.rows * s.dim * 4 for s in specs} == {size}
  plan = plan_tables(specs, 2, batch_size=8)
  assert [p.kind for p in plan.placements] == [TABLE_WISE] * 3 + [ROW_WISE] * 3
  assert plan.device_bytes() == [3 * size + 3 * size // 2] * 2


SIZES = "3000-50-900-20-400-7000-60-250"  # widths 2 8 3 8 3 1 8 4 at D = 8


def _md_config(devices=1):
  c = load_config("tiny", devices=devices)
  c.arch_sparse_feature_size, c.arch_mlp_bot = 8, "13-8-8"
  c.arch_embedding_size = SIZES
  c.md_flag, c.md_threshold = True, 100
  c.sharding.min_column_width = 1
  return c


def test_train_py_with_mixed_dims_learns(tmp_path):
  """The default config with widths 16, 8, 4 and 2 over its 26 tables: it learns
  (0.755 when written; 0.761 with every table 16 wide)."""
  widths = "-".join(["16", "8", "4", "2"] * 6 + ["16", "8"])
  proc = subprocess.run(
      [sys.executable, "train.py", f"--workdir={tmp_path}", "--config.md_flag=True",
       f"--config.md_dims={widths}", "--config.progress_bar=False",
       "--config.checkpoint.enabled=False"], cwd=REPO, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["auc"] > 0.7, records


def test_mixed_on_8_devices_equals_1_resumes_and_restores_on_one(tmp_path, monkeypatch):
  """Tables of four widths over 8 devices (every sharding type forced on some) train as
  on one device; the 8-device checkpoint loads onto one device for prediction; a run
  stopped at step 10 and rerun to 20 ends as one of 20."""
  c8, c1 = _md_config(8), _md_config(1)
  c8.sharding.overrides = "t0:row_wise,t6:column_wise,t2:table_wise:3,t4:replicated"
  c8.checkpoint.enabled = True
  eight = trainer.train_and_evaluate(c8, str(tmp_path / "eight"))
  one = trainer.train_and_evaluate(c1, str(tmp_path / "one"))
  assert eight.task.spec.dims == (2, 8, 3, 8, 3, 1, 8, 4)
  kinds = {p.kind for p in eight.task.plan.placements}
  assert kinds >= {"row_wise", "column_wise", "table_wise", "replicated"}, kinds
  assert {"row_wise_d2", "table_wise_d3", "replicated_d3"} <= set(eight.task.embedding.groups)
  for a, b in zip(eight.task.embedding.to_arrays(eight.state.tables),
                  one.task.embedding.to_arrays(one.state.tables), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert [r["auc"] for r in eight.records] == pytest.approx([r["auc"] for r in one.records],
                                                            abs=1e-4)
  restored = predict.load_model(str(tmp_path / "eight"), devices=1)
  assert restored.step == 20
  for a, b in zip(restored.task.embedding.to_arrays(restored.tables),
                  eight.task.embedding.to_arrays(eight.state.tables), strict=True):
    np.testing.assert_array_equal(a, b)

  from checkpoint_worker import run_interrupted_then_resumed

  resumed = run_interrupted_then_resumed(c1, str(tmp_path / "resumed"), monkeypatch)
  strip = lambda rs: [{k: v for k, v in r.items() if k not in trainer.TIMINGS} for r in rs]
  assert strip(resumed.records) == strip(one.records)
  for a, b in zip(resumed.task.embedding.to_arrays(resumed.state.tables),
                  one.task.embedding.to_arrays(one.state.tables), strict=True):
    np.testing.assert_array_equal(a, b)


def test_16_bit_mixed_tables_on_8_devices_equal_1(tmp_path):
  """bfloat16 tables of odd and even widths (packed two to a 32-bit element where even)
  over 8 devices end bit-equal to one device's: the stochastic rounding of their
  updates draws by global row and column in every layout."""
  runs = []
  for devices in (8, 1):
    c = _md_config(devices)
    c.embedding_dtype, c.embedding_optimizer, c.num_batches = "bfloat16", "rowwise_adagrad", 6
    if devices == 8:
      c.sharding.overrides = "t0:row_wise,t6:column_wise,t2:table_wise:3,t4:replicated"
    runs.append(trainer.train_and_evaluate(c, str(tmp_path / str(devices))))
  tables = runs[1].state.tables
  assert tables["table_wise_d4"].dtype == np.uint32  # packed
  assert tables["table_wise_d3"].dtype == jnp.bfloat16
  for a, b in zip(*(r.task.embedding.to_arrays(r.state.tables) for r in runs), strict=True):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(a, b)


def test_mixed_model_exports_and_scores_quantised(tmp_path):
  """The export (flat and padded bags) and predict's int8 / int4 scoring look up each
  width's stacked tables (odd widths among them) and project as the model does."""
  from dlrm_jax.data import make_data

  c = _md_config(1)
  task = Task(c)
  state = task.init_state(0)
  model = predict.Model(task=task, params=state.params, tables=state.tables, config=c, step=0)
  batch = make_data(RunSpec.from_config(c)).batch(0)
  want = predict.score(model, iter([batch]), 64)
  predict.export(model, str(tmp_path / "x"))
  sig = json.loads((tmp_path / "x" / "signature.json").read_text())
  assert sig["tables"] == ["stacked", "stacked_d1", "stacked_d2", "stacked_d3", "stacked_d4"]
  sets = {s["suffix"]: s for s in sig["table_sets"]}  # widths 2 8 3 8 3 1 8 4
  assert sets["_d3"] == {"width": 3, "suffix": "_d3", "features": [2, 4], "offsets": [0, 900]}
  assert sets[""] == {"width": 8, "suffix": "", "features": [1, 3, 6], "offsets": [0, 50, 70]}
  assert [sets[k]["features"] for k in ("_d4", "_d2", "_d1")] == [[7], [0], [5]]
  np.testing.assert_array_equal(  # a table found through its set: t4, 400 rows of 3
      np.load(tmp_path / "x" / "params.npz")["tables_stacked_d3"][900:1300],
      task.embedding.to_arrays(state.tables)[4])
  run = predict.load_exported(str(tmp_path / "x"))
  np.testing.assert_allclose(run(batch["dense"], batch["sparse"]), want, rtol=1e-6, atol=1e-7)
  padded, weights, mask = predict.pad_bags(task.collection.hotness, batch["sparse"])
  np.testing.assert_allclose(run(batch["dense"], padded, weights, mask), want, rtol=1e-6,
                             atol=1e-7)
  int8 = predict.score_quantized(model, iter([batch]), 64, "int8")
  np.testing.assert_allclose(int8, want, atol=5e-3)
  int4 = predict.score_quantized(model, iter([batch]), 64, "int4")
  np.testing.assert_allclose(int4, want, atol=5e-2)
  assert np.abs(int4 - want).max() > np.abs(int8 - want).max()  # coarser, and quantised
  predict.export(model, str(tmp_path / "q4"), quantize="int4")
  sig = json.loads((tmp_path / "q4" / "signature.json").read_text())
  assert "int4_d3" in sig["tables"] and "int4_d1" in sig["tables"]
  np.testing.assert_allclose(predict.load_exported(str(tmp_path / "q4"))(
      batch["dense"], batch["sparse"]), int4, rtol=1e-6, atol=1e-7)


def test_every_width_below_d():
  """With `md_dims` all narrower than D the lookup is the widest table's width (the
  exchange moves 4 values a vector, not 8) and the model projects every feature to D:
  its output equals the model's on the numpy lookup zero-padded to D."""
  from dlrm_jax.data import make_data

  c = _md_config(1)
  c.md_dims = "4-2-4-1-2-4-3-1"
  task = Task(c)
  assert task.collection.dim == 4 and task.spec.dims == (4, 2, 4, 1, 2, 4, 3, 1)
  state = task.init_state(0)
  model = predict.Model(task=task, params=state.params, tables=state.tables, config=c, step=0)
  batch = make_data(RunSpec.from_config(c)).batch(0)
  got = predict.score(model, iter([batch]), 64)
  arrays = task.embedding.to_arrays(state.tables)
  ids = np.asarray(batch["sparse"])
  emb = np.zeros((len(ids), len(arrays), 8), np.float32)
  for f, a in enumerate(arrays):
    emb[:, f, :a.shape[1]] = a[ids[:, f]]
  net = nnx.merge(task.graphdef, state.params)
  want = np.asarray(jax.nn.sigmoid(net(jnp.asarray(batch["dense"]), jnp.asarray(emb))))
  np.testing.assert_allclose(got, want.reshape(got.shape), rtol=1e-5, atol=1e-6)


def test_partial_restore_keeps_each_features_own_projection(tmp_path):
  """Widths changed under a partial restore (t0 and t2 swap 2 and 3 columns, so each
  width's kernel keeps its shape): a feature's projection (and its Adam moments) comes
  back only where the feature had the same width; the rest are fresh."""
  from test_checkpoint import _contents, _random_state
  from dlrm_jax import checkpoint

  saved_c, new_c = _md_config(1), _md_config(1)
  saved_c.dense_optimizer = new_c.dense_optimizer = "adam"
  new_c.md_dims = "3-8-2-8-3-1-8-4"
  saved_task, task = Task(saved_c), Task(new_c)
  state = _random_state(saved_task, seed=1)
  with checkpoint.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    ckpt.save(3, state, _contents(saved_c, saved_task))
    ckpt.wait()
  fresh = task.init_state(7)
  with checkpoint.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    restored = ckpt.restore(task, partial=True, fresh=lambda: fresh).state

  def kernels(tree):  # width -> [n_w, w, D] of every projection leaf (params, moments)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in leaves:
      key = checkpoint._key(path)
      if "projection/kernels/" in key:
        out.setdefault(key.split("projection/")[0], {})[leaf.shape[1]] = np.asarray(leaf)
    return out

  old, new, got = (kernels(x) for x in ((state.params, state.opt_state),
                                        (fresh.params, fresh.opt_state),
                                        (restored.params, restored.opt_state)))
  assert sorted(got) == sorted(old) and len(got) == 3  # params, Adam's mu and nu
  for prefix in got:
    # width 3: features (2, 4) saved, (0, 4) now; width 2: feature 0 saved, 2 now
    np.testing.assert_array_equal(got[prefix][3][1], old[prefix][3][1])  # feature 4
    np.testing.assert_array_equal(got[prefix][3][0], new[prefix][3][0])  # feature 0
    np.testing.assert_array_equal(got[prefix][2], new[prefix][2])  # feature 2
    for w in (4, 1):
      np.testing.assert_array_equal(got[prefix][w], old[prefix][w])
  tables = task.embedding.to_arrays(restored.tables)
  saved_tables = saved_task.embedding.to_arrays(state.tables)
  np.testing.assert_array_equal(tables[4], saved_tables[4])
  np.testing.assert_array_equal(tables[0], task.embedding.to_arrays(fresh.tables)[0])


KAGGLE_HEAD = os.path.join(CRITEO_DIR, "kaggle_train_head10k.tsv")


@pytest.mark.skipif(not os.path.exists(KAGGLE_HEAD), reason="real Criteo rows not present")
def test_mixed_dims_learn_on_the_kaggle_rows(tmp_path):
  """The reference's rule over the Kaggle rows' own vocabularies (3 to 5,521 rows a
  table): the big tables narrow (most to 1 or 2 columns), the small keep D, and the model
  learns (0.741 when written, with 7.3x fewer table bytes; 0.731 with every table at D)."""
  from dlrm_jax.data import criteo
  from test_criteo_train import _kaggle_head_config

  c = _kaggle_head_config(tmp_path)
  out = tmp_path / "vocab"
  criteo.prepare("kaggle", [KAGGLE_HEAD], str(out), categorical="reference", workers=1,
                 progress=False, log=lambda m: None)
  c.data.path = str(out)
  c.md_flag, c.md_threshold = True, 200
  result = trainer.train_and_evaluate(c, str(tmp_path / "run"))
  rows, dims = result.task.spec.table_rows, result.task.spec.dims
  assert dims == table_dims(rows, 8, enabled=True, threshold=200)
  assert min(dims) < 8 and {d for n, d in zip(rows, dims) if n <= 200} == {8}
  assert result.summary["auc"] > 0.68, result.records


def test_mixed_weights_round_trip_through_the_reference_names():
  """`to_reference` names every table as the reference's PrEmbeddingBag
  (emb_l.F.embs.weight, emb_l.F.proj.weight [D, d] where narrower); `config_from_reference`
  reads md_flag and the widths back, and `from_reference` loads a task of that config with
  the same predictions."""
  from dlrm_jax.data import make_data
  from dlrm_jax.reference import config_from_reference, from_reference, to_reference

  c = _md_config(1)
  task = Task(c)
  state = task.init_state(0)
  arrays = to_reference(state.params, task.embedding, state.tables)
  assert arrays["emb_l.0.embs.weight"].shape == (3000, 2)
  assert arrays["emb_l.0.proj.weight"].shape == (8, 2)
  assert "emb_l.1.proj.weight" not in arrays and arrays["emb_l.1.embs.weight"].shape == (50, 8)
  fields = config_from_reference(arrays)
  assert {k: fields[k] for k in ("md_flag", "md_dims", "qr_flag", "arch_embedding_size")} == {
      "md_flag": True, "md_dims": "2-8-3-8-3-1-8-4", "qr_flag": False,
      "arch_embedding_size": SIZES}
  again = load_config("tiny")
  for key, value in fields.items():
    section, _, name = key.rpartition(".")
    (again[section] if section else again)[name] = value
  other = Task(again)
  assert other.spec.dims == task.spec.dims
  params, tables = from_reference(other.spec, other.embedding, arrays)
  batch = make_data(RunSpec.from_config(c)).batch(0)
  np.testing.assert_allclose(np.asarray(other.predict(params, tables, batch)),
                             np.asarray(task.predict(state.params, state.tables, batch)),
                             rtol=1e-6, atol=1e-7)
  del arrays["emb_l.0.proj.weight"]
  with pytest.raises(KeyError, match="emb_l.0.proj.weight"):
    config_from_reference(arrays)
