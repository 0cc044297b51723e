"""DLRMv4's ranking model around the HSTU encoder, on looked-up embedding vectors.

MLPerf's DLRMv4 scores one candidate item per example against the user's history
(docs/dlrmv4_reference.md, section 2, is the reference's wiring as read from its
code; this module is written from that description). Per example:

1. The sequence: 8 contextual tokens (the uid's and 7 crosses' embeddings, each
   through an affine map of its own), then the history's events, then the candidate.
   Each event (and the candidate) is the sum of three small MLPs: one of the item's
   embedding, one of the artist's and album's together, one of its actions (the
   listen-plus, like and skip bits, each a learned 8-vector where set; the candidate
   gets one learned vector of its own, so its label is never an input).
2. `dlrm_jax.hstu.HSTU` over it (position ids counting from the end, the contextual
   prefix, time buckets from the candidate's query time; contextual tokens at time 0),
   with the batch's longest sequence as the attention's divisor (under data
   parallelism, the global batch's: the reference divides by each rank's own
   longest, which at full scale is 4,096 nearly always). The attention is
   `hstu.chunked_attention` by default, so that no [B, H, N, N] scores exist at
   once (the reference's N is up to 4,096).
3. The candidate's output, with cos and sin of its query time's hour of the day and
   day of the week, through Linear and LayerNorm: the user side. The candidate's item,
   artist and album embeddings through an MLP: the item side. A head on their
   element-wise product gives the logit; the loss is 0.2 times the mean binary
   cross-entropy (listen-plus against skip).

Inputs are embedding vectors (the sharded tables' lookups are the engine's part):

    batch = {
        "history": {"item": [B, L, D], "artist": [B, L, D], "album": [B, L, D]},
        "history_actions": [B, L] int (bits 1 listen-plus, 2 like, 4 skip),
        "history_timestamps": [B, L] (seconds), "history_lengths": [B],
        "candidate": {"item": [B, D], "artist": [B, D], "album": [B, D]},
        "query_time": [B] (seconds: the history's last timestamp, as the reference's),
        "contextual": [B, 8, D],
    }

`ModelSpec` is a run's model (`config.model = "dlrmv4"`: the network's sizes, the
tables, the history's length); `dlrm_jax.task.dlrmv4_parts` is what the task trains of
it: the tables (the pooled features `POOLED` and the history's sequences `SEQUENCES`,
in the sharded embedding engine) and the network on their vectors, fed by batches
of `BATCH_KEYS` (`dlrm_jax.data.windows`).

Training-mode dropout is the reference's (`input_dropout` on the encoder's input,
`linear_dropout` in each STU layer: `hstu.Dropout`), given a key; without one the
model is in eval mode. Not here yet: bfloat16.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dlrm_jax import hstu
from dlrm_jax.config import ConfigError, parse_widths
from dlrm_jax.data.anchors import CROSSES

ACTION_BITS = (1, 2, 4)  # listen-plus, like, skip
# The tables, one per pooled feature of a batch's "sparse" ids, in this order: the
# candidate's item, artist and album, then the contextual ids (dlrm_jax.data.anchors'
# CONTEXTUAL: the uid and the 7 crosses).
CROSS_NAMES = tuple(name for name, _, _ in CROSSES)
POOLED = ("item", "artist", "album", "uid") + CROSS_NAMES
# The history's sequence features and the tables they read (the candidate's own).
SEQUENCES = (("history_item", "item"), ("history_artist", "artist"), ("history_album", "album"))
# A batch: "sparse" [B, len(POOLED)] ids; the history's ids, action bitmasks and
# timestamps (seconds) [B, L] and lengths [B]; the candidate's query time [B] (seconds);
# the label [B] (1.0: listen-plus).
BATCH_KEYS = ("sparse", "history_item", "history_artist", "history_album", "history_action",
              "history_timestamp", "history_length", "query_time", "label")
ATTENTIONS = ("chunked", "dense")
LOSS_WEIGHT = 0.2  # the reference's weight of its one task's loss
# (period in seconds, cycle length) of the query time's features: hour of the day and day
# of the week; the reference's angle is 2 * 3.14 (not pi) * ((t // period) % cycle) / cycle.
TIME_FEATURES = ((3600, 24), (86400, 7))
TWO_PI_REFERENCE = 2 * 3.14


@dataclasses.dataclass(frozen=True)
class DLRMv4Spec:
  """Sizes; the defaults are the reference's (its gin file for Yambda-5b)."""

  embedding_dim: int = 512  # D, of the tables and the encoder
  preprocessor_hidden_dim: int = 256
  action_dim: int = 8  # per action bit
  num_contextual: int = 8  # uid and 7 crosses
  num_heads: int = 4
  attention_dim: int = 128
  hidden_dim: int = 128
  num_layers: int = 3
  num_position_buckets: int = 8192
  num_time_buckets: int = 2048
  input_dropout: float = 0.2  # on the encoder's input, in training
  linear_dropout: float = 0.1  # on each STU layer's [U, O, Y], in training

  def __post_init__(self):
    for name in ("input_dropout", "linear_dropout"):
      if not 0 <= getattr(self, name) < 1:
        raise ConfigError(f"DLRMv4 {name}={getattr(self, name)} must be in [0, 1)")
    for field in dataclasses.fields(self):
      if field.type == "int" and getattr(self, field.name) < 1:
        raise ConfigError(f"DLRMv4 {field.name}={getattr(self, field.name)} must be >= 1")

  @property
  def encoder(self) -> hstu.HSTUSpec:
    return hstu.HSTUSpec(
        embedding_dim=self.embedding_dim, num_heads=self.num_heads,
        attention_dim=self.attention_dim, hidden_dim=self.hidden_dim,
        num_layers=self.num_layers, num_position_buckets=self.num_position_buckets,
        num_time_buckets=self.num_time_buckets, pos_contextual_seq_len=self.num_contextual)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A run's DLRMv4 (`config.dlrmv4`): the network, the tables' rows (one per `POOLED`
  feature) and the history's length and scan window."""

  network: DLRMv4Spec
  table_rows: tuple[int, ...]
  history_length: int = 4086
  scan_window: int = 20000
  attention: str = "chunked"
  attention_chunk: int = 256
  embedding_dtype: str = "float32"  # the tables' storage
  compute_dtype: str = "float32"  # the network's arithmetic (bfloat16: not yet)
  dims: tuple[int, ...] = ()  # every table is embedding_dim wide

  def __post_init__(self):
    if len(self.table_rows) != len(POOLED):
      raise ConfigError(f"DLRMv4 has {len(POOLED)} tables ({', '.join(POOLED)}), not "
                        f"{len(self.table_rows)}")
    for name, rows in zip(POOLED, self.table_rows):
      if rows < 1:
        raise ConfigError(f"dlrmv4 table {name!r} has {rows} rows: set its rows (0 sizes it "
                          "from the data, which needs data.kind 'event_log' or 'yambda')")
    if self.attention not in ATTENTIONS:
      raise ConfigError(f"dlrmv4.attention={self.attention!r} is not one of {ATTENTIONS}")
    for name in ("history_length", "scan_window", "attention_chunk"):
      if getattr(self, name) < 1:
        raise ConfigError(f"dlrmv4.{name}={getattr(self, name)} must be >= 1")
    if self.network.num_position_buckets < self.history_length + 1:
      raise ConfigError(
          f"dlrmv4.num_position_buckets={self.network.num_position_buckets} is less than "
          f"history_length + 1 = {self.history_length + 1}: positions past it share a bucket")

  @property
  def embedding_dim(self) -> int:
    return self.network.embedding_dim

  @property
  def num_tables(self) -> int:
    return len(self.table_rows)

  @property
  def cross_rows(self) -> tuple[int, ...]:
    return self.table_rows[len(POOLED) - len(CROSS_NAMES):]

  @classmethod
  def from_config(cls, config) -> "ModelSpec":
    c = config.dlrmv4
    network = DLRMv4Spec(**{f.name: {"int": int, "float": float}[f.type](c[f.name])
                            for f in dataclasses.fields(DLRMv4Spec)
                            if f.name != "num_contextual"})  # the uid and the 7 crosses
    crosses = parse_widths("dlrmv4.cross_rows", c.cross_rows)
    if len(crosses) != len(CROSS_NAMES):
      raise ConfigError(f"dlrmv4.cross_rows={c.cross_rows!r} gives {len(crosses)} sizes for "
                        f"the {len(CROSS_NAMES)} crosses ({', '.join(CROSS_NAMES)})")
    rows = tuple(int(c[f"{n}_rows"]) for n in ("item", "artist", "album", "uid")) + crosses
    return cls(network=network, table_rows=rows, history_length=int(c.history_length),
               scan_window=int(c.scan_window), attention=str(c.attention),
               attention_chunk=int(c.attention_chunk),
               embedding_dtype=str(config.embedding_dtype))


class SwishLayerNorm(nnx.Module):
  """x * sigmoid(LayerNorm(x)), TorchRec's SwishLayerNorm."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)

  def __call__(self, x):
    return x * jax.nn.sigmoid(self.norm(x))


class SmallMLP(nnx.Module):
  """Linear -> SwishLayerNorm -> Linear -> LayerNorm, the reference's block for every
  small network of this model."""

  def __init__(self, d_in: int, hidden: int, d_out: int, *, rngs: nnx.Rngs,
               init=nnx.initializers.xavier_uniform()):
    linear = dict(kernel_init=init, bias_init=nnx.initializers.zeros_init(), rngs=rngs)
    self.first = nnx.Linear(d_in, hidden, **linear)
    self.swish = SwishLayerNorm(hidden, rngs=rngs)
    self.second = nnx.Linear(hidden, d_out, **linear)
    self.norm = nnx.LayerNorm(d_out, epsilon=1e-5, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.second(self.swish(self.first(x))))


def time_features(t: jax.Array) -> jax.Array:
  """[..., 4]: cos and sin of the hour of the day and of the day of the week of `t`
  (seconds), with the reference's 2 * 3.14."""
  out = []
  for period, cycle in TIME_FEATURES:
    angle = TWO_PI_REFERENCE * ((t // period) % cycle).astype(jnp.float32) / cycle
    out += [jnp.cos(angle), jnp.sin(angle)]
  return jnp.stack(out, axis=-1)


class DLRMv4(nnx.Module):
  """The model; `self(batch)` gives the logits [B] (see the module docstring)."""

  def __init__(self, spec: DLRMv4Spec = DLRMv4Spec(), *, rngs: nnx.Rngs,
               attention: hstu.Attention = functools.partial(hstu.chunked_attention,
                                                             chunk_size=256)):
    d, hidden, bits = spec.embedding_dim, spec.preprocessor_hidden_dim, len(ACTION_BITS)
    # The reference re-initialises the transducer's own Linears (these three MLPs and
    # the output projection) xavier-normal; the item MLP and the head stay uniform.
    normal = dict(rngs=rngs, init=nnx.initializers.xavier_normal())
    self.content = SmallMLP(d, hidden, d, **normal)
    self.additional = SmallMLP(2 * d, hidden, d, **normal)
    self.action = SmallMLP(bits * spec.action_dim, hidden, d, **normal)
    init = nnx.initializers.normal(0.1)
    self.action_table = nnx.Param(init(rngs.params(), (bits, spec.action_dim)))
    self.candidate_action = nnx.Param(init(rngs.params(), (bits * spec.action_dim,)))
    scale = math.sqrt(2.0 / (d + d))
    self.contextual_weight = nnx.Param(
        scale * jax.random.normal(rngs.params(), (spec.num_contextual, d, d)))
    self.contextual_bias = nnx.Param(jnp.zeros((spec.num_contextual, d)))
    self.encoder = hstu.HSTU(spec.encoder, rngs=rngs)
    self.output_projection = nnx.Linear(
        d + 2 * len(TIME_FEATURES), d, kernel_init=nnx.initializers.xavier_normal(),
        bias_init=nnx.initializers.zeros_init(), rngs=rngs)
    self.output_norm = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
    self.item = SmallMLP(3 * d, d, d, rngs=rngs)
    self.head_hidden = nnx.Linear(d, d, kernel_init=nnx.initializers.xavier_uniform(),
                                  rngs=rngs)
    self.head_swish = SwishLayerNorm(d, rngs=rngs)
    self.head_out = nnx.Linear(d, 1, kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)
    self.spec, self.attention = spec, attention

  def events(self, item, artist, album, actions) -> jax.Array:
    """The encoder's input of events [..., D] from their embeddings and their action
    encodings [..., 3 * action_dim]."""
    return (self.content(item) + self.additional(jnp.concatenate([artist, album], axis=-1))
            + self.action(actions))

  def encode_actions(self, bits: jax.Array) -> jax.Array:
    """[B, L] action bitmasks -> [B, L, 3 * action_dim]: each set bit's learned row."""
    on = jnp.stack([(bits & b) > 0 for b in ACTION_BITS], axis=-1)  # [B, L, 3]
    rows = jnp.where(on[..., None], self.action_table[...], 0.0)  # [B, L, 3, action_dim]
    return rows.reshape(*bits.shape, -1)

  def sequence(self, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x [B, C + L + 1, D], timestamps, lengths): the contextual tokens, the history
    (left-aligned) and the candidate right after each history's last event (a length
    over the history's width L counts as L)."""
    s, h, c = self.spec, batch["history"], batch["candidate"]
    b, width = batch["history_actions"].shape
    n = jnp.clip(batch["history_lengths"].astype(jnp.int32), 0, width)
    ctx = jnp.einsum("bsd,sde->bse", batch["contextual"], self.contextual_weight[...]) \
        + self.contextual_bias[...]
    past = self.events(h["item"], h["artist"], h["album"],
                       self.encode_actions(batch["history_actions"]))
    cand_actions = jnp.broadcast_to(self.candidate_action[...], (b, self.candidate_action.shape[0]))
    cand = self.events(c["item"], c["artist"], c["album"], cand_actions)
    slot = jnp.arange(width + 1)[None, :]
    x = jnp.where((slot < n[:, None])[..., None],
                  jnp.pad(past, ((0, 0), (0, 1), (0, 0))), 0.0)
    x = jnp.where((slot == n[:, None])[..., None], cand[:, None, :], x)
    ts = jnp.where(slot < n[:, None], jnp.pad(batch["history_timestamps"], ((0, 0), (0, 1))), 0)
    ts = jnp.where(slot == n[:, None], batch["query_time"][:, None], ts)
    x = jnp.concatenate([ctx, x], axis=1)
    ts = jnp.concatenate([jnp.zeros((b, s.num_contextual), ts.dtype), ts], axis=1)
    return x, ts, s.num_contextual + n + 1

  def __call__(self, batch, dropout_key: jax.Array | None = None) -> jax.Array:
    """The logits [B]; with `dropout_key`, in training mode (the spec's dropout)."""
    s = self.spec
    drop = None if dropout_key is None or not (s.input_dropout or s.linear_dropout) else \
        hstu.Dropout(dropout_key, s.input_dropout, s.linear_dropout)
    x, ts, lengths = self.sequence(batch)
    ones = jnp.ones_like(lengths)
    out = self.encoder(x, ts, lengths, ones, max_seq_len=jnp.max(lengths),
                       attention=self.attention, train_dropout=drop)
    user = jnp.take_along_axis(out, (lengths - 1)[:, None, None], axis=1)[:, 0]
    user = self.output_norm(self.output_projection(
        jnp.concatenate([user, time_features(batch["query_time"])], axis=-1)))
    c = batch["candidate"]
    item = self.item(jnp.concatenate([c["item"], c["artist"], c["album"]], axis=-1))
    return self.head_out(self.head_swish(self.head_hidden(user * item)))[:, 0]


def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The reference's loss: 0.2 times the mean binary cross-entropy of the logits."""
  return LOSS_WEIGHT * jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))


def batch_shapes(spec: ModelSpec, batch_size: int) -> dict[str, tuple[tuple[int, ...], type]]:
  """Each of `BATCH_KEYS`' shape and dtype in a batch of `batch_size` (as
  `dlrm_jax.data.windows` makes them)."""
  b, length = batch_size, spec.history_length
  out = {"sparse": ((b, len(POOLED)), np.int32)}
  for k in BATCH_KEYS[1:6]:
    out[k] = ((b, length), np.int32)
  out.update(history_length=((b,), np.int32), query_time=((b,), np.int32),
             label=((b,), np.float32))
  return out


def attention_of(spec: ModelSpec) -> hstu.Attention:
  """The encoder's attention function that the spec names."""
  if spec.attention == "dense":
    return hstu.dense_attention
  return functools.partial(hstu.chunked_attention, chunk_size=spec.attention_chunk)


def model_inputs(embedded, batch) -> dict:
  """`DLRMv4`'s input (the module docstring's layout) from a batch of `BATCH_KEYS` and
  its embeddings (`dlrm_jax.embedding.sharded.Embedded`: the pooled features' [B, 11, D]
  in `POOLED` order, each history sequence's [B, L, D])."""
  pooled, seq = embedded.pooled, embedded.sequences
  return {
      "history": {k: seq[f"history_{k}"] for k in ("item", "artist", "album")},
      "history_actions": batch["history_action"],
      "history_timestamps": batch["history_timestamp"],
      "history_lengths": batch["history_length"],
      "candidate": {k: pooled[:, i] for i, k in enumerate(("item", "artist", "album"))},
      "query_time": batch["query_time"],
      "contextual": pooled[:, 3:],
  }
