"""Stopping a run with SIGTERM or Ctrl-C: a checkpoint of the step reached, one line, a
non-zero exit, and a rerun that ends as the uninterrupted run (the 2-process case is in
tests/test_multiprocess.py)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from checkpoint_worker import Injected
from conftest import REPO, load_config
from dlrm_jax import checkpoint, stopping, trainer

STOPPED = "stopped at step {}; checkpoint saved; run the same command to resume"


def stop_config():
  """Tiny, 400 steps, evaluating every 50 and saving only at the end (and at a stop)."""
  c = load_config("tiny")
  c.num_batches, c.test_freq = 400, 50
  c.checkpoint.enabled = True
  c.checkpoint.every_steps = 10_000
  return c


# stop_config() as train.py flags (the subprocess's 8 simulated devices are conftest's).
FLAGS = ["--config=configs/tiny.py", "--config.mesh.num_devices=1",
         "--config.num_batches=400", "--config.test_freq=50",
         "--config.checkpoint.enabled=True", "--config.checkpoint.every_steps=10000"]


def records(workdir) -> list[dict]:
  """WORKDIR/metrics.jsonl's records so far (none before it exists; a line being written
  is left out)."""
  path = pathlib.Path(workdir, "metrics.jsonl")
  lines = path.read_text().splitlines() if path.exists() else []
  return [json.loads(l) for l in lines if l.endswith("}")]


def without_timings(rs):
  return [{k: v for k, v in r.items() if k not in trainer.TIMINGS} for r in rs]


def signal_after_evaluation(proc: subprocess.Popen, workdir, evaluations: int, sig) -> None:
  """Sends `sig` to `proc` once WORKDIR/metrics.jsonl holds `evaluations` records (the
  loop is then running, with its signal handlers set)."""
  deadline = time.monotonic() + 300
  while len(records(workdir)) < evaluations:
    assert proc.poll() is None, f"it ended first (exit {proc.returncode})"
    assert time.monotonic() < deadline, "no evaluation in 300 s"
    time.sleep(0.01)
  proc.send_signal(sig)


def test_sigterm_and_ctrl_c_save_the_step_reached_and_a_rerun_ends_as_if_never_stopped(
    tmp_path):
  """`python train.py` stopped by SIGTERM after its first evaluation, rerun, stopped by
  SIGINT (Ctrl-C) after its next, rerun to the end. Each stop: exit status 128 + the
  signal, no traceback, one last line naming the step, a checkpoint of that step (the
  only saves are at the end and at a stop) and no Orbax temporary directory. The end:
  the records and train state of an uninterrupted run, bit for bit."""
  work = str(tmp_path / "run")
  command = [sys.executable, "train.py", *FLAGS, f"--workdir={work}"]
  stops = []
  for sig in (signal.SIGTERM, signal.SIGINT):
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
      signal_after_evaluation(proc, work, len(records(work)) + 1, sig)
      out, err = proc.communicate(timeout=300)
    finally:
      proc.kill()
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    last = err.strip().splitlines()[-1]
    step = int(last.split()[3].rstrip(";"))
    assert last == STOPPED.format(step), err[-3000:]
    assert (stops[-1] if stops else 50) <= step < 400, (stops, step)
    if stops:
      assert f"resuming from step {stops[-1]}" in out, out[-3000:]
    stops.append(step)
    # Only the stops' checkpoints, and no *.orbax-checkpoint-tmp.
    assert set(os.listdir(os.path.join(work, "checkpoints"))) == {str(s) for s in stops}

  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"resuming from step {stops[1]}" in proc.stdout and "Run summary" in proc.stdout

  whole = trainer.train_and_evaluate(stop_config(), str(tmp_path / "whole"))
  assert without_timings(records(work)) == without_timings(whole.records)
  assert [r["step"] for r in whole.records] == list(range(50, 401, 50))
  with checkpoint.Checkpointer(os.path.join(work, "checkpoints")) as ckpt:
    final = ckpt.restore(whole.task)
  assert final.step == 400
  for got, want in zip(jax.tree.leaves(final.state), jax.tree.leaves(whole.state),
                       strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_the_loop_stops_after_the_step_a_signal_came_in_and_restores_the_handlers(
    tmp_path, monkeypatch):
  """In-process (a notebook's case): a SIGINT while the loop is at step 6 or so stops the
  run after the step it is in with `Stopped` (a checkpoint of that step, exit status
  130); the handlers are the caller's again afterwards."""

  def hook(i, batch):
    if i == 8:  # the prefetcher reads two batches ahead
      signal.raise_signal(signal.SIGINT)
    return batch

  make_data = trainer.make_data
  monkeypatch.setattr(trainer, "make_data", lambda spec: Injected(make_data(spec), hook))
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with pytest.raises(stopping.Stopped) as stop:
    trainer.train_and_evaluate(stop_config(), str(tmp_path))
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
  assert stop.value.exit_status == 130 and stop.value.saved
  assert str(stop.value) == STOPPED.format(stop.value.step)
  assert 5 <= stop.value.step <= 9, stop.value.step
  assert os.listdir(tmp_path / "checkpoints") == [str(stop.value.step)]


def test_a_second_ctrl_c_interrupts_at_once():
  """The first SIGINT is only noted; the second raises KeyboardInterrupt where the
  program is (as with no handler), and the previous handlers are back."""
  before = signal.getsignal(signal.SIGINT)
  with stopping.StopSignals() as signals:
    signal.raise_signal(signal.SIGINT)
    assert signals.requested() and signals.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
  assert signal.getsignal(signal.SIGINT) is before


def test_an_ignored_signal_stays_ignored():
  """A job started with `&` by a non-interactive shell ignores SIGINT: the loop does not
  start honouring it (SIGTERM is still noted)."""
  before = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with stopping.StopSignals() as signals:
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
      signal.raise_signal(signal.SIGINT)
      assert not signals.requested()
      signal.raise_signal(signal.SIGTERM)
      assert signals.requested() and signals.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, before)
