"""An MLPerf-format log of a training run (`logging.mlperf = True`), WORKDIR/mlperf.log.

Written with `mlperf-logging`'s mllog (`pip install 'dlrm_jax[mlperf]'`), one
`:::MLLOG {...}` line per event, with the keys MLPerf Training's rules name for the
run's benchmark: DLRM-DCNv2 for DLRM (`mlperf_logging/compliance_checker/training_6.0.0`,
the newest ruleset with that benchmark), DLRMv4 for `model = "dlrmv4"` (`training_6.1.0`,
`RULESETS`):

  init_start .. init_stop   set-up (compiling comes with the first step, as in the reference)
  submission_*              benchmark (dlrm_dcnv2 for the dcn interaction, else dlrm;
                            dlrmv4), division, platform, org (logging.mlperf_*)
  hyper-parameters          global_batch_size, gradient_accumulation_steps, seed,
                            train_samples, eval_samples, opt_name, opt_base_learning_rate,
                            the schedule's warmup and decay steps, Adagrad's epsilon,
                            initial accumulator, learning-rate decay and weight decay;
                            for DLRMv4 those its rules name instead (`_dlrmv4_keys`)
  run_start .. run_stop     training; run_stop's status is "success" once target_auc
                            is reached, else "aborted"
  block_start .. block_stop the steps between two evaluations (samples_count)
  eval_start, eval_stop, eval_accuracy (the AUC), with epoch_num (fractional: the
                            samples so far over an epoch's) and samples_count

`python -m mlperf_logging.compliance_checker --usage training --ruleset 6.0.0
WORKDIR/mlperf.log` (6.1.0 for DLRMv4) checks it; `tests/test_observe.py` lists what a
short, non-benchmark run fails and why. A resumed run appends to the same file: a
submission's log is that of one uninterrupted run.

DLRMv4's keys, each the run's own value:

  train_samples             every anchor of the train windows (the run trains those of
                            full batches, as the reference does; it counts them all too)
  eval_samples              the rows evaluated (every anchor of the eval windows)
  max_sequence_length       8 contextual tokens + dlrmv4.history_length + 1 candidate:
                            the longest sequence the network takes. The reference logs its
                            max_seq_len 4096, a capacity: it truncates histories past
                            4096 - 8 - 1 = 4087 events, which its histories of at most
                            4,086 never reach. configs/mlperf_dlrmv4.py's history_length
                            4,087 is that capacity: the same samples (each pool gives at
                            most 4,087 // 3 = 1,362 events, as at 4,086), padded to
                            8 + 4,087 + 1 = 4,096 tokens, as the reference's
  opt_name, opt_sparse_name 'Adam' and 'RowWiseAdagrad', the rules' spellings, for
                            dense_optimizer "adam" and embedding_optimizer
                            "rowwise_adagrad"; other optimisers by their config names
  opt_adam_beta_1, _beta_2, _epsilon  dense_optimizer_args, else optax.adam's defaults
                            (with dense_optimizer "adam" only)
  opt_weight_decay          0.0: no dense optimiser here decays weights
  opt_gradient_clip_norm    grad_clip_norm (0.0: no clipping)
  opt_base_learning_rate, opt_sparse_base_learning_rate  learning_rate: one rate and
                            schedule for the network and the tables
  opt_learning_rate_warmup_steps, _start_lr  lr_num_warmup_steps, and 0.0: the warmup
                            is lr * t / W, a line from 0
  eval_every_data_pct       eval_every_epochs where it sets the cadence; with test_freq
                            (or only the final evaluation), the shortest decimal
                            fraction p of train_samples whose grid under the rules,
                            ceil(p * train_samples / batch) steps, is test_freq (the
                            run's length): 0.001 for configs/mlperf_dlrmv4.py's 280 steps
                            of 8,192
  lowest_numerical_precision_in_linear, _in_attn  the network's compute_dtype (fp32);
                            _in_comm fp32: the gradients' reduction and the lookups
                            exchanged are float32 whatever the tables' storage
  tensor_, pipeline_, context_, expert_parallelism  1: the network is data-parallel (the
                            tables are sharded, but no layer is split)
  micro_batch_size          the batch over the mesh's devices
  config_filename           WORKDIR/config.txt, where the run writes its whole config

Of the checks closed_dlrmv4.yaml makes, a benchmark run with configs/mlperf_dlrmv4.py
on the prepared Yambda-5b log fails cache_clear only (the
launcher clears the page cache and logs it, not a trainer). A short run on another log
fails also those that need that data or that length: train_samples (2,290,835,423
anchors), eval_samples (2,058,204), the grid and first-evaluation checks of
eval_accuracy (an evaluation every ceil(0.001 * 2,290,835,423 / batch) steps, the
first at the rules' first_eval_samples for the batch), and its target (an AUC of 0.75);
the hyper-parameters it can set as the benchmark does (the learning rate in the band
for its batch, 24,000 warmup steps) pass.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os

import jax
import optax

from dlrm_jax.config import parse_args

# run.spec.family -> the training ruleset that checks its log (DLRM: DLRM-DCNv2's).
RULESETS = {"dlrm": "6.0.0", "dlrmv4": "6.1.0"}

# DLRMv4's optimisers as closed_dlrmv4.yaml spells them, by their config names.
DENSE_NAMES = {"adam": "Adam"}
SPARSE_NAMES = {"rowwise_adagrad": "RowWiseAdagrad"}

# compute_dtype -> MLPerf's name of the precision.
PRECISIONS = {"float32": "fp32", "bfloat16": "bfloat16", "float16": "fp16"}


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


def _dlrmv4_keys(run, c) -> dict:
  """The hyper-parameters and disclosures training 6.1.0 asks of DLRMv4 (the module
  docstring says where each comes from)."""
  spec = run.spec
  t, model = spec.training, spec.model
  train_samples = run.data.train_anchors()
  keys = {c.TRAIN_SAMPLES: train_samples,
          c.MAX_SEQUENCE_LENGTH: model.network.num_contextual + model.history_length + 1,
          c.OPT_NAME: DENSE_NAMES.get(t.dense_optimizer, t.dense_optimizer),
          c.OPT_BASE_LR: t.learning_rate}
  if t.dense_optimizer == "adam":
    defaults = inspect.signature(optax.adam).parameters
    adam = {name: defaults[name].default for name in ("b1", "b2", "eps")}
    adam.update(parse_args("dense_optimizer_args", t.dense_optimizer_args))
    keys.update({c.OPT_ADAM_BETA_1: adam["b1"], c.OPT_ADAM_BETA_2: adam["b2"],
                 c.OPT_ADAM_EPSILON: adam["eps"]})
  precision = PRECISIONS[model.compute_dtype]
  keys.update({
      c.OPT_WEIGHT_DECAY: 0.0, c.OPT_GRADIENT_CLIP_NORM: t.grad_clip_norm,
      c.OPT_SPARSE_NAME: SPARSE_NAMES.get(t.embedding_optimizer, t.embedding_optimizer),
      c.OPT_SPARSE_BASE_LR: t.learning_rate,
      c.OPT_LR_WARMUP_STEPS: t.lr_num_warmup_steps, c.OPT_LR_WARMUP_START_LR: 0.0,
      c.EVAL_EVERY_DATA_PCT: t.eval_every_epochs if t.eval_every_epochs > 0 else
      data_fraction(t.test_freq or run.num_steps, t.mini_batch_size, train_samples),
      c.LOWEST_NUMERICAL_PRECISION_IN_LINEAR: precision,
      c.LOWEST_NUMERICAL_PRECISION_IN_ATTN: precision,
      c.LOWEST_NUMERICAL_PRECISION_IN_COMM: PRECISIONS["float32"],
      c.TENSOR_PARALLELISM: 1, c.PIPELINE_PARALLELISM: 1, c.CONTEXT_PARALLELISM: 1,
      c.EXPERT_PARALLELISM: 1,
      c.MICRO_BATCH_SIZE: t.mini_batch_size // run.task.mesh.devices.size,
      c.CONFIG_FILENAME: os.path.join(run.workdir, "config.txt")})
  return keys


def data_fraction(steps: int, batch: int, samples: int) -> float:
  """The shortest decimal fraction p of `samples` whose evaluation interval under MLPerf
  DLRMv4's rules, ceil(p * samples / batch) steps, is `steps` (p is at most `steps *
  batch / samples`, the fraction trained between two evaluations)."""
  most = steps * batch / samples
  for decimals in range(-math.floor(math.log10(most)), 18):
    p = math.floor(most * 10 ** decimals) / 10 ** decimals
    if p > 0 and math.ceil(p * samples / batch) == steps:
      return p
  return most


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
    if spec.family == "dlrmv4":
      benchmark = c.DLRMV4
    else:
      benchmark = c.DLRM_DCNv2 if spec.model.interaction == "dcn" else "dlrm"
    info = {c.SUBMISSION_BENCHMARK: benchmark, c.SUBMISSION_DIVISION: spec.logging.mlperf_division,
            c.SUBMISSION_PLATFORM: platform}
    if spec.logging.mlperf_org:
      info[c.SUBMISSION_ORG] = spec.logging.mlperf_org
    info.update({c.GLOBAL_BATCH_SIZE: batch, c.GRADIENT_ACCUMULATION_STEPS: 1,
                 c.SEED: spec.training.seed,
                 c.TRAIN_SAMPLES: self.counts.steps_per_epoch * batch,
                 c.EVAL_SAMPLES: run.eval_set.rows})
    info.update(_dlrmv4_keys(run, c) if spec.family == "dlrmv4" else _optimizer_keys(spec, c))
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
