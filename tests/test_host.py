"""The host-process malloc settings (dlrm_jax/host.py)."""

import os
import platform
import subprocess
import sys

import pytest

SCRIPT = "from dlrm_jax import host; print(host.keep_freed_memory(), host.keep_freed_memory())"


def _run(env_value):
  env = dict(os.environ)
  env.pop("DLRM_JAX_KEEP_FREED_MEMORY", None)
  if env_value is not None:
    env["DLRM_JAX_KEEP_FREED_MEMORY"] = env_value
  return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                        text=True, check=True).stdout.split()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_keep_freed_memory_applies_on_glibc_and_can_be_turned_off():
  assert _run(None) == ["True", "True"]  # applied, and the second call is a no-op
  assert _run("0") == ["False", "False"]


def test_importing_the_trainer_applies_the_settings():
  """The settings must be made before JAX's CPU backend starts: importing the trainer
  does it, and nothing in that import starts the backend first."""
  out = subprocess.run(
      [sys.executable, "-c", "import dlrm_jax.trainer, jax._src.xla_bridge as xb; "
       "from dlrm_jax import host; "
       "print(host._applied is not None, xb.backends_are_initialized())"],
      capture_output=True, text=True, check=True).stdout.split()
  assert out == ["True", "False"]
