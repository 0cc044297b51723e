"""Train state, the jitted train and eval steps, and the training loop.

The core is functional: `TrainState` is a pytree (dense parameters as an NNX
state, their optax state, the embedding tables and the sparse optimiser's
state), and `train_step` is a pure function of it and a batch. The dense
network is differentiated with respect to its parameters and to the looked-up
embedding vectors, never the tables: the tables get a sparse update of the
rows the batch touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from tqdm.auto import tqdm

from dlrm_jax import metrics as metrics_lib
from dlrm_jax import parallel
from dlrm_jax.config import ConfigError, ModelSpec, parse_floats, validate_training
from dlrm_jax.data import configure_data, make_data
from dlrm_jax.data.prefetch import prefetch
from dlrm_jax.embedding import EmbeddingCollection, Tables, make_sparse_optimizer
from dlrm_jax.embedding.planner import Plan, PlanError, parse_overrides, plan_tables
from dlrm_jax.embedding.sharded import ShardedEmbedding
from dlrm_jax.model import DLRM, init_params


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes."""

  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  tables: Tables
  emb_opt_state: Any


def lr_schedule(config) -> Callable[[jax.Array], jax.Array]:
  """The reference's (MLPerf) policy, `LRPolicyScheduler` of `dlrm_s_pytorch.py`.

  Step s (0-based) trains with the rate for t = s + 1 (the scheduler's
  `_step_count`, 1 when it is created): t < W (warmup steps) gives lr * t / W;
  S <= t < S + N (decay start, decay steps) gives lr * ((N - (t - S)) / N)^2,
  floored at 1e-7. With a decay configured, the other steps hold the last rate
  set: lr * (W - 1) / W between warmup and decay, the last decayed rate after
  it (and lr itself before a decay that follows no warmup, where the reference
  has no rate to hold); without one, they train at lr.
  """
  base = float(config.learning_rate)
  warmup = int(config.lr_num_warmup_steps)
  decay_start = int(config.lr_decay_start_step)
  decay_steps = int(config.lr_num_decay_steps)
  held = base * (warmup - 1) / warmup if warmup > 1 else base

  def schedule(step):
    t = jnp.asarray(step, jnp.float32) + 1.0
    lr = jnp.asarray(base, jnp.float32)
    if decay_steps > 0:
      done = jnp.clip(t - decay_start, 0.0, decay_steps - 1)  # held at the last decayed rate
      decayed = jnp.maximum(base * ((decay_steps - done) / decay_steps) ** 2, 1e-7)
      lr = jnp.where(t >= decay_start, decayed, held)
    if warmup > 0:
      lr = jnp.where(t < warmup, base * t / warmup, lr)
    return lr

  return schedule


class AdagradState(NamedTuple):
  sum_of_squares: optax.Updates


def scale_by_adagrad(eps: float = 1e-10) -> optax.GradientTransformation:
  """torch.optim.Adagrad's scaling (the reference's `--optimizer adagrad`): a += g^2,
  g / (sqrt(a) + eps). optax.adagrad puts eps inside the root, which changes the
  first steps of parameters whose gradients are near sqrt(eps)."""

  def init(params):
    return AdagradState(jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    acc = jax.tree.map(lambda a, g: a + jnp.square(g), state.sum_of_squares, updates)
    updates = jax.tree.map(lambda g, a: g / (jnp.sqrt(a) + eps), updates, acc)
    return updates, AdagradState(acc)

  return optax.GradientTransformation(init, update)


def make_dense_optimizer(config) -> optax.GradientTransformation:
  """The optax optimiser for the MLPs, at a learning rate of 1.

  The train step scales its updates by the schedule's rate for `TrainState.step`
  (each optimiser's update is linear in the rate), so the MLPs and the tables
  follow one schedule on one step count.
  """
  name = config.dense_optimizer
  if name == "sgd":
    return optax.sgd(1.0)
  if name == "adagrad":
    return optax.chain(scale_by_adagrad(eps=1e-10), optax.scale(-1.0))
  if name == "adam":
    return optax.adam(1.0)
  raise ValueError(f"dense_optimizer={name!r} is not one of ['adagrad', 'adam', 'sgd']")


def make_loss(config) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Mean loss of logits against 0/1 labels: bce, mse (on probabilities) or wbce."""
  name = config.loss_function
  if name == "bce":
    return lambda logits, labels: optax.sigmoid_binary_cross_entropy(logits, labels).mean()
  if name == "mse":
    return lambda logits, labels: jnp.mean((jax.nn.sigmoid(logits) - labels) ** 2)
  if name == "wbce":
    w0, w1 = parse_floats("loss_weights", config.loss_weights)

    def wbce(logits, labels):
      weights = jnp.where(labels > 0.5, w1, w0)
      return jnp.mean(weights * optax.sigmoid_binary_cross_entropy(logits, labels))

    return wbce
  raise ValueError(f"loss_function={name!r} is not one of ['bce', 'mse', 'wbce']")


class Task:
  """A model, its sharded embedding tables and optimisers, with jitted steps.

  Holds only static things (architecture, mesh, sharding plan, graph
  definition, optimiser definitions); all state lives in `TrainState`.
  """

  def __init__(self, config, spec: ModelSpec | None = None):
    validate_training(config)
    self.config = config
    self.spec = spec or ModelSpec.from_config(config)
    self.collection = EmbeddingCollection.uniform(
        self.spec.table_rows, self.spec.embedding_dim, config.embedding_pooling)
    self.mesh, self.axes = parallel.make_mesh(config)
    self.plan = make_plan(config, self.collection, self.mesh.shape[self.axes.shard])
    self.embedding = ShardedEmbedding(self.collection, self.plan, self.mesh, self.axes)
    self.schedule = lr_schedule(config)
    self.tx = make_dense_optimizer(config)
    self.sparse_opt = make_sparse_optimizer(config.embedding_optimizer)
    self.loss = make_loss(config)
    abstract = nnx.eval_shape(lambda: DLRM(self.spec, rngs=nnx.Rngs(0)))
    self.graphdef, _ = nnx.split(abstract)
    self.batch_sharding = NamedSharding(self.mesh, self.embedding.batch_spec)
    self.state_shardings = self._state_shardings()
    self._train_step_jit = jax.jit(self._train_step, donate_argnums=(0,),
                                   in_shardings=(self.state_shardings, None),
                                   out_shardings=(self.state_shardings, None))
    self._predict_jit = jax.jit(self._predict)
    self._train_step_in_step = parallel.CompiledInStep(self._train_step_jit, "train step")
    self._predict_in_step = parallel.CompiledInStep(self._predict_jit, "predict")
    # One program for all optimiser-state initialisers (eagerly, XLA:CPU would
    # compile each of their ops separately), created where they will live.
    self._init_opt_states = jax.jit(
        lambda p, t: (self.tx.init(p), self.embedding.init_optimizer(self.sparse_opt, t)),
        out_shardings=(self.state_shardings.opt_state, self.state_shardings.emb_opt_state))

  def _state_shapes(self) -> TrainState:
    params = nnx.state(nnx.eval_shape(lambda: DLRM(self.spec, rngs=nnx.Rngs(0))))
    tables = jax.eval_shape(self.embedding.init, 0)
    opt_state = jax.eval_shape(self.tx.init, params)
    emb_opt_state = jax.eval_shape(
        lambda t: self.embedding.init_optimizer(self.sparse_opt, t), tables)
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=opt_state, tables=tables, emb_opt_state=emb_opt_state)

  def _state_shardings(self) -> TrainState:
    shapes = self._state_shapes()
    rep = parallel.replicated(self.mesh)
    return TrainState(step=rep, params=jax.tree.map(lambda _: rep, shapes.params),
                      opt_state=jax.tree.map(lambda _: rep, shapes.opt_state),
                      tables=self.embedding.table_shardings(),
                      emb_opt_state=self.embedding.state_shardings(shapes.emb_opt_state))

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the train state (restore targets), nothing allocated."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        self._state_shapes(), self.state_shardings)

  def init_state(self, seed: int) -> TrainState:
    """Fresh parameters (reference initialisation) and optimiser states.

    Tables are created shard by shard on their devices, never whole on one.
    """
    params = init_params(self.spec, seed)
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
    return self._train_step_in_step(state, self.device_batch(batch))

  def predict(self, params: nnx.State, tables: Tables, batch) -> jax.Array:
    """Click probabilities [B] of a host or device batch."""
    return self._predict_in_step(params, tables, self.device_batch(batch))

  def device_batch(self, batch) -> dict[str, jax.Array]:
    """A host batch (global, or this process's rows of it) as arrays split over the mesh."""
    return parallel.global_batch(parallel.local_rows(batch, self.batch_sharding),
                                 self.batch_sharding)

  def logits(self, params: nnx.State, tables: Tables, batch) -> jax.Array:
    emb = self.embedding.embed(tables, batch)
    return nnx.merge(self.graphdef, params)(batch["dense"], emb)

  def _predict(self, params: nnx.State, tables: Tables, batch) -> jax.Array:
    return jax.nn.sigmoid(self.logits(params, tables, batch))

  def _train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    # Each device gathers the rows it owns; the loss is differentiated with
    # respect to those looked-up vectors (where they live), never the tables.
    lookups = self.embedding.lookup(state.tables, batch)

    def loss_fn(params, vectors):
      emb = self.embedding.exchange(self.embedding.with_vectors(lookups, vectors))
      logits = nnx.merge(self.graphdef, params)(batch["dense"], emb)
      return self.loss(logits, batch["label"])

    loss, (g_params, g_vectors) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
        state.params, self.embedding.differentiable_part(lookups))
    lr = self.schedule(state.step)
    updates, opt_state = self.tx.update(g_params, state.opt_state, state.params)
    params = optax.apply_updates(state.params, jax.tree.map(lambda u: lr * u, updates))
    tables, emb_opt_state = self.embedding.update(
        self.sparse_opt, state.tables, state.emb_opt_state, lookups, g_vectors, lr, state.step)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           tables=tables, emb_opt_state=emb_opt_state)
    return new_state, {"loss": loss, "lr": lr}


def make_plan(config, collection: EmbeddingCollection, num_shards: int) -> Plan:
  """The sharding plan for the config's tables over `num_shards` devices."""
  sharding = config.get("sharding")
  budget_mb = float(sharding.memory_budget_mb) if sharding else 0.0
  budget = int(budget_mb * 2**20) if budget_mb > 0 else device_memory_budget()
  hotness = int(config.data.get("hotness", 1))
  try:
    return plan_tables(
        collection.specs, num_shards, batch_size=int(config.mini_batch_size),
        lookups=hotness, optimizer=config.embedding_optimizer, memory_budget=budget,
        min_column_width=int(sharding.min_column_width) if sharding else 32,
        overrides=parse_overrides(sharding.overrides if sharding else ""))
  except PlanError as e:
    raise ConfigError(str(e)) from None


def device_memory_budget() -> int | None:
  """90% of a device's memory when the backend reports it (GPU, TPU); None on CPU."""
  stats = jax.local_devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  return int(0.9 * limit) if limit else None


def evaluate(task: Task, state: TrainState, batches) -> dict[str, float]:
  """AUC, log loss and accuracy over an iterable of batches."""
  labels, probs = [], []
  for batch in batches:
    probs.append(parallel.fetch(task.predict(state.params, state.tables, batch)))
    label = batch["label"]  # a host batch, or global arrays already placed
    labels.append(parallel.fetch(label) if isinstance(label, jax.Array) else np.asarray(label))
  return metrics_lib.evaluate(np.concatenate(labels), np.concatenate(probs))


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite; the message names the step and the
  last good checkpoint."""


@dataclasses.dataclass
class TrainResult:
  """What a training run returns: its summary, final state and evaluation records."""

  summary: dict
  state: TrainState
  task: Task
  records: list[dict]


def train_and_evaluate(config, workdir: str, *, progress: bool | None = None,
                       log: Callable[[str], None] | None = None) -> TrainResult:
  """Trains `config.num_batches` steps, evaluating every `config.test_freq`.

  `log`, if given, receives the sharding plan at start-up (on process 0).

  Writes WORKDIR/metrics.jsonl (one JSON object per evaluation, the same
  records as `TrainResult.records`); `format_summary(result.summary)` is what
  `train.py` prints at the end.
  """
  parallel.initialize_distributed(config)
  config = configure_data(config)  # Criteo: table sizes from the prepared data's metadata.
  task = Task(config)
  devices = task.mesh.size
  for name in ("mini_batch_size", "test_mini_batch_size"):
    if int(config[name]) % devices:
      raise ConfigError(f"{name}={config[name]} must be a multiple of the number of devices "
                        f"in the mesh ({devices}): each device takes an equal slice")
  data = make_data(config, task.spec)
  lead = jax.process_index() == 0  # logs, metrics and the progress bar come from process 0
  show = (progress if progress is not None else bool(config.progress_bar)) and lead
  if log is not None and lead:
    log(task.plan.describe())
  os.makedirs(workdir, exist_ok=True)
  num_steps = int(config.num_batches)
  test_freq = int(config.test_freq) or num_steps
  # A loader that reads only this process's rows (Criteo) gives process-local
  # batches; the synthetic generators give whole global batches.
  process_local = bool(getattr(data, "process_local", False))
  eval_batches = [data.batch(i, "eval", int(config.test_mini_batch_size))
                  for i in range(int(config.test_num_batches))]
  if process_local:
    eval_batches = [parallel.global_batch(b, task.batch_sharding) for b in eval_batches]
  teacher_auc = None
  if hasattr(data, "teacher_probability"):
    teacher_auc = metrics_lib.roc_auc(
        np.concatenate([b["label"] for b in eval_batches]),
        np.concatenate([data.teacher_probability(b) for b in eval_batches]))

  say = (log if log is not None and lead else (lambda _: None))
  checkpointer = None
  if config.get("checkpoint") is not None and bool(config.checkpoint.enabled):
    from dlrm_jax import checkpoint as checkpoint_lib

    ckpt = config.checkpoint
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=int(ckpt.max_to_keep),
        keep_best=bool(ckpt.keep_best), async_save=bool(ckpt.async_save), log=say)
  restored = None
  if checkpointer is not None and not bool(config.checkpoint.resume) and checkpointer.steps():
    say(f"checkpoint.resume=False: deleting the checkpoints of steps {checkpointer.steps()} "
        f"in {checkpointer.directory}")
    checkpointer.delete_all()
  if checkpointer is not None and bool(config.checkpoint.resume):
    restored = checkpointer.restore(
        task, config, partial=bool(config.checkpoint.restore_partial),
        fresh=lambda: task.init_state(int(config.seed)))
  records, losses, start = [], [], 0
  data_position = None
  if restored is not None:
    state, start = restored.state, restored.step
    records = [dict(r) for r in restored.meta.get("records", [])]
    # The unfinished interval's losses, so that its mean is the uninterrupted run's.
    losses = [np.float32(x) for x in restored.meta.get("interval_losses", [])]
    data_position = restored.meta.get("data")
    say(f"resuming from step {start} ({checkpointer.directory}/{start})"
        + (" with only the parts that match the config" if restored.partial else ""))
  else:
    state = task.init_state(int(config.seed))
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if lead:  # records up to the restored step; a killed run may have written more
    with open(metrics_path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)

  train_stream = data.batches(start, "train")
  if data_position is not None and hasattr(train_stream, "restore"):
    if "process_index" in data_position:  # process 0 wrote it; the position is common to all
      data_position = {**data_position, "process_index": jax.process_index()}
    try:
      train_stream.restore(data_position)
    except ValueError as e:
      raise ConfigError(f"cannot resume the data: {e}") from None

  def host_batches():
    for batch in train_stream:
      task.collection.check_ids(batch["sparse"], batch.get("sparse_mask"))
      yield batch if process_local else parallel.local_rows(batch, task.batch_sharding)

  def data_state(position: int) -> dict:
    if hasattr(train_stream, "state_at"):
      return train_stream.state_at(position)
    return {"position": position}

  checked = len(losses)  # losses[:checked] are known to be finite

  def check_losses(upto: int) -> None:
    """Stops on a NaN or infinite loss among losses[checked:upto], naming its step."""
    nonlocal checked
    if upto <= checked:
      return
    values = np.asarray(jax.device_get(losses[checked:upto]), np.float32)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
      bad_step = done - len(losses) + checked + int(bad[0]) + 1
      kept = None
      if checkpointer is not None:
        checkpointer.wait()
        kept = checkpointer.latest_step()
      bar.close()
      raise NonFiniteLossError(
          f"the training loss is {values[bad[0]]} at step {bad_step}: training stopped. "
          + (f"The last good checkpoint is step {kept} in {checkpointer.directory}; "
             if kept is not None else "No checkpoint was saved before it; ")
          + "lower the learning rate or check the data, then rerun (a rerun resumes from it).")
    checked = upto

  def save(step_done: int, metrics: dict | None, finished: bool) -> None:
    check_losses(len(losses))
    meta = {
        "config": json.loads(config.to_json()),
        "plan": checkpoint_lib.plan_to_json(task.plan),
        "mesh": {"shape": dict(task.mesh.shape), "processes": jax.process_count()},
        "seed": int(config.seed), "data_seed": int(config.data.seed),
        "data": data_state(step_done),
        "interval_losses": [float(x) for x in jax.device_get(losses)],
        "records": records, "finished": finished,
    }
    checkpointer.save(step_done, state, meta, metrics)

  every = int(config.checkpoint.every_steps) if checkpointer is not None else 0
  finished = restored is not None and bool(restored.meta.get("finished"))
  if finished or start >= num_steps:
    say(f"the checkpoint at step {start} is the end of this run: nothing to train")
  batches = prefetch(host_batches(), size=2)
  interval_start, interval_steps, train_seconds = None, 0, 0.0
  compile_seconds = 0.0
  done = start
  bar = tqdm(total=num_steps, initial=start, disable=not show, unit="step", dynamic_ncols=True,
             mininterval=0.5, desc="train")
  with open(metrics_path if lead else os.devnull, "a") as metrics_file:
    for step in range(start, num_steps if not finished else start):
      batch = parallel.global_batch(next(batches), task.batch_sharding)
      if step == start:
        t = time.perf_counter()
        state, out = task.train_step(state, batch)
        jax.block_until_ready(state)
        compile_seconds = time.perf_counter() - t
        interval_start = time.perf_counter()
      else:
        state, out = task.train_step(state, batch)
        interval_steps += 1
      losses.append(out["loss"])
      bar.update(1)
      done = step + 1
      check_losses(len(losses) - 1)  # the previous step's loss: done by now, or nearly
      evaluated = done % test_freq == 0 or done == num_steps
      stop = False
      if evaluated:
        check_losses(len(losses))
        mean_loss = float(np.mean(jax.device_get(losses)))
        elapsed = time.perf_counter() - interval_start
        train_seconds += elapsed
        examples_per_sec = interval_steps * int(config.mini_batch_size) / max(elapsed, 1e-9)
        result = evaluate(task, state, eval_batches)
        record = {"step": done, **result, "train_loss": mean_loss,
                  "examples_per_sec": examples_per_sec, "lr": float(out["lr"])}
        if teacher_auc is not None:
          record["teacher_auc"] = teacher_auc
        records.append(record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        bar.set_postfix(loss=f"{mean_loss:.4f}", auc=f"{result['auc']:.4f}",
                        ex_s=f"{examples_per_sec:,.0f}")
        losses, interval_steps, checked = [], 0, 0
        stop = float(config.target_auc) > 0 and result["auc"] >= float(config.target_auc)
      if checkpointer is not None and (
          done == num_steps or stop or (every > 0 and done % every == 0)
          or (every <= 0 and evaluated)):
        save(done, {"auc": records[-1]["auc"]} if evaluated else None,
             finished=done == num_steps or stop)
      if stop:
        break
      interval_start = time.perf_counter() if evaluated else interval_start
  bar.close()
  if checkpointer is not None:
    checkpointer.wait()
    checkpointer.close()
  if not records:
    raise ConfigError(f"no evaluation record: the checkpoint in {workdir} ends at step {start}, "
                      "before any evaluation")

  final = records[-1]
  steps_done = final["step"]
  summary = {
      "steps": steps_done,
      "examples": steps_done * int(config.mini_batch_size),
      "auc": final["auc"],
      "logloss": final["logloss"],
      "accuracy": final["accuracy"],
      "teacher_auc": teacher_auc,
      "compile_seconds": compile_seconds,
      "train_seconds": train_seconds,
      "examples_per_sec": max(0, steps_done - start - 1) * int(config.mini_batch_size)
                          / max(train_seconds, 1e-9),
      "target_auc": float(config.target_auc) or None,
      "eval_samples": int(sum(b["label"].size for b in eval_batches)),
      "workdir": workdir,
  }
  return TrainResult(summary=summary, state=state, task=task, records=records)


def format_summary(summary: dict) -> str:
  """A human-readable run summary, with a warning for an AUC stuck near 0.5."""
  lines = [
      "Run summary",
      f"  steps            {summary['steps']:,} ({summary['examples']:,} examples)",
      f"  eval AUC         {summary['auc']:.4f}",
  ]
  if summary.get("teacher_auc") is not None:
    gap = summary["teacher_auc"] - summary["auc"]
    lines.append(f"  teacher AUC      {summary['teacher_auc']:.4f}  "
                 f"(best achievable on this data; gap {gap:+.4f})")
  lines += [
      f"  eval log loss    {summary['logloss']:.4f}",
      f"  eval accuracy    {summary['accuracy']:.4f}  ({summary['eval_samples']:,} samples)",
      f"  throughput       {summary['examples_per_sec']:,.0f} examples/s "
      f"(compile {summary['compile_seconds']:.1f} s)",
      f"  metrics          {os.path.join(summary['workdir'], 'metrics.jsonl')}",
  ]
  if summary.get("target_auc"):
    reached = "reached" if summary["auc"] >= summary["target_auc"] else "not reached"
    lines.append(f"  target AUC       {summary['target_auc']:.4f} ({reached})")
  if summary["auc"] < 0.52:
    lines.append("  WARNING: the AUC is close to 0.5, the model has not learned to rank. "
                 "Check the labels, the learning rate and the data (random data has no signal).")
  return "\n".join(lines)
