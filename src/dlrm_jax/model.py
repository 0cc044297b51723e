"""The dense half of DLRM as Flax NNX modules: MLPs and feature interactions.

The embedding tables are deliberately not part of these modules: they live in
their own pytree (see `dlrm_jax.embedding`) so that they can be sharded and
updated sparsely. `DLRM.__call__` therefore takes the already looked-up
embedding vectors.

Layer order, activations and initialisation follow the reference
implementation (facebookresearch/dlrm, `dlrm_s_pytorch.py`), so that weights
trained there load here and give the same predictions; the "dcn" interaction
(DLRM-DCNv2) follows TorchRec's `DLRM_DCN` (`dlrm_jax.torchrec` loads its
weights).

`compute_dtype` bfloat16 runs the MLPs, the interaction and the cross layers
in bfloat16 on float32 parameters; the logits come back as float32, so the
loss is float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlrm_jax.config import ConfigError, dash_list, parse_widths
from dlrm_jax.ops import take_static


def reference_kernel_init(key, shape, dtype=jnp.float32):
  """N(0, sqrt(2 / (fan_in + fan_out))), the reference's Linear weight init."""
  fan_in, fan_out = shape
  return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 / (fan_in + fan_out)).astype(dtype)


def reference_bias_init(key, shape, dtype=jnp.float32):
  """N(0, sqrt(1 / fan_out)), the reference's Linear bias init."""
  return jax.random.normal(key, shape, dtype) * np.sqrt(1.0 / shape[-1]).astype(dtype)


def host_kernel(rng: np.random.Generator, shape: tuple[int, int]) -> jax.Array:
  """A Flax [in, out] kernel drawn as `reference_kernel_init`'s distribution (torch's
  `xavier_normal_`) with numpy, as the reference draws its [out, in] matrix."""
  fan_in, fan_out = shape
  w = rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), (fan_out, fan_in))
  return jnp.asarray(w.T, jnp.float32)


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EMBEDDING_DTYPES = ("float32", "bfloat16", "float16")  # dlrm_jax.embedding's STORAGE_DTYPES


def accumulation_dtype(dtype):
  """What a matrix product of `dtype` inputs accumulates and returns: float32 for 16-bit
  inputs (XLA:CPU then runs a native bfloat16 kernel, about 2x float32's speed on CPUs
  with AVX512-BF16, where a bfloat16 result makes it convert to float32 and multiply at
  float32's speed; GPUs and TPUs accumulate in float32 either way); None (the inputs'
  type) otherwise."""
  return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else None


def abstract_model(spec: ModelSpec) -> "DLRM":
  """`DLRM(spec)` with shapes and dtypes only (for its graph definition and state
  structure), nothing allocated."""
  return nnx.eval_shape(lambda: DLRM(spec, rngs=nnx.Rngs(0)))


def init_params(spec: ModelSpec, seed: int) -> nnx.State:
  """Reference-initialised parameters of `DLRM(spec)`, drawn on the host.

  Same distributions as the module's own initialisers, but drawn with numpy
  (as the reference does): XLA:CPU takes seconds to compile each random
  normal op, far longer than drawing a few MB of weights here.
  """
  _, state = nnx.split(abstract_model(spec))
  rng = np.random.default_rng(seed)
  values = nnx.to_pure_dict(state)
  for mlp in ("bottom", "top"):
    for i in sorted(values[mlp]["layers"]):
      layer = values[mlp]["layers"][i]
      fan_out = layer["kernel"].shape[1]
      layer["kernel"] = host_kernel(rng, layer["kernel"].shape)
      layer["bias"] = jnp.asarray(rng.normal(0.0, np.sqrt(1.0 / fan_out), fan_out), jnp.float32)
  host_init = INTERACTIONS[spec.interaction].host_init
  if host_init is not None:
    host_init(values["interaction"], rng)
  if "projection" in values:
    _projection_host_init(values["projection"], rng, spec.embedding_dim)
  nnx.replace_by_pure_dict(state, values)
  return state


def xavier_uniform_host(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
  """An [in, out] matrix U(+-sqrt(6 / (in + out))), torch's `xavier_uniform_` drawn as
  torch lays the matrix out ([out, in]) and transposed."""
  bound = np.sqrt(6.0 / (fan_in + fan_out))
  return rng.uniform(-bound, bound, (fan_out, fan_in)).T


class MLP(nnx.Module):
  """Stack of Linear layers with ReLU between them (and after the last if asked)."""

  def __init__(self, widths: tuple[int, ...], *, relu_last: bool, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.layers = nnx.List([
        nnx.Linear(
            fan_in, fan_out,
            kernel_init=reference_kernel_init,
            bias_init=reference_bias_init,
            dtype=dtype, param_dtype=jnp.float32,
            preferred_element_type=accumulation_dtype(dtype),
            rngs=rngs,
        )
        for fan_in, fan_out in zip(widths[:-1], widths[1:])
    ])
    self.relu_last = relu_last

  def __call__(self, x: jax.Array) -> jax.Array:
    last = len(self.layers) - 1
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < last or self.relu_last:
        x = jax.nn.relu(x)
    return x


DOT_PAIR_ORDERS = ("lower", "upper")


@functools.lru_cache(maxsize=None)
def dot_pair_indices(num_vectors: int, itself: bool, order: str = "lower") -> np.ndarray:
  """Flat indices into the [n, n] Gram matrix of the pairs kept, in their order.

  "lower" (the reference's): row-major lower triangle (1,0), (2,0), (2,1), (3,0),
  ...; with `itself` the diagonal too: (0,0), (1,0), (1,1), (2,0), ...
  "upper" (TorchRec's `DLRM`, `torch.triu_indices(n, n, 1)`): row-major upper
  triangle (0,1), (0,2), ..., (0,n-1), (1,2), ...; with `itself` from (0,0).
  """
  offset = 1 if itself else 0
  if order == "lower":
    pairs = [(i, j) for i in range(num_vectors) for j in range(i + offset)]
  elif order == "upper":
    pairs = [(i, j) for i in range(num_vectors) for j in range(i + 1 - offset, num_vectors)]
  else:
    raise ValueError(f"dot pair order {order!r} is not one of {DOT_PAIR_ORDERS}")
  return np.array([i * num_vectors + j for i, j in pairs], dtype=np.int32)


def dot_interaction(x: jax.Array, emb: jax.Array, itself: bool = False,
                    order: str = "lower") -> jax.Array:
  """[x, pairwise dots of {x, e_1..e_F}]: x [B, D], emb [B, F, D] -> [B, D + P]."""
  t = jnp.concatenate([x[:, None, :], emb], axis=1)  # [B, F+1, D]
  n = t.shape[1]
  gram = jnp.einsum("bid,bjd->bij", t, t, preferred_element_type=accumulation_dtype(t.dtype))
  gram = gram.reshape(t.shape[0], n * n)
  pairs = take_static(gram, dot_pair_indices(n, itself, order), axis=1)
  return jnp.concatenate([x, pairs], axis=1)


def cat_interaction(x: jax.Array, emb: jax.Array) -> jax.Array:
  """[x, e_1, ..., e_F] flattened: x [B, D], emb [B, F, D] -> [B, (F+1) D]."""
  return jnp.concatenate([x, emb.reshape(emb.shape[0], -1)], axis=1)


class DotInteraction(nnx.Module):
  """`dot_interaction` as a module (no parameters)."""

  def __init__(self, itself: bool, order: str = "lower"):
    self.itself, self.order = itself, order

  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    return dot_interaction(x, emb, self.itself, self.order)


class CatInteraction(nnx.Module):
  """`cat_interaction` as a module (no parameters)."""

  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    return cat_interaction(x, emb)


class LowRankCross(nnx.Module):
  """One DCNv2 cross layer of rank r: x_{l+1} = x0 * (W (V x_l) + b) + x_l, with
  V: N -> r (no bias) and W: r -> N."""

  def __init__(self, width: int, rank: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    # TorchRec's xavier-normal init, the reference Linear's distribution.
    kw = dict(kernel_init=reference_kernel_init, dtype=dtype, param_dtype=jnp.float32,
              preferred_element_type=accumulation_dtype(dtype), rngs=rngs)
    self.v = nnx.Linear(width, rank, use_bias=False, **kw)
    self.w = nnx.Linear(rank, width, bias_init=nnx.initializers.zeros_init(), **kw)

  def __call__(self, x0: jax.Array, x: jax.Array) -> jax.Array:
    return x0 * self.w(self.v(x)) + x


class CrossInteraction(nnx.Module):
  """DLRM-DCNv2's interaction (TorchRec's `InteractionDCNArch` with a
  `LowRankCrossNet`): x0 = [x, e_1, ..., e_F] flattened, [B, (F+1) D], through
  `num_layers` low-rank cross layers; the output has x0's width."""

  def __init__(self, width: int, num_layers: int, rank: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.layers = nnx.List([LowRankCross(width, rank, rngs=rngs, dtype=dtype)
                            for _ in range(num_layers)])

  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    x0 = cat_interaction(x, emb)
    out = x0
    for layer in self.layers:
      out = layer(x0, out)
    return out


def _cross_host_init(values: dict, rng: np.random.Generator) -> None:
  """TorchRec's initialisation of the cross layers, drawn on the host: xavier-normal
  V and W, zero bias."""
  for i in sorted(values["layers"]):
    layer = values["layers"][i]
    for name in ("v", "w"):
      layer[name]["kernel"] = host_kernel(rng, layer[name]["kernel"].shape)
    layer["w"]["bias"] = jnp.zeros_like(layer["w"]["bias"])


class Projection(nnx.Module):
  """Mixed-dimension tables' projections to D (dlrm_jax.embedding.mixed): feature f's
  vector, the first d_f values of its zero-padded one, times its own [d_f, D] matrix
  (no bias, the reference's `PrEmbeddingBag`); features of width D pass unchanged.
  One [n_w, w, D] kernel per narrower width w (its n_w features in order)."""

  def __init__(self, dims: tuple[int, ...], dim: int, *, rngs: nnx.Rngs):
    self.dims, self.dim = tuple(int(d) for d in dims), int(dim)
    self.widths = tuple(sorted({d for d in self.dims if d < self.dim}, reverse=True))
    init = nnx.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.kernels = nnx.List([
        nnx.Param(init(rngs.params(), (len(self.features(w)), w, self.dim), jnp.float32))
        for w in self.widths])

  def features(self, width: int) -> list[int]:
    return [f for f, d in enumerate(self.dims) if d == width]

  def __call__(self, emb: jax.Array) -> jax.Array:
    """[B, F, W] (each narrow feature's vector zero-padded to the widest table's W, which
    is D whenever a table keeps D), in the compute dtype ->
    [B, F, D] projected."""
    parts, order = [], self.features(self.dim)
    if order:
      parts.append(take_static(emb, order, axis=1))
    for w, kernel in zip(self.widths, self.kernels):
      features = self.features(w)
      x = take_static(emb, features, axis=1)[..., :w]
      parts.append(jnp.einsum("bfw,fwd->bfd", x, kernel[...].astype(x.dtype),
                              preferred_element_type=accumulation_dtype(x.dtype)
                              ).astype(x.dtype))
      order = order + features
    return take_static(jnp.concatenate(parts, axis=1), np.argsort(order), axis=1)


def _projection_host_init(values: dict, rng: np.random.Generator, dim: int) -> None:
  """The projections as the reference draws them: xavier-uniform, feature by feature."""
  for i in sorted(values["kernels"]):
    n, w, _ = values["kernels"][i].shape
    values["kernels"][i] = jnp.asarray(
        np.stack([xavier_uniform_host(rng, w, dim) for _ in range(n)]), jnp.float32)


def _cat_width(spec: "ModelSpec") -> int:
  return (spec.num_tables + 1) * spec.embedding_dim


def _dot_width(spec: "ModelSpec") -> int:
  n = spec.num_tables + 1
  pairs = n * (n + 1) // 2 if spec.interaction_itself else n * (n - 1) // 2
  return spec.embedding_dim + pairs


@dataclasses.dataclass(frozen=True)
class Interaction:
  """An interaction of the bottom MLP's output x [B, D] with the embedding vectors
  emb [B, F, D]: `make(spec, rngs)` builds its module (called as module(x, emb)),
  `width(spec)` is its output width (the top MLP's input width), `host_init`
  (for one with parameters) draws them in place into their pure dict with a
  numpy generator (see `init_params`)."""

  make: Callable[["ModelSpec", nnx.Rngs], nnx.Module]
  width: Callable[["ModelSpec"], int]
  host_init: Callable[[dict, np.random.Generator], None] | None = None


# arch_interaction_op -> its interaction. A new one is an entry here (and its test).
INTERACTIONS: dict[str, Interaction] = {
    "dot": Interaction(
        make=lambda spec, rngs: DotInteraction(spec.interaction_itself, spec.dot_pair_order),
        width=_dot_width),
    "cat": Interaction(make=lambda spec, rngs: CatInteraction(), width=_cat_width),
    "dcn": Interaction(
        make=lambda spec, rngs: CrossInteraction(
            _cat_width(spec), spec.dcn_num_layers, spec.dcn_low_rank_dim, rngs=rngs,
            dtype=spec.dtype),
        width=_cat_width, host_init=_cross_host_init),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The DLRM architecture, validated.

  Attributes:
    num_dense: number of dense input features (13 for Criteo).
    embedding_dim: D, the width of every embedding vector.
    bottom: bottom-MLP widths, input first (first == num_dense, last == D).
    top: top-MLP output widths (last == 1); its input width is derived.
    table_rows: rows of each embedding table, one table per categorical feature.
    interaction: a name in INTERACTIONS ("dot", "cat", "dcn").
    interaction_itself: for "dot", keep the diagonal (self dot products) too.
    dot_pair_order: for "dot", the order of the kept pairs: "lower" (the
      reference's) or "upper" (TorchRec's `DLRM`).
    dcn_num_layers, dcn_low_rank_dim: for "dcn", the cross layers and their rank.
    compute_dtype: "float32" or "bfloat16", the arithmetic of the MLPs and the
      interaction (parameters stay float32).
    embedding_dtype: "float32", "bfloat16" or "float16", the tables' storage
      (lookups give float32 vectors; optimiser state is float32).
    table_dims: each table's width (mixed-dimension tables, dlrm_jax.embedding.mixed:
      those narrower than D are projected to D); () for D each.
  """

  num_dense: int
  embedding_dim: int
  bottom: tuple[int, ...]
  top: tuple[int, ...]
  table_rows: tuple[int, ...]
  interaction: str = "dot"
  interaction_itself: bool = False
  dot_pair_order: str = "lower"
  dcn_num_layers: int = 3
  dcn_low_rank_dim: int = 512
  compute_dtype: str = "float32"
  embedding_dtype: str = "float32"
  table_dims: tuple[int, ...] = ()

  def __post_init__(self):
    if self.embedding_dim <= 0:
      raise ConfigError(f"arch_sparse_feature_size={self.embedding_dim} must be >= 1")
    if len(self.bottom) < 2:
      raise ConfigError(
          f"arch_mlp_bot={dash_list(self.bottom)} needs at least an input and an output width")
    if self.bottom[0] != self.num_dense:
      raise ConfigError(
          f"arch_mlp_bot={dash_list(self.bottom)} starts with {self.bottom[0]}, but there are "
          f"{self.num_dense} dense features: its first width must be the number of dense features")
    if self.bottom[-1] != self.embedding_dim:
      raise ConfigError(
          f"arch_mlp_bot={dash_list(self.bottom)} ends with {self.bottom[-1]}, but "
          f"arch_sparse_feature_size={self.embedding_dim}: the bottom MLP's output is interacted "
          "with the embedding vectors, so its last width must equal the embedding dim")
    if self.top[-1] != 1:
      raise ConfigError(
          f"arch_mlp_top={dash_list(self.top)} ends with {self.top[-1]}: the top MLP outputs one "
          "click logit, so its last width must be 1")
    if not self.table_rows:
      raise ConfigError("arch_embedding_size is empty: give at least one table size")
    if self.interaction not in INTERACTIONS:
      raise ConfigError(
          f"arch_interaction_op={self.interaction!r} is not one of {tuple(INTERACTIONS)}")
    if self.dot_pair_order not in DOT_PAIR_ORDERS:
      raise ConfigError(f"arch_dot_pair_order={self.dot_pair_order!r} is not one of "
                        f"{DOT_PAIR_ORDERS}")
    for name in ("dcn_num_layers", "dcn_low_rank_dim"):
      if self.interaction == "dcn" and getattr(self, name) < 1:
        raise ConfigError(f"{name}={getattr(self, name)} must be >= 1 with "
                          "arch_interaction_op='dcn'")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ConfigError(f"compute_dtype={self.compute_dtype!r} is not one of "
                        f"{tuple(COMPUTE_DTYPES)}")
    if self.embedding_dtype not in EMBEDDING_DTYPES:
      raise ConfigError(f"embedding_dtype={self.embedding_dtype!r} is not one of "
                        f"{EMBEDDING_DTYPES}")
    if self.table_dims and (len(self.table_dims) != self.num_tables or not all(
        1 <= d <= self.embedding_dim for d in self.table_dims)):
      raise ConfigError(f"table widths {dash_list(self.table_dims)} must be one per table "
                        f"({self.num_tables}), each in [1, {self.embedding_dim}]")

  @property
  def dims(self) -> tuple[int, ...]:
    """Each table's width (D where `table_dims` is empty)."""
    return self.table_dims or (self.embedding_dim,) * self.num_tables

  @property
  def dtype(self):
    """The JAX dtype of `compute_dtype`."""
    return COMPUTE_DTYPES[self.compute_dtype]

  @property
  def num_tables(self) -> int:
    return len(self.table_rows)

  @property
  def interaction_width(self) -> int:
    """Width of the interaction output, i.e. the top MLP's input width."""
    return INTERACTIONS[self.interaction].width(self)

  @classmethod
  def from_config(cls, config) -> "ModelSpec":
    """Builds the spec from a config with the reference's `arch_*` knobs."""
    return cls(
        num_dense=int(config.data.num_dense_features),
        embedding_dim=int(config.arch_sparse_feature_size),
        bottom=parse_widths("arch_mlp_bot", config.arch_mlp_bot),
        top=parse_widths("arch_mlp_top", config.arch_mlp_top),
        table_rows=parse_widths("arch_embedding_size", config.arch_embedding_size),
        interaction=str(config.arch_interaction_op),
        interaction_itself=bool(config.arch_interaction_itself),
        dot_pair_order=str(config.arch_dot_pair_order),
        dcn_num_layers=int(config.dcn_num_layers),
        dcn_low_rank_dim=int(config.dcn_low_rank_dim),
        compute_dtype=str(config.compute_dtype),
        embedding_dtype=str(config.embedding_dtype),
        table_dims=_mixed_dims(config),
    )


def _mixed_dims(config) -> tuple[int, ...]:
  """The tables' widths of a config with md_flag; () without."""
  from dlrm_jax.embedding.mixed import dims_from_config

  dims = dims_from_config(config)
  return dims if any(d != int(config.arch_sparse_feature_size) for d in dims) else ()


class DLRM(nnx.Module):
  """Bottom MLP, interaction with the embedding vectors, top MLP; returns logits."""

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    if spec.table_dims:  # mixed-dimension tables: their projections to D
      self.projection = Projection(spec.table_dims, spec.embedding_dim, rngs=rngs)
    self.bottom = MLP(spec.bottom, relu_last=True, rngs=rngs, dtype=spec.dtype)
    self.interaction = INTERACTIONS[spec.interaction].make(spec, rngs)
    self.top = MLP((spec.interaction_width,) + spec.top, relu_last=False, rngs=rngs,
                   dtype=spec.dtype)

  def __call__(self, dense: jax.Array, emb: jax.Array) -> jax.Array:
    """dense [B, num_dense], emb [B, F, D] -> float32 click logits [B]."""
    dtype = self.spec.dtype
    x = self.bottom(dense.astype(dtype)).astype(dtype)
    emb = emb.astype(dtype)
    if self.spec.table_dims:
      emb = self.projection(emb)
    logits = self.top(self.interaction(x, emb))[:, 0]
    return logits.astype(jnp.float32)
