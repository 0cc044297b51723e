"""What the training loop asks of a data source (synthetic generators, the Criteo loader)."""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np

Batch = dict[str, np.ndarray]


class BatchStream(Protocol):
  """Train batches from a position on, with the data position a checkpoint keeps."""

  def __iter__(self) -> Iterator[Batch]: ...

  def __next__(self) -> Batch: ...

  def state_at(self, position: int) -> dict:
    """The data position of batch `position` (JSON values)."""

  def restore(self, state: dict) -> None:
    """Continues from `state_at` of an earlier run; ValueError if it is another order."""


class DataSource(Protocol):
  """Batches of the train and eval splits by number, and a train stream."""

  # True: a batch holds this process's rows only; False: the whole global batch.
  process_local: bool

  def batch(self, index: int, split: str = "train", batch_size: int | None = None) -> Batch:
    """Batch `index` of `split` ("train" or "eval")."""

  def batches(self, start: int = 0, split: str = "train",
              batch_size: int | None = None) -> BatchStream:
    """The train stream from batch `start` on."""

  def teacher_probability(self, batch: Batch) -> np.ndarray | None:
    """The best achievable click probability of each sample, where the data knows it."""
