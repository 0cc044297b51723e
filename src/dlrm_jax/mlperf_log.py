"""An MLPerf-format log of a training run (`logging.mlperf = True`), WORKDIR/mlperf.log.

Written with `mlperf-logging`'s mllog (`pip install 'dlrm_jax[mlperf]'`), one
`:::MLLOG {...}` line per event, with the keys MLPerf Training's rules name
for DLRM-DCNv2 (`mlperf_logging/compliance_checker/training_6.0.0`, the newest
ruleset with that benchmark):

  init_start .. init_stop   set-up (compiling comes with the first step, as in the reference)
  submission_*              benchmark (dlrm_dcnv2 for the dcn interaction, else dlrm),
                            division, platform, org (logging.mlperf_*)
  hyper-parameters          global_batch_size, gradient_accumulation_steps, seed,
                            train_samples, eval_samples, opt_name, opt_base_learning_rate,
                            the schedule's warmup and decay steps, Adagrad's epsilon,
                            initial accumulator, learning-rate decay and weight decay
  run_start .. run_stop     training; run_stop's status is "success" once target_auc
                            is reached, else "aborted"
  block_start .. block_stop the steps between two evaluations (samples_count)
  eval_start, eval_stop, eval_accuracy (the AUC), with epoch_num (fractional: the
                            samples so far over an epoch's) and samples_count

`python -m mlperf_logging.compliance_checker --usage training --ruleset 6.0.0
WORKDIR/mlperf.log` checks it; `tests/test_observe.py` lists what a short,
non-benchmark run fails and why. A resumed run appends to the same file: a
submission's log is that of one uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os

import jax

from dlrm_jax.config import parse_args

RULESET = "6.0.0"


def _optimizer_keys(spec, c) -> dict:
  """opt_* keys of the run's optimisers (MLPerf's DLRM-DCNv2 trains all with Adagrad)."""
  from dlrm_jax.embedding.optimizers import make_sparse_optimizer
  from dlrm_jax.optim import scale_by_adagrad

  t = spec.training
  name = t.dense_optimizer if t.dense_optimizer == t.embedding_optimizer else \
      f"{t.dense_optimizer} (dense), {t.embedding_optimizer} (embeddings)"
  keys = {c.OPT_NAME: name, c.OPT_BASE_LR: t.learning_rate,
          c.OPT_LR_WARMUP_STEPS: t.lr_num_warmup_steps,
          c.OPT_LR_DECAY_START_STEP: t.lr_decay_start_step,
          c.OPT_LR_DECAY_STEPS: t.lr_num_decay_steps, c.OPT_WEIGHT_DECAY: 0}
  if "adagrad" in t.embedding_optimizer:
    sparse = make_sparse_optimizer(t.embedding_optimizer, t.embedding_optimizer_args)
    keys.update({c.OPT_ADAGRAD_EPSILON: sparse.eps,
                 c.OPT_ADAGRAD_INITIAL_ACCUMULATOR_VALUE: sparse.initial_accumulator_value,
                 c.OPT_ADAGRAD_LR_DECAY: 0})
    defaults = inspect.signature(scale_by_adagrad).parameters  # the dense Adagrad's own
    dense = {name: defaults[name].default for name in ("eps", "initial_accumulator_value")}
    dense.update(parse_args("dense_optimizer_args", t.dense_optimizer_args))
    if t.dense_optimizer == "adagrad" and (dense["eps"], dense["initial_accumulator_value"]) != (
        sparse.eps, sparse.initial_accumulator_value):
      keys[c.OPT_NAME] += (f"; dense eps {dense['eps']:g}, initial accumulator "
                           f"{dense['initial_accumulator_value']:g}")
  return keys


@dataclasses.dataclass
class _Counts:
  batch: int
  steps_per_epoch: int  # an epoch's steps (the run's, for data without epochs)

  def metadata(self, step: int) -> dict:
    return {"epoch_num": step / self.steps_per_epoch, "samples_count": step * self.batch}


class MLPerfLog:
  """The events of one run into WORKDIR/mlperf.log; built at set-up (init_start is the
  set-up's start, `started`, a time.time())."""

  def __init__(self, run, started: float):
    from mlperf_logging.mllog import constants, mllog  # installed: LoggingSpec checks it

    self.c = c = constants
    spec = run.spec
    self.path = os.path.join(run.workdir, "mlperf.log")
    self.logger = logging.getLogger(f"dlrm_jax.mlperf.{id(self)}")
    self.logger.propagate = False
    self.logger.setLevel(logging.INFO)
    self.handler = logging.FileHandler(self.path)
    self.logger.addHandler(self.handler)
    self.mllog = mllog.MLLogger(logger=self.logger, default_stack_offset=1,
                                root_dir=os.path.dirname(os.path.dirname(__file__)))
    batch = spec.training.mini_batch_size
    self.counts = _Counts(batch, run.steps_per_epoch or run.num_steps)
    self.block_open = False
    m = self.mllog
    m.start(c.INIT_START, time_ms=int(started * 1e3))
    devices = jax.devices()
    platform = spec.logging.mlperf_platform or f"{len(devices)}x{devices[0].device_kind}"
    benchmark = c.DLRM_DCNv2 if spec.model.interaction == "dcn" else "dlrm"
    info = {c.SUBMISSION_BENCHMARK: benchmark, c.SUBMISSION_DIVISION: spec.logging.mlperf_division,
            c.SUBMISSION_PLATFORM: platform}
    if spec.logging.mlperf_org:
      info[c.SUBMISSION_ORG] = spec.logging.mlperf_org
    info.update({c.GLOBAL_BATCH_SIZE: batch, c.GRADIENT_ACCUMULATION_STEPS: 1,
                 c.SEED: spec.training.seed,
                 c.TRAIN_SAMPLES: self.counts.steps_per_epoch * batch,
                 c.EVAL_SAMPLES: run.eval_set.rows})
    info.update(_optimizer_keys(spec, c))
    for key, value in info.items():
      m.event(key, value)

  def run_start(self) -> None:
    self.mllog.end(self.c.INIT_STOP)
    self.mllog.start(self.c.RUN_START)

  def before_step(self, step: int) -> None:
    """Opens a block before the first step after the start or an evaluation."""
    if not self.block_open:
      self.mllog.start(self.c.BLOCK_START, metadata={"samples_count": step * self.counts.batch})
      self.block_open = True

  def _block_stop(self, step: int) -> None:
    if self.block_open:
      self.mllog.end(self.c.BLOCK_STOP, metadata={"samples_count": step * self.counts.batch})
      self.block_open = False

  def eval_start(self, prog) -> None:
    self._block_stop(prog.steps_done)
    self.mllog.start(self.c.EVAL_START, metadata=self.counts.metadata(prog.steps_done))

  def evaluated(self, record: dict) -> None:
    m, c, md = self.mllog, self.c, self.counts.metadata(record["step"])
    m.end(c.EVAL_STOP, metadata=md)
    m.event(c.EVAL_ACCURACY, value=record["auc"], metadata=md)

  def run_stop(self, step: int, success: bool) -> None:
    self._block_stop(step)
    self.mllog.end(self.c.RUN_STOP, metadata={
        "status": self.c.SUCCESS if success else self.c.ABORTED,
        "samples_count": step * self.counts.batch})
    self.handler.close()
    self.logger.removeHandler(self.handler)
