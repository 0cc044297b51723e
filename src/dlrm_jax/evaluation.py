"""Evaluation passes: the evaluation split scored batch by batch, the metrics exact.

`EvalSet` reads the run's evaluation batches from the data as they are scored
(none is held beyond the one in flight; only a small set, such as generated
data's, is kept after its first pass), the last one padded to the full batch
size with its filler rows masked out, so that a sharded step keeps equal slices
and every row of a split counts once. `evaluate` scores them and keeps 4 bytes
per row for the exact AUC (`dlrm_jax.metrics.StreamingMetrics`); in a
multi-process run each process's devices score their slices and every process
gets the metrics of all rows.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import jax
import numpy as np

from dlrm_jax import metrics as metrics_lib
from dlrm_jax import parallel
from dlrm_jax.data.source import Batch, DataSource

MASK = "eval_mask"  # a batch's real rows (False: padding); not a model input
# The data's own best probability of each row, where it knows it (a synthetic log's
# hidden one); for `EvalSet.teacher_auc`, not a model input.
TEACHER = "teacher_probability"


def pad_rows(batch: Batch, rows: int) -> Batch:
  """`batch` padded with zero rows to `rows`, with `MASK` marking its own rows."""
  n = len(batch["label"])
  if n > rows:
    raise ValueError(f"a batch of {n} rows does not fit in {rows}")
  out = {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)]) if n < rows
         else v for k, v in batch.items()}
  out[MASK] = np.arange(rows) < n
  return out


@dataclasses.dataclass
class EvalSet:
  """`num_batches` global batches of `batch_size` rows of the data's evaluation split,
  read in order (a partial last batch padded); iterating gives them ready to score."""

  data: DataSource
  batch_size: int
  num_batches: int
  sharding: jax.sharding.NamedSharding
  # An evaluation set of at most this many bytes is kept after its first pass, so that
  # generated data is not generated again at every evaluation; larger ones are read
  # again at every pass, one batch at a time.
  cache_bytes: int = 64 << 20
  _cache: list | None = dataclasses.field(default=None, init=False, repr=False)

  @property
  def rows(self) -> int:
    """Rows scored per pass: the split's own count where the data knows it (the last
    batch may be partial), else the batches' rows."""
    whole = self.num_batches * self.batch_size
    num_rows = getattr(self.data, "num_rows", None)
    return whole if num_rows is None else min(whole, num_rows("eval"))

  def host_batches(self) -> Iterator[Batch]:
    """The batches as the data gives them (this process's rows where it gives only those)."""
    if self._cache is not None:
      yield from self._cache
      return
    kept, size = [], 0
    for i in range(self.num_batches):
      batch = self.data.batch(i, "eval", self.batch_size)
      if kept is not None:
        size += sum(np.asarray(v).nbytes for v in batch.values())
        kept = kept if size <= self.cache_bytes else None
        if kept is not None:
          kept.append(batch)
      yield batch
    self._cache = kept

  def __iter__(self) -> Iterator[Batch]:
    local = self.data.process_local
    rows = self.batch_size // jax.process_count() if local else self.batch_size
    for batch in self.host_batches():
      batch = pad_rows({k: v for k, v in batch.items() if k != TEACHER}, rows)
      # Rows held by their processes only: one global array of them all.
      yield parallel.global_batch(batch, self.sharding) if local else batch

  def teacher_auc(self) -> float | None:
    """The AUC of the data's own click probabilities (None where it has none)."""
    m = metrics_lib.StreamingMetrics()
    for batch in self.host_batches():
      p = self.data.teacher_probability(batch)
      if p is None:
        return None
      m.add(batch["label"], p)
    return m.result()["auc"]


def _host(x) -> np.ndarray:
  return parallel.gather_to_host(x) if isinstance(x, jax.Array) else np.asarray(x)


def evaluate(task, state, batches: Iterable[Batch], rows: int = 0) -> dict[str, float]:
  """AUC (exact, ties as half), log loss, accuracy and the number of rows of `batches`
  (host batches or global arrays already placed; `MASK` leaves padding out), scored
  one by one: the host reads the next batch while the devices score the last one.
  `rows`: the expected number (pre-allocates the 4 bytes per row kept)."""
  metrics = metrics_lib.StreamingMetrics(rows)
  pending = None
  for batch in batches:
    inputs = {k: v for k, v in batch.items() if k != MASK}
    probs = task.predict(state.params, state.tables, inputs)  # dispatched, not awaited
    if pending is not None:
      metrics.add(*map(_host, pending))
    mask = batch[MASK] if MASK in batch else np.ones(len(batch["label"]), bool)
    pending = (batch["label"], probs, mask)
  if pending is not None:
    metrics.add(*map(_host, pending))
  return metrics.result()
