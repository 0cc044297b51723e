"""Checkpoints: exact resume after SIGKILL and of a shuffled Criteo run, resume=False,
keep_best, restore onto other meshes, damaged and incomplete checkpoints, NaN guard,
config mismatch and partial restores, predict and export."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from checkpoint_worker import inject, resume_config
from conftest import REPO, fill, load_config, small_criteo_config, tmpfs
from dlrm_jax import checkpoint, predict, stopping, trainer
from dlrm_jax.config import ConfigError
from dlrm_jax.data import RandomData
from dlrm_jax.embedding import EmbeddingCollection
from dlrm_jax.embedding.planner import plan_tables
from dlrm_jax.embedding.sharded import unstack_rows
from dlrm_jax.state import TrainState
from dlrm_jax.task import Task

WORKER = os.path.join(REPO, "tests", "checkpoint_worker.py")


def _leaves(tree):
  return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(tree)]


def _assert_states_equal(a, b):
  """Every array of two train states (on the same plan) bit for bit."""
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _steps(directory) -> list[int]:
  with checkpoint.Checkpointer(str(directory)) as ckpt:
    return ckpt.steps()


def _contents(config, task) -> checkpoint.Contents:
  return checkpoint.Contents(config=json.loads(config.to_json()), plan=task.plan)


def _without_speed(records):
  return [{k: v for k, v in r.items() if k not in trainer.TIMINGS} for r in records]


def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path):
  """Killed with SIGKILL mid-run, then rerun: the same records, parameters and tables
  as a run that was never interrupted, bit for bit."""
  killed = tmp_path / "killed"
  proc = subprocess.run([sys.executable, WORKER, str(killed), "14"], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL
  steps = _steps(str(killed / "checkpoints"))
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


def test_a_save_on_a_full_disk_keeps_the_last_checkpoint_and_resumes(tmp_path):
  """A run killed after its step-5 checkpoint resumes on a full disk (a tmpfs, skipped
  where it cannot be mounted): its next save fails as one CheckpointError that names the
  intact checkpoint; once space is freed the same run resumes from it and ends as the
  uninterrupted run."""
  with tmpfs(tmp_path / "disk", "30m") as disk:
    work = disk / "run"
    proc = subprocess.run([sys.executable, WORKER, str(work), "14"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    saved = _steps(str(work / "checkpoints"))
    assert saved and max(saved) < 20, saved
    fill(disk, leave=20_000)
    with pytest.raises(checkpoint.CheckpointError, match=(
        rf"failed: no space left on the device\. The last complete checkpoint, step "
        rf"{max(saved)}, is intact; free some space and rerun")):
      trainer.train_and_evaluate(resume_config(), str(work))
    assert _steps(str(work / "checkpoints")) == saved
    (disk / "filler").unlink()
    resumed = trainer.train_and_evaluate(resume_config(), str(work))
  whole = trainer.train_and_evaluate(resume_config(), str(tmp_path / "whole"))
  assert _without_speed(resumed.records) == _without_speed(whole.records)
  _assert_states_equal(resumed.state, whole.state)


def test_train_py_on_a_full_disk_ends_in_one_line(tmp_path):
  """train.py whose first save meets a full disk: exit status 1 and one line that says
  what happened and what to do; none of Orbax's background threads' tracebacks or
  closed-event-loop messages before or after it."""
  with tmpfs(tmp_path / "disk", "30m") as disk:
    fill(disk, leave=20_000)
    proc = subprocess.run(
        [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={disk}/run",
         "--config.checkpoint.enabled=True"], cwd=REPO, capture_output=True, text=True,
        timeout=600)
  assert proc.returncode == 1, proc.stderr[-3000:]
  out = proc.stdout + proc.stderr
  assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: saving the checkpoint of step 10 in {disk}/run/checkpoints failed: no space "
      "left on the device. No checkpoint was completed before it; free some space"), \
      proc.stderr[-3000:]


def test_a_finished_run_given_a_longer_length_trains_on_to_the_longer_runs_result(tmp_path):
  """A finished 10-step run rerun with num_batches=20 trains steps 11-20 and ends with the
  records, parameters and tables of a 20-step run, bit for bit; rerun again, it has
  nothing to train and says which run it found and how to go on."""
  c = resume_config()
  c.num_batches = 10
  trainer.train_and_evaluate(c, str(tmp_path / "run"))
  c.num_batches = 20
  messages = []
  longer = trainer.train_and_evaluate(c, str(tmp_path / "run"), log=messages.append)
  assert "the run ended at step 10: training on to step 20" in messages, messages
  whole = trainer.train_and_evaluate(resume_config(), str(tmp_path / "whole"))
  assert [r["step"] for r in longer.records] == [10, 20]
  assert _without_speed(longer.records) == _without_speed(whole.records)
  _assert_states_equal(longer.state, whole.state)

  messages.clear()
  again = trainer.train_and_evaluate(c, str(tmp_path / "run"), log=messages.append)
  assert (f"{tmp_path / 'run'} holds a run on synthetic_ctr data, batch 64, that ended at "
          f"step 20 with eval AUC {whole.records[-1]['auc']:.4f}: nothing to train, as this "
          "config's run is 20 steps. To train it on, raise num_batches; to start a new run, "
          "use another --workdir (or --config.checkpoint.resume=False, which deletes this "
          "run's checkpoints).") in messages, messages
  assert again.summary["trained_steps"] == 0
  assert "throughput       - (nothing trained: the run had ended)" in \
      trainer.format_summary(again.summary)


def test_a_run_stopped_at_its_target_has_nothing_to_train_until_the_target_is_raised(
    tmp_path):
  c = resume_config()
  c.test_freq, c.target_auc = 2, 0.52
  stopped = trainer.train_and_evaluate(c, str(tmp_path))
  step = stopped.summary["steps"]
  assert step < 20 and stopped.records[-1]["auc"] >= 0.52
  messages = []
  trainer.train_and_evaluate(c, str(tmp_path), log=messages.append)
  assert any(f"ended at step {step} with eval AUC" in m and "nothing to train, as it "
             "reached target_auc=0.52. To train it on, raise target_auc (0: none)" in m
             for m in messages), messages
  c.target_auc = 0.0
  assert trainer.train_and_evaluate(c, str(tmp_path)).summary["steps"] == 20


def test_resume_false_deletes_the_checkpoints_and_starts_afresh(tmp_path, monkeypatch):
  """checkpoint.resume=False in a used workdir: the old checkpoints are deleted (and that
  is logged), training starts at step 0 and ends as the first run did."""
  c = resume_config()
  c.num_batches, c.test_freq, c.checkpoint.every_steps = 10, 5, 5
  first = trainer.train_and_evaluate(c, str(tmp_path))
  directory = tmp_path / "checkpoints"
  assert _steps(str(directory)) == [5, 10]
  # Gone only if step 10 is deleted: a save onto an existing step is skipped.
  (directory / "10" / "stale").write_text("")
  seen = []
  monkeypatch.setattr(trainer, "make_data", trainer.make_data)  # undone after the test
  inject(lambda i, batch: seen.append(i) or batch)
  c.checkpoint.resume = False
  messages = []
  again = trainer.train_and_evaluate(c, str(tmp_path), log=messages.append)
  assert (f"checkpoint.resume=False: deleting the checkpoints of steps [5, 10] in {directory}"
          in messages), messages
  assert not any(m.startswith("resuming") for m in messages), messages
  assert seen[:10] == list(range(10))  # from step 0 (and the prefetcher's read-ahead)
  assert not (directory / "10" / "stale").exists()
  assert _steps(str(directory)) == [5, 10]
  assert [r["step"] for r in again.records] == [5, 10]
  assert _without_speed(again.records) == _without_speed(first.records)
  _assert_states_equal(again.state, first.state)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert _without_speed([json.loads(l) for l in lines]) == _without_speed(first.records)


def _criteo_config(data_path):
  """A tiny model on a prepared Criteo directory: shuffled blocks of 16 rows in windows of
  64, 10 batches of 32 an epoch, 16 steps, checkpoints every 4, evaluations every 8."""
  c = small_criteo_config(data_path)
  c.data.shuffle, c.data.block_rows, c.data.shuffle_buffer = True, 16, 64
  c.embedding_optimizer, c.dense_optimizer = "rowwise_adagrad", "adagrad"
  c.num_batches, c.test_freq = 16, 8
  c.checkpoint.enabled, c.checkpoint.every_steps, c.checkpoint.max_to_keep = True, 4, 2
  return c


class _Interrupted(Exception):
  """Raised by a data hook to stop a run mid-way, as a crash would."""


def test_interrupted_criteo_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
  """A shuffled Criteo run stopped by an error at train batch 11 (past the step-8
  checkpoint), then rerun, crossing into epoch 1: the same records, parameters and
  tables as an uninterrupted run, bit for bit, with the loader's position restored."""
  from dlrm_jax.data import criteo
  from dlrm_jax.data.criteo_synth import write_raw

  raw = tmp_path / "train.txt"
  write_raw(str(raw), 400, seed=0)
  data = tmp_path / "prepared"
  meta = criteo.prepare("kaggle", [str(raw)], str(data), categorical="reference", workers=1,
                        progress=False, log=lambda m: None)
  assert meta["splits"]["train"] == [[0, 343]]  # 10 batches of 32 an epoch
  whole = trainer.train_and_evaluate(_criteo_config(data), str(tmp_path / "whole"))

  seen, stop_at = [], [11]

  def hook(i, batch):
    if i == stop_at[0]:
      raise _Interrupted(f"train batch {i}")
    seen.append(i)
    return batch

  monkeypatch.setattr(trainer, "make_data", trainer.make_data)  # undone after the test
  inject(hook)
  run = tmp_path / "run"
  with pytest.raises(_Interrupted):  # the prefetcher hands the error to the loop, which
    trainer.train_and_evaluate(_criteo_config(data), str(run))  # closes its checkpointer
  ckpt = checkpoint.Checkpointer(str(run / "checkpoints"))
  assert ckpt.steps() == [4, 8]
  position = ckpt.read_contents(8).data
  assert position["position"] == 8 and position["shuffle"] == 1  # the loader's own state
  ckpt.close()
  stop_at[0], seen[:] = None, []
  messages = []
  resumed = trainer.train_and_evaluate(_criteo_config(data), str(run), log=messages.append)
  assert any(m.startswith("resuming from step 8") for m in messages), messages
  assert seen[0] == 8

  assert [r["step"] for r in resumed.records] == [8, 16]
  assert _without_speed(resumed.records) == _without_speed(whole.records)
  _assert_states_equal(resumed.state, whole.state)
  lines = (run / "metrics.jsonl").read_text().splitlines()
  assert _without_speed([json.loads(l) for l in lines]) == _without_speed(whole.records)
  # The saved position belongs to one data order: another shuffle seed is refused.
  reseeded = _criteo_config(data)
  reseeded.data.seed = int(reseeded.data.seed) + 1
  with pytest.raises(ConfigError, match="cannot resume the data: .*another data order.*seed"):
    trainer.train_and_evaluate(reseeded, str(run))


def _mesh_config(devices, overrides="", embedding_dtype="float32"):
  c = load_config("tiny", devices=devices)
  c.embedding_dtype = embedding_dtype
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


def _save_and_restore_elsewhere(tmp_path, saved_on, restore_on, dtype="float32"):
  """A random state saved under the mixed plan on `saved_on` devices restores exactly onto
  each of `restore_on`: device counts (the planner's plan there), or (devices, overrides)
  for another plan on as many devices. No step is ever taken for damaged."""
  config = _mesh_config(saved_on, _mixed(saved_on), dtype)
  task = Task(config)
  assert {p.kind for p in task.plan.placements} == {"row_wise", "column_wise", "table_wise",
                                                    "replicated"}
  state = _random_state(task)
  batch = RandomData(task.spec.table_rows, 13, 64, seed=3).batch(0)
  want = np.asarray(task.predict(state.params, state.tables, batch))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(7, state, _contents(config, task))
  ckpt.wait()
  tables, slots = task.embedding.to_arrays(state.tables), _slots(task, state)
  messages = []
  ckpt.log = messages.append
  for where in restore_on:
    devices, overrides = where if isinstance(where, tuple) else (where, "")
    other = Task(_mesh_config(devices, overrides, embedding_dtype=dtype))
    assert devices != saved_on or other.plan.placements != task.plan.placements
    restored = ckpt.restore(other)
    assert restored is not None and restored.step == 7 and not restored.partial, messages
    assert not messages and ckpt.steps() == [7]  # nothing taken for damaged
    for got, expected in zip(other.embedding.to_arrays(restored.state.tables), tables,
                             strict=True):
      np.testing.assert_array_equal(got, expected)
    for got, expected in zip(_slots(other, restored.state), slots, strict=True):
      np.testing.assert_array_equal(got, expected)
    for name in ("step", "params", "opt_state"):
      for got, expected in zip(_leaves(getattr(restored.state, name)),
                               _leaves(getattr(state, name)), strict=True):
        np.testing.assert_array_equal(got, expected)
    got = np.asarray(other.predict(restored.state.params, restored.state.tables, batch))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  same = ckpt.restore(task)  # the saved plan: straight into the shardings
  _assert_states_equal(same.state, state)


@pytest.mark.slow  # a smaller case of the next test
def test_restore_onto_one_device_and_another_plan(tmp_path):
  _save_and_restore_elsewhere(tmp_path, 2, (1,))


def test_restore_from_8_devices_onto_1_2_and_4(tmp_path):
  _save_and_restore_elsewhere(tmp_path, 8, (1, 2, 4))


def test_restore_onto_another_plan_on_as_many_devices(tmp_path):
  """The same 8 devices, other plans (new overrides; the planner's own): every table and
  optimiser slot as saved, the same scores."""
  moved = "t0:column_wise,t1:row_wise,t2:table_wise:6,t3:replicated,t4:table_wise:2"
  _save_and_restore_elsewhere(tmp_path, 8, ((8, moved), (8, "")))


def test_16_bit_tables_restore_onto_another_plan_and_from_unpacked_saves(tmp_path):
  """bfloat16 tables (stored in pairs, column_wise's slices too on 2 devices) restore
  onto one device; a save whose tables are plain [rows, D] bfloat16 arrays, as they were
  stored before pairs, restores into the same plan's paired storage, values equal."""
  from dlrm_jax.embedding.collection import unpack

  _save_and_restore_elsewhere(tmp_path / "a", 2, (1,), dtype="bfloat16")
  config = _mesh_config(1, embedding_dtype="bfloat16")
  task = Task(config)
  state = _random_state(task)
  plain = TrainState(**{**state.as_dict(), "tables": {
      k: unpack(v) for k, v in state.tables.items()}})
  with checkpoint.Checkpointer(str(tmp_path / "b")) as ckpt:
    ckpt.save(3, plain, _contents(config, task))
    ckpt.wait()
    restored = ckpt.restore(task)
  assert restored.step == 3
  for kind, table in restored.state.tables.items():
    assert table.dtype == state.tables[kind].dtype and table.shape == state.tables[kind].shape
  for got, want in zip(task.embedding.to_arrays(restored.state.tables),
                       task.embedding.to_arrays(state.tables), strict=True):
    np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
  """Two checkpoints (steps 1 and 2) of the tiny model on one device."""
  directory = tmp_path_factory.mktemp("tiny") / "ckpt"
  config = _mesh_config(1)
  task = Task(config)
  states = {}
  ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=5)
  for step in (1, 2):
    states[step] = _random_state(task, seed=step)
    ckpt.save(step, states[step], _contents(config, task))
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
  restored = ckpt.restore(task)
  assert restored.step == 1
  _assert_states_equal(restored.state, states[1])
  assert len(messages) == 1 and "/2 is damaged" in messages[0], messages
  assert (directory / "2.damaged").is_dir() and ckpt.steps() == [1]
  ckpt.close()


def test_other_format_versions_are_refused_not_taken_for_damage(tmp_path, saved_tiny):
  """A step of an unknown format (here: a later one, and format 1's single meta item)
  raises CheckpointError naming the version and stays where it is."""
  import shutil

  source, config, task, _ = saved_tiny
  for name, item, version in (("later", "config", 4), ("first", "meta", 1)):
    directory = tmp_path / name
    shutil.copytree(source, directory)
    step = directory / "2"
    shutil.rmtree(step / "data")
    shutil.rmtree(step / "run")
    if item == "meta":
      (step / "config").rename(step / "meta")
    metadata = step / item / "metadata"
    body = json.loads(metadata.read_text())
    body["format_version"] = version
    metadata.write_text(json.dumps(body))
    with checkpoint.Checkpointer(str(directory)) as ckpt:
      with pytest.raises(checkpoint.CheckpointError, match=f"format version {version}, this "
                         r"code reads \[2, 3\]"):
        ckpt.restore(task)
    assert (directory / "2").is_dir() and not (directory / "2.damaged").exists()


def test_the_recorded_format_2_checkpoint_reads_as_contents(tmp_path):
  """The single `meta` item of format 2 gives every part of the run back (its records:
  those of the run that wrote it, in criteo_run/metrics.jsonl)."""
  import shutil

  recorded = os.path.join(REPO, "tests", "data", "behaviour", "criteo_run")
  shutil.copytree(os.path.join(recorded, "checkpoints"), tmp_path / "ckpt")
  with open(os.path.join(recorded, "metrics.jsonl")) as f:
    metrics = [json.loads(line) for line in f]
  with checkpoint.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    contents = ckpt.read_contents(12)
  assert contents.finished and contents.interval_losses == []
  assert _without_speed(contents.records) == metrics
  assert contents.data["position"] == 12 and contents.data["shuffle"] == 1
  assert contents.plan.num_shards == 1 and contents.config["num_batches"] == 12
  assert contents.mesh["processes"] == 1


def test_config_mismatch_is_refused_unless_partial(saved_tiny):
  directory, _, task, states = saved_tiny
  ckpt = checkpoint.Checkpointer(str(directory))
  other = _mesh_config(1)
  other.arch_embedding_size = "500-300-200-120-500-64-40-999"
  other.arch_mlp_top = "16-1"
  other_task = Task(other)
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    ckpt.restore(other_task)
  message = str(e.value)
  assert "arch_embedding_size: checkpoint '500-300-200-120-500-64-40-250', config " \
         "'500-300-200-120-500-64-40-999'" in message
  assert "arch_mlp_top: checkpoint '8-1', config '16-1'" in message
  assert "arch_mlp_bot" not in message and "restore_partial" in message
  fresh = other_task.init_state(5)
  restored = ckpt.restore(other_task, partial=True, fresh=lambda: fresh)
  ckpt.close()
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


def test_partial_restore_takes_the_dense_slots_that_match_and_fresh_sparse_slots(tmp_path):
  """A partial restore takes the dense optimiser state of each parameter whose path and
  shape match from the checkpoint, the rest and every sparse slot (of the restored tables
  too) from `fresh`."""
  config = _mesh_config(1)
  task = Task(config)
  data = RandomData(task.spec.table_rows, 13, 64, seed=3)
  state = task.init_state(0)
  for i in range(3):
    state, _ = task.train_step(state, data.batch(i))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(3, state, _contents(config, task))
  ckpt.wait()
  other = _mesh_config(1)
  other.arch_embedding_size = "500-300-200-120-500-64-40-999"
  other.arch_mlp_top = "16-1"  # top layer 0: other shapes; layer 1: another kernel
  other_task = Task(other)
  fresh = _random_state(other_task, seed=9)  # unlike the saved slots and a new state's zeros
  restored = ckpt.restore(other_task, partial=True, fresh=lambda: fresh)
  assert restored.partial and int(restored.state.step) == 3  # the schedule's step: restored

  def rss(s, *path):
    tree = s.opt_state[0].sum_of_squares
    for k in path:
      tree = tree[k]
    return _leaves(tree)

  assert not np.array_equal(rss(state, "bottom")[0], rss(fresh, "bottom")[0])
  for got, want in zip(rss(restored.state, "bottom"), rss(state, "bottom"), strict=True):
    np.testing.assert_array_equal(got, want)  # matching parameters: their slots restored
  for layer, name, source in ((0, "kernel", fresh), (0, "bias", fresh), (1, "kernel", fresh),
                              (1, "bias", state)):  # (1,) in both configs: it matches
    got, = rss(restored.state, "top", "layers", layer, name)
    want, = rss(source, "top", "layers", layer, name)
    np.testing.assert_array_equal(got, want, err_msg=f"top layer {layer} {name}")
  saved_slots, fresh_slots = _slots(task, state), _slots(other_task, fresh)
  assert saved_slots[0].any() and not np.array_equal(saved_slots[0], fresh_slots[0])
  for got, want in zip(_slots(other_task, restored.state), fresh_slots, strict=True):
    np.testing.assert_array_equal(got, want)
  got = other_task.embedding.to_arrays(restored.state.tables)
  for t, want in enumerate(task.embedding.to_arrays(state.tables)[:7]):
    np.testing.assert_array_equal(got[t], want)  # the tables themselves are restored


def _small_state(value: float):
  """A train state of a few tiny arrays, all `value` (what Checkpointer saves is any such)."""
  import jax.numpy as jnp

  def full(*shape):
    return jnp.full(shape, value, jnp.float32)

  return TrainState(step=jnp.zeros((), jnp.int32), params={"w": full(3)},
                            opt_state={"s": full(3)}, tables={"t": full(4, 2)},
                            emb_opt_state={"t": {"accumulator": full(4)}})


_SMALL_PLAN = plan_tables(EmbeddingCollection.uniform([4], 2).specs, 1, batch_size=8)


def _save_aucs(directory, keep_best, *aucs_by_step):
  """Saves a tiny state at each (step, AUC or None) with max_to_keep=2; the steps kept."""
  ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=2, keep_best=keep_best)
  for step, auc in aucs_by_step:
    records = [] if auc is None else [{"step": step, "auc": auc}]
    assert ckpt.save(step, _small_state(step), checkpoint.Contents(
        config={}, plan=_SMALL_PLAN, records=records), None if auc is None else {"auc": auc})
  ckpt.wait()
  steps = ckpt.steps()
  ckpt.close()
  return steps


@pytest.mark.parametrize("keep_best", [True, False])
def test_keep_best_keeps_the_best_auc_besides_the_latest(tmp_path, keep_best):
  """max_to_keep=2 keeps the 2 latest steps; keep_best also the step of the best AUC
  (the highest), until a better one comes; a step without an AUC is never the best."""
  best = [2] if keep_best else []
  assert _save_aucs(tmp_path / "a", keep_best, (1, 0.6), (2, 0.9), (3, 0.7), (4, 0.65),
                    (5, None)) == best + [4, 5]
  if keep_best:
    with checkpoint.Checkpointer(str(tmp_path / "a")) as ckpt:
      assert ckpt.read_contents(2).records == [{"step": 2, "auc": 0.9}]
  assert _save_aucs(tmp_path / "b", keep_best, (1, 0.6), (2, 0.9), (3, 0.95),
                    (4, None), (5, None)) == ([3] if keep_best else []) + [4, 5]


def test_keep_best_keeps_the_best_auc_of_a_reopened_directory(tmp_path):
  """A resumed run (a new Checkpointer on the directory) still keeps the best AUC's step."""
  assert _save_aucs(tmp_path, True, (1, 0.6), (2, 0.9), (3, 0.7), (4, 0.65)) == [2, 3, 4]
  assert _save_aucs(tmp_path, True, (5, None)) == [2, 4, 5]
  assert _save_aucs(tmp_path, True, (6, 0.95), (7, None)) == [6, 7]


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, bad):
  """Step 14's loss is NaN (NaN inputs) or infinite (a squared error against a label of
  1e20, over float32's range): either stops the run with the step named, and the
  checkpoints before it stay."""
  def hook(i, batch):
    if i == 13:
      batch = (dict(batch, dense=np.full_like(batch["dense"], np.nan)) if bad == "nan" else
               dict(batch, label=np.full_like(batch["label"], 1e20)))
    return batch

  from dlrm_jax import trainer as trainer_module

  make_data = trainer_module.make_data
  inject(hook)
  try:
    c = resume_config()
    c.loss_function = "bce" if bad == "nan" else "mse"
    with pytest.raises(stopping.NonFiniteLossError, match=rf"loss is {bad} at step 14: .*"
                       r"last good checkpoint is step 10"):
      trainer.train_and_evaluate(c, str(tmp_path))
  finally:
    trainer_module.make_data = make_data
  assert _steps(str(tmp_path / "checkpoints")) == [5, 10]


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
  c = small_criteo_config(data)
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
  # The same model scored and exported with int8 and int4 row-wise quantised tables.
  for fmt in ("int8", "int4"):
    run("--input", str(data), "--split", "test", "--output", str(tmp_path / f"{fmt}.txt"),
        "--export", str(tmp_path / fmt), "--quantize", fmt)
  script = f"""
import json, sys
import jax, numpy as np
assert "dlrm_jax" not in sys.modules and "flax" not in sys.modules
for name in ("x", "int8", "int4"):
  d = {str(tmp_path)!r} + "/" + name
  exported = jax.export.deserialize(bytearray(open(d + "/model.jaxexport", "rb").read()))
  arrays = np.load(d + "/params.npz")
  sig = json.load(open(d + "/signature.json"))
  leaves = [arrays[f"param_{{i:04d}}"] for i in range(sig["num_params"])]
  tables = {{k: arrays["tables_" + k] for k in sig["tables"]}}
  out = exported.call(leaves, tables, np.load({str(tmp_path / 'dense.npy')!r}),
                      np.load({str(tmp_path / 'sparse.npy')!r}))
  np.save({str(tmp_path)!r} + "/exported_" + name + ".npy", np.asarray(out))
assert "flax" not in sys.modules
"""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env=env, timeout=300, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / "exported_x.npy"), from_prepared,
                             rtol=1e-6, atol=1e-7)
  for fmt, near in (("int8", 2e-3), ("int4", 3e-2)):
    scored = np.loadtxt(tmp_path / f"{fmt}.txt", dtype=np.float32)
    np.testing.assert_allclose(np.load(tmp_path / f"exported_{fmt}.npy"), scored, rtol=1e-5,
                               atol=1e-7)  # predict --quantize and its export agree
    gap = np.abs(scored - from_prepared).max()
    assert 0 < gap < near, (fmt, gap)  # quantised, and close to the float model
    sig = json.loads((tmp_path / fmt / "signature.json").read_text())
    assert sig["quantize"] == fmt and sig["tables"] == sorted([fmt, "scale", "bias"])
