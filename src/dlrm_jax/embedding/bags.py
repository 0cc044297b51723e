"""How a batch's categorical ids form bags: a static description of its layout.

A batch's "sparse" ids come in one of three layouts, told apart by shape:

  [B, L]     flat bags, L = sum of the tables' hotness: feature f's h_f ids lie in
             columns offsets[f] .. offsets[f] + h_f (the prepared Criteo files' rows)
  [B, F]     one id per feature (the flat layout when every h_f is 1)
  [B, F, H]  bags padded to H ids, with "sparse_mask" marking the ids present
             (for bags whose length varies from sample to sample)

A batch may also carry sequence features ("sequences": name -> ids [B, L], with
"sequence_lengths": name -> [B]): per-sample sequences of ids of one table, looked
up without pooling. A sequence of capacity L is L bags of width 1 that all read
its table, appended after the pooled features' bags (`with_sequences`); its
positions at or past a sample's length are padding (id -1, scale 0).

Whatever the layout, the lookups see ids as flat rows with static bag widths:
a padded batch is a flat one whose F bags are all H wide. Gathers, exchanges and
sparse updates then cost one slot per id of the flat row, and a bag is pooled
by a reshape-sum where every bag of a group has one width, by a sorted segment
sum where widths differ.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Bags:
  """The static layout of flat rows of ids: bag k holds `widths[k]` ids, end to end.

  Attributes:
    widths: ids per bag, in order.
    divisors: what each pooled bag is divided by after pooling ("mean" tables of
      flat bags: their static hotness; 1 for the others); None: nothing to divide.
    tables: the table each bag reads (an index); None: bag k reads table k (one bag
      per table, as pooled features are). Sequence positions are bags of one table.
  """

  widths: tuple[int, ...]
  divisors: tuple[float, ...] | None = None
  tables: tuple[int, ...] | None = None

  @property
  def table_of(self) -> np.ndarray:
    """The table each bag reads, [bags] int64."""
    return np.arange(len(self.widths)) if self.tables is None else np.asarray(self.tables)

  @property
  def total(self) -> int:
    """Ids per row."""
    return int(sum(self.widths))

  @property
  def offsets(self) -> np.ndarray:
    """The column where each bag starts."""
    return np.concatenate([[0], np.cumsum(self.widths)[:-1]]).astype(np.int64)

  @property
  def uniform(self) -> int | None:
    """The one width every bag has, or None where widths differ."""
    return self.widths[0] if len(set(self.widths)) == 1 else None

  def columns(self, bags: Sequence[int]) -> np.ndarray:
    """The columns of `bags` (indices), bag after bag: a group's part of a row."""
    offsets = self.offsets
    return np.concatenate([np.arange(offsets[k], offsets[k] + self.widths[k]) for k in bags]
                          ).astype(np.int32)

  def of_tables(self, tables: Sequence[int]) -> tuple[np.ndarray, "Bags"]:
    """The bags that read `tables` (their indices, in order) and the layout of their
    `columns`, each bag's table numbered by its place in `tables` (without divisors:
    they apply to whole batches)."""
    place = {int(t): i for i, t in enumerate(tables)}
    bags = np.array([k for k, t in enumerate(self.table_of) if int(t) in place], np.int64)
    local = tuple(place[int(self.table_of[k])] for k in bags)
    return bags, Bags(tuple(self.widths[k] for k in bags),
                      tables=None if local == tuple(range(len(local))) else local)

  def segments(self) -> np.ndarray:
    """The bag of each column, [total] int32 (sorted)."""
    return np.repeat(np.arange(len(self.widths)), self.widths).astype(np.int32)

  def per_column(self, values: Sequence) -> np.ndarray:
    """A per-bag value repeated for each of the bag's columns, [total]."""
    return np.repeat(np.asarray(values), self.widths)

  def per_table_column(self, values: Sequence) -> np.ndarray:
    """A per-table value (of the table each bag reads) for each column, [total]."""
    return self.per_column(np.asarray(values)[self.table_of])


def batch_bags(hotness: Sequence[int], mean: Sequence[bool],
               shape: tuple[int, ...]) -> Bags:
  """The layout of ids of `shape` for tables of `hotness` ("mean" pooling where `mean`).

  [B, L] (L = sum(hotness)): flat bags, mean tables divided by their hotness;
  [B, F]: one id per feature; [B, F, H]: F bags of H (their mask and the mean's
  count of present ids are per sample: `EmbeddingCollection.bag_scale`).
  """
  hotness, f = tuple(int(h) for h in hotness), len(hotness)
  if len(shape) == 3 and shape[1] == f:
    return Bags((int(shape[2]),) * f)
  if len(shape) == 2 and shape[1] == f:
    return Bags((1,) * f)
  if len(shape) == 2 and shape[1] == sum(hotness):
    divisors = tuple(float(h) if m else 1.0 for h, m in zip(hotness, mean))
    return Bags(hotness, divisors if any(d != 1.0 for d in divisors) else None)
  raise ValueError(
      f"categorical ids must have shape [batch, {sum(hotness)}] (flat bags: the tables' "
      f"hotness {_short(hotness)} end to end), [batch, {f}] (one id per feature) or "
      f"[batch, {f}, hotness] (padded bags, with a mask), got {tuple(shape)}")


def with_sequences(bags: Bags, tables: Sequence[int], capacities: Sequence[int]) -> Bags:
  """`bags` followed by sequences of `capacities` reading `tables`: each sequence's L
  positions are L bags of width 1 (divided by 1, where `bags` divide)."""
  extra = sum(int(c) for c in capacities)
  if not extra:
    return bags
  seq = [int(t) for t, c in zip(tables, capacities) for _ in range(int(c))]
  return Bags(bags.widths + (1,) * extra,
              None if bags.divisors is None else bags.divisors + (1.0,) * extra,
              tuple(int(t) for t in bags.table_of) + tuple(seq))


def pool_equal(vectors: jax.Array, scale: jax.Array | None) -> jax.Array:
  """Bags of one width: [..., K, H, D] vectors with [..., K, H] scales (None: weight 1)
  -> [..., K, D]."""
  if scale is None:
    return vectors[..., 0, :] if vectors.shape[-2] == 1 else vectors.sum(-2)
  return jnp.einsum("...h,...hd->...d", scale, vectors)


def pool_segments(vectors: jax.Array, scale: jax.Array | None, segments: jax.Array,
                  num_segments: int) -> jax.Array:
  """Bags of any widths: [..., L, D] vectors with [..., L] scales (None: weight 1) -> [..., K, D].

  Column l goes to bag `segments[l]` ([L] int32, sorted; K = `num_segments`);
  columns with a segment of K or more (padding) are left out. One sorted segment
  sum over every row's columns: work and memory per column, never per bag width.
  """
  if scale is not None:
    vectors = vectors * scale[..., None].astype(vectors.dtype)
  lead, (width, dim) = vectors.shape[:-2], vectors.shape[-2:]
  n, k = math.prod(lead), num_segments + 1  # one more per row: the padding's, dropped
  rows = jnp.arange(n, dtype=jnp.int32)[:, None] * k
  ids = (rows + jnp.minimum(segments, num_segments).astype(jnp.int32)[None, :]).reshape(-1)
  # Every id is in bounds (padding has its own segment): no masking, nor in the gradient's
  # gather.
  out = jax.ops.segment_sum(vectors.reshape(n * width, dim), ids, num_segments=n * k,
                            indices_are_sorted=True, mode="promise_in_bounds")
  return out.reshape(*lead, k, dim)[..., :num_segments, :]


def pool(vectors: jax.Array, scale: jax.Array | None, bags: Bags) -> jax.Array:
  """Flat rows of bags: [..., total, D] vectors with [..., total] scales -> [..., bags, D]
  (`bags.divisors` not applied): `pool_equal` where one width serves all, else
  `pool_segments`."""
  width, k = bags.uniform, len(bags.widths)
  if width is not None:
    vectors = vectors.reshape(*vectors.shape[:-2], k, width, vectors.shape[-1])
    return pool_equal(vectors, None if scale is None else scale.reshape(vectors.shape[:-1]))
  return pool_segments(vectors, scale, jnp.asarray(bags.segments()), k)


def _short(values: tuple[int, ...]) -> str:
  text = "-".join(str(v) for v in values)
  return text if len(text) <= 60 else text[:57] + "..."
