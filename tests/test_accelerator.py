"""benchmarks/accelerator.py --smoke: the one-GPU benchmark runs end to end on CPU."""

import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import REPO

GPU = any(d.platform == "gpu" for d in jax.devices())


def test_accelerator_benchmark_smoke(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as on a GPU
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "accelerator.py"), "--smoke",
       "--only", "a_bf16,d_bf16,e_bf16,scatter", "--out", str(tmp_path), "--timeout", "300"],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.load(open(tmp_path / "accelerator.json"))["results"]
  assert [r["config"] for r in results] == ["a_bf16", "d_bf16", "e_bf16", "scatter"]
  probe = results.pop()["dlrm_jax"]  # the three forms of the sparse update, same table
  assert set(probe["ms"]) == {"scatter_add", "sort_segment_sum", "sort_scan"}, probe
  assert all(ms > 0 for ms in probe["ms"].values()) and probe["max_difference"] < 1e-3
  assert 0 < probe["distinct_rows"] < probe["ids"]
  hotness = {"a_bf16": 26, "d_bf16": 214, "e_bf16": 214}  # ids per sample
  for r in results:
    jx = r["dlrm_jax"]
    assert jx["samples_per_s"] > 0 and jx["peak_bytes"] > 0, jx
    assert jx["plan_bytes"] > 0 and jx["estimate_bytes"] >= jx["plan_bytes"]
    # Every real id counted (MLPerf's multi-hot bags: 214 per sample), each touched row once.
    ids = hotness[r["config"]] * 256
    assert jx["ids_per_step"] == ids and 0 < jx["touched_rows_per_step"] < ids
    assert "| dense backward |" in jx["phase_table"], jx.get("trace_error")
    assert "samples_per_s" in r["torch"] or "skipped" in r["torch"], r["torch"]
  import jax

  table = (tmp_path / "accelerator.md").read_text()
  assert table.startswith(f"jax {jax.__version__}, jaxlib ")  # which jax the numbers ran
  assert "\n\n| config | batch | dlrm_jax samples/s |" in table
  assert json.load(open(tmp_path / "accelerator.json"))["versions"]["jax"] == jax.__version__
  assert "| a_bf16 | 256 |" in table
  assert "| sort_scan |" in table


@pytest.mark.skipif(not GPU, reason="needs a GPU")
@pytest.mark.parametrize("kind", ["table_wise", "row_wise", "column_wise", "replicated"])
def test_gpu_train_step_equals_cpu(tiny_config, kind):
  """One train step of each sharding type on the GPU gives the CPU's loss, tables and
  parameters (float32 tolerance: the GPU's matmuls run at full float32 precision here)."""
  import numpy as np

  from dlrm_jax.data import RandomData
  from dlrm_jax.task import Task

  jax.config.update("jax_default_matmul_precision", "highest")
  tiny_config.mesh.num_devices = 1
  tables = len(tiny_config.arch_embedding_size.split("-"))
  tiny_config.sharding.overrides = ",".join(f"t{t}:{kind}" for t in range(tables))
  out = {}
  for platform in ("gpu", "cpu"):
    tiny_config.mesh.platform = platform
    task = Task(tiny_config)
    data = RandomData(task.spec.table_rows, task.spec.num_dense, 64, seed=0)
    state, res = task.train_step(task.init_state(0), data.batch(0))
    out[platform] = (float(res["loss"]), task.embedding.to_arrays(state.tables),
                     [np.asarray(x) for x in jax.tree.leaves(state.params)])
  assert abs(out["gpu"][0] - out["cpu"][0]) < 1e-5
  for g, c in zip(out["gpu"][1] + out["gpu"][2], out["cpu"][1] + out["cpu"][2], strict=True):
    np.testing.assert_allclose(g, c, rtol=1e-5, atol=1e-6)
