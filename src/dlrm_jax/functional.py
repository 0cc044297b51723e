"""A model as plain functions of explicit state: init, apply, predict, loss, train step.

`Task(config).functions` is a `Functions`: the model's math with nothing
jitted and nothing donated, so that `jax.jit`, `jax.grad`, `jax.vmap` and
`jax.lax.scan` compose with it as with any pure function:

    task = Task(config)
    fns = task.functions
    state = fns.init(0)
    batch = task.device_batch(host_batch)
    state, metrics = jax.jit(fns.train_step)(state, batch)                # one step
    grads = jax.jit(jax.grad(fns.loss))(state.params, state.tables, batch)  # dense grads
    step = jax.jit(jax.vmap(fns.train_step, in_axes=(0, None)))  # stacked states, one batch

The task builds its own steps from these: `Task.train_step` is
`jax.jit(functions.train_step)` with the state donated (its buffers reused for
the next state) and pinned to the sharding plan's layout, on a host or a
device batch; `Task.predict` is `jax.jit(functions.predict)`. Train with
those; transform these.

The tables are `shard_map` programs over the task's mesh, whose axes are
explicit (`mesh.axis_types`), so the arrays these functions take live on that
mesh: states from `init` (or the task's checkpoints), batches from
`task.device_batch`; and they run under `jax.jit` (JAX does not run them op by
op).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax
from flax import nnx

from dlrm_jax.embedding import Tables
from dlrm_jax.embedding.sharded import Embedded, ShardedEmbedding
from dlrm_jax.state import TrainState

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class ModelParts:
  """What a model family gives `dlrm_jax.task.Task`: its tables, its dense network and
  how a batch feeds them (DLRM's: `dlrm_jax.task.dlrm_parts`; DLRMv4's:
  `dlrm_jax.task.dlrmv4_parts`)."""

  collection: Any  # EmbeddingCollection: the tables (and sequence features) as stored
  features: Any  # EmbeddingCollection: what a batch's "sparse" ids are checked against
  abstract: Callable[[], nnx.Module]  # the dense network, shapes only
  init_params: Callable[[int], nnx.State]  # seed -> its initial parameters
  lookup_fields: Callable[[Batch], Batch]  # see `Functions`
  network: Callable[[nnx.Module, Embedded, Batch, jax.Array | None], jax.Array]  # `Functions`
  objective: Callable[[jax.Array, jax.Array], jax.Array] | None = None  # None: the config's
  qr: Any = None  # DLRM's QRTables (dlrm_jax.embedding.qr)


@dataclasses.dataclass(frozen=True, eq=False)
class Functions:
  """The pure functions of one model, its tables and its optimisers (see the module's
  docstring); built by `Task`, whose static parts these fields are.

  A batch is a dict of arrays with a leading batch axis. DLRM's: "dense" [B, num_dense]
  floats; "sparse", the ids ([B, F] one per feature, [B, sum(hotness)] flat bags, or
  [B, F, H] padded bags with a boolean "sparse_mask"); optionally "sparse_weights" (the
  ids' shape); "label" [B] (0/1) for `loss` and `train_step`. DLRMv4's:
  `dlrm_jax.dlrmv4.BATCH_KEYS`. `lookup_fields` picks the embedding engine's fields out
  of it, `network` runs the dense network on what they looked up.
  """

  init: Callable[[int], TrainState]  # seed -> a fresh step-0 state (`Task.init_state`)
  graphdef: nnx.GraphDef  # the dense network's structure; its parameters are `params`
  embedding: ShardedEmbedding
  # batch -> the embedding engine's fields ("sparse", ..., "sequences"; ShardedEmbedding)
  lookup_fields: Callable[[Batch], Batch]
  # (the dense network, the batch's embeddings, the batch, a dropout key: training mode,
  # or None) -> logits [B]
  network: Callable[[nnx.Module, Embedded, Batch, jax.Array | None], jax.Array]
  tx: optax.GradientTransformation  # the MLPs' optimiser, at a learning rate of 1
  sparse_opt: Any  # the tables' optimiser (dlrm_jax.embedding.optimizers)
  objective: Callable[[jax.Array, jax.Array], jax.Array]  # mean loss of (logits, labels)
  schedule: Callable[[jax.Array], jax.Array]  # step -> learning rate
  seed: int = 0  # of the train step's dropout bits (a network with dropout: DLRMv4's)

  def init_optimizers(self, params: nnx.State, tables: Tables) -> tuple[Any, Any]:
    """The MLPs' and the tables' fresh optimiser states."""
    return self.tx.init(params), self.embedding.init_optimizer(self.sparse_opt, tables)

  def apply(self, params: nnx.State, tables: Tables, batch: Batch) -> jax.Array:
    """Logits [B] of a batch."""
    return self._logits(params, self.embedding.embed_all(tables, self.lookup_fields(batch)),
                        batch)

  def predict(self, params: nnx.State, tables: Tables, batch: Batch) -> jax.Array:
    """Click probabilities [B] of a batch."""
    return jax.nn.sigmoid(self.apply(params, tables, batch))

  def loss(self, params: nnx.State, tables: Tables, batch: Batch) -> jax.Array:
    """The mean loss of a batch (`loss_function`), in eval mode (no dropout).
    Differentiable with respect to `params` and to `tables`; the gradient with respect
    to the tables is dense (the tables' shape), where `train_step` never forms one."""
    return self._loss(params, self.embedding.embed_all(tables, self.lookup_fields(batch)),
                      batch)

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    """One optimisation step: (the next state, {"loss": the batch's loss before the
    step, "lr": the step's learning rate, "dropped_ids": row-wise ids past their
    owner's capacity, left out of the step: 0 unless `sharding.row_wise_capacity` is
    too small for the batch}).

    The loss is differentiated with respect to the dense parameters and to the
    looked-up vectors (where their rows live), never the tables: the MLPs get the
    optax update, the tables a sparse update of the rows the batch touched. Both
    train at `schedule(state.step)`.
    """
    forward = self.embedding.forward(state.tables, self.lookup_fields(batch))
    key = jax.random.fold_in(jax.random.key(self.seed), state.step)  # a network's dropout
    loss, (g_params, g_vectors) = jax.value_and_grad(
        lambda params, vectors: self._loss(params, forward.exchange(vectors), batch, key),
        argnums=(0, 1))(state.params, forward.vectors)
    lr = self.schedule(state.step)
    with jax.named_scope("dense update"):
      updates, opt_state = self.tx.update(g_params, state.opt_state, state.params)
      params = optax.apply_updates(state.params, jax.tree.map(lambda u: lr * u, updates))
    tables, emb_opt_state = forward.apply_gradients(
        self.sparse_opt, state.tables, state.emb_opt_state, g_vectors, lr, state.step)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           tables=tables, emb_opt_state=emb_opt_state)
    return new_state, {"loss": loss, "lr": lr, "dropped_ids": forward.dropped}

  def _logits(self, params: nnx.State, emb: Embedded, batch: Batch,
              key: jax.Array | None = None) -> jax.Array:
    """The dense network on the batch's embeddings (with `key`: in training mode)."""
    with jax.named_scope("dense"):
      return self.network(nnx.merge(self.graphdef, params), emb, batch, key)

  def _loss(self, params: nnx.State, emb: Embedded, batch: Batch,
            key: jax.Array | None = None) -> jax.Array:
    logits = self._logits(params, emb, batch, key)
    with jax.named_scope("dense"):
      return self.objective(logits, batch["label"])
