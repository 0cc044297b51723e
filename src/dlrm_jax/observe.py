"""What a run reports besides metrics.jsonl: TensorBoard, an MLPerf log, a profile, warnings.

`Observers` is called by the training loop (`dlrm_jax.trainer`) at the start of
training, before and after each step, after each evaluation and at the end;
only process 0 writes. Each part is switched by the config:

- `logging.tensorboard`: event files in WORKDIR/tensorboard, tensorboardX's event
  records written synchronously: every `logging.every_steps` steps `train/loss` (the mean since
  the last point), `train/learning_rate` and `train/examples_per_sec`; at
  every evaluation `eval/auc`, `eval/logloss`, `eval/accuracy` and the
  interval's `train/loss_interval`. Without tensorboardX installed a run says
  so once and trains on.
- `logging.mlperf`: WORKDIR/mlperf.log in MLPerf's format (`mlperf-logging`'s
  mllog), with the keys the training rules name for DLRM-DCNv2, or DLRMv4 (see `MLPerfLog`).
- `profile_steps = "START-END"`: a `jax.profiler` trace of those steps in
  WORKDIR/tensorboard (TensorBoard's profile plugin reads it; the
  `*.trace.json.gz` beside it opens in Perfetto).
- Warnings during the run (`RunWarnings`): an evaluation AUC near 0.5 for
  several evaluations in a row, a training loss that has not fallen from its
  start; each once, with what to check.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable

import jax
import numpy as np

# |AUC - 0.5| below max(AUC_NEAR_HALF, AUC_NOISE / sqrt(rows)) counts as not ranking: the
# second is about 3 standard deviations of a chance AUC over that many rows (at a CTR of
# 0.25 its deviation is about 0.67 / sqrt(rows)), so a small evaluation set's noise is not
# taken for ranking.
AUC_NEAR_HALF = 0.01
AUC_NOISE = 2.0
STUCK_EVALUATIONS = 3  # evaluations in a row near 0.5 before the warning
FLAT_LOSS_POINTS = 3  # loss points (log points or evaluations) before the loss is judged


class RunWarnings:
  """Watches the evaluations and the training loss; `check` returns the warnings that
  are new (each kind is given once per run)."""

  def __init__(self):
    self.aucs: list[tuple[float, float]] = []  # (AUC, how far from 0.5 is still chance)
    self.losses: list[float] = []
    self.given: set[str] = set()

  def add_loss(self, loss: float) -> None:
    self.losses.append(float(loss))

  def add_auc(self, auc: float, rows: int) -> None:
    self.aucs.append((float(auc), max(AUC_NEAR_HALF, AUC_NOISE / max(rows, 1) ** 0.5)))

  def check(self, step: int) -> list[str]:
    out = []
    recent = self.aucs[-STUCK_EVALUATIONS:]
    if (len(recent) == STUCK_EVALUATIONS and "auc" not in self.given
        and all(abs(a - 0.5) < chance for a, chance in recent)):
      self.given.add("auc")
      out.append(
          f"WARNING (step {step}): the evaluation AUC has stayed as near 0.5 as chance gives "
          f"for {STUCK_EVALUATIONS} evaluations ({', '.join(f'{a:.4f}' for a, _ in recent)}): "
          "the model does not rank. Check that the labels are 0/1 clicks and match their rows, "
          "that the features carry signal (data.kind='random' has none), and the learning "
          "rate (too high diverges, too low stands still).")
    if (len(self.losses) >= FLAT_LOSS_POINTS and "loss" not in self.given
        and self.losses[-1] >= self.losses[0]):
      self.given.add("loss")
      out.append(
          f"WARNING (step {step}): the training loss has not fallen from its start "
          f"({self.losses[0]:.4f} -> {self.losses[-1]:.4f}). Check the learning rate "
          "(learning_rate, the warmup) and the optimisers, and that the labels are not "
          "shuffled apart from their features.")
    return out


class TensorBoard:
  """Scalars into an event file, written where they are logged (tensorboardX's event
  records, without its background thread), or nothing where tensorboardX is not
  installed. A write that fails (a full disk) stops the event file with one message,
  not the run: the checkpoints and metrics.jsonl report their own failures."""

  def __init__(self, directory: str, log: Callable[[str], None]):
    self.log = log
    self.events = None
    try:
      from tensorboardX.event_file_writer import EventsWriter
      from tensorboardX.proto.event_pb2 import Event
      from tensorboardX.summary import scalar
    except ImportError:
      log("logging.tensorboard: tensorboardX is not installed, so no event files are "
          "written (pip install tensorboardX, or set logging.tensorboard=False)")
      return
    self._event, self._scalar = Event, scalar
    with self._failures():
      os.makedirs(directory, exist_ok=True)
      self.events = EventsWriter(os.path.join(directory, "events"))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self.events is None:
      return
    with self._failures():
      for name, value in values.items():
        self.events.write_event(self._event(wall_time=time.time(), step=int(step),
                                            summary=self._scalar(name, float(value))))
      self.events.flush()

  def close(self) -> None:
    if self.events is not None:
      with self._failures():
        self.events.close()
      self.events = None

  @contextlib.contextmanager
  def _failures(self):
    try:
      yield
    except OSError as e:
      self.log(f"logging.tensorboard: writing the event file failed ({e}); no more events "
               "are written in this run")
      events, self.events = self.events, None
      if events is not None:
        with contextlib.suppress(OSError):
          events.close()


class Profile:
  """A jax.profiler trace of train steps `first`..`last` (1-based) into `directory`."""

  def __init__(self, steps: tuple[int, int], directory: str, log: Callable[[str], None]):
    self.first, self.last = steps
    self.directory, self.log = directory, log
    self.running = False

  def before(self, step: int) -> None:
    if step == self.first:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.running = True

  def after(self, step: int, state) -> None:
    if self.running and step >= self.last:
      jax.block_until_ready(state)
      self.stop()
      self.log(f"profile of steps {self.first}-{self.last} written to {self.directory} "
               "(tensorboard --logdir there, Profile tab; or the .trace.json.gz in Perfetto)")

  def stop(self) -> None:
    if self.running:
      self.running = False
      jax.profiler.stop_trace()


class Observers:
  """The run's TensorBoard writer, MLPerf log, profile and warnings (process 0 writes)."""

  def __init__(self, run):
    from dlrm_jax import mlperf_log  # mllog only where asked for

    spec, log = run.spec, run.log
    self.warn = run.warn
    self.every = spec.logging.every_steps
    self.batch = spec.training.mini_batch_size
    self.warnings = RunWarnings()
    self.window: list = []  # device losses since the last log point
    self.window_start = time.perf_counter()
    lead = run.is_lead
    board_dir = os.path.join(run.workdir, "tensorboard")
    self.board = TensorBoard(board_dir, log) if lead and spec.logging.tensorboard else None
    self.mlperf = (mlperf_log.MLPerfLog(run, run.started) if lead and spec.logging.mlperf
                   else None)
    steps = spec.training.profile_steps
    self.profile = Profile(steps, board_dir, log) if steps is not None else None

  def start(self) -> None:
    if self.mlperf is not None:
      self.mlperf.run_start()
    self.window_start = time.perf_counter()

  def before_step(self, prog) -> None:
    if self.mlperf is not None:
      self.mlperf.before_step(prog.steps_done)
    if self.profile is not None:
      self.profile.before(prog.steps_done + 1)

  def after_step(self, prog, out: dict) -> None:
    """After step `prog.steps_done`: the profile's end, the log points."""
    if self.profile is not None:
      self.profile.after(prog.steps_done, prog.state)
    self.window.append(out["loss"])
    if self.every > 0 and prog.steps_done % self.every == 0:
      loss = float(np.mean(jax.device_get(self.window)))
      elapsed = time.perf_counter() - self.window_start
      if self.board is not None:
        self.board.scalars(prog.steps_done, {
            "train/loss": loss, "train/learning_rate": float(out["lr"]),
            "train/examples_per_sec": len(self.window) * self.batch / max(elapsed, 1e-9)})
      self.warnings.add_loss(loss)
      self._warn(prog.steps_done)
      self.window, self.window_start = [], time.perf_counter()

  def before_eval(self, prog) -> None:
    if self.mlperf is not None:
      self.mlperf.eval_start(prog)

  def evaluated(self, record: dict) -> None:
    if self.board is not None:
      self.board.scalars(record["step"], {
          "eval/auc": record["auc"], "eval/logloss": record["logloss"],
          "eval/accuracy": record["accuracy"], "train/loss_interval": record["train_loss"]})
    if self.mlperf is not None:
      self.mlperf.evaluated(record)
    self.warnings.add_auc(record["auc"], record["eval_rows"])
    if self.every <= 0:  # no log points: the intervals' losses are the loss curve
      self.warnings.add_loss(record["train_loss"])
    self._warn(record["step"])
    self.window_start = time.perf_counter()  # examples/s leaves evaluations out

  def _warn(self, step: int) -> None:
    for message in self.warnings.check(step):
      self.warn(message)

  def end(self, prog, success: bool) -> None:
    """Closes everything, on every way out of the loop (an error too); `success`: the
    run reached its target (or its last step, without a target)."""
    if self.profile is not None:
      self.profile.stop()
    if self.mlperf is not None:
      self.mlperf.run_stop(prog.steps_done, success)
    if self.board is not None:
      self.board.close()
