"""The notebooks in notebooks/ run top to bottom without an error (nbclient, a kernel of
this environment), each executed in memory: the committed files are never rewritten."""

import glob
import os
import time

import pytest

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  from nbclient import NotebookClient

  # A notebook sets up its own devices; the test suite's 8 simulated ones are not its.
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  nb = nbformat.read(path, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
      "store notebooks with their outputs cleared"
  start = time.perf_counter()
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, errors
  assert time.perf_counter() - start < 240  # 6-15 s each on 2 cores (2026-12-07)
