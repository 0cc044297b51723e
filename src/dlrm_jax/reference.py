"""Weights of the reference PyTorch DLRM (facebookresearch/dlrm) in our layout.

The reference's `DLRM_Net.state_dict()` names its layers `bot_l.I.weight`,
`top_l.I.weight` (I = 0, 2, 4, ...: the odd entries are activations) and
`emb_l.K.weight` (a quotient-remainder table `emb_l.K.weight_q` and `weight_r`, a
mixed-dimension one `emb_l.K.embs.weight` and, if narrower than D, its projection
`emb_l.K.proj.weight`); a Linear stores W as [out, in] and computes x W^T + b.
`from_reference` maps such arrays (as numpy, e.g. `{k: v.numpy() for k, v in
state_dict.items()}`) onto our dense parameters and embedding tables, and
`to_reference` goes back, so a model trained by either loads in the other.
`config_from_reference` reads the architecture off such arrays (what the
reference's flags were), so that a config can be made to fit them.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

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
  if "projection" in values:  # mixed-dimension tables: [D, d] Linear weights, stacked
    kernels = values["projection"]["kernels"]
    for i in sorted(kernels):
      n, w, d = kernels[i].shape
      features = [f for f, dim in enumerate(spec.dims) if dim == w]
      kernels[i] = jnp.asarray(np.stack([checked_array(
          arrays, f"{prefix}emb_l.{f}.proj.weight", (d, w)).T for f in features]), jnp.float32)
  nnx.replace_by_pure_dict(state, values)
  tables = []
  for k, s in enumerate(collection.specs):
    name = prefix + table_name(k, s.name)
    mixed = name.replace(".weight", ".embs.weight")  # PrEmbeddingBag's table
    tables.append(checked_array(arrays, mixed if mixed in arrays else name, (s.rows, s.dim)))
  return state, collection.from_arrays(tables)


def table_name(k: int, name: str) -> str:
  """The reference's name of table `k` (ours: `name`): `emb_l.F.weight`, or for the
  quotient-remainder pair of feature F (`tFq`, `tFr`) its QREmbeddingBag's
  `emb_l.F.weight_q` and `emb_l.F.weight_r`."""
  m = re.fullmatch(r"t(\d+)([qr]?)", name)
  if m is None:
    return f"emb_l.{k}.weight"
  return f"emb_l.{m.group(1)}.weight" + (f"_{m.group(2)}" if m.group(2) else "")


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
  mixed = "projection" in values  # every table a PrEmbeddingBag, as the reference's
  for k, (spec, table) in enumerate(zip(collection.specs, collection.to_arrays(tables))):
    name = table_name(k, spec.name)
    out[name.replace(".weight", ".embs.weight") if mixed else name] = table
  if mixed:
    kernels = values["projection"]["kernels"]
    dim = next(iter(kernels.values())).shape[-1]
    dims = [s.dim for s in collection.specs]
    for i, w in enumerate(sorted({d for d in dims if d < dim}, reverse=True)):
      for j, f in enumerate(f for f, d in enumerate(dims) if d == w):
        out[f"emb_l.{f}.proj.weight"] = np.asarray(kernels[i][j]).T.copy()
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


def config_from_reference(arrays: Mapping[str, np.ndarray], prefix: str = "",
                          table_rows: Sequence[int] | None = None) -> dict:
  """The config fields (`arch_*`, `qr_*`, `md_*`, `data.num_dense_features`) of the model
  whose reference state-dict arrays these are: sizes from the shapes, the
  interaction from the top MLP's input width (dot: D + F (F + 1) / 2 pairs, or with
  the diagonal D + (F + 1) (F + 2) / 2; cat: (F + 1) D for F features).

  Quotient-remainder tables (`emb_l.F.weight_q` / `weight_r`) set `qr_flag`, the
  collisions (the remainder tables' rows) and a threshold between the plain and
  the split tables; `qr_operation` is "concat" where the halves make the bottom
  MLP's width, else mult or add, which the shapes cannot tell (left out). A split
  table's row count is known only to within the collisions: `table_rows` (the
  config's) is kept where it fits, else ceil(n / c) c is used. Mixed-dimension
  tables (`emb_l.F.embs.weight`, `proj.weight` where narrower than D) set `md_flag`
  and their widths as `md_dims`. Raises KeyError / ValueError for weights of no
  DLRM_Net this package builds.
  """
  arrays = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  plain = {int(m.group(1)): np.asarray(v) for k, v in arrays.items()
           if (m := re.fullmatch(r"emb_l\.(\d+)\.(?:embs\.)?weight", k))}
  split = {int(m.group(1)): (np.asarray(v), checked_array(arrays, f"emb_l.{m.group(1)}.weight_r"))
           for k, v in arrays.items() if (m := re.fullmatch(r"emb_l\.(\d+)\.weight_q", k))}
  f = len(plain) + len(split)
  if not f or sorted({*plain, *split}) != list(range(f)):
    raise KeyError("reference weights need emb_l.0 .. emb_l.F-1 (weight, or weight_q and "
                   f"weight_r, or embs.weight), got tables {sorted({*plain, *split})}")
  bottom = mlp_widths(numbered_layers(arrays, r"bot_l\.(\d+)\.weight"), "bot_l")
  top = mlp_widths(numbered_layers(arrays, r"top_l\.(\d+)\.weight"), "top_l")
  if any(k.startswith("emb_l.") and ".embs." in k for k in arrays):
    if split:
      raise ValueError("quotient-remainder and mixed-dimension tables together: not loaded")
    d, out = int(bottom[-1]), _mixed_fields(arrays, plain, int(bottom[-1]))
    rows = [int(plain[k].shape[0]) for k in range(f)]
  else:
    dims = {int(t.shape[1]) for t in plain.values()} | {
        int(t.shape[1]) for pair in split.values() for t in pair}
    if len(dims) != 1:
      raise ValueError(f"plain tables of several widths {sorted(dims)}: not loaded")
    d, rows, out = _split_fields(plain, split, dims.pop(), bottom, table_rows)
    out["md_flag"] = False
  if bottom[-1] != d:
    raise ValueError(f"the bottom MLP ends in {bottom[-1]}, the tables are {d} wide")
  interactions = {d + f * (f + 1) // 2: ("dot", False),
                  d + (f + 1) * (f + 2) // 2: ("dot", True), (f + 1) * d: ("cat", False)}
  if top[0] not in interactions:
    raise ValueError(f"the top MLP takes {top[0]} inputs: no dot or cat interaction of "
                     f"{f} features of width {d} gives that")
  op, itself = interactions[top[0]]
  out.update({"arch_sparse_feature_size": d, "arch_embedding_size": "-".join(map(str, rows)),
              "arch_mlp_bot": "-".join(map(str, bottom)),
              "arch_mlp_top": "-".join(map(str, top[1:])),
              "arch_interaction_op": op, "arch_interaction_itself": itself,
              "arch_dot_pair_order": "lower", "data.num_dense_features": bottom[0]})
  return out


def _mixed_fields(arrays, tables: dict[int, np.ndarray], dim: int) -> dict:
  """`md_*` of mixed-dimension tables of D = `dim`: each narrower one needs its [D, d]
  projection."""
  widths = [int(tables[k].shape[1]) for k in range(len(tables))]
  for k, w in enumerate(widths):
    if w > dim:
      raise ValueError(f"emb_l.{k}.embs.weight is {w} wide, over the bottom MLP's {dim}")
    if w < dim:
      checked_array(arrays, f"emb_l.{k}.proj.weight", (dim, w))
  return {"qr_flag": False, "md_flag": True, "md_dims": "-".join(map(str, widths))}


def _split_fields(plain, split, d: int, bottom, table_rows) -> tuple[int, list[int], dict]:
  """(D, the tables' rows, `qr_*`) of plain and quotient-remainder tables of width d."""
  f = len(plain) + len(split)
  if not split:
    return d, [int(plain[k].shape[0]) for k in range(f)], {"qr_flag": False}
  collisions = {int(r.shape[0]) for _, r in split.values()}
  if len(collisions) != 1:
    raise ValueError(f"quotient-remainder tables of several collisions {sorted(collisions)}")
  c = collisions.pop()
  concat = bottom[-1] == 2 * d and not plain
  rows = []
  for k in range(f):
    if k in plain:
      rows.append(int(plain[k].shape[0]))
      continue
    q = int(split[k][0].shape[0])
    hint = None if table_rows is None or k >= len(table_rows) else int(table_rows[k])
    rows.append(hint if hint is not None and -(-hint // c) == q else q * c)
  smallest = min(rows[k] for k in split)
  threshold = max((rows[k] for k in plain), default=smallest - 1)
  if threshold >= smallest:
    raise ValueError(f"a plain table of {threshold} rows and a split one of {smallest}: "
                     "no threshold splits them so")
  return 2 * d if concat else d, rows, {
      "qr_flag": True, "qr_collisions": c, "qr_threshold": threshold,
      **({"qr_operation": "concat"} if concat else {})}
