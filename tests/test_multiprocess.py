"""Several processes x 2 CPU devices on localhost (gloo) train like one process on as many
devices, across a restore from a checkpoint that each process wrote its shards of; a
SIGTERM to one process stops them all after the same step."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, load_config
from dlrm_jax import checkpoint, trainer
from dlrm_jax.task import Task
from test_stopping import STOPPED, records, signal_after_evaluation, without_timings

HERE = os.path.dirname(os.path.abspath(__file__))


def make_config():
  """A small run whose plan uses every sharding type over 4 devices."""
  c = load_config("tiny", devices=0)
  c.arch_sparse_feature_size, c.arch_mlp_bot = 8, "13-8-8"
  c.sharding.min_column_width = 1
  c.sharding.overrides = "t0:table_wise:3,t1:row_wise,t2:column_wise,t3:replicated"
  c.num_batches, c.test_freq = 6, 3
  c.checkpoint.enabled = True  # each process writes its own shards
  return c


def criteo_config(data):
  """A tiny model on a prepared Criteo directory, over 4 devices, evaluating the whole
  test split in batches of 24 (its last one partial, split unevenly between processes).
  The processes read train batches of their own (the loader's per-process order), so
  the learning rate is 1e-30: updates below float32's precision, so every run evaluates
  the same initial model.""" 
  from conftest import small_criteo_config

  c = small_criteo_config(data, devices=0)
  c.test_mini_batch_size = 24
  c.num_batches, c.test_freq = 4, 2
  c.learning_rate = 1e-30
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Far above a run's 5-60 s on 2 loaded cores, far below CI's patience: a run that
# hangs (a collective that not every process enters) fails with its stacks.
TIMEOUT_S = 300


def _run_processes(workdir, steps: int | str = "", processes: int = 2, devices: int = 2,
                   **env) -> list[str]:
  """`processes` x `devices` devices training in `workdir` until `steps`; their outputs."""
  worker = os.path.join(HERE, "multiprocess_worker.py")
  return _finish(_launch(
      lambda port, i: [worker, str(port), str(processes), str(i), str(workdir), str(steps)],
      processes, devices, **env))


def _launch(args, processes: int = 2, devices: int = 2, **env) -> list[subprocess.Popen]:
  """`processes` Python processes of `args(port, i)` (the coordinator's port, the
  process id), each with `devices` CPU devices."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", **env)
  return [subprocess.Popen([sys.executable, *args(port, i)], env=env, cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(processes)]


def _finish(procs: list[subprocess.Popen], status: int = 0,
            dump: int = signal.SIGUSR1) -> list[str]:
  """The processes' outputs, once each has ended with exit `status`. Past TIMEOUT_S, a
  failure with every process's Python stacks (faulthandler's, on signal `dump`)."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
  except subprocess.TimeoutExpired:
    outputs = None
  if outputs is None:
    for p in procs:
      if p.poll() is None:
        p.send_signal(dump)
    time.sleep(3)
    for p in procs:
      p.kill()
    outputs = [p.communicate()[0] for p in procs]
    pytest.fail(f"{len(procs)} processes did not finish in {TIMEOUT_S} s; "
                "their last output and stacks:\n" + "\n".join(
                    f"--- process {i}:\n{out[-6000:]}" for i, out in enumerate(outputs)))
  failed = [i for i, p in enumerate(procs) if p.returncode != status]
  assert not failed, "\n".join(f"process {i} (exit {procs[i].returncode}):\n{outputs[i][-3000:]}"
                                for i in failed)
  return outputs


@pytest.mark.parametrize("processes,devices", [(2, 2), (4, 2)])
def test_processes_match_one_process_across_a_resume(tmp_path, processes, devices):
  """N processes train 6 steps, checkpointing at 3 and 6; with the step-6 checkpoint
  removed (a run that died after step 3's), N new processes resume from step 3, each
  reading its own shards, and train to 6 again. Both times metrics and tables equal a
  1-process run's on as many devices. (4 processes can show an ordering bug that 2
  hide: a collective that some but not all processes enter.)"""
  multi = tmp_path / "multi"
  _run_processes(multi, 6, processes, devices)
  first = _results(multi)
  shutil.rmtree(multi / "checkpoints" / "6")
  resumed = _run_processes(multi, 6, processes, devices)
  assert "resuming from step 3" in resumed[0], resumed[0][-3000:]
  # Then (not meanwhile: gloo gives processes 30 s to meet at their first
  # collective, which a loaded machine can miss) the same run in this process
  # on as many of its 8 devices.
  c = make_config()
  c.mesh.num_devices = processes * devices
  single = trainer.train_and_evaluate(c, str(tmp_path / "single"))
  want_tables = single.task.embedding.to_arrays(single.state.tables)
  for records, tables in (first, _results(multi)):
    assert [r["step"] for r in records] == [3, 6]
    for got, want in zip(records, single.records, strict=True):
      for key in ("auc", "logloss", "train_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    for got, want in zip(tables, want_tables, strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_sigterm_to_one_process_stops_both_after_one_step_and_the_rerun_is_exact(tmp_path):
  """`python train.py` in 2 processes x 2 devices, SIGTERM to process 1 alone after the
  first evaluation: both stop after the same step (they agree on it), save it together
  and exit with 143; process 0 prints the one line. The same commands again (on another
  port) resume there and end with the records and train state of 2 processes that were
  never stopped, bit for bit."""
  def train_py(workdir):
    return lambda port, i: [
        "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
        "--config.num_batches=60", "--config.test_freq=20",
        "--config.checkpoint.enabled=True", "--config.checkpoint.every_steps=10000",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]

  stopped, whole = tmp_path / "stopped", tmp_path / "whole"
  procs = _launch(train_py(stopped), PYTHONFAULTHANDLER="1")
  signal_after_evaluation(procs[1], stopped, 1, signal.SIGTERM)
  outputs = _finish(procs, status=128 + signal.SIGTERM, dump=signal.SIGABRT)
  assert "Traceback" not in "".join(outputs), outputs[0][-3000:]
  line = next(l for l in outputs[0].splitlines() if l.startswith("stopped at step"))
  step = int(line.split()[3].rstrip(";"))
  assert line == STOPPED.format(step) and 20 <= step < 60, line
  assert os.listdir(stopped / "checkpoints") == [str(step)]  # no *.orbax-checkpoint-tmp

  resumed = _finish(_launch(train_py(stopped)), dump=signal.SIGABRT)
  assert f"resuming from step {step}" in resumed[0], resumed[0][-3000:]
  _finish(_launch(train_py(whole)), dump=signal.SIGABRT)
  assert without_timings(records(stopped)) == without_timings(records(whole))
  assert [r["step"] for r in records(whole)] == [20, 40, 60]
  c = load_config("tiny", devices=4)
  task = Task(c)
  states = []
  for workdir in (stopped, whole):
    with checkpoint.Checkpointer(str(workdir / "checkpoints")) as ckpt:
      states.append(ckpt.restore(task, step=60).state)
  for got, want in zip(*(jax.tree.leaves(s) for s in states), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _results(workdir):
  """The metrics records and final tables a multi-process run left in `workdir`."""
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  with np.load(workdir / "tables.npz") as f:
    return records, [f[f"arr_{k}"] for k in range(len(f.files))]


def test_two_processes_evaluate_a_whole_prepared_split_as_one_process(tmp_path):
  """Each process reads and scores its own rows of each evaluation batch (the last one
  partial: 7 rows, 4 and 3 on the processes, each padded to 12), and every evaluation is over the whole test
  split with the AUC of all rows together: the records equal a 1-process run's, whose
  evaluation tests/test_criteo_train.py checks against scikit-learn."""
  from dlrm_jax.data import criteo
  from dlrm_jax.data.criteo_synth import write_raw

  raw = tmp_path / "train.txt"
  write_raw(str(raw), 770, seed=1)
  data = tmp_path / "prepared"
  meta = criteo.prepare("kaggle", [str(raw)], str(data), categorical="hash", max_ind_range=50,
                        workers=1, progress=False, log=lambda m: None)
  rows = meta["split_rows"]["test"]
  assert rows % 24 == 7, rows  # a partial last batch, uneven between the processes
  _run_processes(tmp_path / "multi", CRITEO_DATA=str(data))
  c = criteo_config(data)
  c.mesh.num_devices = 4
  single = trainer.train_and_evaluate(c, str(tmp_path / "single"))
  records = [json.loads(l) for l in (tmp_path / "multi" / "metrics.jsonl").read_text()
             .splitlines()]
  assert [r["step"] for r in records] == [r["step"] for r in single.records] == [2, 4]
  for got, want in zip(records, single.records, strict=True):
    assert got["eval_rows"] == want["eval_rows"] == rows
    for key in ("auc", "logloss", "accuracy"):
      assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_two_processes_train_dlrmv4_as_one_process(tmp_path):
  """DLRMv4 on 2 processes x 2 devices: each process builds its share of every batch
  of the synthetic log (the reference's ranks' round-robin) and of the eval window
  (its last batch partial); the records and tables equal a 1-process run's on
  4 devices (float32 sums in another order: 1e-5)."""
  from test_dlrmv4_train import tiny_config

  log = tmp_path / "log"
  single_config = tiny_config(log, devices=4)  # the log made here, once
  single = trainer.train_and_evaluate(single_config, str(tmp_path / "single"))
  assert single.records[-1]["eval_rows"] % 64  # a partial last eval batch, padded
  _run_processes(tmp_path / "multi", DLRMV4_LOG=str(log))
  records = [json.loads(l) for l in (tmp_path / "multi" / "metrics.jsonl").read_text()
             .splitlines()]
  assert [r["step"] for r in records] == [r["step"] for r in single.records] == [3, 6]
  for got, want in zip(records, single.records, strict=True):
    assert got["eval_rows"] == want["eval_rows"]
    for key in ("auc", "logloss", "train_loss"):
      assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
  tables = np.load(tmp_path / "multi" / "tables.npz")
  for i, want in enumerate(single.task.embedding.to_arrays(single.state.tables)):
    np.testing.assert_allclose(tables[f"arr_{i}"], want, rtol=1e-5, atol=1e-6)
