"""Training: the sparse step equals dense SGD, the LR policy, real learning, the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO, load_config
from dlrm_jax import optim, trainer
from dlrm_jax.config import ConfigError, parse_widths
from dlrm_jax.data import SyntheticCTR
from dlrm_jax.embedding import IdOutOfRangeError
from dlrm_jax.specs import TrainingSpec
from dlrm_jax.task import Task


@pytest.mark.parametrize("step,row_wise", [(0, None), (5, None), (0, "cpu"), (0, "tpu")])
def test_sparse_sgd_step_equals_dense_optax_sgd(tiny_config, step, row_wise, monkeypatch):
  """The rows-only update equals jax.grad through the gather + optax.sgd on everything,
  at the rate the reference's schedule gives the step (here in its warmup); also with
  every table row-wise over 8 devices, where the dense gradient goes through the owners'
  gathers, whose empty slots must give the rows they read no gradient, with the
  portable kernel and with the TPU's (which adds the empty slots to a bag)."""
  from dlrm_jax.embedding import kernels

  c = tiny_config
  c.learning_rate, c.lr_num_warmup_steps = 0.5, 8
  if row_wise:
    monkeypatch.setitem(kernels.KERNELS, "cpu", kernels.KERNELS[row_wise])
    c.mesh.num_devices = 8
    tables = len(c.arch_embedding_size.split("-"))
    c.sharding.overrides = ",".join(f"t{t}:row_wise" for t in range(tables))
  lr = ReferenceLRPolicy(0.5, 8, 8, 0).rates(step + 1)[step]
  task = Task(c)
  if row_wise:
    assert {p.kind for p in task.plan.placements} == {"row_wise"}
  state = task.init_state(0)
  state = state.replace(step=jax.device_put(jnp.int32(step), task.state_shardings.step))
  batch = SyntheticCTR(task.spec.table_rows, 13, 64, seed=0, zipf_exponent=2.0).batch(0)
  assert len(np.unique(batch["sparse"][:, 0])) < 64  # duplicate ids in the batch
  batch = task.device_batch(batch)

  params, tables = state.params, state.tables

  @jax.jit
  def dense_sgd(params, tables):
    grads = jax.grad(task.functions.loss, argnums=(0, 1))(params, tables, batch)
    tx = optax.sgd(lr)
    updates = tx.update(grads, tx.init((params, tables)))[0]
    return optax.apply_updates((params, tables), updates)

  ref_params, ref_tables = dense_sgd(params, tables)
  ref_params = jax.tree.map(np.asarray, ref_params)
  ref_tables = task.embedding.to_arrays(ref_tables)

  new_state, out = task.train_step(state, batch)
  assert float(out["lr"]) == pytest.approx(lr, rel=1e-6)
  for got, want in zip(task.embedding.to_arrays(new_state.tables), ref_tables, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(ref_params),
                       strict=True):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
  assert int(new_state.step) == step + 1


def _np_dense_update(name, params, grads, slots, t, lr, eps=None, a0=0.0, b1=0.9, b2=0.999):
  """torch.optim's SGD, Adagrad (eps 1e-10, initial accumulator a0) and Adam (defaults but
  b1) in float64 numpy, on lists of leaves; t is the 1-based step."""
  out = []
  for k, (w, g) in enumerate(zip(params, grads, strict=True)):
    if name == "sgd":
      out.append(w - lr * g)
    elif name == "adagrad":
      slots[k] = slots.get(k, a0) + g * g
      out.append(w - lr * g / (np.sqrt(slots[k]) + (1e-10 if eps is None else eps)))
    elif name == "adam":
      m, v = slots.get(k, (0.0, 0.0))
      m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
      slots[k] = (m, v)
      out.append(w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t))
                                              + (1e-8 if eps is None else eps)))
  return out


@pytest.mark.parametrize("name,args,hyper", [
    ("sgd", "", {}), ("adagrad", "", {}), ("adam", "", {}),
    ("adagrad", "eps=1e-8,initial_accumulator_value=0.1", {"eps": 1e-8, "a0": 0.1}),
    ("adam", "b1=0.8,eps=1e-6", {"b1": 0.8, "eps": 1e-6}),
])
def test_dense_optimizers_match_their_definitions(tiny_config, name, args, hyper):
  """Three steps of each `dense_optimizer` (with `dense_optimizer_args`) on the MLPs
  equal its rule in float64 numpy, applied to jax.grad of the loss."""
  c = tiny_config
  c.dense_optimizer, c.dense_optimizer_args, c.learning_rate = name, args, 0.05
  task = Task(c)
  state = task.init_state(0)
  data = SyntheticCTR(task.spec.table_rows, 13, 64, seed=3)
  grad_fn = jax.jit(jax.grad(task.functions.loss))
  want = [np.asarray(x, np.float64) for x in jax.tree.leaves(state.params)]
  slots = {}
  for step in range(3):
    batch = task.device_batch(data.batch(step))
    # The tables' sparse update depends on the dense parameters only through the
    # gradients, so the run's own tables are the reference's as long as its
    # parameters are.
    grads = [np.asarray(g, np.float64)
             for g in jax.tree.leaves(grad_fn(state.params, state.tables, batch))]
    want = _np_dense_update(name, want, grads, slots, step + 1, 0.05, **hyper)
    state, _ = task.train_step(state, batch)
    for got, ref in zip(jax.tree.leaves(state.params), want, strict=True):
      np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name,args,match", [
    ("adagrad", "b1=0.9", "adagrad has no \\['b1'\\]"),
    ("sgd", "eps=1", "sgd has no"),
    ("adam", "eps", "is not NAME=NUMBER"),
    ("lamb", "", "dense_optimizer='lamb' is not one of"),
])
def test_dense_optimizer_config_errors(tiny_config, name, args, match):
  tiny_config.dense_optimizer, tiny_config.dense_optimizer_args = name, args
  with pytest.raises(ConfigError, match=match):
    optim.make_dense_optimizer(TrainingSpec.from_config(tiny_config))


class ReferenceLRPolicy:
  """The reference's `LRPolicyScheduler.get_lr` (facebookresearch/dlrm, dlrm_s_pytorch.py),
  transcribed: stateful, with torch's `_step_count` (1 when the scheduler is created,
  +1 at each `scheduler.step()` after an optimiser step)."""

  def __init__(self, base, warmup, decay_start, decay_steps):
    if decay_start < warmup:
      raise ValueError("Learning rate warmup must finish before the decay starts")
    self.base, self.warmup, self.decay_steps = base, warmup, decay_steps
    self.decay_start, self.decay_end = decay_start, decay_start + decay_steps

  def get_lr(self, step_count):
    if step_count < self.warmup:
      self.last_lr = self.base * (1.0 - (self.warmup - step_count) / self.warmup)
      return self.last_lr
    if self.decay_start <= step_count < self.decay_end:
      decayed = step_count - self.decay_start
      scale = ((self.decay_steps - decayed) / self.decay_steps) ** 2
      self.last_lr = max(0.0000001, self.base * scale)
      return self.last_lr
    if self.decay_steps > 0:
      return self.last_lr  # AttributeError when no rate was set yet, as in the reference
    return self.base

  def rates(self, num_steps):
    """The rate of each optimiser step 0..num_steps-1: step s trains with _step_count s + 1."""
    return [self.get_lr(count) for count in range(1, num_steps + 1)]


@pytest.mark.parametrize("warmup,decay_start,decay_steps", [
    (10, 30, 20),  # warmup, held, decay, held after it
    (6, 6, 5),     # the decay right after the warmup
    (0, 0, 7),     # decay from the first step
    (0, 1, 7),
    (6, 6, 0),     # warmup only
    (0, 0, 0),     # constant
])
def test_lr_schedule_matches_reference_policy(tiny_config, warmup, decay_start, decay_steps):
  c = tiny_config
  c.learning_rate, c.lr_num_warmup_steps = 2.0, warmup
  c.lr_decay_start_step, c.lr_num_decay_steps = decay_start, decay_steps
  want = ReferenceLRPolicy(2.0, warmup, decay_start, decay_steps).rates(80)
  got = jax.jit(jax.vmap(optim.lr_schedule(TrainingSpec.from_config(c))))(np.arange(80))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_lr_schedule_where_the_reference_has_no_rate_to_hold(tiny_config):
  """A decay after no warmup: the reference fails before the decay (no rate set yet);
  this schedule trains at the base rate there."""
  c = tiny_config
  c.learning_rate, c.lr_num_warmup_steps = 2.0, 0
  c.lr_decay_start_step, c.lr_num_decay_steps = 5, 4
  with pytest.raises(AttributeError):
    ReferenceLRPolicy(2.0, 0, 5, 4).rates(1)
  got = np.asarray(jax.vmap(optim.lr_schedule(TrainingSpec.from_config(c)))(np.arange(12)))
  np.testing.assert_allclose(got[:4], 2.0)
  reference_after = ReferenceLRPolicy(2.0, 0, 5, 4)
  reference_after.last_lr = 2.0  # what this schedule holds before the decay
  np.testing.assert_allclose(got, reference_after.rates(12), rtol=1e-6)


@pytest.mark.parametrize("loss", ["bce", "mse", "wbce"])
def test_losses(tiny_config, loss):
  c = tiny_config
  c.loss_function = loss
  c.loss_weights = "1.0-3.0"
  fn = optim.make_loss(TrainingSpec.from_config(c))
  logits = jnp.array([-2.0, 0.5, 3.0])
  labels = jnp.array([0.0, 1.0, 1.0])
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  y = np.asarray(labels)
  bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  want = {"bce": bce.mean(), "mse": ((p - y) ** 2).mean(),
          "wbce": (np.where(y > 0.5, 3.0, 1.0) * bce).mean()}[loss]
  assert float(fn(logits, labels)) == pytest.approx(want, rel=1e-5)


def test_out_of_range_ids_are_an_error_at_the_boundary(tiny_config):
  task = Task(tiny_config)
  ids = np.zeros((4, task.spec.num_tables), np.int32)
  task.collection.check_ids(ids)
  ids[2, 3] = task.spec.table_rows[3]
  with pytest.raises(IdOutOfRangeError, match="feature 3.*sample 2"):
    task.collection.check_ids(ids)
  ids[2, 3] = -1
  with pytest.raises(IdOutOfRangeError):
    task.collection.check_ids(ids)


def test_training_learns_from_the_ids_alone(tmp_path):
  """Labels that depend on the ids alone (no dense signal): a run must rank well above
  chance, which frozen tables do not (about 0.55 at this size, through the fixed random
  vectors the MLPs can read, against 0.65), and a step moves exactly the rows it touched."""
  c = load_config("default")
  c.data.teacher_dense_scale = 0.0
  c.num_batches, c.test_freq, c.mini_batch_size = 400, 200, 256
  c.progress_bar = False
  c.checkpoint.enabled = False
  result = trainer.train_and_evaluate(c, str(tmp_path))
  first, last = result.records[0], result.records[-1]
  assert last["auc"] > 0.62, result.records
  assert last["auc"] > first["auc"], result.records
  assert last["teacher_auc"] > last["auc"]
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l) for l in lines] == result.records
  assert [r["step"] for r in result.records] == [200, 400]

  # One more step on a batch that uses only the even ids of every table.
  task, state = result.task, result.state
  batch = SyntheticCTR(task.spec.table_rows, 13, 256, seed=9).batch(0)
  batch["sparse"] = batch["sparse"] - batch["sparse"] % 2
  before = task.embedding.to_arrays(state.tables)
  after = task.embedding.to_arrays(task.train_step(state, batch)[0].tables)
  for t, (old, new) in enumerate(zip(before, after, strict=True)):
    touched = np.unique(batch["sparse"][:, t])
    moved = np.flatnonzero(np.any(old != new, axis=1))
    np.testing.assert_array_equal(moved, touched, err_msg=f"table {t}")


def test_format_summary_warns_about_chance_auc():
  summary = {"steps": 10, "examples": 640, "auc": 0.7, "logloss": 0.5, "accuracy": 0.8,
             "teacher_auc": None, "compile_seconds": 1.0, "train_seconds": 1.0,
             "examples_per_sec": 640.0, "target_auc": None, "eval_samples": 512,
             "workdir": "/tmp/x"}
  assert "WARNING" not in trainer.format_summary(summary)
  assert "WARNING" in trainer.format_summary({**summary, "auc": 0.51})
  assert "WARNING" in trainer.format_summary({**summary, "auc": 0.45})


def test_random_data_warns_about_chance_auc(tiny_config, tmp_path):
  c = tiny_config
  c.data.kind = "random"
  result = trainer.train_and_evaluate(c, str(tmp_path))
  assert result.summary["teacher_auc"] is None
  # Coin-flip labels: 512 eval samples put the AUC within about 0.05 of 0.5 (0.478 here).
  assert abs(result.summary["auc"] - 0.5) < 0.05, result.summary
  assert "WARNING: the AUC is close to 0.5" in trainer.format_summary(result.summary)


def test_evaluate_covers_every_batch(tiny_config):
  """AUC, log loss and accuracy over all eval batches, against sklearn on the
  predictions of each batch, so that no batch (the last one included) is left out; a
  padded batch's masked rows are left out."""
  from sklearn.metrics import log_loss, roc_auc_score

  from dlrm_jax import evaluation

  task = Task(tiny_config)
  state = task.init_state(0)
  data = SyntheticCTR(task.spec.table_rows, 13, 64, seed=4)
  state, _ = task.train_step(state, data.batch(0))
  batches = [data.batch(i, "eval", 256) for i in range(3)]
  probs = np.concatenate([np.asarray(task.predict(state.params, state.tables, b), np.float64)
                          for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  got = evaluation.evaluate(task, state, batches)
  assert got["rows"] == 768
  assert got["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-6)
  assert got["logloss"] == pytest.approx(log_loss(labels, probs), rel=1e-5)
  assert got["accuracy"] == pytest.approx(np.mean((probs > 0.5) == labels), abs=1e-9)
  placed = [task.device_batch(b) for b in batches]  # global arrays, as on Criteo
  assert evaluation.evaluate(task, state, placed) == pytest.approx(got)
  # The last batch cut to 100 rows and padded back to 256: only its 100 rows count.
  cut = batches[:2] + [evaluation.pad_rows({k: v[:100] for k, v in batches[2].items()}, 256)]
  short = evaluation.evaluate(task, state, cut)
  assert short["rows"] == 612
  assert short["auc"] == pytest.approx(roc_auc_score(labels[:612], probs[:612]), abs=1e-6)
  assert short["logloss"] == pytest.approx(log_loss(labels[:612], probs[:612]), rel=1e-5)


def test_the_training_loop_checks_ids(tiny_config, tmp_path, monkeypatch):
  """An id outside its table in the 4th train batch stops the run with IdOutOfRangeError
  (inside the jitted step it would be clamped to the last row, silently)."""
  from checkpoint_worker import Injected

  rows = parse_widths("arch_embedding_size", tiny_config.arch_embedding_size)

  def hook(i, batch):
    if i == 3:
      batch = dict(batch, sparse=batch["sparse"].copy())
      batch["sparse"][5, 2] = rows[2]
    return batch

  make_data = trainer.make_data
  monkeypatch.setattr(trainer, "make_data",
                      lambda run: Injected(make_data(run), hook))
  with pytest.raises(IdOutOfRangeError, match=f"feature 2.*sample 5.*{rows[2]}"):
    trainer.train_and_evaluate(tiny_config, str(tmp_path))


def test_cli_end_to_end_on_tiny(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS="")  # the host's one CPU device, as a user's first run
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "train.py"),
       f"--config={os.path.join(REPO, 'configs', 'tiny.py')}", f"--workdir={workdir}",
       "--config.num_batches=30", "--config.learning_rate=0.2",
       "--config.lr_num_warmup_steps=5", "--config.lr_decay_start_step=12",
       "--config.lr_num_decay_steps=10"],
      capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Run summary" in proc.stdout and "teacher AUC" in proc.stdout
  assert "Embedding sharding plan: 8 tables over 1 device(s)" in proc.stdout
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [10, 20, 30]
  # Each record's rate is its last step's: held after the warmup, decaying, held after.
  rates = ReferenceLRPolicy(0.2, 5, 12, 10).rates(30)
  assert [r["lr"] for r in records] == pytest.approx([rates[9], rates[19], rates[29]])
  assert len(set(rates[9::10])) == 3


def test_cli_rerun_of_a_finished_run_says_so_and_a_longer_one_trains_on(tmp_path):
  """`python train.py` twice in one directory: the second says which run it found and how
  to go on (no throughput of 0); with a raised num_batches it trains on from the end."""
  env = dict(os.environ, XLA_FLAGS="")

  def train(*args):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"),
         f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
         "--config.checkpoint.enabled=True", *args],
        capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout

  first = train()
  assert ("schedule: 20 steps of 64 (num_batches=20); an evaluation every 10 steps and at "
          "the end, a checkpoint at each") in first
  auc = [json.loads(l) for l in (tmp_path / "runs/tiny/metrics.jsonl").read_text()
         .splitlines()][-1]["auc"]
  again = train()
  assert (f"runs/tiny holds a run on synthetic_ctr data, batch 64, that ended at step 20 "
          f"with eval AUC {auc:.4f}: nothing to train, as this config's run is 20 steps. To "
          "train it on, raise num_batches; to start a new run, use another --workdir (or "
          "--config.checkpoint.resume=False, which deletes this run's checkpoints).") in again
  assert "throughput       - (nothing trained: the run had ended)" in again
  longer = train("--config.num_batches=30")
  assert "the run ended at step 20: training on to step 30" in longer
  assert "steps            30 (1,920 examples)" in longer
  records = [json.loads(l) for l in (tmp_path / "runs/tiny/metrics.jsonl").read_text()
             .splitlines()]
  assert [r["step"] for r in records] == [10, 20, 30]


def test_readme_commands_keep_to_their_own_run_directories():
  """Run top to bottom in one clone, the README's commands never train into another's
  run directory (a rerun there would resume it, or find it finished); `predict` reads a
  run that one of them wrote."""
  import re
  import shlex

  text = open(os.path.join(REPO, "README.md")).read()
  blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
  commands = [c.split("#")[0] for b in blocks for c in b.replace("\\\n", " ").splitlines()]
  written, read = [], []
  for command in commands:
    words = shlex.split(command)
    flags = dict(w.split("=", 1) if "=" in w else (w, None) for w in words)
    for i, w in enumerate(words[:-1]):
      if w == "--workdir":  # "--workdir DIR"
        flags[w] = words[i + 1]
    config = os.path.splitext(os.path.basename(flags.get("--config") or "default"))[0]
    if "train.py" in words:
      written.append(flags.get("--workdir") or f"runs/{config}")
    elif "dlrm_jax.from_torch" in words:
      written.append(flags["--workdir"])
    elif "dlrm_jax.predict" in words:
      read.append(flags["--workdir"])
  assert len(written) >= 8, written
  assert len(set(written)) == len(written), written
  assert read and set(read) <= set(written), (read, written)


def test_cli_rejects_bad_config(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "train.py"),
       f"--config={os.path.join(REPO, 'configs', 'tiny.py')}", f"--workdir={tmp_path}",
       "--config.arch_mlp_top=8-2"],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0
  assert "last width must be 1" in proc.stderr


def test_training_on_variable_multi_hot_bags(tiny_config, tmp_path):
  c = tiny_config
  c.data.kind = "random"
  c.data.hotness, c.data.variable_hotness = 3, True
  c.embedding_pooling = "mean"
  c.embedding_optimizer = "rowwise_adagrad"
  result = trainer.train_and_evaluate(c, str(tmp_path))
  assert result.summary["steps"] == c.num_batches
  assert np.isfinite(result.summary["logloss"])
