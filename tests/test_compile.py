"""The train step compiled for described accelerators (dlrm_jax.compile, dlrm_jax.targets).

XLA compiles for a TPU slice (the `libtpu` wheel) or an NVIDIA GPU (the CUDA
plugin, without CUDA's libraries) on this CPU machine: an op or collective that
TPU or GPU cannot lower fails here, not on a rented pod. Where the wheels are
missing (Python 3.11, whose newest jax has none that match) these tests skip; in
the test run's newest-jax leg (tests/run.sh sets DLRM_JAX_COMPILE_TESTS=require)
a missing wheel fails them.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, load_config, update_scatters
from dlrm_jax import compile as compile_lib
from dlrm_jax import targets
from dlrm_jax.config import ConfigError

REQUIRED = os.environ.get("DLRM_JAX_COMPILE_TESTS") == "require"
SHARDINGS = ("table_wise", "row_wise", "column_wise", "replicated")


def _available(platform: str) -> str | None:
  """None where `platform`'s compiler is installed, else why not."""
  import importlib.util

  module = {"tpu": "libtpu", "cuda": "jax_plugins.xla_cuda13"}[platform]
  try:
    found = importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    found = False
  return None if found else f"{module} is not installed ({targets.INSTALL[platform]})"


def _need(platform: str) -> None:
  why = _available(platform)
  if why is None:
    return
  if REQUIRED:
    pytest.fail(f"DLRM_JAX_COMPILE_TESTS=require: {why}")
  pytest.skip(why)


@pytest.fixture(scope="module", autouse=True)
def compile_only_backends():
  """As `python -m dlrm_jax.compile` runs; then the persistent cache on again for the
  worker's next tests."""
  from jax.experimental.compilation_cache import compilation_cache

  compile_lib.prepare_backends()
  yield
  jax.config.update("jax_enable_compilation_cache", True)
  compilation_cache.reset_cache()


# Small targets: few devices compile fast on 2 cores.
TPU, GPU = "v5e-4", "h100x2"


def _small(name="tiny", kind=None):
  c = load_config(name, devices=0)
  if kind is not None:
    c.sharding.min_column_width = 1
    tables = len(c.arch_embedding_size.split("-"))
    c.sharding.overrides = ",".join(f"t{t}:{kind}" for t in range(tables))
  return c


@pytest.mark.parametrize("target", [TPU, GPU])
@pytest.mark.parametrize("kind", SHARDINGS)
def test_each_sharding_type_compiles_for_tpu_and_gpu(target, kind):
  """Every table of one sharding type: the step compiles for a TPU slice and for NVIDIA
  GPUs, with the collectives that type needs in the compiled program."""
  t = targets.get(target)
  _need(t.chip.platform)
  r = compile_lib.compile_config(_small(kind=kind), t, evaluate=False, name="tiny")
  assert r.fits and r.devices == t.devices and r.device_kind == t.chip.device_kind
  assert f" {kind} " in r.plan and r.memory["temporaries"] > 0
  # The dense gradient's all-reduce; table-wise adds an all-to-all, column-wise an
  # all-gather (TPU's compiler may express an exchange as another collective).
  assert "all-reduce" in r.collectives, r.collectives
  if kind != "replicated":
    assert len(r.collectives) >= 2, (kind, r.collectives)
  if kind == "row_wise":  # the owners' partial sums: reduce-scattered on GPUs; on TPU an
    # all-to-all (XLA:TPU may make a reduce-scatter an all-reduce of the whole input)
    assert ("reduce-scatter" in r.collectives) == (t.chip.platform != "tpu"), r.collectives


@pytest.mark.parametrize("target", [TPU, GPU])
@pytest.mark.parametrize("config", ["default", "dcnv2_small"])
def test_default_and_dcnv2_compile_with_a_report(target, config):
  """The default config and a scaled-down DLRM-DCNv2 (multi-hot, Adagrad) compile with
  both steps; the report's cost and roofline are consistent with its parts."""
  t = targets.get(target)
  _need(t.chip.platform)
  c = _small(config)
  r = compile_lib.compile_config(c, t, name=config)
  assert r.fits and r.eval_memory["total"] > 0
  flops = r.cost["flops"]
  hbm = sum(v["hbm"] for v in r.traffic.values())  # the traffic model's, not XLA's
  assert flops > 0 and hbm > 0 and r.cost["bytes accessed"] > 0
  f = r.roofline
  assert f["compute_s"] == pytest.approx(flops / t.chip.flops(r.compute_dtype))
  assert f["hbm_s"] == pytest.approx(hbm / t.chip.hbm_bytes_per_s)
  assert f["step_s"] == max(f["compute_s"], f["hbm_s"], f["interconnect_s"])
  assert f["samples_per_s"] == pytest.approx(c.mini_batch_size / f["step_s"])
  assert "roofline lower bound" in compile_lib.format_report(r)


def test_gpu_step_has_no_scatter_with_repeated_indices():
  """On NVIDIA devices the tables' update is SortedLookup's: ids sorted and summed, each
  row written once, so every scatter of the compiled step's sparse update declares
  unique indices (no contended atomics). The TPU step, whose kernel is the portable one,
  has update scatters that do not: the check can tell the two apart."""
  _need("cuda")
  _need("tpu")
  texts = {}
  for target in (GPU, TPU):
    t = targets.get(target)
    c = _small(kind="row_wise")
    texts[target] = compile_lib.compile_train_step(*_task(c, t))[0].as_text()
  gpu, tpu = update_scatters(texts[GPU]), update_scatters(texts[TPU])
  assert gpu and all("unique_indices=true" in l for l in gpu), gpu
  assert any("unique_indices=true" not in l for l in tpu), tpu


def _task(config, target):
  """The task of `config` on every device of `target`, and its batch's shapes."""
  from dlrm_jax.specs import RunSpec
  from dlrm_jax.task import Task

  config.mesh.num_devices = 0
  run = RunSpec.from_config(config)
  return Task(run, devices=target.compile_devices()), compile_lib.batch_shapes(run)


@pytest.mark.parametrize("kind", ["table_wise", "row_wise", "replicated"])
def test_tpu_step_updates_the_donated_tables_in_place(kind):
  """The tables and their optimiser slots are donated to the train step and their touched
  rows written in place: the compiled TPU step holds no copy of a table-shaped buffer.
  XLA:TPU copied the whole table every step while the update's gather of the rows it
  rewrites was fused into the scatter that rewrites them (docs/compile.md)."""
  _need("tpu")
  c = _small(kind=kind)
  c.embedding_optimizer = "adagrad"  # a slot per element: state as large as the table
  c.arch_sparse_feature_size, c.arch_mlp_bot = 128, "13-128"  # TPU's 128-lane rows
  c.arch_embedding_size = "-".join(["50000"] * 8)
  text = compile_lib.compile_train_step(*_task(c, targets.get(TPU)))[0].as_text()
  shapes = set(re.findall(r"= (\w+\[[\d,]+\])\S* parameter\(\d+\), "
                          r"metadata=\{op_name=\"state\.(?:tables|emb_opt_state)", text))
  assert shapes, "no table parameters found in the HLO"
  copies = [line.strip()[:160] for line in text.splitlines()
            if (m := re.search(r"= (\w+\[[\d,]+\])\S* copy\(", line)) and m.group(1) in shapes]
  assert not copies, copies


@pytest.mark.parametrize("kind", ["table_wise", "row_wise"])
def test_tpu_exchange_keeps_vectors_flat(kind):
  """A TPU tiles an array's two minor dimensions by (8, 128): [owner, sample, ids, D]
  vectors or [sample, bags, D] partial sums with a width that is no multiple of 8 would be
  padded, and each reshape between them and the [ids, D] rows the update scatters would
  be a copy. The looked-up vectors, the row-wise partial sums and their gradients stay
  [rows, D]: no copy or reshape in the compiled step makes a float array of rank 4 with
  as many values as the batch's pooled vectors or more (the table-wise owners' pooled vectors
  [owner, sample, bag, D], one per bag, may still be padded: a small cost)."""
  _need("tpu")
  c = _small("dcnv2_small", kind=kind)  # MLPerf's hotness: bags of 1 to 100 ids
  text = compile_lib.compile_train_step(*_task(c, targets.get(TPU)))[0].as_text()
  pooled = c.mini_batch_size * len(c.arch_embedding_size.split("-")) * c.arch_sparse_feature_size
  relayouts = [line.strip()[:160] for line in text.splitlines()
               if (m := re.search(r"= f\d+\[(\d+),(\d+),(\d+),(\d+)\]\S* (copy|reshape)\(", line))
               and np.prod([int(x) for x in m.groups()[:4]]) >= pooled]
  assert relayouts == [], relayouts


def test_command_line_report_agrees_with_memory_analysis(tmp_path):
  """`python -m dlrm_jax.compile` as a user runs it: its JSON's memory is the compiler's
  memory_analysis of the same step compiled here, and its Markdown row names the target."""
  _need("tpu")
  proc = subprocess.run(
      [sys.executable, "-m", "dlrm_jax.compile", f"--config={REPO}/configs/tiny.py",
       f"--target={TPU}", "--out", str(tmp_path), "--noeval"],
      capture_output=True, text=True, cwd=REPO, timeout=600,
      env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "verdict: fits" in proc.stdout and "Traceback" not in proc.stderr
  assert "TPU" not in proc.stderr, proc.stderr[-2000:]  # libtpu's start-up kept quiet
  got = json.load(open(tmp_path / "compile.json"))
  task, batch = _task(_small(), targets.get(TPU))
  m = compile_lib.compile_train_step(task, batch)[0].memory_analysis()
  assert got["memory"]["arguments"] == m.argument_size_in_bytes
  assert got["memory"]["temporaries"] == m.temp_size_in_bytes
  assert got["memory"]["aliased"] == m.alias_size_in_bytes
  assert got["plan_bytes"] == max(task.plan.device_bytes())
  assert f"| tiny / {TPU} | 4 |" in (tmp_path / "compile.md").read_text()


def test_a_plan_over_the_chip_is_one_line_before_compiling():
  """Tables over a v5e's 16 GiB: the planner refuses in a line that names the need and
  the budget (90% of the chip), before any compile."""
  _need("tpu")
  tables = "-".join(["500000000"] * 4)  # 4 x 128 GB over 4 chips of 16 GiB
  proc = subprocess.run(
      [sys.executable, "-m", "dlrm_jax.compile", f"--config={REPO}/configs/tiny.py",
       f"--target={TPU}", f"--config.arch_embedding_size={tables}",
       "--config.arch_sparse_feature_size=64", "--config.arch_mlp_bot=13-64"],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
  first = proc.stderr.strip().splitlines()[0]  # then the plan that did not fit
  assert first.startswith("error: the embedding tables need") and "budget of 14.4 GiB" in first, \
      proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


# Without the compilers ----------------------------------------------------------------

def test_target_names_and_topologies():
  assert targets.get("v5p-8").devices == 4 and targets.get("v5p-8").topology() == "2x2x1"
  assert targets.get("v5p-32").topology() == "2x2x4"
  assert targets.get("v5p-128").topology() == "4x4x4"
  assert targets.get("v6e-8").topology() == "2x4" and targets.get("v6e-64").topology() == "8x8"
  assert targets.get("v5e-4").topology() == "2x2"
  assert targets.get("v5p-8", slices=2).devices == 8
  assert targets.get("h200x8").topology() == "1x1x8"
  assert targets.get("b200x8").chip.memory_bytes > targets.get("h200x1").chip.memory_bytes
  assert targets.get("cpu").chip is None
  for bad in ("v5p-6", "v5p-3", "h100x9", "tpu", "v6e-8x"):
    with pytest.raises(ConfigError):
      targets.get(bad)
  with pytest.raises(ConfigError, match="slices"):
    targets.get("h100x8", slices=2)
  for chip in targets.CHIPS.values():
    assert chip.source and chip.memory_bytes > 0 and chip.flops_bf16 >= chip.flops_f32
    if chip.gpu_target:  # the description it ships agrees with the figures here
      text = open(os.path.join(targets.GPU_TARGETS, chip.gpu_target)).read()
      assert f'name: "{chip.device_kind}"' in text
      assert f"device_memory_size: {chip.memory_bytes}" in text


def test_collectives_are_counted_from_the_hlo_text():
  """Counts and result bytes per kind, async starts by their outputs only (XLA:GPU's
  all-reduce-start carries its operands too, as a nested tuple)."""
  hlo = """
  %a = f32[64,8]{1,0} all-to-all(f32[64,8]{1,0} %x), replica_groups={{0,1}}
  %b = (f32[4,8]{1,0}, f32[8,8]{1,0}) all-gather-start(f32[4,8]{1,0} %y), dimensions={0}
  %c = f32[8,8]{1,0} all-gather-done(%b)
  %d = (f32[10]{0}, bf16[6]{0}) all-reduce-start(f32[10]{0} %p, bf16[6]{0} %q)
  %e = f32[2,8]{1,0} reduce-scatter(f32[4,8]{1,0} %z), dimensions={0}
  %f = f32[100]{0} add(f32[100]{0} %u, f32[100]{0} %v)
  %g = ((f32[5]{0}), f32[5]{0}) all-reduce-start(%w), replica_groups={}
  """
  got = compile_lib.collectives(hlo)
  assert got == {"all-to-all": {"count": 1, "bytes": 64 * 8 * 4},
                 "all-gather": {"count": 1, "bytes": 8 * 8 * 4},
                 "all-reduce": {"count": 2, "bytes": 10 * 4 + 6 * 2 + 5 * 4},
                 "reduce-scatter": {"count": 1, "bytes": 2 * 8 * 4}}


def test_batch_shapes_are_the_data_sources_batches():
  """The abstract batch the compile uses has the shapes and dtypes the data gives."""
  from dlrm_jax.data import make_data
  from dlrm_jax.specs import RunSpec

  for name, fields in (("tiny", {}), ("dcnv2_small", {}),
                       ("tiny", {"data.kind": "random", "data.hotness": 3,
                                 "data.variable_hotness": True})):
    c = load_config(name)
    for k, v in fields.items():
      section, field = k.split(".")
      c[section][field] = v
    run = RunSpec.from_config(c)
    real = make_data(run).batch(0)
    shapes = compile_lib.batch_shapes(run)
    assert set(shapes) == set(real), name
    for k, v in real.items():
      assert shapes[k].shape == v.shape and shapes[k].dtype == np.asarray(v).dtype, (name, k)


@pytest.mark.parametrize("target", [TPU, GPU])
def test_dlrmv4_compiles_with_its_sequences(target, tmp_path):
  """DLRMv4 (its history sequences through the sharded tables, the HSTU network) compiles
  for a TPU slice and NVIDIA GPUs from shapes alone, both steps."""
  from test_dlrmv4_train import tiny_config

  t = targets.get(target)
  _need(t.chip.platform)
  c = tiny_config(tmp_path / "unused", devices=0)  # no data: the shapes are the config's
  for k, rows in (("item", 150), ("artist", 20), ("album", 50), ("uid", 40)):
    c.dlrmv4[f"{k}_rows"] = rows
  r = compile_lib.compile_config(c, t, name="dlrmv4_tiny")
  assert r.fits and r.eval_memory["total"] > 0 and r.cost["flops"] > 0
  assert r.plan.count("\n") > 11 and " history" not in r.plan  # 11 tables, no extra ones


def test_tpu_plans_no_column_slice_narrower_than_its_lanes():
  """The MLPerf DLRM-DCNv2 tables (D = 128) on v5p-8's 4 chips, as the compile tool plans
  them: TPU lays an array's last dimension out in 128-lane tiles, so the planner splits
  no table into 32-column slices there (it did: five 40M-row tables), while on 4 CPU
  or GPU devices it still does; an explicit `sharding.min_column_width` wins."""
  from dlrm_jax.embedding.planner import COLUMN_WISE, ROW_WISE
  from dlrm_jax.specs import RunSpec
  from dlrm_jax.task import dlrm_parts, make_plan

  run = RunSpec.from_config(load_config("mlperf_dcnv2", devices=0))
  collection = dlrm_parts(run).collection
  memory = targets.get("v5p-8").chip.memory_bytes

  def split(platform, run=run):
    plan = make_plan(run, collection, 4, memory, platform)
    return {kind: [collection.dims[t] // 4 for t, p in enumerate(plan.placements)
                   if p.kind == kind] for kind in (COLUMN_WISE, ROW_WISE)}

  tpu = split("tpu")
  assert tpu[COLUMN_WISE] == [] and len(tpu[ROW_WISE]) == 5, tpu
  for platform in ("cpu", "gpu"):
    assert split(platform)[COLUMN_WISE] == [32] * 5
  c = load_config("mlperf_dcnv2", devices=0)
  c.sharding.min_column_width = 32
  assert split("tpu", RunSpec.from_config(c))[COLUMN_WISE] == [32] * 5
