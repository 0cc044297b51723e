"""A pool of worker processes (or inline execution) with two shared progress counters.

Workers are forked where that is safe (they start at once, with the parent's modules
already imported) and spawned otherwise (see `start_method`), so a task must be a
module-level function. Tasks report progress with `add_count`; the main process reads
`WorkerPool.counters` (by convention 0: rows, 1: bytes), e.g. through `rows_ticker`.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Sequence

# Libraries whose threads may hold locks at a fork (numpy's BLAS and pyarrow's pools
# handle fork themselves).
FORK_UNSAFE_MODULES = ("jax", "jaxlib", "tensorflow", "torch")

_COUNTERS = None  # (rows, bytes) shared counters, set in each worker.


class WorkerError(RuntimeError):
  """A worker process died (killed, perhaps for memory) before its task was done."""


def _init_worker(counters, parent: int):
  """In each worker: the counters; death with the parent (a parent killed outright must
  not leave workers writing beside the run that resumes it); Ctrl-C left to the parent."""
  global _COUNTERS
  _COUNTERS = counters
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  if sys.platform.startswith("linux"):
    import ctypes

    try:
      ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
      pass
  if os.getppid() != parent:  # The parent died before the line above.
    os._exit(1)


def add_count(i: int, n: int) -> None:
  """Adds `n` to shared counter `i` of the pool running this task (a no-op outside one)."""
  if _COUNTERS is not None and n:
    with _COUNTERS[i].get_lock():
      _COUNTERS[i].value += n


def start_method() -> str:
  """"fork" (workers start at once, modules already imported) on Linux when this process
  runs no other Python thread and none of `FORK_UNSAFE_MODULES`; else "spawn"."""
  import threading

  if (sys.platform.startswith("linux") and threading.active_count() == 1
      and not any(m in sys.modules for m in FORK_UNSAFE_MODULES)):
    return "fork"
  return "spawn"


def _ready() -> bool:
  """A no-op task: returns once a worker is up."""
  return True


class WorkerPool:
  """Worker processes (or inline execution), with shared progress counters.

  `preload` names modules imported once here before forked workers start, so that
  they need not import them each (pyarrow's import costs seconds per process on a
  busy machine).
  """

  def __init__(self, workers: int, preload: Sequence[str] = ()):
    import multiprocessing as mp

    self.workers = max(1, int(workers))
    self.executor = None
    if self.workers > 1:
      self._ctx = mp.get_context(start_method())
      self.counters = (self._ctx.Value("q", 0), self._ctx.Value("q", 0))
      # Forked workers start at once, with the preloaded modules imported once, here;
      # they are started before any helper thread (a progress bar's) exists.
      if self._ctx.get_start_method() == "fork":
        for name in preload:
          importlib.import_module(name)
      self.executor = ProcessPoolExecutor(self.workers, mp_context=self._ctx,
                                          initializer=_init_worker,
                                          initargs=(self.counters, os.getpid()))
      if self._ctx.get_start_method() == "fork":
        for f in [self.executor.submit(_ready) for _ in range(self.workers)]:
          f.result()
    else:
      self.counters = (_Counter(), _Counter())

  def run(self, fn: Callable, tasks: list, on_done: Callable[[object, object], None],
          on_tick: Callable[[], None] = lambda: None, max_in_flight: int | None = None) -> None:
    """Runs fn(*task) for every task; on_done(task, result) in the main process, in task order."""
    if self.workers == 1 or len(tasks) <= 1:
      global _COUNTERS
      saved, _COUNTERS = _COUNTERS, self.counters
      try:
        for task in tasks:
          result = fn(*task)
          on_tick()
          on_done(task, result)
      finally:
        _COUNTERS = saved
      return
    limit = max_in_flight or 2 * self.workers
    pending = list(tasks)
    futures: list = []
    try:
      while pending or futures:
        while pending and len(futures) < limit:
          task = pending.pop(0)
          futures.append((task, self.executor.submit(fn, *task)))
        wait([f for _, f in futures[:1]], timeout=0.5, return_when=FIRST_COMPLETED)
        on_tick()
        while futures and futures[0][1].done():
          task, future = futures.pop(0)
          on_done(task, _result(future))
    except BaseException:
      for _, f in futures:
        f.cancel()
      raise

  def reset(self) -> None:
    """Sets the counters back to 0 (before the next stage's tasks)."""
    for c in self.counters:
      c.value = 0

  def rows_ticker(self, bar) -> Callable[[], None]:
    """A callback that moves `bar` on by the rows the workers have counted since."""
    last = [0]

    def tick():
      v = self.counters[0].value
      bar.update(v - last[0])
      last[0] = v

    return tick

  def close(self) -> None:
    """Stops the workers (after the tasks running now), dropping the tasks not started."""
    if self.executor is not None:
      self.executor.shutdown(wait=True, cancel_futures=True)
      self.executor = None


def _result(future):
  """A task's result; its error without the worker's traceback chained to it where the
  error is about the input or the output (ValueError, OSError: the message says it all)."""
  try:
    return future.result()
  except BrokenProcessPool:
    raise WorkerError("a worker process died before its task was done (killed, perhaps "
                      "for lack of memory: try fewer --workers); run the same command again "
                      "to resume") from None
  except (ValueError, OSError) as e:
    e.__cause__ = None
    raise


class _Counter:
  """A counter of the inline pool: the interface of a multiprocessing Value, no lock."""

  def __init__(self):
    self.value = 0

  def get_lock(self):
    import contextlib

    return contextlib.nullcontext()


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool):
  """A tqdm bar for a pool's stage (disabled unless `enabled`)."""
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
              disable=not enabled, mininterval=0.5, smoothing=0.1)
