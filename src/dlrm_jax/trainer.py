"""The training loop: set a run up, step, evaluate, checkpoint, summarise.

`train_and_evaluate` reads top to bottom: `set_up` builds the task, the data
and the evaluation set; `resume_or_start` restores the latest checkpoint or
starts afresh (or, when the run had ended, trains on to a raised length);
`train_loop` steps, evaluating as the `Cadence` says (every `test_freq` steps
or every `eval_every_epochs` of an epoch, and at the end) and checkpointing as
`is_save_step` says, until the run's length (`run_length`: `num_batches`
steps, or `num_epochs` epochs of the data) or `target_auc`, or a SIGINT or
SIGTERM (`dlrm_jax.stopping`: a checkpoint of the step reached, then `Stopped`);
`summarize` makes the run summary. What a run reports besides
metrics.jsonl (TensorBoard, the MLPerf log, a profile, warnings) is
`dlrm_jax.observe`'s. The pure, jitted steps are `dlrm_jax.task.Task`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Callable, Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from dlrm_jax import checkpoint as checkpoint_lib
from dlrm_jax import evaluation
from dlrm_jax import observe
from dlrm_jax import optim
from dlrm_jax import parallel
from dlrm_jax import stopping
from dlrm_jax.config import ConfigError
from dlrm_jax.data import configure_data, make_data
from dlrm_jax.data.prefetch import prefetch
from dlrm_jax.data.source import Batch, BatchStream, DataSource
from dlrm_jax.specs import RunSpec, TrainingSpec
from dlrm_jax.state import TrainState
from dlrm_jax.task import Task


# Fields of an evaluation record that time the run, which no rerun reproduces.
TIMINGS = ("examples_per_sec", "seconds")

# A run longer than this many epochs of its data is warned about at start-up.
MANY_EPOCHS = 5


@dataclasses.dataclass
class TrainResult:
  """What a training run returns: its summary, final state and evaluation records."""

  summary: dict
  state: TrainState
  task: Task
  records: list[dict]


@dataclasses.dataclass(frozen=True)
class Cadence:
  """Which steps end with an evaluation: every `every_steps` steps, or at every
  `every_epochs` of an epoch of `steps_per_epoch` steps (the step nearest each exact
  fraction), none of them before `start_step`; the last step always."""

  num_steps: int
  every_steps: int = 0
  every_epochs: float = 0.0
  steps_per_epoch: int | None = None
  start_step: int = 0

  def due(self, step: int) -> bool:
    if step == self.num_steps:
      return True
    if step < self.start_step:
      return False
    if self.every_steps > 0:
      return step % self.every_steps == 0
    if self.every_epochs > 0:
      period = self.every_epochs * self.steps_per_epoch
      if period <= 1:
        return True
      k = round(step / period)
      return k >= 1 and round(k * period) == step
    return False


@dataclasses.dataclass
class Run:
  """What a training run is made of, set up once."""

  spec: RunSpec  # the config, sized for the data, typed
  workdir: str
  task: Task
  data: DataSource
  eval_set: evaluation.EvalSet
  teacher_auc: float | None
  baseline_auc: float | None  # what the data's popularity baseline reaches on eval
  is_lead: bool  # process 0: logs, metrics and the progress bar
  show_progress: bool
  log: Callable[[str], None]  # process 0's messages; a no-op elsewhere
  warn: Callable[[str], None]  # process 0's warnings during the run (log, else logging)
  checkpointer: checkpoint_lib.Checkpointer | None
  num_steps: int  # the run's length (`run_length`)
  steps_per_epoch: int | None  # None: the data has no epochs (and none was given)
  cadence: Cadence
  save_every: int  # checkpoint every N steps; 0: at every evaluation
  started: float  # time.time() at the start of the set-up

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.workdir, "metrics.jsonl")


@dataclasses.dataclass
class Progress:
  """What the step loop carries from step to step."""

  state: TrainState
  start: int  # the step this run started from (a restored checkpoint's, or 0)
  steps_done: int
  records: list[dict]
  losses: list  # the unfinished evaluation interval's losses (device scalars)
  losses_checked: int = 0  # losses[:losses_checked] are known to be finite
  # (step, device count) of the steps' row-wise ids past capacity, not yet checked.
  dropped: list = dataclasses.field(default_factory=list)
  finished: bool = False  # the restored run has nothing left to train
  data_position: dict | None = None
  compile_seconds: float = 0.0
  train_seconds: float = 0.0
  seconds_before: float = 0.0  # the run's wall time before this process resumed it
  loop_start: float = 0.0  # perf_counter() when this process's first step started
  interval_start: float = 0.0
  interval_steps: int = 0  # timed steps of the interval (the first, compiling, is not)


def train_and_evaluate(config, workdir: str, *, progress: bool | None = None,
                       log: Callable[[str], None] | None = None) -> TrainResult:
  """Trains the run's length (`run_length`), evaluating as `Cadence` says.

  `log`, if given, receives the sharding plan and the schedule at start-up and
  the checkpoints' news (on process 0). Writes WORKDIR/metrics.jsonl (one JSON
  object per evaluation, the same records as `TrainResult.records`);
  `format_summary(result.summary)` is what `train.py` prints at the end. A SIGINT or
  SIGTERM stops the run after the step it is in, with a checkpoint of that step (when
  checkpoints are on): `stopping.Stopped`; a second one acts at once.
  """
  run = set_up(config, workdir, progress, log)
  finished = False
  try:
    prog = resume_or_start(run)
    train_loop(run, prog, train_stream(run, prog))
    finished = True
  finally:
    # Not after a second Ctrl-C (stopping.StopSignals): that leaves at once.
    if run.checkpointer is not None and not isinstance(sys.exception(), KeyboardInterrupt):
      try:
        run.checkpointer.close()  # after the saves in flight
      except Exception:
        if finished:  # a last save that failed; otherwise the run's own error is the one
          raise
  return TrainResult(summary=summarize(run, prog), state=prog.state, task=run.task,
                     records=prog.records)


# Set-up ---------------------------------------------------------------------------

def set_up(config, workdir: str, progress: bool | None,
           log: Callable[[str], None] | None) -> Run:
  """The task, the data, the evaluation set and the checkpointer of a run."""
  started = time.time()
  config = configure_data(config)  # Criteo: table sizes from the prepared data's metadata.
  spec = RunSpec.from_config(config)  # the one conversion of the config
  parallel.initialize_distributed(spec.distributed)
  task = Task(spec)
  devices = task.mesh.size
  for name in ("mini_batch_size", "test_mini_batch_size"):
    if getattr(spec.training, name) % devices:
      raise ConfigError(f"{name}={getattr(spec.training, name)} must be a multiple of the "
                        f"number of devices in the mesh ({devices}): each device takes an "
                        "equal slice")
  data = make_data(spec)
  is_lead = jax.process_index() == 0
  warn = (log if log is not None else logging.getLogger("dlrm_jax").warning) if is_lead \
      else (lambda _: None)
  log = log if log is not None and is_lead else (lambda _: None)
  log(task.plan.describe())
  os.makedirs(workdir, exist_ok=True)
  if is_lead:  # the whole config, beside the run it made (train.py --verbose prints it)
    with open(os.path.join(workdir, "config.txt"), "w") as f:
      f.write(str(config))
  eval_set = evaluation.EvalSet(data, spec.training.test_mini_batch_size,
                                spec.training.test_num_batches, task.batch_sharding)
  teacher_auc = eval_set.teacher_auc()
  popularity = getattr(data, "popularity_auc", None)
  baseline_auc = popularity() if popularity is not None else None
  per_epoch = epoch_steps(spec, data)
  num_steps = run_length(spec.training, per_epoch)
  run = Run(
      spec=spec, workdir=workdir, task=task, data=data, eval_set=eval_set,
      teacher_auc=teacher_auc, baseline_auc=baseline_auc, is_lead=is_lead,
      show_progress=is_lead and (progress if progress is not None
                                 else spec.training.progress_bar),
      log=log, warn=warn, checkpointer=None, num_steps=num_steps,
      steps_per_epoch=per_epoch,
      cadence=Cadence(num_steps, spec.training.test_freq, spec.training.eval_every_epochs,
                      per_epoch, spec.training.eval_start_step),
      save_every=spec.checkpoint.every_steps if spec.checkpoint.enabled else 0,
      started=started)
  run.checkpointer = make_checkpointer(spec, workdir, log)
  for line in describe_schedule(run):
    log(line)
  epochs = num_steps / per_epoch if per_epoch else 0.0
  if epochs > MANY_EPOCHS:
    whole = lambda x, digits: f"{x:,.0f}" if x >= 10 ** digits else f"{x:.{digits}g}"
    warn(f"WARNING: this run's {num_steps:,} steps are {whole(epochs, 3)} epochs of its data "
         f"({per_epoch:,} steps each): it sees every train row about {whole(epochs, 2)} times"
         + (f"; num_batches=0 trains num_epochs={spec.training.num_epochs:g} instead"
            if spec.training.num_batches else ""))
  return run


def epoch_steps(spec: RunSpec, data: DataSource) -> int | None:
  """Steps per epoch: the Criteo loader's train batches, or `data.epoch_rows` over the
  batch for generated data; None without either (a ConfigError if the length or the
  cadence needs it)."""
  t = spec.training
  batch = t.mini_batch_size
  needs = ([f"num_batches=0 trains num_epochs={t.num_epochs:g} epochs"] if t.num_batches == 0
           else []) + ([f"eval_every_epochs={t.eval_every_epochs} evaluates at fractions of "
                        "an epoch"] if t.eval_every_epochs > 0 else [])
  if hasattr(data, "num_batches"):  # data with a train split
    steps = data.num_batches("train", batch)
    if not steps and needs:
      raise ConfigError(f"{' and '.join(needs)}, but the train split of {spec.data.path} "
                        f"({data.num_rows('train'):,} rows) holds no full batch of {batch}")
    return steps or None
  rows = spec.data.epoch_rows
  if rows > 0:
    if rows < batch:
      raise ConfigError(f"data.epoch_rows={rows} is less than one batch "
                        f"(mini_batch_size={batch})")
    return rows // batch
  if needs:
    raise ConfigError(
        f"{' and '.join(needs)}, but data.kind={spec.data.kind!r} has no epochs: set "
        "data.epoch_rows (the rows of one epoch), or give num_batches and test_freq in steps")
  return None


def run_length(t: TrainingSpec, steps_per_epoch: int | None) -> int:
  """The run's steps: `num_batches`, or when it is 0 `num_epochs` epochs of
  `steps_per_epoch` (rounded to the nearest step, at least one)."""
  if t.num_batches > 0:
    return t.num_batches
  return max(1, round(t.num_epochs * steps_per_epoch))


def describe_schedule(run: Run) -> list[str]:
  """The start-up lines on the run's length, its evaluations and checkpoints, and its
  learning rate."""
  t, n, per_epoch = run.spec.training, run.num_steps, run.steps_per_epoch
  length = f"{n:,} steps of {t.mini_batch_size:,}"
  if per_epoch:
    length += f" = {_epochs(n / per_epoch)} of {per_epoch:,} steps"
  length += f" (num_batches={t.num_batches:,})" if t.num_batches else \
      f" (num_epochs={t.num_epochs:g})"
  start = f" from step {t.eval_start_step:,}" if t.eval_start_step > 0 else ""
  if t.test_freq > 0:
    when = f"an evaluation every {t.test_freq:,} steps{start} and at the end"
  elif t.eval_every_epochs > 0:
    when = (f"an evaluation every {t.eval_every_epochs:g} epoch (about "
            f"{max(1.0, t.eval_every_epochs * per_epoch):,.0f} steps){start} and at the end")
  else:
    when = "an evaluation at the end"
  saves = ("no checkpoints" if run.checkpointer is None
           else f"a checkpoint every {run.save_every:,} steps and at the end"
           if run.save_every > 0 else "a checkpoint at each")
  return [f"schedule: {length}; {when}, {saves}", f"learning rate: {optim.describe_lr(t, n)}"]


def _epochs(x: float) -> str:
  return f"{x:,.4g} epoch" + ("" if x == 1 else "s")


def make_checkpointer(spec: RunSpec, workdir: str,
                      log: Callable[[str], None]) -> checkpoint_lib.Checkpointer | None:
  ckpt = spec.checkpoint
  if not ckpt.enabled:
    return None
  return checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=ckpt.max_to_keep,
      keep_best=ckpt.keep_best, async_save=ckpt.async_save, log=log)


def resume_or_start(run: Run) -> Progress:
  """The latest checkpoint's progress (`checkpoint.resume`), or a fresh state's; writes
  metrics.jsonl with the records up to it (a killed run may have written more)."""
  ckpt, spec = run.checkpointer, run.spec
  seed = spec.training.seed
  restored = None
  if ckpt is not None and not spec.checkpoint.resume and ckpt.steps():
    run.log(f"checkpoint.resume=False: deleting the checkpoints of steps {ckpt.steps()} "
            f"in {ckpt.directory}")
    ckpt.delete_all()
  if ckpt is not None and spec.checkpoint.resume:
    restored = ckpt.restore(run.task, partial=spec.checkpoint.restore_partial,
                            fresh=lambda: run.task.init_state(seed))
  if restored is None:
    prog = Progress(state=run.task.init_state(seed), start=0, steps_done=0, records=[], losses=[])
  else:
    c = restored.contents
    # The unfinished interval's losses, so that its mean is the uninterrupted run's.
    losses = [np.float32(x) for x in c.interval_losses]
    prog = Progress(state=restored.state, start=restored.step,
                    steps_done=restored.step,
                    records=[dict(r) for r in c.records], losses=losses,
                    losses_checked=len(losses),
                    finished=c.finished, data_position=c.data or None,
                    seconds_before=float(c.records[-1].get("seconds", 0.0)) if c.records
                    else 0.0)
    run.log(f"resuming from step {prog.start} ({ckpt.directory}/{prog.start})"
            + (" with only the parts that match the config" if restored.partial else ""))
    if prog.start >= run.num_steps or (prog.finished and target_reached(run, prog.records)):
      run.log(nothing_to_train(run, prog, c.config))
      prog.finished = True
    elif prog.finished:  # the run ended at its length; this config's is longer
      prog.finished = False
      run.log(f"the run ended at step {prog.start:,}: training on to step {run.num_steps:,}"
              + ("; the learning rate goes on by step number (see above)"
                 if run.spec.training.lr_num_warmup_steps
                 or run.spec.training.lr_num_decay_steps else ""))
  if run.is_lead:
    with open(run.metrics_path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in prog.records)
  return prog


def target_reached(run: Run, records: list[dict]) -> bool:
  """Whether the last evaluation reached the config's target_auc (0: none)."""
  target = run.spec.training.target_auc
  return bool(records) and 0 < target <= records[-1]["auc"]


def nothing_to_train(run: Run, prog: Progress, saved: dict) -> str:
  """What a rerun says when the run it resumes has nothing left to train: the run
  (its `saved` config's data and batch, its step and AUC) and how to go on."""
  t = run.spec.training
  data = saved["data"]
  found = (f"{run.workdir} holds a run on {data['kind']} data"
           + (f" ({data['path']})" if data.get("path") else "")
           + f", batch {saved['mini_batch_size']:,}, "
           + ("that ended" if prog.finished else "saved") + f" at step {prog.start:,}"
           + (f" with eval AUC {prog.records[-1]['auc']:.4f}" if prog.records else ""))
  if prog.start < run.num_steps:  # stopped at the target
    why, more = f"it reached target_auc={t.target_auc:g}", "raise target_auc (0: none)"
  else:
    why = f"this config's run is {run.num_steps:,} steps"
    more = "raise num_batches" if t.num_batches else "raise num_epochs"
  return (f"{found}: nothing to train, as {why}. To train it on, {more}; to start a new "
          "run, use another --workdir (or --config.checkpoint.resume=False, which deletes "
          "this run's checkpoints).")


def train_stream(run: Run, prog: Progress) -> BatchStream:
  """The train batches from the first step to take on, at the saved data position."""
  stream = run.data.batches(prog.start, "train")
  position = prog.data_position
  if position is not None:
    if "process_index" in position:  # process 0 wrote it; the position is common to all
      position = {**position, "process_index": jax.process_index()}
    try:
      stream.restore(position)
    except ValueError as e:
      raise ConfigError(f"cannot resume the data: {e}") from None
  return stream


# The loop ---------------------------------------------------------------------------

def train_loop(run: Run, prog: Progress, stream: BatchStream) -> None:
  """Steps to `num_steps` (or the target AUC), evaluating and checkpointing on the way."""
  observers = observe.Observers(run)
  batches = prefetch(host_batches(run, stream), size=2)
  last = prog.steps_done if prog.finished else run.num_steps
  bar = tqdm(total=run.num_steps, initial=prog.start,  # none for a run with nothing to train
             disable=not run.show_progress or prog.steps_done >= last,
             unit="step", dynamic_ncols=True, mininterval=0.5, desc="train")
  target = run.spec.training.target_auc
  ended = False  # at the last step or the target, rather than by an error
  prog.loop_start = time.perf_counter()
  observers.start()
  try:
    with open(run.metrics_path if run.is_lead else os.devnull, "a") as metrics_file, \
        stopping.StopSignals() as signals:
      while prog.steps_done < last:
        observers.before_step(prog)
        out = take_step(run, prog, next(batches))
        bar.update(1)
        stopping.check_losses(run, prog, len(prog.losses) - 1)  # the previous step's: done by now
        observers.after_step(prog, out)
        evaluated, stop, record = run.cadence.due(prog.steps_done), False, None
        if evaluated:
          observers.before_eval(prog)
          record = evaluate_interval(run, prog, out["lr"])
          metrics_file.write(json.dumps(record) + "\n")
          metrics_file.flush()
          bar.set_postfix(loss=f"{record['train_loss']:.4f}", auc=f"{record['auc']:.4f}",
                          ex_s=f"{record['examples_per_sec']:,.0f}")
          observers.evaluated(record)
          stop = 0 < target <= record["auc"]
        if run.checkpointer is not None and is_save_step(run, prog.steps_done, evaluated, stop):
          save(run, prog, stream, None if record is None else {"auc": record["auc"]},
               finished=prog.steps_done == run.num_steps or stop)
        if stop:
          break
        if prog.steps_done < last and signals.requested():
          stop_on_signal(run, prog, stream, signals.signum)
        if evaluated:
          prog.interval_start = time.perf_counter()
    ended = True
  finally:
    observers.end(prog, success=target_reached(run, prog.records) if target > 0 else ended)
    bar.close()


def host_batches(run: Run, stream: BatchStream) -> Iterator[Batch]:
  """The stream's batches with their ids checked, as this process's rows."""
  task = run.task
  for batch in stream:
    task.check_ids(batch["sparse"], batch.get("sparse_mask"))
    yield batch if run.data.process_local else parallel.local_rows(batch, task.batch_sharding)


def take_step(run: Run, prog: Progress, host_batch: Batch) -> dict:
  """One train step; the first of a run is timed as the compile."""
  batch = parallel.global_batch(host_batch, run.task.batch_sharding)
  first = prog.steps_done == prog.start
  t = time.perf_counter()
  prog.state, out = run.task.train_step(prog.state, batch)
  if first:
    jax.block_until_ready(prog.state)
    prog.compile_seconds = time.perf_counter() - t
    prog.interval_start = time.perf_counter()
  else:
    prog.interval_steps += 1
  prog.losses.append(out["loss"])
  prog.steps_done += 1
  if run.task.embedding.may_drop_ids:
    prog.dropped.append((prog.steps_done, out["dropped_ids"]))
  return out


def is_save_step(run: Run, steps_done: int, evaluated: bool, stop: bool) -> bool:
  """At the end, at a stop, and every `save_every` steps (0: at every evaluation)."""
  every = run.save_every
  return (steps_done == run.num_steps or stop or (every > 0 and steps_done % every == 0)
          or (every <= 0 and evaluated))


def evaluate_interval(run: Run, prog: Progress, lr: jax.Array) -> dict:
  """The evaluation record closing an interval of steps; starts the next interval."""
  stopping.check_losses(run, prog, len(prog.losses))
  mean_loss = float(np.mean(jax.device_get(prog.losses)))
  elapsed = time.perf_counter() - prog.interval_start
  prog.train_seconds += elapsed
  batch = run.spec.training.mini_batch_size
  examples_per_sec = prog.interval_steps * batch / max(elapsed, 1e-9)
  result = evaluation.evaluate(run.task, prog.state, run.eval_set, rows=run.eval_set.rows)
  result["eval_rows"] = result.pop("rows")
  record = {"step": prog.steps_done, **result, "train_loss": mean_loss,
            "examples_per_sec": examples_per_sec, "lr": float(lr),
            # The run's wall time so far (set-up left out, evaluations in), across resumes.
            "seconds": prog.seconds_before + time.perf_counter() - prog.loop_start}
  if run.steps_per_epoch:
    record["epoch"] = prog.steps_done / run.steps_per_epoch
  if run.teacher_auc is not None:
    record["teacher_auc"] = run.teacher_auc
  prog.records.append(record)
  prog.losses, prog.interval_steps, prog.losses_checked = [], 0, 0
  return record


def save(run: Run, prog: Progress, stream: BatchStream, metrics: dict | None,
         finished: bool) -> None:
  """Checkpoints the state after `prog.steps_done` steps (asynchronously)."""
  stopping.check_losses(run, prog, len(prog.losses))
  contents = checkpoint_lib.Contents(
      config=run.spec.source, plan=run.task.plan,
      mesh={"shape": dict(run.task.mesh.shape), "processes": jax.process_count()},
      data=stream.state_at(prog.steps_done), records=prog.records,
      interval_losses=[float(x) for x in jax.device_get(prog.losses)], finished=finished)
  run.checkpointer.save(prog.steps_done, prog.state, contents, metrics)


def stop_on_signal(run: Run, prog: Progress, stream: BatchStream, signum: int) -> None:
  """Saves the state after `prog.steps_done` steps, waits for the save and raises
  `stopping.Stopped` (SIGINT or SIGTERM: `stopping.StopSignals`)."""
  if run.checkpointer is not None:
    save(run, prog, stream, None, finished=False)  # none if this step was just saved
    run.checkpointer.wait()
  raise stopping.Stopped(prog.steps_done, signum, saved=run.checkpointer is not None)


# The summary --------------------------------------------------------------------------

def summarize(run: Run, prog: Progress) -> dict:
  """The run's summary (what `format_summary` prints)."""
  if not prog.records:
    raise ConfigError(f"no evaluation record: the checkpoint in {run.workdir} ends at step "
                      f"{prog.start}, before any evaluation")
  final = prog.records[-1]
  batch = run.spec.training.mini_batch_size
  target = run.spec.training.target_auc
  hit = next((r for r in prog.records if 0 < target <= r["auc"]), None)
  return {
      "steps": final["step"],
      "examples": final["step"] * batch,
      "auc": final["auc"],
      "logloss": final["logloss"],
      "accuracy": final["accuracy"],
      "teacher_auc": run.teacher_auc,
      "popularity_auc": run.baseline_auc,
      "compile_seconds": prog.compile_seconds,
      "train_seconds": prog.train_seconds,
      "examples_per_sec": max(0, final["step"] - prog.start - 1) * batch
                          / max(prog.train_seconds, 1e-9),
      "trained_steps": prog.steps_done - prog.start,  # by this process: 0 when it had ended
      "target_auc": target or None,
      # The first evaluation at or above the target: its step, samples and wall time.
      "target_step": None if hit is None else hit["step"],
      "target_samples": None if hit is None else hit["step"] * batch,
      "target_seconds": None if hit is None else hit.get("seconds"),
      "eval_samples": final.get("eval_rows"),  # None in records of older checkpoints
      "workdir": run.workdir,
  }


def format_summary(summary: dict) -> str:
  """A human-readable run summary, with a warning for an AUC stuck near 0.5."""
  lines = [
      "Run summary",
      f"  steps            {summary['steps']:,} ({summary['examples']:,} examples)",
      f"  eval AUC         {summary['auc']:.4f}",
  ]
  if summary.get("teacher_auc") is not None:
    gap = summary["teacher_auc"] - summary["auc"]
    lines.append(f"  teacher AUC      {summary['teacher_auc']:.4f}  "
                 f"(best achievable on this data; gap {gap:+.4f})")
  if summary.get("popularity_auc") is not None:
    gain = summary["auc"] - summary["popularity_auc"]
    lines.append(f"  popularity AUC   {summary['popularity_auc']:.4f}  "
                 f"(each item's past listen-plus rate; the model's gain {gain:+.4f})")
  lines += [
      f"  eval log loss    {summary['logloss']:.4f}",
      f"  eval accuracy    {summary['accuracy']:.4f}"
      + (f"  ({summary['eval_samples']:,} samples)" if summary["eval_samples"] else ""),
      (f"  throughput       {summary['examples_per_sec']:,.0f} examples/s "
       f"(compile {summary['compile_seconds']:.1f} s)" if summary.get("trained_steps", 1) > 0
       else "  throughput       - (nothing trained: the run had ended)"),
      f"  metrics          {os.path.join(summary['workdir'], 'metrics.jsonl')}",
  ]
  if summary.get("target_auc"):
    if summary.get("target_step") is None:
      reached = "not reached"
    else:
      seconds = summary.get("target_seconds")
      reached = (f"reached at step {summary['target_step']:,}, "
                 f"{summary['target_samples']:,} samples"
                 + (f", {seconds:,.1f} s" if seconds is not None else ""))
    lines.append(f"  target AUC       {summary['target_auc']:.4f} ({reached})")
  if summary["auc"] < 0.52:
    lines.append("  WARNING: the AUC is close to 0.5, the model has not learned to rank. "
                 "Check the labels, the learning rate and the data (random data has no signal).")
  return "\n".join(lines)
