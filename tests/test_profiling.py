"""Step time by phase from a profiler trace (dlrm_jax.profiling)."""

import jax
import jax.numpy as jnp
import pytest

from dlrm_jax.data import RandomData
from dlrm_jax.profiling import OTHER, format_phases, instruction_phases, phase_of, phase_times
from dlrm_jax.task import Task


@pytest.mark.parametrize("op_name,phase", [
    ("jit(train_step)/lookup/jit(_take)/gather", "lookup"),
    ("jit(train_step)/jvp(dense)/jit(relu)/max", "dense forward"),
    ("jit(train_step)/transpose(jvp(dense))/bid,bjd->bij/dot_general", "dense backward"),
    ("jit(train_step)/transpose(jvp(exchange))/all_to_all", "exchange backward"),
    ("jit(train_step)/jvp(exchange)/shard_map", "exchange forward"),
    ("jit(train_step)/sparse update/scatter", "sparse update"),
    ("jit(train_step)/dense update/mul", "dense update"),
    ("jit(train_step)/add", OTHER),
    ("state.params['top']['layers'][2]['bias'].value", OTHER),
])
def test_phase_of_op_names(op_name, phase):
  assert phase_of(op_name) == phase


def test_train_step_phases_from_a_trace(tiny_config, tmp_path):
  task = Task(tiny_config)
  state = task.init_state(0)
  data = RandomData(task.spec.table_rows, task.spec.num_dense, 64, seed=0)
  batch = task.device_batch(data.batch(0))
  compiled = task.lower_train_step(state, batch).compile()
  phases = instruction_phases(compiled.as_text())
  assert {"lookup", "dense forward", "dense backward", "sparse update"} <= set(phases.values())
  state, out = compiled(state, batch)  # warm
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      state, out = compiled(state, batch)
    jax.block_until_ready(out)
  times = phase_times(str(tmp_path), compiled.as_text())
  for phase in ("lookup", "dense forward", "dense backward", "sparse update"):
    assert times.get(phase, 0.0) > 0.0, times
  table = format_phases(times, steps=3)
  assert table.splitlines()[0] == "| phase | ms per step | share |"
  assert "| dense backward |" in table


def test_other_programs_are_left_out_by_module(tmp_path):
  f = jax.jit(lambda x: jnp.sin(x) @ x)
  g = jax.jit(lambda x: jnp.cos(x) @ x)
  x = jnp.ones((64, 64))
  f(x).block_until_ready(), g(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    f(x).block_until_ready()
    g(x).block_until_ready()
  text = f.lower(x).compile().as_text()
  assert sum(phase_times(str(tmp_path), text, module="jit__lambda").values()) > 0
  assert phase_times(str(tmp_path), text, module="jit_missing") == {}
