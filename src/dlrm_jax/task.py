"""A model with its sharded tables and optimisers, and its jitted steps.

`Task` holds only static things; all state lives in `TrainState`. The step's
math is `Task.functions` (`dlrm_jax.functional`: plain functions of explicit
state); the task jits them over its mesh, lays the state out by the sharding
plan and donates it to the train step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from ml_collections import ConfigDict

from dlrm_jax import dlrmv4
from dlrm_jax import parallel
from dlrm_jax import state as state_lib
from dlrm_jax import targets
from dlrm_jax.config import ConfigError
from dlrm_jax.embedding import (EmbeddingCollection, SequenceSpec, Tables, TableSpec,
                                make_sparse_optimizer)
from dlrm_jax.embedding import costs
from dlrm_jax.embedding.collection import POOLINGS, STORAGE_DTYPES
from dlrm_jax.embedding.planner import (OverBudgetError, Plan, PlanError, fmt_bytes,
                                        min_column_width, parse_overrides, plan_tables)
from dlrm_jax.embedding.qr import QRTables
from dlrm_jax.embedding.sharded import ShardedEmbedding
from dlrm_jax.embedding.step_time import CPU, Bandwidths
from dlrm_jax.functional import Functions, ModelParts
from dlrm_jax.model import abstract_model, init_params
from dlrm_jax.optim import lr_schedule, make_dense_optimizer, make_loss
from dlrm_jax.specs import RunSpec
from dlrm_jax.state import TrainState


class Task:
  """A model, its sharded embedding tables and optimisers, with jitted steps.

  Holds only static things (architecture, mesh, sharding plan, graph
  definition, optimiser definitions); all state lives in `TrainState`.
  `functions` is the model's math as pure functions (`dlrm_jax.functional`);
  `train_step` and `predict` are those jitted over the mesh, on host or device
  batches, with the state laid out by the plan and donated to the train step.
  """

  def __init__(self, run: RunSpec | ConfigDict, devices: list | None = None):
    """`run`: the run's spec, or its config (converted here, once); `devices`: those of
    the mesh (default: the config's `mesh.platform`), e.g. a described accelerator's
    compile-only devices to lower and compile for (`dlrm_jax.compile`)."""
    self.run = run if isinstance(run, RunSpec) else RunSpec.from_config(run)
    training = self.run.training
    if training.embedding_pooling not in POOLINGS:
      raise ConfigError(f"embedding_pooling={training.embedding_pooling!r} is not one of "
                        f"{POOLINGS}")
    self.spec = self.run.model
    # The model family's tables, network and batch fields (config.model).
    self.parts = parts = (dlrmv4_parts(self.run) if self.run.family == "dlrmv4"
                          else dlrm_parts(self.run))
    self.qr = parts.qr  # DLRM's quotient-remainder tables; None for DLRMv4
    self.collection, self.features = parts.collection, parts.features
    self.mesh, self.axes = parallel.make_mesh(self.run.mesh, devices)
    self.schedule = lr_schedule(training)
    self.tx = make_dense_optimizer(training)
    self.sparse_opt = make_sparse_optimizer(training.embedding_optimizer,
                                            training.embedding_optimizer_args)
    self.loss = parts.objective or make_loss(training)
    self.graphdef, abstract_params = nnx.split(parts.abstract())
    mine = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
    device = mine[0] if mine else self.mesh.devices.flat[0]
    self.plan = make_plan(self.run, self.collection, self.mesh.shape[self.axes.shard],
                          device_memory(device), device.platform,
                          dense_bytes(abstract_params, self.tx), device_bandwidths(device))
    self.embedding = ShardedEmbedding(self.collection, self.plan, self.mesh, self.axes,
                                      row_wise_capacity=self.run.sharding.row_wise_capacity)
    self.batch_sharding = NamedSharding(self.mesh, self.embedding.batch_spec)
    self.state_shapes = state_lib.state_shapes(abstract_params, self.embedding, self.tx,
                                               self.sparse_opt)
    self.state_shardings = state_lib.state_shardings(self.state_shapes, self.embedding)
    self.functions = Functions(
        init=self.init_state, graphdef=self.graphdef, embedding=self.embedding,
        lookup_fields=parts.lookup_fields, network=parts.network, tx=self.tx,
        sparse_opt=self.sparse_opt, objective=self.loss, schedule=self.schedule,
        seed=training.seed)
    self._train_step_jit = jax.jit(self.functions.train_step, donate_argnums=(0,),
                                   in_shardings=(self.state_shardings, None),
                                   out_shardings=(self.state_shardings, None))
    self._predict_jit = jax.jit(self.functions.predict)
    self._train_step_met = parallel.CompileThenMeet(self._train_step_jit, "train step")
    self._predict_met = parallel.CompileThenMeet(self._predict_jit, "predict")
    # One program for all optimiser-state initialisers (eagerly, XLA:CPU would
    # compile each of their ops separately), created where they will live.
    self._init_opt_states = jax.jit(
        self.functions.init_optimizers,
        out_shardings=(self.state_shardings.opt_state, self.state_shardings.emb_opt_state))

  def lower_train_step(self, state: TrainState, batch) -> jax.stages.Lowered:
    """The train step lowered for `state` and a device batch (to compile it, read its HLO)."""
    return self._train_step_jit.lower(state, batch)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the train state (restore targets), nothing allocated."""
    return state_lib.abstract_state(self.state_shapes, self.state_shardings)

  def init_state(self, seed: int) -> TrainState:
    """A step-0 state: fresh parameters (the reference's initialisation, the dense ones
    drawn with numpy on the host, so `seed` is a Python int, not traced) and optimiser
    states, laid out by the plan. Tables are created shard by shard on their devices,
    never whole on one."""
    params = self.parts.init_params(seed)
    tables = jax.jit(self.embedding.init, out_shardings=self.state_shardings.tables)(
        jnp.uint32(seed))
    return self.state_from(params, tables)

  def state_from(self, params: nnx.State, tables: Tables) -> TrainState:
    """A step-0 train state around given dense parameters and (sharded) tables."""
    params = jax.device_put(params, self.state_shardings.params)
    opt_state, emb_opt_state = self._init_opt_states(params, tables)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step),
                      params=params, opt_state=opt_state, tables=tables,
                      emb_opt_state=emb_opt_state)

  def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    """One jitted step (`state` is donated); `batch` is a host or device batch."""
    return self._train_step_met(state, self.device_batch(batch))

  def predict(self, params: nnx.State, tables: Tables, batch) -> jax.Array:
    """Click probabilities [B] of a host or device batch."""
    return self._predict_met(params, tables, self.device_batch(batch))

  def device_batch(self, batch) -> dict[str, jax.Array]:
    """A host batch (global, or this process's rows of it) as arrays split over the mesh."""
    return parallel.global_batch(parallel.local_rows(batch, self.batch_sharding),
                                 self.batch_sharding)

  def check_ids(self, sparse, mask=None) -> None:
    """IdOutOfRangeError for an id outside its feature's rows (at the data boundary)."""
    self.features.check_ids(sparse, mask)


def dlrm_parts(run: RunSpec) -> ModelParts:
  """DLRM's (and DLRM-DCNv2's) tables and network: a table per categorical feature (of
  its own width with mixed-dimension tables, embedding/mixed.py), or quotient-remainder
  pairs (embedding/qr.py); the network on the pooled vectors and the dense features."""
  spec, qr = run.model, run.qr
  tables = QRTables(spec.table_rows, run.data.hotness, spec.embedding_dim,
                    enabled=qr.qr_flag, collisions=qr.qr_collisions, operation=qr.qr_operation,
                    threshold=qr.qr_threshold, dims=spec.dims)
  collection = EmbeddingCollection(tables.table_specs(run.training.embedding_pooling),
                                   dtype=STORAGE_DTYPES[spec.embedding_dtype])
  return ModelParts(
      collection=collection,
      # The features' ids are checked against the features' row counts.
      features=(EmbeddingCollection.uniform(spec.table_rows, spec.embedding_dim,
                                            hotness=run.data.hotness)
                if qr.qr_flag else collection),
      abstract=lambda: abstract_model(spec), init_params=lambda seed: init_params(spec, seed),
      lookup_fields=tables.split,
      network=lambda model, emb, batch, _: model(batch["dense"], tables.combine(emb.pooled)),
      qr=tables)


def dlrmv4_collection(spec: dlrmv4.ModelSpec) -> EmbeddingCollection:
  """DLRMv4's tables: one per pooled feature (`dlrmv4.POOLED`), the history's sequences
  (`dlrmv4.SEQUENCES`) reading the candidate's."""
  return EmbeddingCollection(
      [TableSpec(name, rows, spec.embedding_dim)
       for name, rows in zip(dlrmv4.POOLED, spec.table_rows)],
      dtype=STORAGE_DTYPES[spec.embedding_dtype],
      sequences=[SequenceSpec(name, table) for name, table in dlrmv4.SEQUENCES])


def dlrmv4_parts(run: RunSpec) -> ModelParts:
  """DLRMv4's tables and network (`run.model` a `dlrm_jax.dlrmv4.ModelSpec`): a table per
  pooled feature (`dlrmv4.POOLED`), the history's sequences (`dlrmv4.SEQUENCES`)
  reading the candidate's; the network on their vectors and the history's actions and
  timestamps."""
  spec = run.model
  collection = dlrmv4_collection(spec)
  attention = dlrmv4.attention_of(spec)
  make = lambda seed: dlrmv4.DLRMv4(spec.network, rngs=nnx.Rngs(seed), attention=attention)  # noqa: E731

  def init_params(seed: int) -> nnx.State:
    # One compiled program for all initialisers (eagerly, XLA:CPU compiles each op).
    return jax.jit(lambda: nnx.state(make(seed), nnx.Param))()

  def lookup_fields(batch):
    lengths = batch["history_length"]
    return {"sparse": batch["sparse"],
            "sequences": {name: batch[name] for name, _ in dlrmv4.SEQUENCES},
            "sequence_lengths": {name: lengths for name, _ in dlrmv4.SEQUENCES}}

  return ModelParts(
      collection=collection, features=collection, abstract=lambda: nnx.eval_shape(
          lambda: make(0)), init_params=init_params, lookup_fields=lookup_fields,
      network=lambda model, embedded, batch, key: model(dlrmv4.model_inputs(embedded, batch),
                                                        dropout_key=key),
      objective=dlrmv4.loss)


def make_plan(run: RunSpec, collection: EmbeddingCollection, num_shards: int,
              memory: int | None = None, platform: str = "cpu",
              dense: tuple[int, int] = (0, 0), bandwidths: Bandwidths | None = CPU) -> Plan:
  """The sharding plan for the run's tables over `num_shards` devices of `memory` bytes
  each (None: unknown) on `platform` ("cpu", "gpu", "tpu"): within
  `sharding.memory_budget_mb`, else 90% of `memory`, less the dense network's state
  and the step's temporaries (`dense`: the dense parameters' bytes and those of their
  state with the optimiser's; the temporaries estimated by `embedding.costs` for the
  plan, which is made again within what they leave where they do not fit beside it);
  column slices of at least `sharding.min_column_width` values, else the platform's
  (`planner.min_column_width`); column- against row-wise chosen by, and each table's
  time estimated with, the time model at the devices' `bandwidths` (`embedding.step_time`)."""
  budget_mb = run.sharding.memory_budget_mb
  budget = int(budget_mb * 2**20) if budget_mb > 0 else (
      int(0.9 * memory) if memory else None)
  own = (run.training.embedding_optimizer, collection.dtype.itemsize)
  fit = lambda optimizer, itemsize: _plan_within(
      run, collection, num_shards, budget, platform, dense, optimizer, itemsize, bandwidths)
  try:
    plan = fit(*own)
    if budget is None or _device_total(plan) <= budget:
      return plan
    problem = (
        f"the embedding tables need {fmt_bytes(max(plan.device_bytes()))} per device and the "
        f"step about {fmt_bytes(plan.temporaries)} more (its temporaries, an estimate) and "
        f"{fmt_bytes(plan.dense_bytes)} (the dense network's state): over the per-device "
        f"budget of {fmt_bytes(budget)} by {fmt_bytes(_device_total(plan) - budget)}")
    details, advice = plan.describe(), "; use more devices or a smaller mini_batch_size"
  except OverBudgetError as e:  # its message advises
    problem, details, advice = e.summary, e.plan.describe(), ""
  except PlanError as e:  # overrides that cannot be met
    raise ConfigError(str(e)) from None
  changes = [c for c in dict.fromkeys([("rowwise_adagrad", own[1]), (own[0], min(own[1], 2)),
                                       ("rowwise_adagrad", min(own[1], 2))]) if c != own]
  for optimizer, itemsize in changes:  # the smallest change that fits, if any
    try:
      other = fit(optimizer, itemsize)
    except PlanError:
      continue
    if _device_total(other) <= budget:
      named = " and ".join(
          ([f"embedding_optimizer={optimizer}"] if optimizer != run.training.embedding_optimizer
           else []) + (["16-bit tables (embedding_dtype=bfloat16)"] if itemsize == 2
                       and collection.dtype.itemsize > 2 else []))
      advice = (f"; {named} would fit ({fmt_bytes(_device_total(other))} of tables, state "
                f"and the step per device)")
      break
  raise ConfigError(f"{problem}{advice}\n{details}")


def _plan_within(run: RunSpec, collection: EmbeddingCollection, num_shards: int,
                 budget: int | None, platform: str, dense: tuple[int, int], optimizer: str,
                 itemsize: int, bandwidths: Bandwidths | None) -> Plan:
  """`make_plan`'s plan with the sparse `optimizer` and tables of `itemsize` bytes a
  value, and its estimate of the step; placed again within what the step leaves where
  the first plan does not fit beside it. PlanError where the tables alone do not fit."""
  sharding = run.sharding
  slots = make_sparse_optimizer(optimizer).slot_values_per_row

  def plan_within(limit):
    plan = plan_tables(
        collection.specs, num_shards, batch_size=run.training.mini_batch_size,
        lookups=collection.hotness, optimizer=optimizer, memory_budget=limit,
        min_column_width=sharding.min_column_width or min_column_width(platform),
        overrides=parse_overrides(sharding.overrides), table_itemsize=itemsize,
        bandwidths=bandwidths)
    step = costs.step_temporaries(plan, run.model, slots, dense[0],
                                  sharding.row_wise_capacity, run.mesh.replicas, platform)
    return dataclasses.replace(plan, temporaries=step, dense_bytes=dense[1])

  plan = plan_within(budget)
  if budget is not None and _device_total(plan) > budget:
    try:
      plan = plan_within(budget - plan.temporaries - plan.dense_bytes)
    except PlanError:
      pass  # the tables do not fit beside the step however they are placed
  return plan


def _device_total(plan: Plan) -> int:
  """Bytes the fullest device needs: tables, optimiser state, the step's temporaries and
  the dense network's state."""
  return max(plan.device_bytes()) + plan.temporaries + plan.dense_bytes


def dense_bytes(abstract_params, tx) -> tuple[int, int]:
  """The dense parameters' bytes, and theirs with their optimiser's state."""
  size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                          if hasattr(x, "dtype"))
  params = size(abstract_params)
  return params, params + size(jax.eval_shape(tx.init, abstract_params))


def device_bandwidths(device) -> Bandwidths | None:
  """A device's memory and interconnect bandwidths for the planner's time model: its
  chip's peak figures (`dlrm_jax.targets`), this kind of CPU's for CPU devices, None
  for an accelerator without figures there."""
  chip = targets.chip_of(device.device_kind)
  if chip is None:
    return CPU if device.platform == "cpu" else None
  return Bandwidths(chip.hbm_bytes_per_s, chip.interconnect_bytes_per_s,
                    f"{chip.name}'s peak figures")


def device_memory(device) -> int | None:
  """A device's memory in bytes: what the backend reports (GPU, TPU), else the chip's
  figure in `dlrm_jax.targets` (compile-only devices); None on CPU."""
  try:
    stats = device.memory_stats() or {}
  except Exception:  # compile-only devices have no memory to report
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  chip = targets.chip_of(device.device_kind)
  return None if chip is None else chip.memory_bytes
