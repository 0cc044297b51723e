"""Shared test helpers.

Tests run with 8 simulated CPU devices, so that the sharded code paths run in
the same process as everything else; configs from `load_config` use one
device unless a test asks for more.
"""

import contextlib
import os
import subprocess
import sys
import tempfile

import pytest

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
# Many tests compile the same small programs (XLA:CPU compiles take seconds on
# 2 cores): share compiled executables between tests, test workers and the
# subprocesses they start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "dlrm_jax_tests_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
PARITY_DIR = os.path.join(SHARED, "data", "reference_parity")
CRITEO_DIR = os.path.join(SHARED, "data", "criteo")

if REPO not in sys.path:  # configs/ is not part of the installed package.
  sys.path.insert(0, REPO)


def load_config(name: str, devices: int = 1):
  """get_config() of configs/NAME.py, on `devices` devices (0: all 8)."""
  import importlib

  config = importlib.import_module(f"configs.{name}").get_config()
  config.mesh.num_devices = devices
  return config


@pytest.fixture
def tiny_config():
  return load_config("tiny")


def small_criteo_config(data_path, devices: int = 1):
  """A tiny model (D=4, bottom 13-8-4, top 8-1) on a prepared Criteo directory: 6 steps
  of 32, one evaluation at the end over the whole test split, in batches of 16."""
  c = load_config("criteo_kaggle", devices=devices)
  c.data.path = str(data_path)
  c.arch_sparse_feature_size, c.arch_mlp_bot, c.arch_mlp_top = 4, "13-8-4", "8-1"
  c.mini_batch_size, c.num_batches, c.test_freq, c.eval_every_epochs = 32, 6, 0, 0.0
  c.test_mini_batch_size, c.test_num_batches = 16, 0
  c.progress_bar = False
  return c


@contextlib.contextmanager
def tmpfs(path, size: int | str):
  """A tmpfs of `size` bytes ("30m" works too) mounted at `path` (made here) for the
  block; the test is skipped where mounting is refused (not root, a container
  without the capability)."""
  path.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True, text=True)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
  try:
    yield path
  finally:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
      subprocess.run(["umount", "--lazy", str(path)], capture_output=True)  # files still open


def fill(path, leave: int) -> None:
  """Fills the file system of `path` up to `leave` free bytes (with path/filler)."""
  st = os.statvfs(path)
  (path / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def update_scatters(hlo_text: str) -> list[str]:
  """The scatters of a compiled step's HLO text (`Compiled.as_text()`) that its sparse
  update makes (by the op_name scope, `dlrm_jax.profiling.phase_of`): a GPU kernel's
  must all declare unique indices (no contended atomics)."""
  import re

  from dlrm_jax.profiling import phase_of

  return [line for line in hlo_text.splitlines() if re.search(r"\sscatter\(", line)
          and phase_of((re.findall(r'op_name="([^"]*)"', line) or [""])[0]) == "sparse update"]
