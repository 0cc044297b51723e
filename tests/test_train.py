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
from dlrm_jax import trainer
from dlrm_jax.data import SyntheticCTR
from dlrm_jax.embedding import IdOutOfRangeError


def test_sparse_sgd_step_equals_dense_optax_sgd(tiny_config):
  """The rows-only update equals jax.grad through the gather + optax.sgd on everything."""
  c = tiny_config
  c.learning_rate = 0.5
  task = trainer.Task(c)
  state = task.init_state(0)
  batch = SyntheticCTR(task.spec.table_rows, 13, 64, seed=0, zipf_exponent=2.0).batch(0)
  assert len(np.unique(batch["sparse"][:, 0])) < 64  # duplicate ids in the batch
  batch = task.device_batch(batch)

  params, tables = state.params, state.tables

  @jax.jit
  def dense_sgd(params, tables):
    def dense_loss(params, tables):
      return task.loss(task.logits(params, tables, batch), batch["label"])

    grads = jax.grad(dense_loss, argnums=(0, 1))(params, tables)
    tx = optax.sgd(0.5)
    updates = tx.update(grads, tx.init((params, tables)))[0]
    return optax.apply_updates((params, tables), updates)

  ref_params, ref_tables = dense_sgd(params, tables)
  ref_params = jax.tree.map(np.asarray, ref_params)
  ref_tables = task.embedding.to_arrays(ref_tables)

  new_state, _ = task.train_step(state, batch)
  for got, want in zip(task.embedding.to_arrays(new_state.tables), ref_tables):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
  assert int(new_state.step) == 1


def _reference_lr(step, base, warmup, decay_start, decay_steps):
  """The reference's LRPolicyScheduler, stepped once per optimiser step (t = step + 1)."""
  t = step + 1
  if t < warmup:
    return base * (1.0 - (warmup - t) / warmup)
  if decay_steps > 0 and decay_start <= t < decay_start + decay_steps:
    return max(1e-7, base * ((decay_steps - (t - decay_start)) / decay_steps) ** 2)
  if decay_steps > 0 and t >= decay_start + decay_steps:
    return max(1e-7, base * (1 / decay_steps) ** 2)
  return base


def test_lr_schedule_matches_reference_policy(tiny_config):
  c = tiny_config
  c.learning_rate, c.lr_num_warmup_steps = 2.0, 10
  c.lr_decay_start_step, c.lr_num_decay_steps = 30, 20
  steps = np.array(list(range(0, 60)) + [1000])
  got = jax.jit(jax.vmap(trainer.lr_schedule(c)))(steps)
  want = [_reference_lr(int(step), 2.0, 10, 30, 20) for step in steps]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  c.lr_num_warmup_steps = c.lr_num_decay_steps = 0
  assert float(trainer.lr_schedule(c)(12345)) == pytest.approx(2.0)


@pytest.mark.parametrize("loss", ["bce", "mse", "wbce"])
def test_losses(tiny_config, loss):
  c = tiny_config
  c.loss_function = loss
  c.loss_weights = "1.0-3.0"
  fn = trainer.make_loss(c)
  logits = jnp.array([-2.0, 0.5, 3.0])
  labels = jnp.array([0.0, 1.0, 1.0])
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  y = np.asarray(labels)
  bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  want = {"bce": bce.mean(), "mse": ((p - y) ** 2).mean(),
          "wbce": (np.where(y > 0.5, 3.0, 1.0) * bce).mean()}[loss]
  assert float(fn(logits, labels)) == pytest.approx(want, rel=1e-5)


def test_out_of_range_ids_are_an_error_at_the_boundary(tiny_config):
  task = trainer.Task(tiny_config)
  ids = np.zeros((4, task.spec.num_tables), np.int32)
  task.collection.check_ids(ids)
  ids[2, 3] = task.spec.table_rows[3]
  with pytest.raises(IdOutOfRangeError, match="feature 3.*sample 2"):
    task.collection.check_ids(ids)
  ids[2, 3] = -1
  with pytest.raises(IdOutOfRangeError):
    task.collection.check_ids(ids)


def test_training_learns_synthetic_ctr(tmp_path):
  """A short run on synthetic_ctr must rank clearly better than chance."""
  c = load_config("default")
  c.arch_embedding_size = "-".join(["200"] * 26)
  c.num_batches, c.test_freq, c.mini_batch_size = 300, 150, 256
  c.progress_bar = False
  result = trainer.train_and_evaluate(c, str(tmp_path))
  first, last = result.records[0], result.records[-1]
  assert last["auc"] > 0.65, result.records
  assert last["auc"] > first["auc"] - 0.01
  assert last["logloss"] < 0.65
  assert last["teacher_auc"] > last["auc"]
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [150, 300]
  for key in ("step", "auc", "logloss", "accuracy", "examples_per_sec"):
    assert key in json.loads(lines[-1])


def test_random_data_warns_about_chance_auc(tiny_config, tmp_path):
  c = tiny_config
  c.data.kind = "random"
  result = trainer.train_and_evaluate(c, str(tmp_path))
  assert result.summary["teacher_auc"] is None
  text = trainer.format_summary(result.summary)
  if result.summary["auc"] < 0.52:
    assert "WARNING" in text


def test_cli_end_to_end_on_tiny(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS="")  # the host's one CPU device, as a user's first run
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "train.py"),
       f"--config={os.path.join(REPO, 'configs', 'tiny.py')}", f"--workdir={workdir}",
       "--config.num_batches=30", "--config.learning_rate=0.2"],
      capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Run summary" in proc.stdout and "teacher AUC" in proc.stdout
  assert "Embedding sharding plan: 8 tables over 1 device(s)" in proc.stdout
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [10, 20, 30]
  assert records[-1]["lr"] == pytest.approx(0.2)


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
