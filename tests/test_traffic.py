"""The traffic model of a compiled step (dlrm_jax.traffic): its rule on hand-written HLO,
and a real compile's phases and totals."""

import pytest

from conftest import load_config
from dlrm_jax import compile as compile_lib
from dlrm_jax import profiling, targets, traffic

_OP = 'metadata={op_name="jit(train_step)/%s/x"}'


def _module(entry: str, *computations: str) -> str:
  return "HloModule m\n\n" + "\n\n".join(computations) + (
      "\n\nENTRY %main (p: f32[8]) -> f32[8] {\n" + entry + "\n}\n")


def test_a_gather_counts_its_rows_not_its_operand():
  """A gather of 16 rows of 8 floats from a 1M-row table: the rows read, the result
  written and the indices, 1 KiB, not the table's 32 MB (XLA's bytes accessed)."""
  hlo = _module(f"""
  %table = f32[1000000,8]{{1,0}} parameter(0)
  %ids = s32[16,1]{{1,0}} parameter(1)
  ROOT %g = f32[16,8]{{1,0}} gather(%table, %ids), offset_dims={{1}}, collapsed_slice_dims={{0}}, start_index_map={{0}}, index_vector_dim=1, slice_sizes={{1,8}}, {_OP % 'lookup'}""")
  assert traffic.hlo_traffic(hlo) == {"lookup": {"hbm": 2 * 16 * 8 * 4 + 16 * 4,
                                                 "interconnect": 0}}


FUSED = """%fused_update (param_0: f32[1000000,8], param_1: s32[16,1], param_2: f32[16,8]) -> f32[1000000,8] {
  %param_0 = f32[1000000,8]{1,0} parameter(0)
  %param_1 = s32[16,1]{1,0} parameter(1)
  %param_2 = f32[16,8]{1,0} parameter(2)
  %rows = f32[16,8]{1,0} gather(%param_0, %param_1), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,8}, metadata={op_name="jit(train_step)/sparse update/gather"}
  %new = f32[16,8]{1,0} subtract(%rows, %param_2), metadata={op_name="jit(train_step)/sparse update/sub"}
  %b = f32[16,8]{1,0} bitcast(%new)
  ROOT %s = f32[1000000,8]{1,0} scatter(%param_0, %param_1, %b), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%add, metadata={op_name="jit(train_step)/sparse update/scatter"}
}

%fused_mlp (param_0: f32[64,32], param_1: f32[32,32]) -> f32[64,32] {
  %param_0 = f32[64,32]{1,0} parameter(0)
  %param_1 = f32[32,32]{1,0} parameter(1)
  %d = f32[64,32]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %m = f32[64,32]{1,0} multiply(%d, %d)
  ROOT %r = f32[64,32]{1,0} maximum(%m, %d)
}"""


def test_a_fusion_counts_once_and_an_indexed_table_by_its_rows():
  """A fusion counts its parameters and its result, not its three inner ops; a table
  that the fusion only gathers from and scatters into counts the rows gathered and the
  rows written (an in-place result), not 32 MB twice."""
  hlo = _module(f"""
  %x = f32[64,32]{{1,0}} parameter(0)
  %w = f32[32,32]{{1,0}} parameter(1)
  %table = f32[1000000,8]{{1,0}} parameter(2)
  %ids = s32[16,1]{{1,0}} parameter(3)
  %grad = f32[16,8]{{1,0}} parameter(4)
  %h = f32[64,32]{{1,0}} fusion(%x, %w), kind=kLoop, calls=%fused_mlp, {_OP % 'jvp(dense)'}
  ROOT %t = f32[1000000,8]{{1,0}} fusion(%table, %ids, %grad), kind=kLoop, calls=%fused_update, {_OP % 'sparse update'}""",
                FUSED)
  rows = 16 * 8 * 4
  assert traffic.hlo_traffic(hlo) == {
      "dense forward": {"hbm": (64 * 32 + 32 * 32 + 64 * 32) * 4, "interconnect": 0},
      # rows gathered, ids, gradients, rows written
      "sparse update": {"hbm": rows + 16 * 4 + rows + rows, "interconnect": 0}}


SLICED = """%fused_slice (param_0: f32[8192,512], param_1: f32[8192,512]) -> f32[8192,64] {
  %param_0 = f32[8192,512]{1,0} parameter(0)
  %param_1 = f32[8192,512]{1,0} parameter(1)
  %sum = f32[8192,512]{1,0} add(%param_0, %param_1)
  %twice = f32[8192,512]{1,0} multiply(%sum, %param_1)
  ROOT %part = f32[8192,64]{1,0} slice(%twice), slice={[0:8192], [128:192]}
}

%fused_halves (param_0: f32[8192,128]) -> f32[8192,64] {
  %param_0 = f32[8192,128]{1,0} parameter(0)
  %e = f32[8192,128]{1,0} exponential(%param_0)
  %left = f32[8192,64]{1,0} slice(%e), slice={[0:8192], [0:64]}
  %right = f32[8192,64]{1,0} slice(%e), slice={[0:8192], [64:128]}
  ROOT %sum = f32[8192,64]{1,0} add(%left, %right)
}

%fused_bias (param_0: f32[8192,512], param_1: f32[8192,512]) -> f32[64] {
  %param_0 = f32[8192,512]{1,0} parameter(0)
  %param_1 = f32[8192,512]{1,0} parameter(1)
  %sum = f32[8192,512]{1,0} add(%param_0, %param_1)
  %part = f32[8192,64]{1,0} slice(%sum), slice={[0:8192], [128:192]}
  %zero = f32[] constant(0)
  ROOT %bias = f32[64]{0} reduce(%part, %zero), dimensions={0}, to_apply=%add
}

%fused_window (param_0: f32[8192,512]) -> f32[8192,64] {
  %param_0 = f32[8192,512]{1,0} parameter(0)
  %zero = f32[] constant(0)
  ROOT %w = f32[8192,64]{1,0} reduce-window(%param_0, %zero), window={size=1x8 stride=1x8}, to_apply=%add
}"""


def test_a_fusion_reads_of_its_parameters_what_its_outputs_need():
  """A fusion computes each output element once from the elements it needs: a slice of
  a sum of two [8192, 512] parameters reads each where the slice is (once per path to
  the output: param_1 twice), not whole; a parameter whose one use reaches the output
  by two slices twice; a reduction over the slice all of the slice's elements, and no
  more; a window over a parameter (no per-element op) all of it."""
  out = 8192 * 64 * 4
  hlo = _module(f"""
  %a = f32[8192,512]{{1,0}} parameter(0)
  %b = f32[8192,512]{{1,0}} parameter(1)
  ROOT %s = f32[8192,64]{{1,0}} fusion(%a, %b), kind=kLoop, calls=%fused_slice, {_OP % 'jvp(dense)'}""",
                SLICED)
  assert traffic.hlo_traffic(hlo) == {"dense forward": {"hbm": out + 2 * out + out,
                                                        "interconnect": 0}}
  # One use, two paths to the output (both halves of it added): read twice per element.
  hlo = _module(f"""
  %a = f32[8192,128]{{1,0}} parameter(0)
  ROOT %h = f32[8192,64]{{1,0}} fusion(%a), kind=kLoop, calls=%fused_halves, {_OP % 'jvp(dense)'}""",
                SLICED)
  assert traffic.hlo_traffic(hlo) == {"dense forward": {"hbm": 2 * out + out,
                                                        "interconnect": 0}}
  hlo = _module(f"""
  %a = f32[8192,512]{{1,0}} parameter(0)
  %b = f32[8192,512]{{1,0}} parameter(1)
  ROOT %r = f32[64]{{0}} fusion(%a, %b), kind=kInput, calls=%fused_bias, {_OP % 'jvp(dense)'}""",
                SLICED)
  assert traffic.hlo_traffic(hlo) == {"dense forward": {"hbm": 2 * out + 64 * 4,
                                                        "interconnect": 0}}
  hlo = _module(f"""
  %a = f32[8192,512]{{1,0}} parameter(0)
  ROOT %w = f32[8192,64]{{1,0}} fusion(%a), kind=kLoop, calls=%fused_window, {_OP % 'jvp(dense)'}""",
                SLICED)
  assert traffic.hlo_traffic(hlo) == {"dense forward": {"hbm": 8192 * 512 * 4 + out,
                                                        "interconnect": 0}}


def test_collectives_count_their_results_as_interconnect_bytes():
  """A collective's result bytes are interconnect bytes (an async start's outputs, not
  the operands its tuple carries), its operands and results HBM bytes; a while body is
  counted once; bookkeeping counts nothing; merged op names find their phase."""
  body = """%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]{0}) parameter(0)
  %v = f32[256]{0} get-tuple-element(%p), index=1
  %n = s32[] get-tuple-element(%p), index=0
  %w = f32[256]{0} add(%v, %v), metadata={op_name="jit(train_step)/dense update/add"}
  ROOT %t = (s32[], f32[256]{0}) tuple(%n, %w)
}"""
  merged = "jit(train_step)/(transpose(jvp(dense))/reduce_sum:transpose(jvp(dense))/dot)"
  hlo = _module(f"""
  %g = f32[1000]{{0}} parameter(0)
  %r = f32[1000]{{0}} all-reduce(%g), replica_groups={{}}, to_apply=%add, metadata={{op_name="{merged}"}}
  %e = f32[4,8]{{1,0}} parameter(1)
  %s = ((f32[4,8]{{1,0}}), f32[32,8]{{1,0}}) all-gather-start(%e), dimensions={{0}}, {_OP % 'transpose(jvp(exchange))'}
  %d = f32[32,8]{{1,0}} all-gather-done(%s), {_OP % 'transpose(jvp(exchange))'}
  %c = f32[32,8]{{1,0}} bitcast(%d)
  %i = (s32[], f32[256]{{0}}) parameter(2)
  %l = (s32[], f32[256]{{0}}) while(%i), condition=%cond, body=%body
  ROOT %k = f32[8]{{0}} constant({{1,2,3,4,5,6,7,8}})""", body)
  assert profiling.phase_of(merged) == "dense backward"
  assert traffic.hlo_traffic(hlo) == {
      "exchange backward": {"hbm": (4 * 8 + 32 * 8) * 4, "interconnect": 32 * 8 * 4},
      "dense backward": {"hbm": 2 * 4000, "interconnect": 4000},
      "dense update": {"hbm": 3 * 256 * 4, "interconnect": 0}}


def _mixed(rows: int = 100_000):
  """configs/tiny.py on 8 devices, D = 8, with four tables of `rows` rows, one of each
  sharded type, and four small replicated ones."""
  c = load_config("tiny", devices=0)
  c.arch_sparse_feature_size, c.arch_mlp_bot = 8, "13-8-8"
  c.arch_embedding_size = "-".join([str(rows)] * 4 + ["50"] * 4)
  c.sharding.min_column_width = 1
  c.sharding.overrides = ("t0:row_wise,t1:table_wise:1,t2:table_wise:5,t3:column_wise,"
                          "t4:replicated,t5:replicated,t6:replicated,t7:replicated")
  return c


def test_a_compiled_step_has_every_phase_and_consistent_totals():
  """The train step compiled for 8 CPU devices (one table of each sharded type): every
  phase moves bytes, the report's total is the sum of its phases, and the lookup's bytes
  are of the order of the batch's ids (global: row-wise and column-wise tables gather
  every id on every device), far below the tables' bytes that XLA's figure counts."""
  c = _mixed()
  r = compile_lib.compile_config(c, targets.get("cpu"), evaluate=False, name="tiny")
  phases = set(r.traffic)
  for p in ("lookup", "exchange forward", "exchange backward", "dense forward",
            "dense backward", "dense update", "sparse update"):
    assert r.traffic[p]["hbm"] > 0 and r.need[p] > 0, (p, r.traffic, r.need)
  assert phases <= set(traffic.PHASES)
  hbm, link, need = traffic.totals(r.traffic, r.need)
  assert hbm == sum(v["hbm"] for v in r.traffic.values())
  assert link == sum(v["bytes"] for v in r.collectives.values())
  d, batch, ids = 8, c.mini_batch_size, c.mini_batch_size * 8
  # Each id's row read and written at most a few times (row-wise: every device gathers
  # the global batch's ids of its table), its ids with it; a table is 3.2 MB.
  assert r.traffic["lookup"]["hbm"] <= 4 * ids * (d * 4 + 4)
  assert r.traffic["lookup"]["hbm"] < 100_000 * d * 4 / 10
  assert r.cost["bytes accessed"] > 100_000 * d * 4  # XLA's figure counts the tables
  assert r.need["lookup"] == batch // 8 * 8 * d * 4  # 8 features, one id each, float32
  text = compile_lib.format_report(r)
  assert compile_lib.TRAFFIC_TITLE in text and f"HBM bytes / physical need: " \
      f"{hbm / need:.1f}x" in text


NESTED = """%scatter_rows (param_0: f32[1000000,8], param_1: s32[16,1], param_2: f32[16,8]) -> f32[1000000,8] {
  %param_0 = f32[1000000,8]{1,0} parameter(0)
  %param_1 = s32[16,1]{1,0} parameter(1)
  %param_2 = f32[16,8]{1,0} parameter(2)
  ROOT %s = f32[1000000,8]{1,0} scatter(%param_0, %param_1, %param_2), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%add, metadata={op_name="jit(train_step)/sparse update/scatter-add"}
}

%fused_step (param_0.1: f32[1000000,8], param_1.1: s32[16,1], param_2.1: f32[16,8]) -> f32[1000000,8] {
  %param_0.1 = f32[1000000,8]{1,0} parameter(0)
  %param_1.1 = s32[16,1]{1,0} parameter(1)
  %param_2.1 = f32[16,8]{1,0} parameter(2)
  %neg = f32[16,8]{1,0} negate(%param_2.1), metadata={op_name="jit(train_step)/sparse update/neg"}
  ROOT %inner = f32[1000000,8]{1,0} fusion(%param_0.1, %param_1.1, %neg), kind=kCustom, calls=%scatter_rows, metadata={op_name="jit(train_step)/sparse update/scatter-add"}
}"""


def test_a_scatter_nested_in_a_fusion_counts_its_rows():
  """XLA:TPU nests a scatter's own fusion inside the fusion that computes its updates:
  the table passed through counts the rows written, not its 32 MB twice."""
  hlo = _module(f"""
  %table = f32[1000000,8]{{1,0}} parameter(0)
  %ids = s32[16,1]{{1,0}} parameter(1)
  %grad = f32[16,8]{{1,0}} parameter(2)
  ROOT %t = f32[1000000,8]{{1,0}} fusion(%table, %ids, %grad), kind=kCustom, calls=%fused_step, {_OP % 'sparse update'}""",
                NESTED)
  rows = 16 * 8 * 4
  # ids and gradients read, the rows written
  assert traffic.hlo_traffic(hlo) == {"sparse update": {"hbm": 16 * 4 + rows + rows,
                                                        "interconnect": 0}}
