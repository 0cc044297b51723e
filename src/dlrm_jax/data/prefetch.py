"""Background prefetching of host batches, so data work overlaps the train step."""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


def prefetch(iterator: Iterator[T], size: int = 2) -> Iterator[T]:
  """Yields the items of `iterator`, produced `size` ahead by a daemon thread.

  An exception raised by the producer is re-raised in the consumer at the point
  where its item would have been.
  """
  buffer: queue.Queue = queue.Queue(maxsize=size)

  def produce():
    try:
      for item in iterator:
        buffer.put(item)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      buffer.put(_Failure(e))
      return
    buffer.put(_DONE)

  threading.Thread(target=produce, daemon=True, name="prefetch").start()
  while True:
    item = buffer.get()
    if item is _DONE:
      return
    if isinstance(item, _Failure):
      raise item.error
    yield item


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error
