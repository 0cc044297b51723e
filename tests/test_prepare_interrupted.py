"""Nothing is lost: a preparation killed at random moments and resumed, or stopped by a
full disk and resumed after space is freed, writes exactly the uninterrupted output.

The preparations run as child processes (two workers each), as a user's would; a
kill is SIGKILL to the parent alone, whose workers must then die with it.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, tmpfs
from dlrm_jax.data.criteo_synth import write_raw

DAYS, ROWS = 3, 3000
# Small pieces, shards and vocabulary memory: many files and every stage (pieces, the
# vocabulary's passes, its application, the metadata) in a few seconds.
CHILD = """
import sys
from dlrm_jax.data import criteo
criteo.prepare("terabyte", sys.argv[2:], sys.argv[1], categorical="frequency", workers=2,
               shard_rows=700, piece_bytes=60_000, vocab_memory_bytes=20_000, progress=False,
               log=lambda m: None)
"""


@pytest.fixture(scope="module")
def days(tmp_path_factory):
  root = tmp_path_factory.mktemp("raw")
  paths = [str(root / f"day_{d}") for d in range(DAYS)]
  for d, p in enumerate(paths):
    write_raw(p, ROWS, seed=d)
  return paths


def _command(output, days):
  return [sys.executable, "-c", CHILD, str(output), *days]


def _env():
  return {**os.environ, "PYTHONPATH": os.path.join(REPO, "src") + os.pathsep
          + os.environ.get("PYTHONPATH", "")}


def contents(directory) -> dict:
  """Every file's bytes by relative path, the metadata parsed and without its timestamp."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  meta = json.loads(out.pop("metadata.json"))
  del meta["created"]
  out["metadata.json"] = meta
  return out


def _assert_same(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  differing = [k for k in want if got[k] != want[k]]
  assert not differing, differing


def _wait_gone(pgid: int, timeout: float = 20.0) -> None:
  """Until no process of the group is left (the killed parent's workers included)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    try:
      os.killpg(pgid, 0)
    except ProcessLookupError:
      return
    time.sleep(0.05)
  raise AssertionError(f"processes of group {pgid} outlived their killed parent")


def test_killed_at_random_moments_and_resumed_gives_the_uninterrupted_output(days, tmp_path):
  """Runs SIGKILLed after random delays, each resuming the last one's output, until 4
  kills have landed; a run that finishes first must have written the whole output, which
  then starts again from nothing (so that a busy machine cannot make the kills miss)."""
  start = time.monotonic()
  subprocess.run(_command(tmp_path / "whole", days), check=True, env=_env(), timeout=300)
  duration = time.monotonic() - start
  want = contents(tmp_path / "whole")
  out = tmp_path / "killed"
  rng = np.random.default_rng(0)
  killed = 0
  for _ in range(20):
    proc = subprocess.Popen(_command(out, days), env=_env(), start_new_session=True,
                            stderr=subprocess.PIPE)
    try:
      proc.wait(timeout=rng.uniform(0.15, 0.9) * duration)
      assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
      _assert_same(contents(out), want)  # finished before its kill: whole, then afresh
      shutil.rmtree(out)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)  # the parent only
      proc.wait()
      _wait_gone(proc.pid)
      killed += 1
    finally:
      proc.stderr.close()
    if killed == 4:
      break
  assert killed == 4, f"only {killed} of 20 runs were still running at their kill"
  subprocess.run(_command(out, days), check=True, env=_env(), timeout=300)
  _assert_same(contents(out), want)


def test_a_full_disk_stops_with_a_message_and_resumes_once_space_is_freed(days, tmp_path):
  """The command line on a tmpfs of half the output's size: one line that says what to
  do, no traceback; after the tmpfs grows, the same command finishes the output."""
  def cli(output):
    return [sys.executable, "-m", "dlrm_jax.data.criteo", "prepare", "--dataset", "terabyte",
            "--input", *days, "--output", str(output), "--categorical", "frequency",
            "--workers", "2", "--no-progress"]

  subprocess.run(cli(tmp_path / "whole"), check=True, env=_env(), timeout=300,
                 capture_output=True)
  want = contents(tmp_path / "whole")
  size = sum(len(v) for k, v in want.items() if k != "metadata.json")
  with tmpfs(tmp_path / "disk", size // 2) as disk:
    proc = subprocess.run(cli(disk / "prepared"), capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "no space left on the device" in last and "run the same command again" in last, \
        proc.stderr[-3000:]
    subprocess.run(["mount", "-o", f"remount,size={4 * size}", str(disk)], check=True)
    proc = subprocess.run(cli(disk / "prepared"), capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same(contents(disk / "prepared"), want)


def test_a_run_stopped_between_its_metadata_and_its_clean_up_resumes_clean(tmp_path):
  """The last moment a kill can land: metadata written, progress records not yet removed.
  The rerun finds the output complete and removes them (the random kills above met it)."""
  from dlrm_jax.data import criteo
  from dlrm_jax.data import format as fmt
  from dlrm_jax.data.criteo_synth import write_raw

  raw = tmp_path / "train.txt"
  write_raw(str(raw), 300, seed=0)
  out = tmp_path / "out"
  kwargs = dict(categorical="hash", max_ind_range=50, workers=1, progress=False,
                log=lambda m: None)
  criteo.prepare("kaggle", [str(raw)], str(out), **kwargs)
  want = contents(out)
  (out / fmt.PROGRESS_DIR).mkdir()
  (out / fmt.PROGRESS_DIR / "piece-0000-00000.json").write_text("{}")
  criteo.prepare("kaggle", [str(raw)], str(out), **kwargs)
  _assert_same(contents(out), want)
