"""The train state: one pytree of everything a train step reads and writes, its
abstract shapes and its shardings over the mesh.

Dense parameters and their optax state are replicated (the MLPs are data
parallel); the tables and their sparse optimiser slots follow the sharding
plan (`ShardedEmbedding`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dlrm_jax import parallel
from dlrm_jax.embedding import Tables
from dlrm_jax.embedding.sharded import ShardedEmbedding


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes."""

  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  tables: Tables
  emb_opt_state: Any

  def as_dict(self) -> dict[str, Any]:
    """Field name -> subtree (the checkpoint's `state` item)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def state_shapes(abstract_params: nnx.State, embedding: ShardedEmbedding,
                 tx: optax.GradientTransformation, sparse_opt) -> TrainState:
  """Shapes and dtypes of a train state, nothing allocated."""
  tables = jax.eval_shape(embedding.init, 0)
  return TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
      opt_state=jax.eval_shape(tx.init, abstract_params), tables=tables,
      emb_opt_state=jax.eval_shape(lambda t: embedding.init_optimizer(sparse_opt, t), tables))


def state_shardings(shapes: TrainState, embedding: ShardedEmbedding) -> TrainState:
  """Where each leaf of a train state lives: dense leaves replicated, the embedding's
  leaves as its plan lays them out."""
  rep = parallel.replicated(embedding.mesh)
  return TrainState(step=rep, params=jax.tree.map(lambda _: rep, shapes.params),
                    opt_state=jax.tree.map(lambda _: rep, shapes.opt_state),
                    tables=embedding.table_shardings(),
                    emb_opt_state=embedding.state_shardings(shapes.emb_opt_state))


def abstract_state(shapes: TrainState, shardings: TrainState) -> TrainState:
  """Shapes, dtypes and shardings together (restore targets)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)
