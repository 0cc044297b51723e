"""The train step built for an accelerator you don't have: memory, cost and collectives.

    python -m dlrm_jax.compile --config=configs/mlperf_dcnv2.py --target=v5p-32 [--out DIR]
    python -m dlrm_jax.compile --target=h100x8 --config.mini_batch_size=8192

XLA compiles for a described TPU slice or NVIDIA GPU on any machine (the
`libtpu` wheel, the CUDA plugin: `dlrm_jax.targets`). This plans the config's
tables for the target's devices (the budget from the chip's memory), lowers and
compiles the real train step (and the evaluation step) at the config's global
batch from shapes alone (no data, no arrays), and reports per device: the
compiler's memory (arguments, outputs, aliased, temporaries) against the chip's,
with a verdict; FLOPs and bytes accessed (XLA's cost model); each collective kind
in the compiled program with its count and bytes; the HBM and interconnect bytes
of each phase of the step by one rule (`dlrm_jax.traffic`) beside what the step
physically needs; a roofline lower bound on the step time from the chip's peaks
(its HBM term from that traffic), and the samples/s it implies. All of these are
models of a program, not measurements of a machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np

from dlrm_jax import targets as targets_lib
from dlrm_jax import traffic as traffic_lib
from dlrm_jax.config import DEFAULT_CONFIG, ConfigError
from dlrm_jax.traffic import collectives


def prepare_backends() -> None:
  """A compile-only process: JAX on the CPU (the CUDA plugin without CUDA's libraries
  cannot start a GPU backend, and should not try), libtpu quiet and not exclusive (it
  otherwise looks for a TPU VM's metadata and takes a lock on /tmp/libtpu_lockfile)."""
  import jax

  from dlrm_jax import parallel

  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # any: it only quiets start-up
  jax.config.update("jax_platforms", "cpu")
  # A compile-only executable cannot be stored or loaded without the device's client.
  parallel.persistent_cache_off()


def batch_shapes(run) -> dict[str, Any]:
  """The global train batch's shapes and dtypes from a `RunSpec`, as the data sources
  give it: 'dense' [B, num_dense] float32, 'sparse' int32 flat bags [B, sum of hotness]
  (or padded [B, F, max hotness] with a bool 'sparse_mask' with variable hotness),
  'label' [B] float32; DLRMv4's `dlrm_jax.dlrmv4.batch_shapes`."""
  import jax

  b, spec, data = run.training.mini_batch_size, run.model, run.data
  if run.family == "dlrmv4":
    from dlrm_jax import dlrmv4

    return {k: jax.ShapeDtypeStruct(shape, dtype)
            for k, (shape, dtype) in dlrmv4.batch_shapes(spec, b).items()}
  hot = np.broadcast_to(np.asarray(data.hotness), (len(spec.table_rows),))
  out = {"dense": jax.ShapeDtypeStruct((b, spec.num_dense), np.float32),
         "label": jax.ShapeDtypeStruct((b,), np.float32)}
  if data.variable_hotness:
    shape = (b, len(spec.table_rows), int(hot.max()))
    out["sparse_mask"] = jax.ShapeDtypeStruct(shape, np.bool_)
  else:
    shape = (b, int(hot.sum()))
  out["sparse"] = jax.ShapeDtypeStruct(shape, np.int32)
  return out


def cost(compiled) -> dict[str, float] | None:
  """XLA's cost model of a compiled program per device: flops, bytes accessed (and TPU's
  optimal_seconds). Where the backend gives none (NVIDIA's compile-only devices), XLA's
  generic HLO cost analysis of the compiled module (a private jaxlib function: None
  where it is missing)."""
  try:
    c = compiled.cost_analysis()
  except Exception:
    c = None
  if isinstance(c, (list, tuple)):
    c = c[0] if c else None
  if not c:
    try:
      import jax
      from jax._src.lib import _jax

      module = compiled.runtime_executable().hlo_modules()[0]
      c = _jax.hlo_module_cost_analysis(jax.local_devices(backend="cpu")[0].client, module)
    except Exception:
      return None
  keep = ("flops", "bytes accessed", "optimal_seconds", "transcendentals")
  return {k: float(c[k]) for k in keep if k in c}


@dataclasses.dataclass
class Report:
  """What one compile found, per device (bytes, FLOPs, seconds: a model of the program)."""

  config: str
  target: str
  device_kind: str
  devices: int
  global_batch: int
  compute_dtype: str
  plan: str
  plan_bytes: int  # the planner's tables + optimiser state on the fullest device
  plan_temporaries: int  # the planner's estimate of the step's temporaries per device
  memory_bytes: int | None  # the chip's
  compile_seconds: float
  fits: bool | None = None
  verdict: str = ""
  memory: dict[str, int] = dataclasses.field(default_factory=dict)
  cost: dict[str, float] | None = None
  collectives: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  # Phase -> {"hbm", "interconnect"} bytes (dlrm_jax.traffic's rule), and the physical need.
  traffic: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
  need: dict[str, int] = dataclasses.field(default_factory=dict)
  roofline: dict[str, float] = dataclasses.field(default_factory=dict)
  # The embedding's phases in seconds: the planner's time model ("planner", slowest
  # device) and the compiled step's traffic at the chip's bandwidths ("compiled").
  embedding_seconds: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  eval_memory: dict[str, int] = dataclasses.field(default_factory=dict)
  eval_compile_seconds: float = 0.0
  versions: dict[str, str] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def compile_train_step(task, batch) -> tuple[Any, float]:
  """`task`'s train step compiled for `batch`'s shapes (arrays or ShapeDtypeStructs,
  split over the mesh as the task splits batches), from shapes alone: nothing is
  allocated; and the seconds the compile took."""
  import jax

  abstract = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=task.batch_sharding)
              for k, v in batch.items()}
  t = time.perf_counter()
  compiled = task.lower_train_step(task.abstract_state(), abstract).compile()
  return compiled, time.perf_counter() - t


def memory_of(compiled) -> dict[str, int]:
  """The compiler's memory figures of a compiled program, per device."""
  m = compiled.memory_analysis()
  fields = {"arguments": "argument_size_in_bytes", "outputs": "output_size_in_bytes",
            "aliased": "alias_size_in_bytes", "temporaries": "temp_size_in_bytes",
            "code": "generated_code_size_in_bytes"}
  out = {k: int(getattr(m, f, 0) or 0) for k, f in fields.items()}
  # Donated arguments alias their outputs: counted once.
  out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] \
      + out["code"]
  return out


def roofline(report: Report, chip: targets_lib.Chip | None) -> dict[str, float]:
  """The step's lower bound per device: the largest of FLOPs / peak FLOP/s, HBM bytes /
  HBM bandwidth and collective bytes / interconnect bandwidth (each printed), and the
  global samples/s that bound allows. The HBM bytes are the traffic model's total
  (`dlrm_jax.traffic`) where the report has one, else XLA's bytes accessed."""
  if chip is None or not report.cost:
    return {}
  hbm = (traffic_lib.totals(report.traffic, {})[0] if report.traffic
         else report.cost.get("bytes accessed", 0.0))
  terms = {
      "compute_s": report.cost.get("flops", 0.0) / chip.flops(report.compute_dtype),
      "hbm_s": hbm / chip.hbm_bytes_per_s,
      "interconnect_s": sum(c["bytes"] for c in report.collectives.values())
      / chip.interconnect_bytes_per_s,
  }
  bound = max(terms.values())
  return {**terms, "step_s": bound,
          "samples_per_s": report.global_batch / bound if bound > 0 else float("inf")}


# The compiled step's phases that the planner's time model covers (`step_time.PHASES`).
EMBEDDING_PHASES = {"lookup": ("lookup",), "exchange": ("exchange forward", "exchange backward"),
                    "sparse update": ("sparse update",)}


def embedding_seconds(report: Report, plan, chip: targets_lib.Chip | None) -> dict:
  """The embedding's phases in seconds per step: the planner's estimate (its time model,
  on the slowest device) and the compiled step's, its traffic per phase at the chip's
  HBM and interconnect bandwidths (each a model, not a measurement)."""
  planner = plan.step_seconds()  # {} where the plan has no bandwidths
  if chip is None or not report.traffic or not planner:
    return {}
  compiled = {phase: sum(report.traffic[p]["hbm"] / chip.hbm_bytes_per_s
                         + report.traffic[p]["interconnect"] / chip.interconnect_bytes_per_s
                         for p in parts if p in report.traffic)
              for phase, parts in EMBEDDING_PHASES.items()}
  return {"planner": planner, "compiled": {**compiled, "total": sum(compiled.values())}}


def compile_config(config, target: targets_lib.Target, *, evaluate: bool = True,
                   name: str = "") -> Report:
  """Plans `config` for `target`, compiles its train step (and evaluation step) from
  shapes and reports. ConfigError for a config that cannot be planned or compiled there
  (a plan over the budget, a batch the devices do not divide)."""
  import jax

  from dlrm_jax.specs import RunSpec
  from dlrm_jax.task import Task

  devices = target.compile_devices()
  config = config.copy_and_resolve_references()
  config.mesh.num_devices = 0  # every device of the target
  run = RunSpec.from_config(config)
  b = run.training.mini_batch_size
  if b % len(devices) or run.training.test_mini_batch_size % len(devices):
    raise ConfigError(f"mini_batch_size={b} and test_mini_batch_size="
                      f"{run.training.test_mini_batch_size} must be multiples of the "
                      f"target's {len(devices)} devices")
  task = Task(run, devices=devices)
  batch = batch_shapes(run)
  report = Report(
      config=name, target=target.name, device_kind=devices[0].device_kind,
      devices=len(devices), global_batch=b, compute_dtype=run.model.compute_dtype,
      plan=task.plan.describe(), plan_bytes=int(max(task.plan.device_bytes())),
      plan_temporaries=task.plan.temporaries,
      memory_bytes=target.memory_bytes, compile_seconds=0.0,
      versions={"jax": jax.__version__, "jaxlib": jax.lib.__version__})
  t = time.perf_counter()
  try:
    compiled, report.compile_seconds = compile_train_step(task, batch)
  except Exception as e:  # the compiler's own verdict (TPU: a program over the HBM)
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower():
      report.compile_seconds = time.perf_counter() - t
      report.fits = False
      report.verdict = f"does not fit: the compiler says {message}"
      return report
    raise
  report.memory = memory_of(compiled)
  report.cost = cost(compiled)
  text = compiled.as_text()
  report.collectives = collectives(text)
  report.traffic = traffic_lib.hlo_traffic(text)
  report.need = traffic_lib.physical_need(run, task.plan, len(devices), task.state_shapes)
  report.roofline = roofline(report, target.chip)
  report.embedding_seconds = embedding_seconds(report, task.plan, target.chip)
  if target.memory_bytes:
    spare = target.memory_bytes - report.memory["total"]
    report.fits = spare >= 0
    report.verdict = (f"fits, {spare / 2**30:.1f} GiB to spare" if spare >= 0 else
                      f"does not fit by {-spare / 2**30:.1f} GiB: try more devices, "
                      "embedding_optimizer=rowwise_adagrad, embedding_dtype=bfloat16 or a "
                      "smaller mini_batch_size")
  if evaluate:
    eval_b = run.training.test_mini_batch_size
    eval_batch = {k: jax.ShapeDtypeStruct((eval_b,) + v.shape[1:], v.dtype,
                                          sharding=task.batch_sharding)
                  for k, v in batch.items() if k != "label"}
    state = task.abstract_state()
    t = time.perf_counter()
    compiled_eval = task._predict_jit.lower(state.params, state.tables, eval_batch).compile()
    report.eval_compile_seconds = time.perf_counter() - t
    report.eval_memory = memory_of(compiled_eval)
  return report


def _size(n: float | None) -> str:
  from dlrm_jax.embedding.planner import fmt_bytes

  return "-" if n is None else fmt_bytes(n, digits=2)


def _si(n: float, unit: str) -> str:
  for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {prefix}{unit}"
  return f"{n:.0f} {unit}"


def _ratio(estimate: float, actual: float) -> str:
  return f"{estimate / actual - 1:+.0%}" if actual else "-"


def format_report(r: Report) -> str:
  """The report as text for a terminal."""
  lines = [f"{r.config or 'config'} on {r.target}: {r.devices} x {r.device_kind}, global "
           f"batch {r.global_batch:,}, {r.compute_dtype} compute (jax {r.versions.get('jax')})",
           r.plan, "",
           f"compile: {r.compile_seconds:.1f} s (train step)"
           + (f", {r.eval_compile_seconds:.1f} s (eval step)" if r.eval_memory else "")]
  if r.memory:
    m = r.memory
    lines += ["memory per device (the compiler's figures):",
              f"  arguments    {_size(m['arguments']):>12}   (planner: tables + optimiser "
              f"state {_size(r.plan_bytes)})",
              f"  outputs      {_size(m['outputs']):>12}",
              f"  aliased      {_size(m['aliased']):>12}   (donated state, counted once)",
              f"  temporaries  {_size(m['temporaries']):>12}   (planner's estimate "
              f"{_size(r.plan_temporaries)}, {_ratio(r.plan_temporaries, m['temporaries'])})",
              f"  total        {_size(m['total']):>12}   of {_size(r.memory_bytes)}"]
    if r.eval_memory:
      lines.append(f"  eval step    {_size(r.eval_memory['total']):>12}   total")
  lines.append(f"verdict: {r.verdict or 'no memory figure for this target'}")
  if r.cost:
    lines.append(f"cost per device (XLA's model): {_si(r.cost.get('flops', 0), 'FLOP')}, "
                 f"{_si(r.cost.get('bytes accessed', 0), 'B')} accessed")
  elif r.memory:
    lines.append("cost: this backend gives no cost analysis here")
  if r.collectives:
    lines.append("collectives per device per step (count, bytes of results):")
    lines += [f"  {k:<19}{v['count']:>4}  {_size(v['bytes']):>12}"
              for k, v in r.collectives.items()]
  elif r.memory:
    lines.append("collectives: none")
  if r.traffic:
    lines += [TRAFFIC_TITLE + ":", traffic_lib.format_table(r.traffic, r.need)]
  if r.roofline:
    f = r.roofline
    hbm = (f"traffic model, {_size(traffic_lib.totals(r.traffic, {})[0])}; XLA's bytes "
           f"accessed {_size(r.cost.get('bytes accessed', 0))}" if r.traffic else
           "XLA's bytes accessed")
    lines += ["roofline lower bound per step (a model from the chip's peak figures):",
              f"  compute      {f['compute_s'] * 1e3:10.3f} ms",
              f"  HBM          {f['hbm_s'] * 1e3:10.3f} ms   ({hbm})",
              f"  interconnect {f['interconnect_s'] * 1e3:10.3f} ms",
              f"  step >= {f['step_s'] * 1e3:.3f} ms: at most {f['samples_per_s']:,.0f} "
              f"samples/s ({f['samples_per_s'] / r.devices:,.0f} per device)"]
  if r.embedding_seconds:
    lines.append("the embedding's phases per step (models: the planner's estimate for its "
                 "slowest device; the compiled step's traffic at the chip's bandwidths):")
    for source, phases in r.embedding_seconds.items():
      lines.append(f"  {source:<9} " + ", ".join(
          f"{k} {v * 1e3:.3f} ms" for k, v in phases.items()))
  return "\n".join(lines)


TRAFFIC_TITLE = ("traffic per device per step by phase (the rule in dlrm_jax.traffic; a "
                 "model, not a measurement)")
MD_HEADER = ("| config / target | devices | arguments | temporaries (planner's estimate) | "
             "total | memory | fits | FLOPs | bytes accessed | HBM traffic (x need) | "
             "collectives (count, bytes) | roofline samples/s | compile (s) |\n"
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(r: Report) -> str:
  """One row of MD_HEADER's table."""
  m, c = r.memory, r.cost or {}
  coll = ", ".join(f"{v['count']} {k} {_size(v['bytes'])}" for k, v in r.collectives.items())
  fits = "yes" if r.fits else ("no" if r.fits is False else "-")
  rate = r.roofline.get("samples_per_s")
  hbm = "-"
  if r.traffic:
    moved, _, need = traffic_lib.totals(r.traffic, r.need)
    hbm = f"{_size(moved)} ({moved / need:.1f}x)" if need else _size(moved)
  return (f"| {r.config} / {r.target} | {r.devices} | {_size(m.get('arguments'))} | "
          f"{_size(m.get('temporaries'))} ({_size(r.plan_temporaries)}) | "
          f"{_size(m.get('total'))} | {_size(r.memory_bytes)} | {fits} | "
          f"{_si(c['flops'], 'FLOP') if 'flops' in c else '-'} | "
          f"{_si(c['bytes accessed'], 'B') if 'bytes accessed' in c else '-'} | {hbm} | "
          f"{coll or '-'} | {f'{rate:,.0f}' if rate else '-'} | {r.compile_seconds:.0f} |")


def write(report: Report, out: str) -> None:
  """compile.json and compile.md (the report's row, then its traffic table) in `out`."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "compile.json"), "w") as f:
    json.dump(report.to_json(), f, indent=1)
  with open(os.path.join(out, "compile.md"), "w") as f:
    f.write(MD_HEADER + "\n" + markdown_row(report) + "\n")
    if report.traffic:
      f.write(f"\n{TRAFFIC_TITLE}:\n\n"
              + traffic_lib.format_table(report.traffic, report.need) + "\n")


def main(argv) -> None:
  from absl import app, flags, logging

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # JAX's and libtpu's INFO start-up news
  prepare_backends()
  f = flags.FLAGS
  name = os.path.splitext(os.path.basename(f["config"].config_filename))[0]
  try:
    target = targets_lib.get(f.target, f.slices)
    report = compile_config(f.config, target, evaluate=f.eval, name=name)
  except ConfigError as e:
    raise SystemExit(f"error: {e}") from None
  print(format_report(report), flush=True)
  if f.out:
    write(report, f.out)
    print(f"wrote {f.out}/compile.json and compile.md")


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG, "Training configuration file.",
      lock_config=False)
  flags.DEFINE_string("target", "v5p-8", "What to compile for: "
                      + ", ".join(targets_lib.EXAMPLES) + " (see dlrm_jax.targets).")
  flags.DEFINE_integer("slices", 1, "TPU slices of the target (multi-slice).")
  flags.DEFINE_string("out", "", "Directory for compile.json and compile.md.")
  flags.DEFINE_bool("eval", True, "Also compile the evaluation step.")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
