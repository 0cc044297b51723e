"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (a preemptible machine's notice) after
a step, with a checkpoint of that step; and on a step whose result no checkpoint may
keep (`check_losses`: a NaN or infinite loss, row-wise ids past their capacity).

`StopSignals` is a context manager around the train loop. Its handler only notes
the signal; the loop asks `requested()` after each step and, when it says so,
saves a checkpoint and raises `Stopped`. A second signal acts as if the handler
were not there (SIGINT: KeyboardInterrupt at once; SIGTERM: the process ends at
once). On leaving, the previous handlers are back (the trainer also runs in
notebooks and tests).

In a multi-process run every process must stop after the same step (each saves
its shards of that step, and the save is collective), though the signals reach
the processes at different moments, or only some of them. So after each step
the processes agree through JAX's coordination service: a process that received
a signal posts it under that check's key, all meet at a barrier, and each reads
what was posted, every `MULTI_PROCESS_EVERY` steps. That costs about 1 ms each
time (2 processes on localhost), with
no device work and no collective under gloo's 30 s limit on meeting; an
all-reduce of the flags on the CPU devices cost 4 ms.
`jax.experimental.multihost_utils.reached_preemption_sync_point` agrees on a step
too, but knows only SIGTERM, through a handler of its own that
`jax.distributed.initialize` installs (replaced here while the loop runs, and not
put back after it: Python cannot reinstall a handler set outside Python, so a later
SIGTERM ends the process), and
works only in multi-process runs.
"""

from __future__ import annotations

import itertools
import signal
import threading

import jax
import numpy as np
from orbax.checkpoint import multihost

from dlrm_jax import parallel

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_checks = itertools.count()  # every process checks as often, in the same order
# Steps between the multi-process agreements: a stop comes at most this many steps late,
# and the coordination service sees one barrier per this many steps.
MULTI_PROCESS_EVERY = 8


class Stopped(Exception):
  """The run stopped on a signal after `step` steps, with a checkpoint of that step if
  `saved`; `signum` is the signal (in a multi-process run, possibly another process's)."""

  def __init__(self, step: int, signum: int, saved: bool):
    self.step, self.signum, self.saved = step, signum, saved
    super().__init__(
        f"stopped at step {step}; checkpoint saved; run the same command to resume" if saved
        else f"stopped at step {step}; no checkpoint saved (checkpoint.enabled=False), so a "
             "rerun starts afresh")

  @property
  def exit_status(self) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number."""
    return 128 + self.signum


class StopSignals:
  """Notes SIGINT and SIGTERM while open; `requested()` says, after a step, whether to
  stop there (the same on every process). A signal the process ignores stays ignored;
  a no-op outside the main thread, where Python cannot set signal handlers."""

  def __init__(self):
    self.signum = 0  # the signal to stop for (0: none)
    self._received = 0  # the first signal this process received
    self._previous: dict[int, object] = {}
    self._calls = 0

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for s in SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:  # e.g. SIGINT of a job run with `&`
          self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    self._restore()

  def _restore(self) -> None:
    for s, handler in self._previous.items():
      # None: a handler set outside Python (jax.distributed's for SIGTERM); the default.
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    if self._received:  # a second signal: as if this handler were not there
      self._restore()
      signal.raise_signal(signum)
      return
    self._received = signum

  def requested(self) -> bool:
    """Whether to stop after the step just taken. Call it after every step, on every
    process: in a multi-process run the processes meet in every `MULTI_PROCESS_EVERY`th
    call (the others say no)."""
    if jax.process_count() == 1:
      self.signum = self._received
    else:
      self._calls += 1
      if self._calls % MULTI_PROCESS_EVERY:
        return False
      self.signum = self._largest_posted()
    return self.signum != 0

  def _largest_posted(self) -> int:
    """The largest signal any process had received by this check: the same on all."""
    client = multihost.get_jax_distributed_client()
    key = f"dlrm_jax/stop/{next(_checks)}/"
    if self._received:
      client.key_value_set(key + str(jax.process_index()), str(self._received))
    parallel.barrier("stop signals")
    return max((int(v) for _, v in client.key_value_dir_get(key)), default=0)


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite; the message names the step and the
  last good checkpoint."""


class DroppedIdsError(RuntimeError):
  """A train step left out row-wise ids past their owner's capacity
  (`sharding.row_wise_capacity`); the message names the step and the last good
  checkpoint."""


def check_losses(run, prog, upto: int) -> None:
  """Stops on a NaN or infinite loss among losses[losses_checked:upto], or on row-wise ids
  dropped by a step up to that loss's, naming its step (`run`, `prog`: the trainer's
  `Run` and `Progress`). One transfer from the devices for both."""
  last_step = prog.steps_done - len(prog.losses) + upto
  due = [(s, n) for s, n in prog.dropped if s <= last_step]
  losses = prog.losses[prog.losses_checked:upto]
  if not due and not losses:
    return
  counts, values = jax.device_get(([n for _, n in due], losses))
  prog.dropped = prog.dropped[len(due):]
  dropped = np.flatnonzero(np.asarray(counts))
  if dropped.size:  # its update is not exact, so no checkpoint may keep it
    step, count = due[int(dropped[0])][0], int(counts[int(dropped[0])])
    raise DroppedIdsError(
        f"step {step} had {count:,} row-wise ids more than their devices' capacity "
        f"(sharding.row_wise_capacity={run.spec.sharding.row_wise_capacity:g} x an even "
        "share of the batch's ids): training stopped. " + _last_good(run)
        + "raise sharding.row_wise_capacity (0: every id) and rerun (a rerun resumes from it).")
  values = np.asarray(values, np.float32)
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    bad_step = prog.steps_done - len(prog.losses) + prog.losses_checked + int(bad[0]) + 1
    raise NonFiniteLossError(
        f"the training loss is {values[bad[0]]} at step {bad_step}: training stopped. "
        + _last_good(run) + "lower the learning rate or check the data, then rerun (a rerun "
        "resumes from it).")
  prog.losses_checked = max(prog.losses_checked, upto)


def _last_good(run) -> str:
  """Where a stopped run's last good checkpoint is, as the start of a sentence."""
  last_good = None
  if run.checkpointer is not None:
    run.checkpointer.wait()
    last_good = run.checkpointer.latest_step()
  return (f"The last good checkpoint is step {last_good} in {run.checkpointer.directory}; "
          if last_good is not None else "No checkpoint was saved before it; ")
