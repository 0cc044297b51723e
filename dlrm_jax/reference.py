"""Weights of the reference PyTorch DLRM (facebookresearch/dlrm) in our layout.

The reference's `DLRM_Net.state_dict()` names its layers `bot_l.I.weight`,
`top_l.I.weight` (I = 0, 2, 4, ...: the odd entries are activations) and
`emb_l.K.weight`; a Linear stores W as [out, in] and computes x W^T + b.
`from_reference` maps such arrays (as numpy, e.g. `{k: v.numpy() for k, v in
state_dict.items()}`) onto our dense parameters and embedding tables, and
`to_reference` goes back, so a model trained by either loads in the other.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlrm_jax.embedding import EmbeddingCollection, Tables
from dlrm_jax.model import ModelSpec, abstract_model

_MLPS = (("bottom", "bot_l"), ("top", "top_l"))


def from_reference(spec: ModelSpec, collection: EmbeddingCollection,
                   arrays: Mapping[str, np.ndarray], prefix: str = "") -> tuple[nnx.State, Tables]:
  """Dense parameters and tables from reference state-dict arrays.

  Raises KeyError naming the missing entry and ValueError on a shape mismatch.
  """
  _, state = nnx.split(abstract_model(spec))
  values = nnx.to_pure_dict(state)
  for ours, theirs in _MLPS:
    for i in sorted(values[ours]["layers"]):
      layer = values[ours]["layers"][i]
      w = checked_array(arrays, f"{prefix}{theirs}.{2 * i}.weight", layer["kernel"].shape[::-1])
      b = checked_array(arrays, f"{prefix}{theirs}.{2 * i}.bias", layer["bias"].shape)
      layer["kernel"] = jnp.asarray(w.T, jnp.float32)
      layer["bias"] = jnp.asarray(b, jnp.float32)
  nnx.replace_by_pure_dict(state, values)
  tables = collection.from_arrays([
      checked_array(arrays, f"{prefix}emb_l.{k}.weight", (s.rows, s.dim))
      for k, s in enumerate(collection.specs)])
  return state, tables


def to_reference(params: nnx.State, collection: EmbeddingCollection,
                 tables: Tables) -> dict[str, np.ndarray]:
  """The reference's state-dict names and layouts for our parameters and tables."""
  values = nnx.to_pure_dict(params)
  out = {}
  for ours, theirs in _MLPS:
    for i in sorted(values[ours]["layers"]):
      layer = values[ours]["layers"][i]
      out[f"{theirs}.{2 * i}.weight"] = np.asarray(layer["kernel"]).T.copy()
      out[f"{theirs}.{2 * i}.bias"] = np.asarray(layer["bias"])
  for k, table in enumerate(collection.to_arrays(tables)):
    out[f"emb_l.{k}.weight"] = table
  return out


def checked_array(arrays: Mapping[str, np.ndarray], name: str,
                  shape: tuple[int, ...]) -> np.ndarray:
  """`arrays[name]`, checked to have `shape` (KeyError / ValueError naming it otherwise)."""
  if name not in arrays:
    raise KeyError(f"reference weights have no {name!r}")
  value = np.asarray(arrays[name])
  if value.shape != tuple(shape):
    raise ValueError(f"{name}: expected shape {tuple(shape)}, got {value.shape}")
  return value
