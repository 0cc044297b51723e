"""Weights of the reference PyTorch DLRM (facebookresearch/dlrm) in our layout.

The reference's `DLRM_Net.state_dict()` names its layers `bot_l.I.weight`,
`top_l.I.weight` (I = 0, 2, 4, ...: the odd entries are activations) and
`emb_l.K.weight`; a Linear stores W as [out, in] and computes x W^T + b.
`from_reference` maps such arrays (as numpy, e.g. `{k: v.numpy() for k, v in
state_dict.items()}`) onto our dense parameters and embedding tables, and
`to_reference` goes back, so a model trained by either loads in the other.
`config_from_reference` reads the architecture off such arrays (what the
reference's flags were), so that a config can be made to fit them.
"""

from __future__ import annotations

import re
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
                  shape: tuple[int, ...] | None = None) -> np.ndarray:
  """`arrays[name]`, checked to have `shape` if given (KeyError / ValueError naming it
  otherwise)."""
  if name not in arrays:
    raise KeyError(f"the weights have no {name!r}")
  value = np.asarray(arrays[name])
  if shape is not None and value.shape != tuple(shape):
    raise ValueError(f"{name}: expected shape {tuple(shape)}, got {value.shape}")
  return value


def numbered_layers(arrays: Mapping[str, np.ndarray], pattern: str) -> list[np.ndarray]:
  """The weights of names matching `pattern` (one group: the layer index), by index."""
  found = {int(m.group(1)): np.asarray(v) for k, v in arrays.items()
           if (m := re.fullmatch(pattern, k))}
  return [found[i] for i in sorted(found)]


def mlp_widths(weights: list[np.ndarray], name: str) -> list[int]:
  """[in, out_1, out_2, ...] of a chain of [out, in] Linear weights (ValueError if they
  do not chain)."""
  if not weights:
    raise KeyError(f"no {name} layers in the weights")
  widths = [int(weights[0].shape[1])]
  for w in weights:
    if w.ndim != 2 or w.shape[1] != widths[-1]:
      raise ValueError(f"{name}: a layer of shape {w.shape} does not follow one of width "
                       f"{widths[-1]}")
    widths.append(int(w.shape[0]))
  return widths


def config_from_reference(arrays: Mapping[str, np.ndarray], prefix: str = "") -> dict:
  """The config fields (`arch_*`, `data.num_dense_features`) of the model whose
  reference state-dict arrays these are: sizes from the shapes, the interaction
  from the top MLP's input width (dot: D + F (F + 1) / 2 pairs, or with the
  diagonal D + (F + 1) (F + 2) / 2; cat: (F + 1) D for F tables).

  Raises KeyError / ValueError for weights of no DLRM_Net this package builds
  (the reference's quotient-remainder and mixed-dimension tables among them).
  """
  arrays = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  if any(re.fullmatch(r"emb_l\.\d+\.(weight_q|weight_r|embs\..*|proj.*)", k) for k in arrays):
    raise ValueError("these are the reference's quotient-remainder or mixed-dimension "
                     "tables: they are not loaded (train those variants here)")
  tables = numbered_layers(arrays, r"emb_l\.(\d+)\.weight")
  if not tables:
    raise KeyError("reference weights have no 'emb_l.0.weight'")
  dims = {int(t.shape[1]) for t in tables}
  if len(dims) != 1:
    raise ValueError(f"tables of several widths {sorted(dims)}: not loaded")
  d, f = dims.pop(), len(tables)
  bottom = mlp_widths(numbered_layers(arrays, r"bot_l\.(\d+)\.weight"), "bot_l")
  top = mlp_widths(numbered_layers(arrays, r"top_l\.(\d+)\.weight"), "top_l")
  if bottom[-1] != d:
    raise ValueError(f"the bottom MLP ends in {bottom[-1]}, the tables are {d} wide")
  interactions = {d + f * (f + 1) // 2: ("dot", False),
                  d + (f + 1) * (f + 2) // 2: ("dot", True), (f + 1) * d: ("cat", False)}
  if top[0] not in interactions:
    raise ValueError(f"the top MLP takes {top[0]} inputs: no dot or cat interaction of "
                     f"{f} tables of width {d} gives that")
  op, itself = interactions[top[0]]
  return {"arch_sparse_feature_size": d, "arch_embedding_size": "-".join(
              str(int(t.shape[0])) for t in tables),
          "arch_mlp_bot": "-".join(map(str, bottom)), "arch_mlp_top": "-".join(map(str, top[1:])),
          "arch_interaction_op": op, "arch_interaction_itself": itself,
          "arch_dot_pair_order": "lower", "data.num_dense_features": bottom[0]}
