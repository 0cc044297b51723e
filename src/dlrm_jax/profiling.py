"""Where a step's time goes, by phase: a `jax.profiler` trace summarised per named scope.

The train step names its phases with `jax.named_scope` (`dlrm_jax.functional`):
lookup, exchange, dense (the MLPs and the interaction), dense update and
sparse update. XLA keeps a scope in every instruction's `op_name` metadata,
wrapped as `jvp(dense)` in the forward pass and `transpose(jvp(dense))` in the
backward one, and the profiler's events name the instruction they ran
(`hlo_op`). `phase_times` joins the two: the compiled program's text gives
each instruction's phase, a trace of a few steps gives each instruction's
time, on a GPU from the device's "XLA Ops" line, on a CPU from the threads
that ran the program's thunks.

    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        state, out = compiled(state, batch)
      jax.block_until_ready(out)
    times = phase_times(trace_dir, compiled.as_text())  # {"dense backward": s, ...}
"""

from __future__ import annotations

import collections
import glob
import os
import re
import warnings

PHASES = ("lookup", "exchange", "dense", "dense update", "sparse update")
# Phases that run in the forward and the backward pass, reported apart.
DIFFERENTIATED = ("exchange", "dense")
OTHER = "other"
# The phases as reported, the differentiated ones split into their two passes.
REPORTED = tuple(f"{p} {d}" if p in DIFFERENTIATED else p for p in PHASES
                 for d in (("forward", "backward") if p in DIFFERENTIATED else ("",)))

_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name="([^"]*)"', re.M)
_WRAPPED = re.compile(r"^((?:\w+\()*)([^()]*)\)*$")


def phase_of(op_name: str) -> str:
  """The phase of an instruction's `op_name` ("jit(step)/transpose(jvp(dense))/dot" ->
  "dense backward"); OTHER when no phase scope encloses it."""
  for part in op_name.split("/"):
    # Ops XLA merged (GPU's combined all-reduce) name theirs "(a/b:c/d)".
    m = _WRAPPED.match(part.lstrip("("))
    if m is None:
      continue
    wrappers, core = m.groups()
    if core in PHASES:
      if core in DIFFERENTIATED:
        return f"{core} {'backward' if 'transpose(' in wrappers else 'forward'}"
      return core
  return OTHER


def instruction_phases(hlo_text: str) -> dict[str, str]:
  """Instruction name -> phase, for every instruction of a compiled program's text
  (`Compiled.as_text()`) that carries an op_name."""
  return {name: phase_of(op) for name, op in _INSTRUCTION.findall(hlo_text)}


def latest_trace(trace_dir: str) -> str:
  """The newest `*.xplane.pb` that `jax.profiler.trace(trace_dir)` wrote."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb trace under {trace_dir}")
  return max(files, key=os.path.getmtime)


def op_events(path: str):
  """(hlo_op, hlo_module, seconds) of every XLA op event in a trace file: the device
  planes' "XLA Ops" lines where there are some (GPU, TPU), else every line whose events
  name an hlo_op (CPU threads)."""
  from jax.profiler import ProfileData

  planes = list(ProfileData.from_file(path).planes)
  device_lines = [line for plane in planes if plane.name.startswith("/device:")
                  for line in plane.lines if line.name == "XLA Ops"]
  lines = device_lines or [line for plane in planes for line in plane.lines]
  for line in lines:
    for event in line.events:
      with warnings.catch_warnings():
        # jaxlib >= 0.12's stats iterator is a type without __module__, which Python
        # 3.12 warns about when it is first made (jaxlib's, not ours to change).
        warnings.filterwarnings("ignore", "builtin type event_stats", DeprecationWarning)
        stats = dict(event.stats)
      if "hlo_op" in stats:
        yield str(stats["hlo_op"]), str(stats.get("hlo_module", "")), event.duration_ns * 1e-9


def phase_times(trace_dir: str, hlo_text: str, module: str | None = None) -> dict[str, float]:
  """Seconds of op time per phase in the newest trace under `trace_dir`, for the
  program whose compiled text is `hlo_text` (events of other programs are left out
  when `module`, its HLO module name such as "jit_train_step", is given). On a CPU,
  ops of one step overlap on several threads, so the sum can exceed the wall time:
  compare the phases as shares."""
  phases = instruction_phases(hlo_text)
  out: dict[str, float] = collections.defaultdict(float)
  for op, mod, seconds in op_events(latest_trace(trace_dir)):
    if module is not None and mod != module:
      continue
    out[phases.get(op, OTHER)] += seconds
  return dict(out)


def format_phases(times: dict[str, float], steps: int) -> str:
  """A Markdown table of per-step milliseconds and shares of each phase."""
  total = sum(times.values()) or 1.0
  rows = [(name, times[name]) for name in REPORTED + (OTHER,) if name in times]
  return "| phase | ms per step | share |\n|---|---|---|\n" + "\n".join(
      f"| {name} | {t / steps * 1e3:.2f} | {t / total:.0%} |" for name, t in rows)
