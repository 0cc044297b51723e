"""Memory and interconnect traffic of a compiled step, per phase, from its HLO text.

XLA's cost analysis ("bytes accessed") counts every operand of every op whole: a
gather of 200 rows from a 40M-row table counts the table. `hlo_traffic` counts
instead, per device per step, the bytes each instruction of a compiled program
(`Compiled.as_text()`) moves by one fixed rule, and files them under the train
step's phases (`dlrm_jax.profiling.phase_of` of the instruction's op_name).
`physical_need` gives beside it what the step cannot do without, from the
config and the plan. Both are models, not measurements.

The rule (bytes of the logical shapes: TPU's tile padding and memory spaces are
not seen):

- An op counts its operands and its result(s).
- An operand that is only indexed counts the rows the op touches, not its
  whole size: a gather's, dynamic-slice's or slice's data operand counts the
  rows read (the result's bytes); the in-place operand of a scatter or
  dynamic-update-slice counts nothing, and its result the rows written (the
  updates' bytes). Their other operands (indices, offsets, updates) count
  whole. So a gather counts its result twice (the rows read, the result
  written) plus its indices; a scatter its updates twice (read, and written
  into the operand's rows) plus its indices, whatever the operand's size. (A
  scatter-add also reads the rows it adds to: not counted.)
- A fusion (and XLA:GPU's async fusion-start) counts once, as one op: its
  operands (the fused computation's parameters) and its result(s), not its
  inner ops. A parameter whose every use inside (looking through bitcasts, and
  into fusions nested in it, as XLA:TPU nests a scatter's fusion in the one that
  computes its updates) is as the data operand of a gather, dynamic-slice or
  slice, or the in-place operand of a scatter or dynamic-update-slice, is only
  indexed: it counts the
  rows those ops read, as above, and a result that is an in-place update of it
  (through bitcasts and chains of updates) counts the updates' bytes. Each
  part goes to the phase of the instruction inside that makes it (the gather,
  the scatter, the output's producer), or the fusion's where that has no
  op_name; the other parameters go to the fusion's. A fusion computes each
  output element once, so any other parameter counts the elements its outputs
  read of it (at most all of it), counted back from the outputs: an op that
  reads one element of an operand per element it makes (element-wise ops,
  slices, pads, concatenations, transposes, broadcasts, gathers) reads as many
  of each operand as are read of it, once per use; a reduce all the elements
  it reduces into those; any other op (a dot, a window, a sort) its operands
  whole. So a slice of a sum of large arrays reads each where the slice is,
  also where a reduction of the slice follows.
- A collective (all-to-all, all-gather, reduce-scatter, all-reduce,
  collective-permute, sync or an async start; also one inside a fusion)
  counts its result bytes as interconnect bytes, and its HBM bytes as any op.
  An async start counts its operands and outputs, not the tuple that carries
  both.
- Nothing is counted for parameter, constant, tuple, get-tuple-element,
  bitcast, the asynchronous copies between memory spaces (copy-start /
  copy-done, TPU's slice-start / slice-done), every other async "-done" /
  "-update", after-all, partition-id, replica-id, opt-barrier, add-dependency,
  domain, and TPU's custom-calls ConcatBitcast and AssumeGatherIndicesInBound.
  A while, call, conditional or async-start of a computation counts nothing
  itself: the instructions of every computation it calls (a while's body and
  condition, each branch of a conditional) count once per call site, as if
  run once (trip counts are not known here). Reducers (to_apply) are part of
  their op.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np

from dlrm_jax import profiling

COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "s4": 0.5,
                "u4": 0.5}
SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
PHASES = profiling.REPORTED + (profiling.OTHER,)  # in report order

_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "copy-start",
         "copy-done", "after-all", "partition-id", "replica-id", "opt-barrier",
         "add-dependency", "domain", "while", "call", "conditional", "async-start",
         "slice-start"}
# Markers the compiler turns into nothing (TPU's concatenation of adjacent buffers, its
# promise that gather indices are in bounds).
_FREE_CUSTOM_CALLS = ("ConcatBitcast", "AssumeGatherIndicesInBound")
_INDEXED = {"gather": 0, "dynamic-slice": 0, "slice": 0}  # op -> its data operand
# Ops each element of whose result reads at most one element of each operand.
_PER_ELEMENT = {
    "parameter", "constant", "bitcast", "reshape", "transpose", "broadcast", "slice",
    "dynamic-slice", "pad", "concatenate", "gather", "iota", "copy", "tuple", "convert",
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "select", "compare",
    "negate", "abs", "exponential", "log", "log-plus-one", "exponential-minus-one", "and",
    "or", "not", "xor", "clamp", "power", "sqrt", "rsqrt", "tanh", "logistic", "sign",
    "floor", "ceil", "round-nearest-even", "remainder", "shift-left",
    "shift-right-logical", "shift-right-arithmetic", "is-finite"}
_UPDATES = {"dynamic-update-slice": 1}  # op -> its update operand (scatter: by arity)
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"\b(?:calls|body|condition|true_computation|false_computation)="
                    r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _elements(text: str) -> int:
  """Elements of the first array in a shape's text."""
  m = SHAPE.search(text)
  return int(np.prod([int(d) for d in m.group(2).split(",") if d], dtype=np.int64)) if m else 0


def _itemsize(text: str) -> float:
  m = SHAPE.search(text)
  return _DTYPE_BYTES.get(m.group(1), 4) if m else 4


def shape_bytes(text: str) -> int:
  """Bytes of every array in a shape's text ("(f32[8,4]{1,0}, s32[])" -> 132)."""
  return int(sum(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)
                 * _DTYPE_BYTES.get(dtype, 4) for dtype, dims in SHAPE.findall(text)))


@dataclasses.dataclass
class Instruction:
  """One HLO instruction: its result's shape text, opcode, operand names, the text
  after its operands (attributes) and its op_name ("" where it has none)."""

  name: str
  shape: str
  opcode: str
  operands: list[str]
  attributes: str
  op_name: str
  number: int = -1  # a parameter's

  @property
  def phase(self) -> str:
    return profiling.phase_of(self.op_name) if self.op_name else profiling.OTHER

  @property
  def result_bytes(self) -> int:
    return shape_bytes(self.shape)

  def called(self) -> list[str]:
    """The computations it calls, reducers (to_apply) left out."""
    names = _CALLS.findall(self.attributes)
    for group in _BRANCHES.findall(self.attributes):
      names += [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
    return names


def _split_operands(rest: str) -> tuple[list[str], str]:
  """The operand names of "a, %b), attrs..." and the text after the closing paren."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return re.findall(r"%([\w.\-]+)", rest[:i]), rest[i + 1:]
  return re.findall(r"%([\w.\-]+)", rest), ""


@dataclasses.dataclass
class Computation:
  """An HLO computation: its instructions by name (in text order) and its ROOT's name."""

  instructions: dict[str, Instruction] = dataclasses.field(default_factory=dict)
  root: str = ""

  def users(self) -> dict[str, list[tuple[Instruction, int]]]:
    """Instruction name -> (user, operand position) of each of its uses."""
    out = collections.defaultdict(list)
    for ins in self.instructions.values():
      for i, name in enumerate(ins.operands):
        out[name].append((ins, i))
    return out

  def operand_bytes(self, ins: Instruction, positions=None) -> int:
    names = ins.operands if positions is None else [ins.operands[i] for i in positions]
    return sum(self.instructions[n].result_bytes for n in names if n in self.instructions)


def parse(hlo_text: str) -> tuple[dict[str, Computation], str]:
  """Computation name -> Computation, and the entry computation's name, of a compiled
  program's text."""
  computations: dict[str, Computation] = {}
  entry, current = "", None
  for line in hlo_text.splitlines():
    if not line.startswith((" ", "\t")):
      m = _COMPUTATION.match(line)
      if m:
        current = computations.setdefault(m.group(2), Computation())
        entry = m.group(2) if m.group(1) else entry
      elif line.startswith("}"):
        current = None
      continue
    m = _INSTRUCTION.match(line)
    if m:
      if current is None:  # a fragment without its computation's header
        current = computations.setdefault("", Computation())
      name, shape, opcode, rest = m.groups()
      operands, attributes = _split_operands(rest)
      op = _OP_NAME.search(attributes)
      number = int(rest.split(")")[0]) if opcode == "parameter" else -1
      current.instructions[name] = Instruction(name, shape, opcode, operands, attributes,
                                               op.group(1) if op else "", number)
      if line.lstrip().startswith("ROOT"):
        current.root = name
  return computations, entry


def _top_level(shape: str) -> list[str]:
  """The elements of a tuple shape's text ("(f32[2], (s32[]))" -> ["f32[2]", "(s32[])"]);
  [shape] for an array."""
  shape = shape.strip()
  if not shape.startswith("("):
    return [shape]
  out, depth, start = [], 0, 1
  for i, ch in enumerate(shape):
    depth += {"(": 1, ")": -1, "{": 1, "}": -1, "[": 1, "]": -1}.get(ch, 0)
    if (ch == "," and depth == 1) or (depth == 0 and ch == ")"):
      out.append(shape[start:i].strip())
      start = i + 1
  return [e for e in out if e]


def _collective(opcode: str) -> bool:
  return opcode.removesuffix("-start") in COLLECTIVES


def _async_outputs(ins: Instruction) -> int:
  """Bytes of an async start's outputs: its shape is ((operands), outputs[, contexts])
  or (operands..., outputs..., contexts...); an all-reduce-start's, its outputs alone."""
  parts = _top_level(ins.shape)
  if parts[0].startswith("("):
    return shape_bytes(parts[1]) if len(parts) > 1 else 0
  if ins.opcode == "all-reduce-start" or len(parts) == 1:
    return shape_bytes(ins.shape)
  n = len(ins.operands)
  return sum(shape_bytes(p) for p in parts[n:2 * n])


def _op_traffic(ins: Instruction, comp: Computation) -> tuple[int, int]:
  """(HBM bytes, interconnect bytes) of one instruction that is not a fusion or a call."""
  op = ins.opcode
  if op in _FREE or op.endswith(("-done", "-update")) or (
      op == "custom-call" and any(f'"{t}"' in ins.attributes for t in _FREE_CUSTOM_CALLS)):
    return 0, 0
  if op in _INDEXED:  # the rows read, the result written, the indices (offsets)
    return 2 * ins.result_bytes + comp.operand_bytes(ins, range(1, len(ins.operands))), 0
  if op == "scatter":  # updates read, then written into the operand's rows; indices
    n = (len(ins.operands) - 1) // 2
    return (2 * comp.operand_bytes(ins, range(n + 1, len(ins.operands)))
            + comp.operand_bytes(ins, [n])), 0
  if op in _UPDATES:
    rest = [i for i in range(1, len(ins.operands)) if i != _UPDATES[op]]
    return 2 * comp.operand_bytes(ins, [_UPDATES[op]]) + comp.operand_bytes(ins, rest), 0
  if _collective(op):
    out = _async_outputs(ins) if op.endswith("-start") else ins.result_bytes
    return comp.operand_bytes(ins) + out, out
  return comp.operand_bytes(ins) + ins.result_bytes, 0


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """Each collective kind in a compiled HLO text (in every computation, fusions' too):
  its count and the bytes of its results per device (an async start's outputs only)."""
  out = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
  for comp in parse(hlo_text)[0].values():
    for ins in comp.instructions.values():
      if _collective(ins.opcode):
        kind = out[ins.opcode.removesuffix("-start")]
        kind["count"] += 1
        kind["bytes"] += (_async_outputs(ins) if ins.opcode.endswith("-start")
                          else ins.result_bytes)
  return {k: v for k, v in out.items() if v["count"]}


def _indexed_uses(name: str, users, computations) -> list[Instruction] | None:
  """The gathers, dynamic-slices, scatters and dynamic-update-slices that index the
  fusion parameter `name` (looking through bitcasts, and into fusions nested in the
  fusion, as XLA:TPU nests its scatters), or None where it has another use (then it
  counts whole)."""
  out, todo = [], [name]
  while todo:
    for user, i in users.get(todo.pop(), []):
      op = user.opcode
      nested = _nested_parameter(user, i, computations)
      if op == "bitcast":
        todo.append(user.name)
      elif ((op in _INDEXED or op in _UPDATES) and i == 0) or (
          op == "scatter" and i < (len(user.operands) - 1) // 2):
        out.append(user)
      elif nested is not None:
        uses = _indexed_uses(nested[1], nested[0].users(), computations)
        if uses is None:
          return None
        out += uses
      else:
        return None
  return out or None


def _nested_parameter(ins: Instruction, i: int, computations):
  """(the fused computation, the name of its parameter i) of a nested fusion `ins`;
  None for any other instruction."""
  called = [c for c in ins.called() if c in computations]
  if ins.opcode != "fusion" or not called:
    return None
  comp = computations[called[0]]
  names = [p.name for p in comp.instructions.values()
           if p.opcode == "parameter" and p.number == i]
  return (comp, names[0]) if names else None


def _through_bitcasts(comp: Computation, name: str) -> Instruction:
  ins = comp.instructions[name]
  while ins.opcode == "bitcast" and ins.operands[0] in comp.instructions:
    ins = comp.instructions[ins.operands[0]]
  return ins


def _in_place_rows(comp: Computation, name: str, indexed: set[str],
                   computations) -> tuple[int, str] | None:
  """For a fused computation's output `name`: the bytes it writes where it is an
  in-place update (scatters, dynamic-update-slices, or a nested fusion that is one) of
  an only-indexed parameter, and the phase of the last update; None otherwise."""
  ins = _through_bitcasts(comp, name)
  if ins.opcode == "fusion" and _nested_parameter(ins, 0, computations) is not None:
    nested = computations[[c for c in ins.called() if c in computations][0]]
    inner = {p.name for p in nested.instructions.values() if p.opcode == "parameter"
             and _through_bitcasts(comp, ins.operands[p.number]).name in indexed}
    return _in_place_rows(nested, nested.root, inner, computations)
  written, phase = 0, ins.phase
  while ins.opcode in ("scatter", *_UPDATES):
    if ins.opcode == "scatter":
      n = (len(ins.operands) - 1) // 2
      written += comp.operand_bytes(ins, range(n + 1, len(ins.operands)))
    else:
      written += comp.operand_bytes(ins, [_UPDATES[ins.opcode]])
    ins = _through_bitcasts(comp, ins.operands[0])
  if written and ins.opcode == "parameter" and ins.name in indexed:
    return written, phase
  return None


def _fusion_traffic(ins: Instruction, fused: Computation, computations):
  """(phase, HBM bytes, interconnect bytes) of the parts of one fusion (see the rule)."""
  own = ins.phase
  users = fused.users()
  indexed = set()
  read = _elements_read(fused)
  for p in fused.instructions.values():
    if p.opcode != "parameter":
      continue
    uses = _indexed_uses(p.name, users, computations)
    if uses is None:  # the elements the outputs need, at most all of it (a tuple: whole)
      tuple_shaped = p.shape.lstrip().startswith("(")
      yield own, (p.result_bytes if tuple_shaped else
                  min(p.result_bytes, read[p.name] * _itemsize(p.shape))), 0
      continue
    indexed.add(p.name)
    for use in uses:  # the rows read; scatters' rows written are counted as outputs
      if use.opcode in _INDEXED:
        yield (use.phase if use.op_name else own), use.result_bytes, 0
  root = fused.instructions[fused.root]
  for out in (root.operands if root.opcode == "tuple" else [root.name]):
    rows = _in_place_rows(fused, out, indexed, computations)
    producer = _through_bitcasts(fused, out)
    if rows is not None:
      yield (rows[1] if producer.op_name else own), rows[0], 0
    else:
      yield ((producer.phase if producer.op_name else own),
             fused.instructions[out].result_bytes, 0)
  for inner in fused.instructions.values():
    if _collective(inner.opcode):
      yield (inner.phase if inner.op_name else own), 0, inner.result_bytes


def _elements_read(fused: Computation) -> collections.Counter:
  """Instruction name -> how many of its elements the fused computation's outputs read,
  counted back from each output's elements: an op of `_PER_ELEMENT` reads one element
  of each operand per element of it that is read, a reduce all the elements it reduces
  into those, any other op its operands whole (an operand read by several users, or by
  one along several paths, counts once per read; what an op passes on is at most its
  own size, and the caller caps a parameter's count at its size)."""
  root = fused.instructions[fused.root]
  read = collections.Counter()
  for out in (root.operands if root.opcode == "tuple" else [root.name]):
    read[out] += _elements(fused.instructions[out].shape)
  for ins in reversed(list(fused.instructions.values())):  # users after their operands
    made = min(read[ins.name], _elements(ins.shape))
    for name in ins.operands:
      if name not in fused.instructions:
        continue
      size = _elements(fused.instructions[name].shape)
      if ins.opcode in _PER_ELEMENT:
        read[name] += made
      elif ins.opcode == "reduce":  # each element made reduces size / its size of them
        read[name] += made * size / max(1, _elements(ins.shape))
      else:
        read[name] += size
  return read


def contributions(hlo_text: str):
  """(instruction name, phase, HBM bytes, interconnect bytes) of every counted part of a
  compiled program (`Compiled.as_text()`), by the rule in the module docstring."""
  computations, entry = parse(hlo_text)

  def walk(name: str):
    comp = computations[name]
    for ins in comp.instructions.values():
      called = [c for c in ins.called() if c in computations]
      if ins.opcode in ("fusion", "fusion-start") and called:
        for phase, hbm, link in _fusion_traffic(ins, computations[called[0]], computations):
          yield ins.name, phase, hbm, link
      elif ins.opcode in ("while", "call", "conditional", "async-start"):
        for c in called:
          yield from walk(c)
      else:
        hbm, link = _op_traffic(ins, comp)
        if hbm or link:
          yield ins.name, ins.phase, hbm, link

  if entry:
    yield from walk(entry)


def hlo_traffic(hlo_text: str) -> dict[str, dict[str, int]]:
  """Phase -> {"hbm": bytes, "interconnect": bytes} per device per step of a compiled
  program's text, by the rule in the module docstring; phases in PHASES' order, those
  with no bytes left out."""
  out = {p: {"hbm": 0, "interconnect": 0} for p in PHASES}
  for _, phase, hbm, link in contributions(hlo_text):
    out[phase]["hbm"] += int(hbm)
    out[phase]["interconnect"] += int(link)
  return {p: v for p, v in out.items() if v["hbm"] or v["interconnect"]}


def physical_need(run, plan, devices: int, state=None) -> dict[str, int]:
  """Phase -> bytes per device per step that the train step cannot do without (a model:
  each byte moved once, ids not deduplicated, so the sparse terms are upper bounds):

  - lookup: the rows looked up, read (ids x width x the tables' item size);
  - exchange forward / backward: the pooled vectors of the tables that are not
    replicated, received, and their gradients (batch x width x 4 each);
  - dense forward: the activations written and read once (a rough count of the
    values each sample's MLPs and interaction make) and the weights read;
    dense backward: the activations read, their gradients written and read, the
    weights read and their gradients written;
  - dense update: the dense parameters read and written, their gradients read,
    the optimiser state read and written (from `state`, the train state's
    shapes; 0 without it);
  - sparse update: per id, its gradient row read, the table row and its
    optimiser slots read and written.

  Batch terms are the global batch's over `devices`."""
  import jax
  import jax.numpy as jnp

  from dlrm_jax.embedding.costs import dense_values_per_sample
  from dlrm_jax.embedding.optimizers import SPARSE_OPTIMIZERS
  from dlrm_jax.embedding.planner import REPLICATED

  per_device = plan.batch_size / devices
  item = jnp.dtype(getattr(run.model, "embedding_dtype", "float32")).itemsize
  slots = SPARSE_OPTIMIZERS[run.training.embedding_optimizer]().slot_values_per_row
  ids = [per_device * h for h in plan.lookups]
  vectors = sum(per_device * d * 4 for p, d in zip(plan.placements, plan.dims)
                if p.kind != REPLICATED and plan.num_shards > 1)
  weights = opt = 0
  if state is not None:
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    opt = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state)
              if hasattr(x, "dtype"))
  acts = (per_device * dense_values_per_sample(run.model)
          * jnp.dtype(getattr(run.model, "compute_dtype", "float32")).itemsize)
  need = {
      "lookup": sum(n * d * item for n, d in zip(ids, plan.dims)),
      "exchange forward": vectors, "exchange backward": vectors,
      "dense forward": 2 * acts + weights, "dense backward": 3 * acts + 2 * weights,
      "dense update": 3 * weights + 2 * opt,
      "sparse update": sum(n * (d * 4 + 2 * d * item + 2 * slots(d) * 4)
                           for n, d in zip(ids, plan.dims)),
  }
  return {k: int(v) for k, v in need.items()}


def _fmt(n: float) -> str:
  from dlrm_jax.embedding.planner import fmt_bytes

  return fmt_bytes(n, digits=2) if n else "-"


def format_table(traffic: dict[str, dict[str, int]], need: dict[str, int]) -> str:
  """A Markdown table of `hlo_traffic`'s bytes and `physical_need`'s per phase, with a
  total row and the ratio of the total HBM bytes to the total need."""
  rows = ["| phase | HBM | interconnect | physical need |", "|---|---|---|---|"]
  for p in PHASES:
    t = traffic.get(p, {})
    if t or need.get(p):
      rows.append(f"| {p} | {_fmt(t.get('hbm', 0))} | {_fmt(t.get('interconnect', 0))} | "
                  f"{_fmt(need.get(p, 0))} |")
  hbm, link, total_need = totals(traffic, need)
  rows.append(f"| total | {_fmt(hbm)} | {_fmt(link)} | {_fmt(total_need)} |")
  if total_need:
    rows.append(f"\nHBM bytes / physical need: {hbm / total_need:.1f}x")
  return "\n".join(rows)


def totals(traffic: dict[str, dict[str, int]], need: dict[str, int]) -> tuple[int, int, int]:
  """(HBM bytes, interconnect bytes, physical need) summed over the phases."""
  return (sum(t["hbm"] for t in traffic.values()),
          sum(t["interconnect"] for t in traffic.values()), sum(need.values()))
