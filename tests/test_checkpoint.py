"""Checkpoints: exact resume after SIGKILL, restore onto other meshes, damaged and
incomplete checkpoints, NaN guard, config mismatch, predict and export."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from checkpoint_worker import inject, resume_config
from conftest import REPO, load_config
from dlrm_jax import checkpoint, predict, trainer
from dlrm_jax.data import RandomData
from dlrm_jax.embedding.sharded import unstack_rows

WORKER = os.path.join(REPO, "tests", "checkpoint_worker.py")


def _leaves(tree):
  return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(tree)]


def _assert_states_equal(a, b):
  """Every array of two train states (on the same plan) bit for bit."""
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _without_speed(records):
  return [{k: v for k, v in r.items() if k != "examples_per_sec"} for r in records]


def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path):
  """Killed with SIGKILL mid-run, then rerun: the same records, parameters and tables
  as a run that was never interrupted, bit for bit."""
  killed = tmp_path / "killed"
  proc = subprocess.run([sys.executable, WORKER, str(killed), "14"], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL
  steps = checkpoint.Checkpointer(str(killed / "checkpoints")).steps()
  assert steps and max(steps) < 20, steps  # it died mid-run, after saving

  messages = []
  resumed = trainer.train_and_evaluate(resume_config(), str(killed), log=messages.append)
  assert any(m.startswith(f"resuming from step {max(steps)}") for m in messages), messages
  whole = trainer.train_and_evaluate(resume_config(), str(tmp_path / "whole"))

  assert _without_speed(resumed.records) == _without_speed(whole.records)
  assert [r["step"] for r in resumed.records] == [10, 20]
  _assert_states_equal(resumed.state, whole.state)
  lines = (killed / "metrics.jsonl").read_text().splitlines()
  assert _without_speed([json.loads(l) for l in lines]) == _without_speed(whole.records)


def _mesh_config(devices, overrides=""):
  c = load_config("tiny", devices=devices)
  c.arch_sparse_feature_size, c.arch_mlp_bot = 8, "13-8-8"
  c.arch_embedding_size = "-".join(str(r) for r in (500, 300, 200, 120, 500, 64, 40, 250))
  c.embedding_optimizer, c.dense_optimizer = "rowwise_adagrad", "adagrad"
  c.sharding.min_column_width = 1
  c.sharding.overrides = overrides
  return c


def _mixed(devices):
  """Every sharding type, over `devices` devices."""
  return (f"t0:row_wise,t1:column_wise,t2:table_wise:1,t3:table_wise:{devices - 1},"
          "t4:replicated")


def _random_state(task, seed=0):
  """A train state with every array random (optimiser slots included), in place."""
  rng = np.random.default_rng(seed)
  state = task.init_state(0)
  return jax.tree.map(
      lambda x: jax.device_put(rng.uniform(0.1, 1, x.shape).astype(x.dtype)
                               if x.dtype == np.float32 else x, x.sharding), state)


def _slots(task, state):
  return unstack_rows(task.embedding.groups,
                      {k: np.asarray(v["accumulator"]) for k, v in state.emb_opt_state.items()})


def _save_and_restore_elsewhere(tmp_path, saved_on, restore_on):
  config = _mesh_config(saved_on, _mixed(saved_on))
  task = trainer.Task(config)
  assert {p.kind for p in task.plan.placements} == {"row_wise", "column_wise", "table_wise",
                                                    "replicated"}
  state = _random_state(task)
  batch = RandomData(task.spec.table_rows, 13, 64, seed=3).batch(0)
  want = np.asarray(task.predict(state.params, state.tables, batch))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(7, state, {"config": json.loads(config.to_json()),
                       "plan": checkpoint.plan_to_json(task.plan)})
  ckpt.wait()
  tables, slots = task.embedding.to_arrays(state.tables), _slots(task, state)
  for devices in restore_on:
    other = trainer.Task(_mesh_config(devices))
    assert not checkpoint.same_layout(other.plan, task.plan)
    restored = ckpt.restore(other, other.config)
    assert restored.step == 7
    for got, expected in zip(other.embedding.to_arrays(restored.state.tables), tables):
      np.testing.assert_array_equal(got, expected)
    for got, expected in zip(_slots(other, restored.state), slots):
      np.testing.assert_array_equal(got, expected)
    for name in ("step", "params", "opt_state"):
      for got, expected in zip(_leaves(getattr(restored.state, name)),
                               _leaves(getattr(state, name)), strict=True):
        np.testing.assert_array_equal(got, expected)
    got = np.asarray(other.predict(restored.state.params, restored.state.tables, batch))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  same = ckpt.restore(task, config)  # the saved plan: straight into the shardings
  _assert_states_equal(same.state, state)


@pytest.mark.slow  # a smaller case of the next test
def test_restore_onto_one_device_and_another_plan(tmp_path):
  _save_and_restore_elsewhere(tmp_path, 2, (1,))


def test_restore_from_8_devices_onto_1_2_and_4(tmp_path):
  _save_and_restore_elsewhere(tmp_path, 8, (1, 2, 4))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
  """Two checkpoints (steps 1 and 2) of the tiny model on one device."""
  directory = tmp_path_factory.mktemp("tiny") / "ckpt"
  config = _mesh_config(1)
  task = trainer.Task(config)
  states = {}
  ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=5)
  for step in (1, 2):
    states[step] = _random_state(task, seed=step)
    ckpt.save(step, states[step], {"config": json.loads(config.to_json()),
                                   "plan": checkpoint.plan_to_json(task.plan)})
  ckpt.wait()
  ckpt.close()
  return directory, config, task, states


def test_damaged_and_incomplete_checkpoints_are_skipped(tmp_path, saved_tiny):
  import shutil

  source, config, task, states = saved_tiny
  directory = tmp_path / "ckpt"
  shutil.copytree(source, directory)
  # A save that died before it was committed: Orbax's temporary directory.
  partial = directory / "3.orbax-checkpoint-tmp-1700000000000000"
  shutil.copytree(directory / "2", partial)
  (partial / "state" / "manifest.ocdbt").unlink()
  # The latest complete checkpoint damaged: its array data truncated.
  for root, _, files in os.walk(directory / "2" / "state"):
    for name in files:
      if name not in ("_METADATA", "_sharding", "commit_success.txt"):
        open(os.path.join(root, name), "wb").close()
  messages = []
  ckpt = checkpoint.Checkpointer(str(directory), log=messages.append)
  assert ckpt.steps() == [1, 2]  # the uncommitted save is not a checkpoint
  restored = ckpt.restore(task, config)
  assert restored.step == 1
  _assert_states_equal(restored.state, states[1])
  assert len(messages) == 1 and "/2 is damaged" in messages[0], messages
  assert (directory / "2.damaged").is_dir() and ckpt.steps() == [1]


def test_config_mismatch_is_refused_unless_partial(saved_tiny):
  directory, _, task, states = saved_tiny
  ckpt = checkpoint.Checkpointer(str(directory))
  other = _mesh_config(1)
  other.arch_embedding_size = "500-300-200-120-500-64-40-999"
  other.arch_mlp_top = "16-1"
  other_task = trainer.Task(other)
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    ckpt.restore(other_task, other)
  message = str(e.value)
  assert "arch_embedding_size: checkpoint '500-300-200-120-500-64-40-250', config " \
         "'500-300-200-120-500-64-40-999'" in message
  assert "arch_mlp_top: checkpoint '8-1', config '16-1'" in message
  assert "arch_mlp_bot" not in message and "restore_partial" in message
  fresh = other_task.init_state(5)
  restored = ckpt.restore(other_task, other, partial=True, fresh=lambda: fresh)
  assert restored.partial and restored.step == 2
  got = other_task.embedding.to_arrays(restored.state.tables)
  saved = task.embedding.to_arrays(states[2].tables)
  for t in range(7):
    np.testing.assert_array_equal(got[t], saved[t])
  np.testing.assert_array_equal(got[7], other_task.embedding.to_arrays(fresh.tables)[7])
  bottom_saved = _leaves(states[2].params["bottom"])
  for got_leaf, want in zip(_leaves(restored.state.params["bottom"]), bottom_saved, strict=True):
    np.testing.assert_array_equal(got_leaf, want)  # same shapes: restored
  top = restored.state.params["top"]["layers"][0]["kernel"]
  np.testing.assert_array_equal(np.asarray(top[...]),
                                np.asarray(fresh.params["top"]["layers"][0]["kernel"][...]))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  def hook(i, batch):
    if i == 13:
      batch = dict(batch, dense=np.full_like(batch["dense"], np.nan))
    return batch

  from dlrm_jax import trainer as trainer_module

  make_data = trainer_module.make_data
  inject(hook)
  try:
    c = resume_config()
    with pytest.raises(trainer.NonFiniteLossError, match=r"loss is nan at step 14: .*"
                       r"last good checkpoint is step 10"):
      trainer.train_and_evaluate(c, str(tmp_path))
  finally:
    trainer_module.make_data = make_data
  assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).steps() == [5, 10]


def test_predict_raw_and_prepared_data_and_export_round_trip(tmp_path):
  """Scores raw TSV and the prepared rows alike; an exported model in a process
  that imports only jax and numpy gives the same probabilities."""
  from dlrm_jax.data import criteo
  from dlrm_jax.data.criteo_synth import write_raw

  raw = tmp_path / "train.txt"
  write_raw(str(raw), 400, seed=0)
  data = tmp_path / "prepared"
  meta = criteo.prepare("kaggle", [str(raw)], str(data), categorical="reference", workers=1,
                        progress=False, log=lambda m: None)
  c = load_config("criteo_kaggle", devices=1)
  c.data.path = str(data)
  c.arch_sparse_feature_size, c.arch_mlp_bot, c.arch_mlp_top = 4, "13-8-4", "8-1"
  c.mini_batch_size, c.num_batches, c.test_freq = 32, 6, 0
  c.test_mini_batch_size, c.test_num_batches = 16, 0
  c.progress_bar = False
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(c, str(workdir))

  def run(*args):
    assert predict.main(["--workdir", str(workdir), "--batch-size", "64", "--devices", "1",
                         *args]) == 0

  run("--input", str(raw), "--output", str(tmp_path / "raw.txt"), "--export", str(tmp_path / "x"))
  run("--input", str(data), "--split", "test", "--output", str(tmp_path / "test.txt"))
  from_raw = np.loadtxt(tmp_path / "raw.txt", dtype=np.float32)
  from_prepared = np.loadtxt(tmp_path / "test.txt", dtype=np.float32)
  assert len(from_raw) == 400
  (lo, hi), = meta["splits"]["test"]
  np.testing.assert_array_equal(from_raw[lo:hi], from_prepared)
  assert 0 < from_raw.min() and from_raw.max() < 1

  prepared = list(predict.prepared_batches(str(data), 64, "test"))
  np.save(tmp_path / "dense.npy", np.concatenate([b["dense"] for b in prepared]))
  np.save(tmp_path / "sparse.npy", np.concatenate([b["sparse"] for b in prepared]))
  script = f"""
import json, sys
import jax, numpy as np
assert "dlrm_jax" not in sys.modules and "flax" not in sys.modules
exported = jax.export.deserialize(bytearray(open({str(tmp_path / 'x' / 'model.jaxexport')!r}, 'rb').read()))
arrays = np.load({str(tmp_path / 'x' / 'params.npz')!r})
sig = json.load(open({str(tmp_path / 'x' / 'signature.json')!r}))
leaves = [arrays[f"param_{{i:04d}}"] for i in range(sig["num_params"])]
out = exported.call(leaves, arrays["tables"], np.load({str(tmp_path / 'dense.npy')!r}),
                    np.load({str(tmp_path / 'sparse.npy')!r}))
np.save({str(tmp_path / 'exported.npy')!r}, np.asarray(out))
assert "flax" not in sys.modules
"""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env=env, timeout=300, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / "exported.npy"), from_prepared,
                             rtol=1e-6, atol=1e-7)
