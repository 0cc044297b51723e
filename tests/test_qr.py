"""Quotient-remainder tables (dlrm_jax.embedding.qr): the formulas against numpy, a
run through train.py, 8 devices against 1, resuming, and the Kaggle rows."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CRITEO_DIR, REPO, load_config
from dlrm_jax import trainer
from dlrm_jax.embedding import EmbeddingCollection
from dlrm_jax.embedding.qr import QRTables
from dlrm_jax.task import Task

ROWS, HOTNESS = (1000, 50, 300, 201), (2, 1, 3, 1)


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_qr_lookup_against_numpy(operation):
  """Bags of ids through split, the tables' lookup and combine equal numpy's sums of
  Q[id // c] and R[id % c] combined; tables at or below the threshold stay whole (mult,
  add) or become the pair with c = rows (concat: one quotient row, a remainder row per id)."""
  c, threshold, dim = 7, 200, 8
  qr = QRTables(ROWS, HOTNESS, dim, enabled=True, collisions=c, operation=operation,
                threshold=threshold)
  half = operation == "concat"
  assert qr.table_dim == (dim // 2 if half else dim)
  if half:
    assert qr.table_names == ["t0q", "t0r", "t1q", "t1r", "t2q", "t2r", "t3q", "t3r"]
    assert qr.table_rows == [143, 7, 1, 50, 43, 7, 29, 7]
  else:
    assert qr.table_names == ["t0q", "t0r", "t1", "t2q", "t2r", "t3q", "t3r"]
    assert qr.table_rows == [143, 7, 50, 43, 7, 29, 7]
  coll = EmbeddingCollection(qr.table_specs())
  rng = np.random.default_rng(0)
  arrays = [rng.normal(size=(r, qr.table_dim)).astype(np.float32) for r in qr.table_rows]
  tables = coll.from_arrays(arrays)
  ids = np.concatenate([rng.integers(0, n, (6, h)) for n, h in zip(ROWS, HOTNESS)], 1)
  weights = rng.uniform(0.5, 2, ids.shape).astype(np.float32)
  batch = qr.split({"sparse": jnp.asarray(ids, jnp.int32),
                    "sparse_weights": jnp.asarray(weights)})
  got = qr.combine(coll.lookup(tables, batch["sparse"], batch["sparse_weights"]))
  assert got.shape == (6, 4, dim)

  table = dict(zip(qr.table_names, arrays))
  start = 0
  for f, (n, h) in enumerate(zip(ROWS, HOTNESS)):
    bag, w = ids[:, start:start + h], weights[:, start:start + h, None]
    start += h
    cf = c if n > threshold else (n if half else None)
    if cf is None:
      want = (table[f"t{f}"][bag] * w).sum(1)
    else:
      q = (table[f"t{f}q"][bag // cf] * w).sum(1)
      r = (table[f"t{f}r"][bag % cf] * w).sum(1)
      want = {"mult": q * r, "add": q + r, "concat": np.concatenate([q, r], -1)}[operation]
    np.testing.assert_allclose(got[:, f], want, rtol=1e-5, atol=1e-6, err_msg=f"feature {f}")


def _qr_config(devices=1):
  c = load_config("tiny", devices=devices)
  c.qr_flag, c.qr_threshold, c.qr_collisions = True, 20, 4
  c.arch_sparse_feature_size, c.arch_mlp_bot = 8, "13-8-8"
  c.sharding.min_column_width = 1
  return c


def test_train_py_with_qr_tables_learns(tmp_path):
  """The default config with every table split (100 rows > threshold 50, 4 collisions,
  concat): it learns (0.733 when written; 0.761 without QR)."""
  proc = subprocess.run(
      [sys.executable, "train.py", f"--workdir={tmp_path}", "--config.qr_flag=True",
       "--config.qr_threshold=50", "--config.qr_operation=concat", "--config.progress_bar=False",
       "--config.checkpoint.enabled=False"], cwd=REPO, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "t0q" in proc.stdout and "t25r" in proc.stdout  # the plan places the pairs
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["auc"] > 0.7, records


def test_qr_on_8_devices_equals_1_and_resumes(tmp_path, monkeypatch):
  """The pairs spread over 8 devices by the planner (every sharding type forced on some)
  train as on one device; a run stopped at step 10 and rerun to 20 ends as one of 20."""
  overrides = "t0q:row_wise,t0r:replicated,t1q:column_wise,t2q:table_wise:3"
  c8, c1 = _qr_config(8), _qr_config(1)
  c8.sharding.overrides = overrides
  eight = trainer.train_and_evaluate(c8, str(tmp_path / "eight"))
  one = trainer.train_and_evaluate(c1, str(tmp_path / "one"))
  kinds = {p.kind for p in eight.task.plan.placements}
  assert kinds >= {"row_wise", "column_wise", "table_wise", "replicated"}, kinds
  for a, b in zip(eight.task.embedding.to_arrays(eight.state.tables),
                  one.task.embedding.to_arrays(one.state.tables), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert [r["auc"] for r in eight.records] == pytest.approx([r["auc"] for r in one.records],
                                                            abs=1e-4)
  # Resume: a run that fails after its step-10 checkpoint, rerun, ends as the whole run.
  from checkpoint_worker import run_interrupted_then_resumed

  resumed = run_interrupted_then_resumed(c1, str(tmp_path / "resumed"), monkeypatch)
  c1.checkpoint.enabled = False
  whole = trainer.train_and_evaluate(c1, str(tmp_path / "whole"))
  strip = lambda rs: [{k: v for k, v in r.items() if k not in trainer.TIMINGS} for r in rs]
  assert strip(resumed.records) == strip(whole.records)
  for a, b in zip(resumed.task.embedding.to_arrays(resumed.state.tables),
                  whole.task.embedding.to_arrays(whole.state.tables), strict=True):
    np.testing.assert_array_equal(a, b)


KAGGLE_HEAD = os.path.join(CRITEO_DIR, "kaggle_train_head10k.tsv")


@pytest.mark.skipif(not os.path.exists(KAGGLE_HEAD), reason="real Criteo rows not present")
def test_qr_tables_learn_on_the_kaggle_rows(tmp_path):
  from test_criteo_train import _kaggle_head_config

  c = _kaggle_head_config(tmp_path)
  c.qr_flag, c.qr_threshold, c.qr_collisions = True, 200, 4
  result = trainer.train_and_evaluate(c, str(tmp_path / "run"))
  names = [s.name for s in result.task.collection.specs]
  big = [f for f, n in enumerate(result.task.spec.table_rows) if n > 200]
  assert big  # (hash mode: every table has the modulus's 3,000 rows)
  assert names == [n for f in range(26) for n in ((f"t{f}q", f"t{f}r") if f in big
                                                   else (f"t{f}",))]
  assert result.summary["auc"] > 0.68, result.records


def test_qr_model_exports_and_scores_quantised(tmp_path):
  """The export and predict's int8 scoring apply the same split and combine."""
  from dlrm_jax import predict
  from dlrm_jax.data import make_data
  from dlrm_jax.specs import RunSpec

  c = _qr_config(1)
  c.qr_operation = "add"
  task = Task(c)
  state = task.init_state(0)
  model = predict.Model(task=task, params=state.params, tables=state.tables, config=c, step=0)
  batch = make_data(RunSpec.from_config(c)).batch(0)
  want = predict.score(model, iter([batch]), 64)
  predict.export(model, str(tmp_path / "x"))
  np.testing.assert_allclose(predict.load_exported(str(tmp_path / "x"))(
      batch["dense"], batch["sparse"]), want, rtol=1e-6, atol=1e-7)
  int8 = predict.score_quantized(model, iter([batch]), 64, "int8")
  np.testing.assert_allclose(int8, want, atol=5e-3)


@pytest.mark.parametrize("operation", ["mult", "concat"])
def test_qr_weights_round_trip_through_the_reference_names(operation):
  """`to_reference` names a pair emb_l.F.weight_q / weight_r as the reference's
  QREmbeddingBag; `config_from_reference` reads qr_flag, the collisions, a threshold
  (and concat, from the bottom MLP's width) back off the shapes, and `from_reference`
  loads the tables into a task of that config with the same predictions."""
  from dlrm_jax.data import make_data
  from dlrm_jax.reference import config_from_reference, from_reference, to_reference
  from dlrm_jax.specs import RunSpec

  c = load_config("tiny")
  c.qr_flag, c.qr_collisions, c.qr_threshold, c.qr_operation = True, 6, 30, operation
  c.arch_embedding_size = ("50-50-50-50-50-50-50-50" if operation == "concat"
                           else "50-50-50-50-20-20-20-20")
  task = Task(c)
  state = task.init_state(0)
  arrays = to_reference(state.params, task.embedding, state.tables)
  assert arrays["emb_l.0.weight_q"].shape == (9, task.qr.table_dim)
  assert arrays["emb_l.0.weight_r"].shape == (6, task.qr.table_dim)
  fields = config_from_reference(arrays, table_rows=[50] * 8)
  want = {"qr_flag": True, "qr_collisions": 6, "arch_sparse_feature_size": 4,
          "qr_threshold": 49 if operation == "concat" else 20,
          "arch_embedding_size": c.arch_embedding_size}
  if operation == "concat":
    want["qr_operation"] = "concat"
  assert {k: fields[k] for k in want} == want and ("qr_operation" in fields) == (
      operation == "concat")
  assert config_from_reference(arrays)["arch_embedding_size"].startswith(
      "54-54-54-54")  # sizes unknown within the collisions: ceil(n / c) c
  again = load_config("tiny")
  for key, value in fields.items():
    section, _, name = key.rpartition(".")
    (again[section] if section else again)[name] = value
  again.qr_operation = operation
  other = Task(again)
  params, tables = from_reference(other.spec, other.embedding, arrays)
  batch = make_data(RunSpec.from_config(c)).batch(0)
  np.testing.assert_allclose(np.asarray(other.predict(params, tables, batch)),
                             np.asarray(task.predict(state.params, state.tables, batch)),
                             rtol=1e-6, atol=1e-7)
