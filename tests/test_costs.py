"""The planner keeps room for the train step: its temporaries (dlrm_jax.embedding.costs)
and the dense network's state come out of a device's budget before tables are placed."""

import dataclasses

import numpy as np
import pytest

from conftest import load_config
from dlrm_jax.config import ConfigError
from dlrm_jax.embedding import costs
from dlrm_jax.embedding.optimizers import SPARSE_OPTIMIZERS
from dlrm_jax.specs import RunSpec
from dlrm_jax.task import Task, dlrm_parts, make_plan

MiB = 2**20


def _run(rows="400000-300000-200000-100000-64-40-30-20", batch=4096):
  c = load_config("tiny", devices=8)
  c.arch_embedding_size = rows
  c.mini_batch_size = c.test_mini_batch_size = batch
  c.embedding_optimizer = "adagrad"  # per element: state the tables' size
  return RunSpec.from_config(c)


def test_the_plan_states_and_counts_the_steps_temporaries():
  run = _run()
  collection = dlrm_parts(run).collection
  plan = make_plan(run, collection, 8, memory=4096 * MiB, dense=(1000, 3000))
  slots = SPARSE_OPTIMIZERS["adagrad"]().slot_values_per_row
  assert plan.temporaries == costs.step_temporaries(plan, run.model, slots, 1000,
                                                    run.sharding.row_wise_capacity, 1) > 0
  assert plan.dense_bytes == 3000
  assert "and the step's temporaries" in plan.describe() and "(an estimate)" in plan.describe()
  unlimited = make_plan(run, collection, 8)  # CPU: no budget, and the same estimate
  assert unlimited.temporaries == costs.step_temporaries(unlimited, run.model, slots, 0,
                                                         run.sharding.row_wise_capacity)


def test_a_budget_that_holds_the_tables_but_not_the_step_is_refused_with_the_numbers():
  """Where the tables fit a device's budget but not beside the step's temporaries and the
  dense network's state, however they are placed, the planner says so in one error with
  the numbers and the smallest change that fits (row-wise Adagrad's one value a row for
  per-element Adagrad's D), before anything is compiled; with room for both, the plan
  keeps within."""
  run = _run()
  collection = dlrm_parts(run).collection
  free = make_plan(run, collection, 8)
  tables = max(free.device_bytes())
  with pytest.raises(ConfigError, match=r"^the embedding tables need [\d.]+ \w+ per device and "
                     r"the step about [\d.]+ \w+ more \(its temporaries, an estimate\) and "
                     r"[\d.]+ \w+ \(the dense network's state\): over the per-device budget of "
                     r"[\d.]+ \w+ by [\d.]+ \w+; embedding_optimizer=rowwise_adagrad would fit "
                     r"\([\d.]+ \w+ of tables, state and the step per device\)\n"):
    make_plan(run, collection, 8, memory=int((tables + free.temporaries // 2) / 0.9))
  room = tables + free.temporaries + 3000
  planned = make_plan(run, collection, 8, memory=int(room / 0.9) + 1, dense=(1000, 3000))
  assert max(planned.device_bytes()) + planned.temporaries + planned.dense_bytes <= room


def test_the_estimate_is_of_the_order_of_the_compilers():
  """On 8 CPU devices, a small DCNv2 step's temporaries by the model and by XLA's buffer
  assignment agree within a factor of two (docs/compile.md gives the MLPerf model's
  agreement per accelerator target)."""
  c = load_config("dcnv2_small", devices=8)
  c.data.kind = "random"
  task = Task(c)
  from dlrm_jax import compile as compile_lib

  compiled, _ = compile_lib.compile_train_step(task, compile_lib.batch_shapes(task.run))
  compiler = compiled.memory_analysis().temp_size_in_bytes
  assert 0.5 < task.plan.temporaries / compiler < 2.0, (task.plan.temporaries, compiler)
  assert np.isfinite(task.plan.temporaries)


def test_overrides_that_cannot_be_met_are_not_called_a_memory_problem():
  """An override naming no table fails as such, with no change of optimiser or dtype
  offered, also where a device's memory is known."""
  c = load_config("tiny", devices=8)
  c.sharding.overrides = "nope:row_wise"
  run = RunSpec.from_config(c)
  with pytest.raises(ConfigError, match=r"^sharding overrides name unknown tables \['nope'\]"
                     r"[^\n]*$"):
    make_plan(run, dlrm_parts(run).collection, 8, memory=4096 * MiB)


def test_the_temporaries_model_by_platform():
  """The embedding's peak as each platform's compiled step holds it (docs/compile.md):
  on GPU one group's id gradients at a time and half as many again (its scan's
  pairwise sums), with the row-wise partial sums' gradients; on CPU every group's
  gradients, one group's update (summed gradients and its slots' rows) and the
  partial sums' gradients, and so on TPU. The dense peak of a DCN: what its backward
  pass reads and the gradients in flight, counted here from the docstring."""
  run = _run(rows="400000-300000-20000-10000-64-40-30-20")
  collection = dlrm_parts(run).collection
  plan = make_plan(run, collection, 8)
  slots = SPARSE_OPTIMIZERS["adagrad"]().slot_values_per_row
  handled = costs.ids_per_device(plan, run.sharding.row_wise_capacity)
  assert {"table_wise", "row_wise", "replicated"} <= set(handled), handled
  grads = {k: ids * w * 4 for k, (ids, w) in handled.items()}
  row_wise = [k for k, p in enumerate(plan.placements) if p.kind == "row_wise"]
  partial = (plan.batch_size * len(row_wise) * max(plan.dims[k] for k in row_wise) * 4
             if row_wise else 0)
  update = max(ids * (w + slots(int(w))) * 4 for ids, w in handled.values())
  emb = lambda platform: costs.embedding_temporaries(plan, slots,
                                                     run.sharding.row_wise_capacity,
                                                     platform=platform)
  assert emb("gpu") == int(max(1.5 * g for g in grads.values()) + partial)
  assert emb("cpu") == int(sum(grads.values()) + update + partial)
  assert emb("tpu") == emb("cpu")

  c = load_config("dcnv2_small", devices=1)
  model = RunSpec.from_config(c).model
  x0 = (model.num_tables + 1) * model.embedding_dim
  layers, rank = model.dcn_num_layers, model.dcn_low_rank_dim
  saved = sum(model.bottom[1:]) + x0 + sum(model.top) + layers * (x0 + rank + x0)
  assert costs.dense_peak_values(model) == saved + layers * x0 + 2 * x0
  half = dataclasses.replace(model, compute_dtype="bfloat16")  # activations of 2 bytes
  assert costs.dense_temporaries(half, 100, 7) == (saved + (layers + 2) * x0) * 100 * 2 + 21
