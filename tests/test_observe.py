"""What a run reports besides metrics.jsonl: the evaluation cadence and the target,
TensorBoard event files, the MLPerf log through MLPerf's compliance checker, a
profile trace, and the warnings given during a run."""

import glob
import gzip
import json
import logging
import math
import os
import struct

import pytest

from conftest import load_config
from dlrm_jax import trainer
from dlrm_jax.config import ConfigError
from dlrm_jax.trainer import Cadence


def _tiny(**overrides):
  c = load_config("tiny")
  c.logging.tensorboard = False
  for key, value in overrides.items():
    *parents, name = key.split("__")
    node = c
    for p in parents:
      node = node[p]
    setattr(node, name, value)
  return c


def read_events(directory):
  """(tag, step, value) of every scalar in the event files under `directory`: TFRecord
  framing (length, its CRC, data, its CRC) around tensorboard Event protos."""
  from tensorboardX.proto import event_pb2

  out = []
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      for v in event.summary.value:
        out.append((v.tag, event.step, v.simple_value))
  return out


# Cadence ------------------------------------------------------------------------------

def test_the_cadence_by_steps_by_epochs_and_the_last_step():
  by_steps = Cadence(num_steps=25, every_steps=10)
  assert [s for s in range(1, 26) if by_steps.due(s)] == [10, 20, 25]
  # An epoch of 13 steps, every quarter: the steps nearest 3.25, 6.5, 9.75 and 13.
  by_epochs = Cadence(num_steps=26, every_epochs=0.25, steps_per_epoch=13)
  assert [s for s in range(1, 27) if by_epochs.due(s)] == [3, 6, 10, 13, 16, 20, 23, 26]
  assert [s for s in range(1, 8) if Cadence(7, every_epochs=0.01, steps_per_epoch=13).due(s)] \
      == list(range(1, 8))  # more evaluations than steps: every step
  assert [s for s in range(1, 8) if Cadence(7).due(s)] == [7]  # only at the end


def test_eval_start_step_skips_the_cadence_s_earlier_evaluations_but_not_the_last(tmp_path):
  """MLPerf DLRMv4's first evaluation comes at a step the rules set: the cadence's grid
  is kept, its steps before `start_step` skipped; a run shorter than that still
  evaluates at its end. The trainer says so at start-up and evaluates there."""
  late = Cadence(num_steps=50, every_steps=10, start_step=25)
  assert [s for s in range(1, 51) if late.due(s)] == [30, 40, 50]
  assert [s for s in range(1, 51) if Cadence(50, 10, start_step=30).due(s)] == [30, 40, 50]
  assert [s for s in range(1, 21) if Cadence(20, 10, start_step=25).due(s)] == [20]
  by_epochs = Cadence(num_steps=26, every_epochs=0.25, steps_per_epoch=13, start_step=7)
  assert [s for s in range(1, 27) if by_epochs.due(s)] == [10, 13, 16, 20, 23, 26]
  lines = []
  result = trainer.train_and_evaluate(
      _tiny(num_batches=12, test_freq=3, eval_start_step=7, progress_bar=False,
            checkpoint__enabled=False), str(tmp_path), log=lines.append)
  assert [r["step"] for r in result.records] == [9, 12]
  assert any("an evaluation every 3 steps from step 7 and at the end" in line
             for line in lines), lines
  with pytest.raises(ConfigError, match=r"eval_start_step=-1 must be >= 0"):
    trainer.train_and_evaluate(_tiny(eval_start_step=-1), str(tmp_path / "bad"))


def test_epochs_on_generated_data_need_an_epoch_size(tmp_path):
  with pytest.raises(ConfigError, match=r"eval_every_epochs=0.5 evaluates at fractions of an "
                                        r"epoch, but data.kind='synthetic_ctr' has no epochs: "
                                        r"set data.epoch_rows"):
    trainer.train_and_evaluate(_tiny(eval_every_epochs=0.5, test_freq=0), str(tmp_path / "a"))
  with pytest.raises(ConfigError, match="both set a cadence: set one of them to 0"):
    trainer.train_and_evaluate(_tiny(eval_every_epochs=0.5), str(tmp_path / "b"))
  # 10 steps of 64 rows per epoch: evaluations at every half epoch, with their epoch.
  result = trainer.train_and_evaluate(
      _tiny(eval_every_epochs=0.5, test_freq=0, data__epoch_rows=640), str(tmp_path / "c"))
  assert [(r["step"], r["epoch"]) for r in result.records] == [(5, 0.5), (10, 1.0), (15, 1.5),
                                                               (20, 2.0)]


def test_a_length_in_epochs_of_generated_data_needs_an_epoch_size(tmp_path):
  with pytest.raises(ConfigError, match=r"num_batches=0 trains num_epochs=1 epochs, but "
                                        r"data.kind='synthetic_ctr' has no epochs"):
    trainer.train_and_evaluate(_tiny(num_batches=0), str(tmp_path / "a"))
  with pytest.raises(ConfigError, match=r"num_batches=0 trains num_epochs epochs of the data, "
                                        r"but num_epochs=0.0: set num_epochs > 0"):
    trainer.train_and_evaluate(_tiny(num_batches=0, num_epochs=0.0), str(tmp_path / "b"))
  # 1.5 epochs of 10 steps of 64 rows: 15 steps, and the start-up lines say so.
  messages = []
  result = trainer.train_and_evaluate(
      _tiny(num_batches=0, num_epochs=1.5, data__epoch_rows=640, lr_num_warmup_steps=20),
      str(tmp_path / "c"), log=messages.append)
  assert [r["step"] for r in result.records] == [10, 15]
  assert ("schedule: 15 steps of 64 = 1.5 epochs of 10 steps (num_epochs=1.5); an evaluation "
          "every 10 steps and at the end, no checkpoints") in messages, messages
  assert ("learning rate: 0.1, warmup over 20 steps (this run ends during the warmup); by "
          "step number, whatever the run's length") in messages, messages


def test_training_stops_at_the_target_and_says_when(tmp_path):
  result = trainer.train_and_evaluate(_tiny(test_freq=2, target_auc=0.52), str(tmp_path))
  s, hit = result.summary, result.records[-1]
  assert hit["auc"] >= 0.52 and all(r["auc"] < 0.52 for r in result.records[:-1])
  assert s["steps"] == hit["step"] < 20  # stopped there
  assert (s["target_step"], s["target_samples"]) == (hit["step"], hit["step"] * 64)
  assert s["target_seconds"] == hit["seconds"] > 0
  assert [r["seconds"] for r in result.records] == sorted(r["seconds"] for r in result.records)
  assert (f"target AUC       0.5200 (reached at step {hit['step']}, {hit['step'] * 64} "
          "samples, ") in trainer.format_summary(s)


# TensorBoard, profile ---------------------------------------------------------------

def test_tensorboard_scalars_and_a_profile_trace(tmp_path):
  c = _tiny(logging__tensorboard=True, logging__every_steps=4, profile_steps="3-5")
  messages = []
  result = trainer.train_and_evaluate(c, str(tmp_path), log=messages.append)
  events = read_events(tmp_path / "tensorboard")
  tags = {tag for tag, _, _ in events}
  assert tags == {"train/loss", "train/learning_rate", "train/examples_per_sec", "eval/auc",
                  "eval/logloss", "eval/accuracy", "train/loss_interval"}
  steps = lambda name: [s for tag, s, _ in events if tag == name]
  assert steps("train/loss") == [4, 8, 12, 16, 20] and steps("eval/auc") == [10, 20]
  auc = {s: v for tag, s, v in events if tag == "eval/auc"}
  assert auc == pytest.approx({r["step"]: r["auc"] for r in result.records}, abs=1e-6)
  assert all(v == pytest.approx(0.1) for tag, _, v in events if tag == "train/learning_rate")
  # The profile: an XSpace (TensorBoard's profile plugin) and a Perfetto trace beside it.
  from dlrm_jax.profiling import latest_trace, op_events

  xplane = latest_trace(str(tmp_path / "tensorboard"))
  assert os.sep.join(["tensorboard", "plugins", "profile"]) in xplane
  assert any(module.startswith("jit") for _, module, _ in op_events(xplane))
  perfetto, = glob.glob(os.path.join(os.path.dirname(xplane), "*.trace.json.gz"))
  assert json.loads(gzip.open(perfetto).read())["traceEvents"]
  assert any(m.startswith("profile of steps 3-5 written to") for m in messages), messages


# Warnings ---------------------------------------------------------------------------

def test_warnings_for_an_auc_stuck_near_half_and_a_loss_that_does_not_fall(tmp_path, caplog):
  """Labels without signal (random data) and a learning rate of 1e-30: both warnings,
  during the run (at the step they were seen), once each; without a `log` they go to
  Python's logging."""
  c = _tiny(data__kind="random", learning_rate=1e-30, test_freq=4, num_batches=20,
            test_num_batches=8, logging__every_steps=5)
  with caplog.at_level(logging.WARNING, logger="dlrm_jax"):
    trainer.train_and_evaluate(c, str(tmp_path / "a"))
  warnings = [r.getMessage() for r in caplog.records if r.name == "dlrm_jax"]
  assert len(warnings) == 2, warnings
  auc, = [w for w in warnings if "AUC" in w]
  assert auc.startswith("WARNING (step 12): the evaluation AUC has stayed as near 0.5 as "
                        "chance gives for 3 evaluations") and "Check that the labels" in auc
  loss, = [w for w in warnings if "loss" in w]
  assert loss.startswith("WARNING (step 15): the training loss has not fallen from its start")
  # A learning run gives neither.
  messages = []
  trainer.train_and_evaluate(load_config("default"), str(tmp_path / "b"), log=messages.append,
                             progress=False)
  assert not [m for m in messages if m.startswith("WARNING")]


def test_without_tensorboardx_a_run_says_so_and_trains(monkeypatch, tmp_path):
  import sys

  from dlrm_jax import observe

  for name in [m for m in sys.modules if m.split(".")[0] == "tensorboardX"] + ["tensorboardX"]:
    monkeypatch.setitem(sys.modules, name, None)  # import fails
  messages = []
  board = observe.TensorBoard(str(tmp_path), messages.append)
  board.scalars(1, {"train/loss": 0.5})
  board.close()
  assert messages == ["logging.tensorboard: tensorboardX is not installed, so no event files "
                      "are written (pip install tensorboardX, or set logging.tensorboard=False)"]
  assert not os.listdir(tmp_path)


# MLPerf log -------------------------------------------------------------------------

def _dcnv2_tiny(tmp_path):
  """configs/dcnv2_small.py's recipe (DCN, Adagrad eps 1e-8 everywhere, no warmup or
  decay) on tables of 100 rows, 20 steps of 256, evaluated at steps 10 and 20."""
  c = load_config("dcnv2_small")
  c.arch_embedding_size = "-".join(["100"] * 26)
  c.mini_batch_size, c.num_batches, c.test_freq = 256, 20, 10
  c.test_mini_batch_size, c.test_num_batches = 1024, 1
  c.progress_bar, c.checkpoint.enabled, c.logging.tensorboard = False, False, False
  c.logging.mlperf, c.logging.mlperf_org = True, "dlrm_jax tests"
  return c


def test_the_mlperf_log_passes_the_compliance_checker_but_for_a_benchmark_run_s_checks(
    tmp_path):
  """A short DLRM-DCNv2 run's mlperf.log through mlperf-logging's own checker, ruleset
  training 6.0.0 (the newest with dlrm_dcnv2): every check passes except these three,
  which only a benchmark run can pass."""
  pytest.importorskip("mlperf_logging", reason="pip install 'dlrm_jax[mlperf]'")
  from mlperf_logging.compliance_checker import mlp_compliance

  result = trainer.train_and_evaluate(_dcnv2_tiny(tmp_path), str(tmp_path))
  path = str(tmp_path / "mlperf.log")
  checker = mlp_compliance.make_checker("training", "6.0.0", quiet=False, werror=False)
  assert not checker.check_file(path, "training_6.0.0/common.yaml")
  failed = sorted(list(checker.overwritable) + [m.splitlines()[0]
                                                for m in checker.not_overwritable])
  assert failed == sorted([
      # The page cache is cleared by a benchmark's launcher before the run, not by a trainer.
      "cache_clear",
      # The rules fix the evaluation set at day 23's first half, 89,137,319 rows; this
      # run evaluates 1,024 generated rows.
      "eval_samples",
      # The quality target: no evaluation of a 20-step run reaches an AUC of 0.80275.
      "Failed checks for eval_accuracy : v['value'] >= 0.80275 and v['value'] <= 1.0",
  ]), failed
  events = [json.loads(line.split(" ", 1)[1]) for line in open(path)]
  accuracy = [e for e in events if e["key"] == "eval_accuracy"]
  assert [a["value"] for a in accuracy] == [r["auc"] for r in result.records]
  assert [a["metadata"]["epoch_num"] for a in accuracy] == [0.5, 1.0]  # the run as one epoch
  points = {e["key"]: e["value"] for e in events if e["event_type"] == "POINT_IN_TIME"}
  assert points.items() >= {
      "submission_benchmark": "dlrm_dcnv2", "submission_org": "dlrm_jax tests",
      "global_batch_size": 256, "opt_name": "adagrad", "opt_adagrad_epsilon": 1e-8,
      "opt_base_learning_rate": 0.01, "eval_samples": 1024, "train_samples": 20 * 256}.items()
  stop, = [e for e in events if e["key"] == "run_stop"]
  assert stop["metadata"]["status"] == "success"  # all steps, no target set


def _failed_checks(path: str, ruleset: str) -> list[str]:
  """Every check of mlperf-logging's compliance checker that `path` fails under
  `ruleset`, one line each: the failed test (or the message's first line), with its key.
  The checker keeps one message per key; this keeps each check a key failed (those of
  keys a later rules file replaces dropped, as the checker drops them)."""
  from mlperf_logging.compliance_checker import mlp_compliance

  checker = mlp_compliance.make_checker("training", ruleset, quiet=False, werror=False)
  messages = []
  put = checker.put_message

  def record(message, key=None):
    messages.append((key, message))
    put(message, key)

  checker.put_message = record
  assert not checker.check_file(path, f"training_{ruleset}/common.yaml")
  failed = set()
  for key, message in messages:
    if key is not None and key not in checker.overwritable:
      continue  # replaced by a later rules file's check of the key
    lines = message.splitlines()
    test = next((line[len("failed test: "):] for line in lines
                 if line.startswith("failed test: ")), lines[0])
    failed.add(f"{key}: {test.strip()}" if key else test.strip())
  return sorted(failed)


def test_a_dlrmv4_mlperf_log_passes_the_checker_but_for_the_benchmark_data_s_checks(
    tmp_path):
  """A 6-step DLRMv4 run on a synthetic log, with MLPerf's recipe where a short run can
  follow it (the learning rate for its batch, the 24,000-step warmup), through
  mlperf-logging's checker, ruleset training 6.1.0: every check passes except those
  listed, which need the Yambda-5b data, a benchmark-length run or the launcher
  (dlrm_jax.mlperf_log)."""
  pytest.importorskip("mlperf_logging", reason="pip install 'dlrm_jax[mlperf]'")
  from test_dlrmv4_train import tiny_config as dlrmv4_tiny_config
  from dlrm_jax import mlperf_log

  c = dlrmv4_tiny_config(tmp_path / "log")
  batch = c.mini_batch_size
  c.learning_rate = 1e-6 * batch / 8192  # the rules' rate for the batch
  c.lr_num_warmup_steps = 24_000
  c.logging.mlperf, c.logging.mlperf_org = True, "dlrm_jax tests"
  result = trainer.train_and_evaluate(c, str(tmp_path / "run"))
  path = str(tmp_path / "run" / "mlperf.log")
  assert _failed_checks(path, mlperf_log.RULESETS["dlrmv4"]) == sorted([
      # The page cache is cleared by a benchmark's launcher before the run, not by a trainer.
      "cache_clear: Required AT_LEAST_ONE occurrence of 'cache_clear' but found 0",
      # Yambda-5b's train windows hold 2,290,835,423 anchors, its eval window 2,058,204;
      # the synthetic log far fewer.
      "train_samples: v['value'] == s['train_samples']",
      "eval_samples: v['value'] == 2058204",
      # 8 contextual tokens + 12 history events + the candidate (configs/mlperf_dlrmv4.py:
      # 8 + 4,087 + 1).
      "max_sequence_length: v['value'] == 4096",
      # The rules' grid is ceil(0.001 * 2,290,835,423 / 32) steps here, its first point
      # later still: this run's evaluations at steps 3 and 6 are on neither ...
      "eval_accuracy: v['metadata']['samples_count'] % s['eval_interval_samples'] == 0",
      "eval_accuracy: int(v['metadata']['samples_count']) == s['first_eval_samples']",
      # ... and its cadence, 3 steps of 32, is not 0.1% of its train data.
      "eval_every_data_pct: v['value'] == 0.001",
      # The quality target: no evaluation of a 6-step run reaches an AUC of 0.75.
      "Failed checks for eval_accuracy : v['value'] >= s['target_accuracy']",
  ])
  events = [json.loads(line.split(" ", 1)[1]) for line in open(path)]
  points = {e["key"]: e["value"] for e in events if e["event_type"] == "POINT_IN_TIME"}
  train = points["train_samples"]
  assert train > 6 * batch  # every anchor of windows 0-7, not only the full batches trained
  assert points.items() >= {
      "submission_benchmark": "dlrmv4", "global_batch_size": batch,
      "eval_samples": result.records[-1]["eval_rows"], "max_sequence_length": 8 + 12 + 1,
      "opt_name": "Adam", "opt_adam_beta_1": 0.95, "opt_adam_beta_2": 0.999,
      "opt_adam_epsilon": 1e-8, "opt_weight_decay": 0.0, "opt_gradient_clip_norm": 1.0,
      "opt_sparse_name": "RowWiseAdagrad", "opt_base_learning_rate": c.learning_rate,
      "opt_sparse_base_learning_rate": c.learning_rate,
      "opt_learning_rate_warmup_steps": 24_000, "opt_learning_rate_warmup_start_lr": 0.0,
      "lowest_numerical_precision_in_linear": "fp32", "micro_batch_size": batch,
      "tensor_parallelism": 1}.items()
  # test_freq's 3 steps as the shortest fraction of the train data the rules round up to them.
  pct = points["eval_every_data_pct"]
  assert math.ceil(pct * train / batch) == 3 and pct == mlperf_log.data_fraction(3, batch, train)
  accuracy = [e for e in events if e["key"] == "eval_accuracy"]
  assert [(a["metadata"]["samples_count"], a["value"]) for a in accuracy] == [
      (r["step"] * batch, r["auc"]) for r in result.records] and len(accuracy) == 2


def test_the_mlperf_dlrmv4_config_evaluates_on_the_rules_grid():
  """configs/mlperf_dlrmv4.py's test_freq and eval_start_step are the grid and first
  evaluation closed_dlrmv4.yaml derives from the batch (run through the rules' own
  code), at its batch and the reference's two others; its log's eval_every_data_pct is
  the rules' 0.001."""
  yaml = pytest.importorskip("yaml")
  pytest.importorskip("mlperf_logging", reason="pip install 'dlrm_jax[mlperf]'")
  import importlib

  import mlperf_logging.compliance_checker as checker_package
  from dlrm_jax import mlperf_log

  config = importlib.import_module("configs.mlperf_dlrmv4")
  rules = yaml.safe_load(open(os.path.join(os.path.dirname(checker_package.__file__),
                                           "training_6.1.0", "closed_dlrmv4.yaml")))
  begin = next(r["BEGIN"]["CODE"] for r in rules if "BEGIN" in r)
  post = next(r["KEY"]["POST"] for r in rules
              if "KEY" in r and r["KEY"]["NAME"] == "global_batch_size")

  def grid(batch):
    state = {"s": {}, "math": math}
    exec(begin, state)
    exec(post, state, {"v": {"value": batch}})
    s = state["s"]
    return s["eval_interval_samples"] // batch, s["first_eval_samples"] // batch, s

  c = config.get_config()
  every, first, s = grid(c.mini_batch_size)
  assert (c.test_freq, c.eval_start_step) == (every, first) == (280, 7000)
  assert config.TRAIN_SAMPLES == s["train_samples"]
  for batch in (16_384, 32_768):
    every, first, _ = grid(batch)
    steps = math.ceil(config.EVAL_EVERY_DATA_PCT * config.TRAIN_SAMPLES / batch)
    assert (steps, config.first_eval_step(batch, steps)) == (every, first)
  assert mlperf_log.data_fraction(c.test_freq, c.mini_batch_size, config.TRAIN_SAMPLES) \
      == config.EVAL_EVERY_DATA_PCT
