"""The HSTU encoder of DLRMv4 as Flax NNX modules: a positional encoder, then STU layers.

DLRMv4 (MLPerf Training's current recommendation benchmark) ranks candidates with an
HSTU model (Zhai et al. 2024, "Actions Speak Louder than Words", arXiv 2402.17152).
This module is its encoder, written from the equations of the reference's parity
fixtures (mlcommons/training PR #889, `recommendation_v4/`; the fixtures' README
states them) and checked against those fixtures by tests/test_hstu.py.

Batches are padded and dense: `x` [B, N, D], `timestamps` [B, N] (seconds), with
`lengths` [B] (valid tokens, from the start of each row) and `num_targets` [B] (the
last `num_targets[b]` valid tokens of row b are candidates). `jagged_to_padded` and
`padded_to_jagged` convert the reference's jagged layout (values [T, ...] plus
offsets [B+1]). Padded tokens are never attended to and come out as zeros.

The attention is a seam: any function `attention(q, k, v, mask) -> o` with
`dense_attention`'s signature can replace it (`chunked_attention` processes blocks
of queries, so that no [B, H, N, N] tensor exists at once; a Pallas or cuDNN kernel
would be another).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dlrm_jax.config import ConfigError

NORM_EPS = 1e-6  # both LayerNorms of an STU layer
TIME_BUCKET_SECONDS = 60.0  # bucket(dt) = floor(sqrt(dt / 60))


@dataclasses.dataclass(frozen=True)
class HSTUSpec:
  """The encoder's sizes and options, under the reference's names where it has them.

  `pos_contextual_seq_len` (c_p) is the positional encoder's contextual prefix (its
  first c_p tokens get position ids 0..c_p-1; DLRMv4: 8). `contextual_seq_len` (c) is
  the STU layers' contextual prefix inside the attention mask and `max_attn_len` (m)
  their attention window, 0 for none (DLRMv4: both 0). The layers are target-aware,
  as in DLRMv4: each target sees the history and itself, no other target.
  """
  embedding_dim: int  # D
  num_heads: int  # H
  attention_dim: int  # d_qk, per head
  hidden_dim: int  # d_v, per head
  num_layers: int
  num_position_buckets: int  # P, rows of the position table
  num_time_buckets: int  # the time table has num_time_buckets + 1 rows
  pos_contextual_seq_len: int = 0
  contextual_seq_len: int = 0
  max_attn_len: int = 0

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or value < 0:
        raise ConfigError(f"HSTU {field.name} must be an int >= 0, got {value!r}")
    for name in ("embedding_dim", "num_heads", "attention_dim", "hidden_dim",
                 "num_position_buckets"):
      if getattr(self, name) == 0:
        raise ConfigError(f"HSTU {name} must be positive")
    if self.pos_contextual_seq_len >= self.num_position_buckets:
      raise ConfigError(f"HSTU pos_contextual_seq_len {self.pos_contextual_seq_len} needs "
                        f"more than that many position buckets, got {self.num_position_buckets}")
    if self.num_time_buckets + 1 < self.embedding_dim:
      raise ConfigError(f"HSTU time buckets are clamped at embedding_dim - 1 = "
                        f"{self.embedding_dim - 1} (as in the reference): the time table "
                        f"needs num_time_buckets >= {self.embedding_dim - 1}, "
                        f"got {self.num_time_buckets}")

  @property
  def uvqk_widths(self) -> tuple[int, int, int, int]:
    """Column widths of U, V, Q, K in the fused projection, in that order."""
    hv, hqk = self.num_heads * self.hidden_dim, self.num_heads * self.attention_dim
    return hv, hv, hqk, hqk


# --- Jagged <-> padded -------------------------------------------------------------------


def jagged_to_padded(values: jax.Array, offsets: jax.Array, capacity: int) -> jax.Array:
  """[T, ...] values of B concatenated sequences (sequence b: rows offsets[b]:offsets[b+1])
  as [B, capacity, ...], zeros after each sequence's end."""
  if isinstance(offsets, np.ndarray) and len(offsets) > 1 and np.diff(offsets).max() > capacity:
    raise ValueError(f"a sequence of {np.diff(offsets).max()} tokens does not fit a padded "
                     f"capacity of {capacity}")
  offsets = jnp.asarray(offsets)
  lengths = offsets[1:] - offsets[:-1]
  i = jnp.arange(capacity)
  valid = i[None, :] < lengths[:, None]
  if values.shape[0] == 0:
    return jnp.zeros(valid.shape + values.shape[1:], values.dtype)
  rows = jnp.where(valid, offsets[:-1, None] + i[None, :], 0)
  padded = jnp.take(values, rows, axis=0)
  return jnp.where(valid.reshape(valid.shape + (1,) * (values.ndim - 1)), padded, 0)


def padded_to_jagged(padded: jax.Array, offsets: jax.Array, num_tokens: int | None = None
                     ) -> jax.Array:
  """The valid tokens of [B, N, ...] as [T, ...], T = offsets[-1] (pass `num_tokens`
  under jit, where the offsets are not known)."""
  if num_tokens is None:
    num_tokens = int(offsets[-1])
  offsets = jnp.asarray(offsets)
  t = jnp.arange(num_tokens)
  b = jnp.searchsorted(offsets, t, side="right") - 1
  return padded[b, t - offsets[b]]


# --- Positional encoder ------------------------------------------------------------------


def position_ids(lengths: jax.Array, num_targets: jax.Array, capacity: int, *,
                 contextual_seq_len: int, num_buckets: int) -> jax.Array:
  """[B, capacity] rows of the position table: i for the first c_p tokens, then counted
  from the end of the history (high = n - k): min(high - min(i, high) + c_p, P - 1). All
  targets get c_p, the last history token c_p + 1."""
  i = jnp.arange(capacity)[None, :]
  high = (lengths - num_targets)[:, None]
  from_end = jnp.minimum(high - jnp.minimum(i, high) + contextual_seq_len, num_buckets - 1)
  return jnp.where(i < contextual_seq_len, i, from_end)


def time_bucket_ids(timestamps: jax.Array, lengths: jax.Array, *, embedding_dim: int
                    ) -> jax.Array:
  """[B, N] rows of the time table: floor(sqrt(max(t_q - t_i, 1e-6) / 60)), t_q the
  timestamp of the sequence's last token, in float32 as the reference computes it, and
  clamped at D - 1 (the reference's clamp reads the table's width, not its rows). Only
  differences within a sequence matter: without jax_enable_x64 the timestamps are
  int32, so seconds since 1970 serve until 2038 (a later origin, longer)."""
  last = jnp.maximum(lengths - 1, 0)[:, None]
  query_time = jnp.take_along_axis(timestamps, last, axis=1)
  dt = (query_time - timestamps).astype(jnp.float32)
  buckets = jnp.floor(jnp.sqrt(jnp.maximum(dt, 1e-6) / TIME_BUCKET_SECONDS))
  return jnp.clip(buckets.astype(jnp.int32), 0, embedding_dim - 1)


def _uniform_rows(key, shape, dtype=jnp.float32):
  """U(+-sqrt(1 / rows)), the reference's initialisation of its embedding tables."""
  bound = math.sqrt(1.0 / shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def rows_of(table: jax.Array, ids: jax.Array) -> jax.Array:
  """table[ids]: [*ids.shape, D]. Where `ids` are split over a mesh of explicit axes (the
  trainer's batches), the rows come out split as the ids are (JAX cannot tell by itself
  how to split a gather from a replicated table)."""
  sharding = jax.typeof(ids).sharding
  if not any(axis is not None for axis in sharding.spec):
    return jnp.take(table, ids, axis=0)
  return table.at[ids].get(out_sharding=NamedSharding(sharding.mesh, P(*sharding.spec, None)))


class PositionalEncoder(nnx.Module):
  """h = sqrt(D) x + (time table[bucket] + position table[position])."""

  def __init__(self, spec: HSTUSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
    embed = dict(embedding_init=_uniform_rows, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.positions = nnx.Embed(spec.num_position_buckets, spec.embedding_dim, **embed)
    self.times = nnx.Embed(spec.num_time_buckets + 1, spec.embedding_dim, **embed)
    self.spec = spec

  def __call__(self, x, timestamps, lengths, num_targets) -> jax.Array:
    s = self.spec
    pos = position_ids(lengths, num_targets, x.shape[1],
                       contextual_seq_len=s.pos_contextual_seq_len,
                       num_buckets=s.num_position_buckets)
    buckets = time_bucket_ids(timestamps, lengths, embedding_dim=s.embedding_dim)
    return math.sqrt(s.embedding_dim) * x + (rows_of(self.times.embedding[...], buckets)
                                             + rows_of(self.positions.embedding[...], pos))


# --- Attention ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionMask:
  """What decides which keys a query sees, and the normaliser: per-sequence `lengths`
  and `num_targets` [B], the STU's contextual prefix c and window m (static), and
  `max_seq_len` N, the divisor of every attention weight (the same for the batch; may be
  smaller than the padded width)."""
  lengths: jax.Array
  num_targets: jax.Array
  contextual_seq_len: int
  max_attn_len: int
  max_seq_len: int | jax.Array

  def __call__(self, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """[B, len(rows), len(cols)] bool: may query position `rows[r]` see key `cols[c]`.

    τ(i) = i (c = 0) or max(i - c + 1, 0), clamped at maxid = (n or n - c + 1) - k, so
    that all targets share the first target's index; M_ij = (i = j or τ(i) > τ(j)) and
    (m = 0 or τ(i) - τ(j) <= m); with c > 0 also M_ij |= τ(i) = 0 and τ(j) < maxid.
    Positions at or past a sequence's length see and are seen by nothing.
    """
    c, m = self.contextual_seq_len, self.max_attn_len
    n = self.lengths[:, None]
    maxid = (n if c == 0 else n - c + 1) - self.num_targets[:, None]

    def tau(idx):
      t = idx if c == 0 else jnp.maximum(idx - c + 1, 0)
      return jnp.minimum(t[None, :], maxid)

    ti, tj = tau(rows)[:, :, None], tau(cols)[:, None, :]
    mask = (rows[:, None] == cols[None, :])[None] | (ti > tj)
    if m:
      mask &= ti - tj <= m
    if c:
      mask |= (ti == 0) & (tj < maxid[:, :, None])
    valid = (rows[None, :, None] < n[:, :, None]) & (cols[None, None, :] < n[:, :, None])
    return mask & valid


Attention = Callable[[jax.Array, jax.Array, jax.Array, AttentionMask], jax.Array]


def _pointwise(q, k, v, mask: jax.Array, normaliser) -> jax.Array:
  """sum_j SiLU(<q_i, k_j> / sqrt(d_qk)) / N * M_ij v_j, per head: q [B, Q, H, d_qk],
  k [B, K, H, d_qk], v [B, K, H, d_v], mask [B, Q, K] -> [B, Q, H, d_v]."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  weights = jnp.where(mask[:, None], jax.nn.silu(scores), 0) / normaliser
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def dense_attention(q, k, v, mask: AttentionMask) -> jax.Array:
  """HSTU's pointwise attention (SiLU, no softmax) over the whole padded width at once:
  q, k [B, N, H, d_qk], v [B, N, H, d_v] -> [B, N, H, d_v]."""
  idx = jnp.arange(q.shape[1])
  return _pointwise(q, k, v, mask(idx, idx), mask.max_seq_len)


def chunked_attention(q, k, v, mask: AttentionMask, *, chunk_size: int = 256) -> jax.Array:
  """`dense_attention` in blocks of `chunk_size` queries, one block at a time: at most a
  [B, H, chunk_size, N] tensor of scores exists, and the backward pass recomputes each
  block's scores rather than keeping all of them. Use as
  `functools.partial(chunked_attention, chunk_size=...)`."""
  batch, width, heads, _ = q.shape
  blocks = -(-width // chunk_size)
  q = jnp.pad(q, ((0, 0), (0, blocks * chunk_size - width), (0, 0), (0, 0)))
  q = q.reshape(batch, blocks, chunk_size, *q.shape[2:]).swapaxes(0, 1)
  cols = jnp.arange(width)

  @jax.checkpoint
  def block(args):
    q_block, start = args
    rows = start + jnp.arange(chunk_size)
    return _pointwise(q_block, k, v, mask(rows, cols), mask.max_seq_len)

  out = jax.lax.map(block, (q, jnp.arange(blocks) * chunk_size))
  return out.swapaxes(0, 1).reshape(batch, blocks * chunk_size, heads, v.shape[-1])[:, :width]


# --- Dropout -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dropout:
  """Training-mode dropout, as the reference trains: `input_rate` on the positional
  encoder's output, `linear_rate` on each STU layer's [U, O, Y] before W_o; the bits
  drawn from `key` (folded with 0 for the input, l + 1 for layer l)."""

  key: jax.Array
  input_rate: float = 0.0
  linear_rate: float = 0.0


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """x with each value zeroed with probability `rate`, the others divided by 1 - rate.
  The bits are drawn split over the mesh as `x` is (the same bits on any layout)."""
  if rate <= 0:
    return x
  sharding = jax.typeof(x).sharding
  out = (NamedSharding(sharding.mesh, sharding.spec)
         if any(axis is not None for axis in sharding.spec) else None)
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape, out_sharding=out)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# --- STU layers and the encoder ----------------------------------------------------------


class STULayer(nnx.Module):
  """One STU layer: h' = h + [U, O, U * LN(O)] @ W_o, with [U|V|Q|K] = LN(h) @ W + β,
  U = SiLU(U) and O the pointwise attention (see `dense_attention`)."""

  def __init__(self, spec: HSTUSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
    d, hv = spec.embedding_dim, spec.num_heads * spec.hidden_dim
    kind = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    norm = dict(epsilon=NORM_EPS, use_fast_variance=False, **kind)
    self.input_norm = nnx.LayerNorm(d, **norm)
    self.uvqk = nnx.Linear(d, sum(spec.uvqk_widths),
                           kernel_init=nnx.initializers.xavier_uniform(),
                           bias_init=nnx.initializers.zeros_init(), **kind)
    self.output_norm = nnx.LayerNorm(hv, **norm)
    self.output = nnx.Linear(3 * hv, d, use_bias=False,
                             kernel_init=nnx.initializers.xavier_uniform(), **kind)
    self.spec = spec

  def parts(self, h: jax.Array, mask: AttentionMask, attention: Attention = dense_attention,
            drop: tuple[float, jax.Array] | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(SiLU(U), O, h'): [B, N, H*d_v], [B, N, H*d_v], [B, N, D]; with `drop` (a rate and
    a key), dropout on [U, O, Y] before W_o."""
    s = self.spec
    batch, width, _ = h.shape
    u, v, q, k = jnp.split(self.uvqk(self.input_norm(h)), np.cumsum(s.uvqk_widths)[:-1], axis=-1)
    u = jax.nn.silu(u)
    q, k = (t.reshape(batch, width, s.num_heads, s.attention_dim) for t in (q, k))
    v = v.reshape(batch, width, s.num_heads, s.hidden_dim)
    o = attention(q, k, v, mask).reshape(batch, width, -1)
    y = u * self.output_norm(o)
    uoy = jnp.concatenate([u, o, y], axis=-1)
    if drop is not None:
      uoy = dropout(uoy, *drop)
    return u, o, h + self.output(uoy)

  def __call__(self, h, mask: AttentionMask, attention: Attention = dense_attention) -> jax.Array:
    return self.parts(h, mask, attention)[2]


class HSTU(nnx.Module):
  """The encoder: `PositionalEncoder`, then `num_layers` STU layers; no final norm.

  Parameters are `dtype` (float32 or, with jax_enable_x64, float64); the reference's
  initialisation: xavier_uniform projections, zero biases, unit norm weights.
  """

  def __init__(self, spec: HSTUSpec, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.positional = PositionalEncoder(spec, rngs=rngs, dtype=dtype)
    self.layers = nnx.List([STULayer(spec, rngs=rngs, dtype=dtype)
                            for _ in range(spec.num_layers)])
    self.spec = spec

  def __call__(self, x, timestamps, lengths, num_targets, *, max_seq_len=None,
               attention: Attention = dense_attention, intermediates: bool = False,
               train_dropout: Dropout | None = None):
    """[B, N, D] outputs (zeros at padded tokens) of `x` [B, N, D] with `timestamps`
    [B, N], `lengths` and `num_targets` [B]. `max_seq_len` (the attention's divisor,
    default N) may be below the padded width N. With `intermediates`, also a dict of the
    positional encoder's output ("x_after_pos") and each layer's "layer{l}.u", ".attn"
    and ".out" (the fixtures' names). `train_dropout`: training mode (None: none)."""
    mask = AttentionMask(lengths, num_targets, self.spec.contextual_seq_len,
                         self.spec.max_attn_len,
                         x.shape[1] if max_seq_len is None else max_seq_len)
    h = self.positional(x, timestamps, lengths, num_targets)
    d = train_dropout
    if d is not None:
      h = dropout(h, d.input_rate, jax.random.fold_in(d.key, 0))
    found = {"x_after_pos": h}
    for l, layer in enumerate(self.layers):
      drop = None if d is None else (d.linear_rate, jax.random.fold_in(d.key, l + 1))
      u, o, h = layer.parts(h, mask, attention, drop)
      found |= {f"layer{l}.u": u, f"layer{l}.attn": o, f"layer{l}.out": h}
    valid = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
    out = jnp.where(valid[..., None], h, 0)
    return (out, found) if intermediates else out


# --- The reference's parameter names ---------------------------------------------------


def reference_names(spec: HSTUSpec) -> dict[str, tuple]:
  """The reference's parameter names (relative to its encoder; DLRMv4's `DlrmHSTU` adds
  `_hstu_transducer.`) -> paths in `nnx.to_pure_dict(nnx.state(HSTU(spec), nnx.Param))`."""
  table = "_positional_encoder._{}_embeddings_weight"
  names = {table.format("position"): ("positional", "positions", "embedding"),
           table.format("timestamp"): ("positional", "times", "embedding")}
  for l in range(spec.num_layers):
    prefix = f"_stu_module._stu_layers.{l}."
    names |= {prefix + name: ("layers", l) + path for name, path in (
        ("_input_norm_weight", ("input_norm", "scale")),
        ("_input_norm_bias", ("input_norm", "bias")),
        ("_uvqk_weight", ("uvqk", "kernel")), ("_uvqk_beta", ("uvqk", "bias")),
        ("_output_norm_weight", ("output_norm", "scale")),
        ("_output_norm_bias", ("output_norm", "bias")), ("_output_weight", ("output", "kernel")))}
  return names


def to_reference(spec: HSTUSpec, state: nnx.State) -> dict[str, jax.Array]:
  """The arrays of an `HSTU`'s parameter state (or of its gradient) under the reference's
  names."""
  values = nnx.to_pure_dict(state)
  return {name: _parent(values, path)[path[-1]] for name, path in reference_names(spec).items()}


def _parent(values: dict, path: tuple) -> dict:
  """The dict of a pure-dict state that holds `path`'s last key."""
  for key in path[:-1]:
    values = values[key]
  return values


def load_reference(model: HSTU, arrays: Mapping[str, np.ndarray]) -> None:
  """Sets `model`'s parameters from arrays under the reference's names (every name of
  `reference_names`, no other), cast to the parameters' dtype. The reference applies both
  projections as `x @ W`, so no matrix is transposed."""
  names = reference_names(model.spec)
  missing, unknown = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
  if missing or unknown:
    raise ValueError(f"HSTU parameters: missing {missing}, unknown {unknown}")
  state = nnx.state(model, nnx.Param)
  values = nnx.to_pure_dict(state)
  for name, path in names.items():
    node = _parent(values, path)
    old = node[path[-1]]
    if tuple(arrays[name].shape) != old.shape:
      raise ValueError(f"HSTU parameter {name} has shape {tuple(arrays[name].shape)}, "
                       f"expected {old.shape}")
    node[path[-1]] = jnp.asarray(arrays[name], old.dtype)
  nnx.replace_by_pure_dict(state, values)
  nnx.update(model, state)
