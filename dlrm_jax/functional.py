"""DLRM as plain functions of explicit state: init, apply, predict, loss, train step.

`Task(config).functions` is a `Functions`: the model's math with nothing
jitted, nothing donated and nothing placed, so that `jax.jit`, `jax.grad`,
`jax.vmap` and `jax.lax.scan` compose with it as with any pure function:

    fns = Task(config).functions
    state = fns.init(0)
    state, metrics = jax.jit(fns.train_step)(state, batch)        # one step
    grads = jax.grad(fns.loss)(state.params, state.tables, batch)   # dense gradients
    ensemble = jax.vmap(fns.train_step, in_axes=(0, None))           # stacked states

The `Task` builds its own steps from these functions: `Task.train_step` is
`jax.jit(functions.train_step)` with the state donated (its buffers reused for
the new state) and laid out by the sharding plan, on a host or device batch;
`Task.predict` is `jax.jit(functions.predict)`. Use those to train; use these
to transform.

The tables are a pytree of their own (`dlrm_jax.embedding`), sharded over the
task's mesh by `shard_map` programs; these functions take them as they are
laid out there, and run on any mesh (a batch of host arrays is split over it
by `jax.jit`, or pass `task.device_batch(batch)`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dlrm_jax.embedding import Tables
from dlrm_jax.embedding.qr import QRTables
from dlrm_jax.embedding.sharded import ShardedEmbedding
from dlrm_jax.model import ModelSpec, init_params
from dlrm_jax.state import TrainState

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Functions:
  """The pure functions of one model, its tables and its optimisers (see the module's
  docstring); built by `Task`, whose static parts these fields are.

  A batch is a dict: "dense" [B, num_dense] floats; "sparse", the ids ([B, F] one per
  feature, [B, sum(hotness)] flat bags, or [B, F, H] padded bags with a boolean
  "sparse_mask"); optionally "sparse_weights" (the ids' shape); "label" [B] (0/1) for
  `loss` and `train_step`.
  """

  spec: ModelSpec
  graphdef: nnx.GraphDef  # the dense network's structure; its parameters are `params`
  embedding: ShardedEmbedding
  qr: QRTables  # quotient-remainder tables' split of the ids, combine of their vectors
  tx: optax.GradientTransformation  # the MLPs' optimiser, at a learning rate of 1
  sparse_opt: Any  # the tables' optimiser (dlrm_jax.embedding.optimizers)
  objective: Callable[[jax.Array, jax.Array], jax.Array]  # mean loss of (logits, labels)
  schedule: Callable[[jax.Array], jax.Array]  # step -> learning rate

  def init(self, seed: int) -> TrainState:
    """A fresh step-0 state for `seed`: the reference's initialisation (the dense
    parameters drawn with numpy on the host, so `seed` is a Python int, not traced;
    stack the states of several seeds to vmap over them)."""
    return self.state_from(init_params(self.spec, seed), self.embedding.init(seed))

  def state_from(self, params: nnx.State, tables: Tables) -> TrainState:
    """A step-0 state around given dense parameters and tables (traceable)."""
    opt_state, emb_opt_state = self.init_optimizers(params, tables)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      tables=tables, emb_opt_state=emb_opt_state)

  def init_optimizers(self, params: nnx.State, tables: Tables) -> tuple[Any, Any]:
    """The MLPs' and the tables' fresh optimiser states (traceable)."""
    return self.tx.init(params), self.embedding.init_optimizer(self.sparse_opt, tables)

  def apply(self, params: nnx.State, tables: Tables, batch: Batch) -> jax.Array:
    """Logits [B] of a batch."""
    return self._logits(params, self.embedding.embed(tables, self.qr.split(batch)), batch)

  def predict(self, params: nnx.State, tables: Tables, batch: Batch) -> jax.Array:
    """Click probabilities [B] of a batch."""
    return jax.nn.sigmoid(self.apply(params, tables, batch))

  def loss(self, params: nnx.State, tables: Tables, batch: Batch) -> jax.Array:
    """The mean training loss of a batch (`loss_function`). Differentiable with respect
    to `params` and to `tables`; the gradient with respect to the tables is dense (the
    tables' shape), where `train_step` never forms one."""
    return self._loss(params, self.embedding.embed(tables, self.qr.split(batch)), batch)

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    """One optimisation step: (the next state, {"loss": the batch's loss before the
    step, "lr": the step's learning rate}).

    The loss is differentiated with respect to the dense parameters and to the
    looked-up vectors (where their rows live), never the tables: the MLPs get the
    optax update, the tables a sparse update of the rows the batch touched. Both
    train at `schedule(state.step)`.
    """
    forward = self.embedding.forward(state.tables, self.qr.split(batch))
    loss, (g_params, g_vectors) = jax.value_and_grad(
        lambda params, vectors: self._loss(params, forward.embed(vectors), batch),
        argnums=(0, 1))(state.params, forward.vectors)
    lr = self.schedule(state.step)
    with jax.named_scope("dense update"):
      updates, opt_state = self.tx.update(g_params, state.opt_state, state.params)
      params = optax.apply_updates(state.params, jax.tree.map(lambda u: lr * u, updates))
    tables, emb_opt_state = forward.apply_gradients(
        self.sparse_opt, state.tables, state.emb_opt_state, g_vectors, lr, state.step)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           tables=tables, emb_opt_state=emb_opt_state)
    return new_state, {"loss": loss, "lr": lr}

  def _logits(self, params: nnx.State, emb: jax.Array, batch: Batch) -> jax.Array:
    """The dense network on the pooled embeddings [B, F, D]."""
    with jax.named_scope("dense"):
      return nnx.merge(self.graphdef, params)(batch["dense"], self.qr.combine(emb))

  def _loss(self, params: nnx.State, emb: jax.Array, batch: Batch) -> jax.Array:
    logits = self._logits(params, emb, batch)
    with jax.named_scope("dense"):
      return self.objective(logits, batch["label"])
