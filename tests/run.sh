#!/usr/bin/env bash
# The default test set in two fresh virtual environments ("legs"):
#   1. python3 (3.11 here) with the oldest jax we support, which is pip's newest there
#      (0.10.2), and torch's CPU build for the tests that load PyTorch models;
#   2. Python 3.12 or newer with the newest jax, jaxlib, flax, optax and orbax pip gives,
#      plus libtpu and the CUDA plugin, so that tests/test_compile.py compiles the step
#      for TPU and NVIDIA targets (a missing wheel fails it there). No torch: a CUDA
#      build is several GB, and Python 3.12 has no local CPU wheel; those tests skip.
# Usage: bash tests/run.sh [pytest arguments]. Leg 2 is skipped, with a message, where
# no Python 3.12+ exists, except under CI=true, where that is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

versions() {
  python - <<'EOF'
import importlib.metadata as m, sys
names = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "libtpu",
         "jax-cuda13-plugin", "torch"]
have = []
for n in names:
  try:
    have.append(f"{n} {m.version(n)}")
  except m.PackageNotFoundError:
    pass
print(f"Python {sys.version.split()[0]}: " + ", ".join(have))
EOF
}

leg() {  # leg NAME PYTHON EXTRAS [PACKAGES...]
  local name=$1 py=$2 extras=$3
  shift 3
  echo "=== leg ${name}: $("$py" --version) in .venv-${name}"
  "$py" -m venv ".venv-${name}"
  # shellcheck disable=SC1090
  source ".venv-${name}/bin/activate"
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e ".[${extras}]" "$@"
}

newest_python() {  # a Python >= 3.12 that runs: on PATH, else pyenv's
  local c
  for c in python3.12 python3.13 python3.14; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys' 2>/dev/null; then
      command -v "$c"; return
    fi
  done
  if command -v pyenv >/dev/null; then
    for c in "$(pyenv root)"/versions/3.1[2-9]*/bin/python3; do
      if [ -x "$c" ] && "$c" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
        echo "$c"; return
      fi
    done
  fi
}

# Leg 1: the oldest supported jax.
(
  leg oldest python3 test,tfds,torch torch==2.13.0
  versions
  python -m pytest -n 2 -q "$@"
)

# Leg 2: the newest jax, with the compilers for described accelerators.
NEWEST=$(newest_python || true)
if [ -z "$NEWEST" ]; then
  if [ "${CI:-}" = "true" ]; then
    echo "error: no Python >= 3.12 found for the newest-jax leg" >&2; exit 1
  fi
  echo "=== leg newest: skipped, no Python >= 3.12 here (pyenv install 3.12 adds it)"
  exit 0
fi
(
  leg newest "$NEWEST" test,tfds
  # The plugin that matches the installed jaxlib (the CUDA plugin alone: compiling for a
  # described GPU needs none of CUDA's libraries) and libtpu.
  python -m pip install --quiet libtpu \
    "jax-cuda13-plugin==$(python -c 'import jaxlib; print(jaxlib.__version__)')"
  versions
  # The CUDA plugin without CUDA's libraries cannot start a GPU backend and prints a
  # traceback whenever JAX starts one: the tests run on the CPU (they do anyway).
  JAX_PLATFORMS=cpu DLRM_JAX_COMPILE_TESTS=require python -m pytest -n 2 -q "$@"
)
