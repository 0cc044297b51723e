"""Weights of TorchRec's DLRM models (`torchrec.models.dlrm`) in our layout.

`DLRM_DCN` (DLRM-DCNv2, the model MLPerf trains) maps onto a config with
`arch_interaction_op = "dcn"`, and `DLRM` onto the dot interaction with
`arch_dot_pair_order = "upper"` (TorchRec keeps the Gram matrix's upper
triangle, the reference the lower one). Their `state_dict()` names:

  dense_arch.model._mlp.I._linear.{weight,bias}     bottom MLP, layer I
  inter_arch.crossnet.{V_kernels,W_kernels,bias}.L  cross layer L (DLRM_DCN):
                                                    V [r, N], W [N, r], b [N]
  over_arch.model.0._mlp.I._linear.{weight,bias}    top MLP, hidden layer I
  over_arch.model.1.{weight,bias}                   top MLP, the logit layer
  sparse_arch.embedding_bag_collection.embedding_bags.NAME.weight   a table

A Linear stores W as [out, in] and computes x W^T + b. `from_torchrec` takes
such arrays as numpy (`{k: v.numpy() for k, v in model.state_dict().items()}`,
after gathering a sharded model's tables) and `to_torchrec` goes back;
`config_from_torchrec` reads the architecture off them.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlrm_jax.embedding import EmbeddingCollection, Tables
from dlrm_jax.model import ModelSpec, abstract_model
from dlrm_jax.reference import checked_array, mlp_widths, numbered_layers

TABLE_PREFIX = "sparse_arch.embedding_bag_collection.embedding_bags"


def _check_spec(spec: ModelSpec) -> None:
  if spec.interaction == "dot" and (spec.dot_pair_order != "upper" or spec.interaction_itself):
    raise ValueError("TorchRec's DLRM keeps the upper triangle of the dot products without the "
                     "diagonal: set arch_dot_pair_order='upper' and arch_interaction_itself=False")
  if spec.interaction not in ("dot", "dcn"):
    raise ValueError(f"TorchRec's DLRM models have no {spec.interaction!r} interaction "
                     "(DLRM: 'dot', DLRM_DCN: 'dcn')")


def _names(values: dict) -> list[tuple[dict, str, str]]:
  """(our layer's dict, its TorchRec weight name, bias name or None) for every layer."""
  out = []
  bottom = values["bottom"]["layers"]
  for i in sorted(bottom):
    name = f"dense_arch.model._mlp.{i}._linear"
    out.append((bottom[i], f"{name}.weight", f"{name}.bias"))
  top = values["top"]["layers"]
  last = max(top)
  for i in sorted(top):
    name = "over_arch.model.1" if i == last else f"over_arch.model.0._mlp.{i}._linear"
    out.append((top[i], f"{name}.weight", f"{name}.bias"))
  for l, layer in sorted(values.get("interaction", {}).get("layers", {}).items()):
    out.append((layer["v"], f"inter_arch.crossnet.V_kernels.{l}", None))
    out.append((layer["w"], f"inter_arch.crossnet.W_kernels.{l}", f"inter_arch.crossnet.bias.{l}"))
  return out


def table_names(collection: EmbeddingCollection) -> list[str]:
  """TorchRec's default names in our fixtures and MLPerf's reference: t0, t1, ..."""
  return [f"t{k}" for k in range(len(collection.specs))]


def from_torchrec(spec: ModelSpec, collection: EmbeddingCollection,
                  arrays: Mapping[str, np.ndarray], prefix: str = "",
                  tables: Sequence[str] | None = None) -> tuple[nnx.State, Tables]:
  """Dense parameters and tables from TorchRec DLRM / DLRM_DCN state-dict arrays.

  `tables`: the embedding-bag names in table order (default t0, t1, ...).
  Raises KeyError naming a missing entry, ValueError on a shape mismatch or a
  spec that TorchRec's models cannot have.
  """
  _check_spec(spec)
  _, state = nnx.split(abstract_model(spec))
  values = nnx.to_pure_dict(state)
  for layer, weight, bias in _names(values):
    w = checked_array(arrays, prefix + weight, layer["kernel"].shape[::-1])
    layer["kernel"] = jnp.asarray(w.T, jnp.float32)
    if bias is not None:
      layer["bias"] = jnp.asarray(checked_array(arrays, prefix + bias, layer["bias"].shape),
                                  jnp.float32)
  nnx.replace_by_pure_dict(state, values)
  names = tables or table_names(collection)
  out = collection.from_arrays([
      checked_array(arrays, f"{prefix}{TABLE_PREFIX}.{name}.weight", (s.rows, s.dim))
      for name, s in zip(names, collection.specs, strict=True)])
  return state, out


def to_torchrec(params: nnx.State, collection: EmbeddingCollection, tables: Tables,
                names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """TorchRec's state-dict names and layouts for our parameters and tables."""
  out = {}
  for layer, weight, bias in _names(nnx.to_pure_dict(params)):
    out[weight] = np.asarray(layer["kernel"]).T.copy()
    if bias is not None:
      out[bias] = np.asarray(layer["bias"])
  names = names or table_names(collection)
  for name, table in zip(names, collection.to_arrays(tables), strict=True):
    out[f"{TABLE_PREFIX}.{name}.weight"] = table
  return out


def torchrec_table_names(arrays: Mapping[str, np.ndarray], prefix: str = "") -> list[str]:
  """The embedding-bag names in the arrays, in table order: by the number they end in
  (t0, t1, ..., t10), then by name."""
  pattern = re.escape(f"{prefix}{TABLE_PREFIX}.") + r"(.+)\.weight"
  names = [m.group(1) for k in arrays if (m := re.fullmatch(pattern, k))]
  number = lambda n: (int(m.group(1)) if (m := re.search(r"(\d+)$", n)) else -1, n)
  return sorted(names, key=number)


def config_from_torchrec(arrays: Mapping[str, np.ndarray], prefix: str = "",
                         tables: Sequence[str] | None = None) -> dict:
  """The config fields of the `DLRM` (dot, upper pair order) or `DLRM_DCN` (a cross
  network in `inter_arch.crossnet`) whose state-dict arrays these are."""
  arrays = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  names = list(tables or torchrec_table_names(arrays))
  if not names:
    raise KeyError(f"TorchRec weights have no {TABLE_PREFIX}.NAME.weight")
  shapes = [checked_array(arrays, f"{TABLE_PREFIX}.{n}.weight").shape for n in names]
  dims = {int(s[1]) for s in shapes}
  if len(dims) != 1:
    raise ValueError(f"tables of several widths {sorted(dims)}: not loaded")
  d, f = dims.pop(), len(names)
  bottom = mlp_widths(numbered_layers(arrays, r"dense_arch\.model\._mlp\.(\d+)\._linear\.weight"),
                      "dense_arch")
  hidden = numbered_layers(arrays, r"over_arch\.model\.0\._mlp\.(\d+)\._linear\.weight")
  top = mlp_widths(hidden + [checked_array(arrays, "over_arch.model.1.weight")], "over_arch")
  out = {"arch_sparse_feature_size": d,
         "arch_embedding_size": "-".join(str(int(s[0])) for s in shapes),
         "arch_mlp_bot": "-".join(map(str, bottom)), "arch_mlp_top": "-".join(map(str, top[1:])),
         "data.num_dense_features": bottom[0], "qr_flag": False, "md_flag": False}
  crossnet = numbered_layers(arrays, r"inter_arch\.crossnet\.V_kernels\.(\d+)")
  if crossnet:
    out.update(arch_interaction_op="dcn", dcn_num_layers=len(crossnet),
               dcn_low_rank_dim=int(crossnet[0].shape[0]))
    want = (f + 1) * d
  else:
    out.update(arch_interaction_op="dot", arch_interaction_itself=False,
               arch_dot_pair_order="upper")
    want = d + f * (f + 1) // 2
  if top[0] != want:
    raise ValueError(f"the over arch takes {top[0]} inputs; {out['arch_interaction_op']} of "
                     f"{f} tables of width {d} gives {want}")
  return out
