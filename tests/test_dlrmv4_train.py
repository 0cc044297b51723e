"""DLRMv4 trained through the task and the trainer: the sharded tables and the network
wired together, checked against the model on rows gathered in numpy, the dense
gradient of the tables, one device against eight, and a run end to end (its
baselines computed another way, its resume mid-window bit for bit)."""

import dataclasses
import re

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import load_config
from dlrm_jax import checkpoint, dlrmv4, predict, trainer
from dlrm_jax.checkpoint import CheckpointError
from dlrm_jax.config import ConfigError
from dlrm_jax.data import configure_data, windows
from dlrm_jax.data.event_log import EventLog
from dlrm_jax.embedding.sharded import Embedded
from dlrm_jax.metrics import roc_auc
from dlrm_jax.specs import RunSpec
from dlrm_jax.task import Task


def tiny_config(path, devices: int = 1):
  """DLRMv4 at D=8 on a synthetic log of 40 users (12 daily windows): 6 steps of 32 on
  windows 0-7, evaluated on window 8."""
  c = load_config("dlrmv4_small", devices=devices)
  v = c.dlrmv4
  v.embedding_dim, v.preprocessor_hidden_dim, v.action_dim = 8, 8, 2
  v.num_heads, v.attention_dim, v.hidden_dim, v.num_layers = 2, 4, 4, 2
  v.history_length, v.scan_window = 12, 40
  v.num_position_buckets, v.num_time_buckets = 16, 16
  v.attention, v.attention_chunk = "chunked", 8
  v.cross_rows = "31-29-23-19-17-5-13"
  c.data.path = str(path)
  c.data.seed = 1
  c.data.event_log.update(num_users=40, num_items=150, num_artists=20, num_albums=50,
                          listens_per_user=60, days=10.0, latent_dim=4, drift=0.0,
                          affinity_scale=3.0, min_history=8)
  c.data.eval_window = 8
  c.mini_batch_size, c.num_batches, c.eval_every_epochs, c.test_freq = 32, 6, 0.0, 3
  c.test_mini_batch_size = 64
  c.learning_rate = 0.01
  c.progress_bar = False
  c.checkpoint.enabled = False
  c.logging.tensorboard = False
  return c


def _task_and_batch(path, devices=1, **changes):
  c = tiny_config(path, devices)
  for k, v in changes.items():
    c[k] = v
  c = configure_data(c)
  run = RunSpec.from_config(c)
  task = Task(run)
  data = windows.make(run)
  return task, data, data.batch(0)


def test_task_logits_equal_the_model_on_rows_gathered_in_numpy(tmp_path):
  """The task's logits are `DLRMv4` on the tables' rows gathered with numpy (history
  positions beyond each length zero), and its loss 0.2 times the mean BCE."""
  task, _, batch = _task_and_batch(tmp_path / "log")
  state = task.init_state(0)
  got = np.asarray(task.functions.apply(state.params, state.tables, task.device_batch(batch)))
  rows = dict(zip(dlrmv4.POOLED, task.embedding.to_arrays(state.tables)))
  pooled = np.stack([rows[name][batch["sparse"][:, f]] for f, name in enumerate(dlrmv4.POOLED)],
                    axis=1)
  valid = np.arange(batch["history_item"].shape[1])[None, :] < batch["history_length"][:, None]
  sequences = {name: np.where(valid[..., None], rows[table][batch[name]], 0.0)
               for name, table in dlrmv4.SEQUENCES}
  model = nnx.merge(task.graphdef, state.params)
  want = np.asarray(model(dlrmv4.model_inputs(Embedded(pooled, sequences), batch)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert 0 < batch["history_length"].min() < batch["history_length"].max()  # ragged
  loss = float(task.functions.loss(state.params, state.tables, task.device_batch(batch)))
  p = 1 / (1 + np.exp(-want.astype(np.float64)))
  y = batch["label"]
  np.testing.assert_allclose(loss, 0.2 * np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))),
                             rtol=1e-5)


def test_sparse_step_is_sgd_on_the_dense_gradient_of_the_tables(tmp_path):
  """With SGD on the tables, one train step moves every table by -lr times the loss's
  dense gradient with respect to it: the candidate's and the history's rows (repeated
  within and across samples) summed, rows beyond the lengths untouched."""
  task, _, batch = _task_and_batch(tmp_path / "log", embedding_optimizer="sgd",
                                   embedding_optimizer_args="")
  state = task.init_state(0)
  device_batch = task.device_batch(batch)
  before = task.embedding.to_arrays(state.tables)
  grads = task.embedding.to_arrays(jax.jit(jax.grad(task.functions.loss, argnums=1))(
      state.params, state.tables, device_batch))
  lr = float(task.schedule(0))
  new, _ = jax.jit(task.functions.train_step)(state, device_batch)
  after = task.embedding.to_arrays(new.tables)
  for name, b, g, a in zip(dlrmv4.POOLED, before, grads, after):
    np.testing.assert_allclose(a, b - lr * g, rtol=1e-5, atol=1e-7, err_msg=name)
  item = dlrmv4.POOLED.index("item")
  touched = np.flatnonzero(np.abs(grads[item]).sum(1))
  valid = np.arange(12)[None, :] < batch["history_length"][:, None]
  used = np.union1d(batch["sparse"][:, item], batch["history_item"][valid])
  np.testing.assert_array_equal(touched, used)  # the history's rows get gradients too


@pytest.mark.parametrize("overrides, dropout", [
    ("item:row_wise,artist:column_wise,album:replicated,uid:table_wise", 0.0),
    ("item:table_wise,artist:row_wise,album:row_wise,uid:replicated", 0.3),
])
def test_eight_devices_match_one(tmp_path, overrides, dropout):
  """Three train steps on 8 devices, with the tables sharded several ways (and with
  dropout: the same bits on any layout), give the one-device parameters and tables
  (float32 sums in other orders: 1e-5)."""
  states = []
  for devices in (1, 8):
    c = tiny_config(tmp_path / "log", devices)
    c.dlrmv4.input_dropout = c.dlrmv4.linear_dropout = dropout
    c.sharding.overrides = overrides if devices > 1 else ""
    c.sharding.min_column_width = 4
    run = RunSpec.from_config(configure_data(c))
    task, data = Task(run), windows.make(run)
    state = task.init_state(0)
    for step in range(3):
      state, _ = task.train_step(state, data.batch(step))
    states.append((jax.device_get(state.params), task.embedding.to_arrays(state.tables)))
  (p1, t1), (p8, t8) = states
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(t1, t8, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_run_reports_its_baselines_computed_from_the_generator(tmp_path):
  """A run's summary gives the eval AUC, the generator's best AUC on the eval window
  (its hidden probabilities of those anchors) and the popularity baseline (each item's
  listen-plus rate before the window), each equal to its computation from the
  generator's own events."""
  c = tiny_config(tmp_path / "log")
  result = trainer.train_and_evaluate(c, str(tmp_path / "run"))
  s = result.summary
  prepared = windows.open_data(RunSpec.from_config(configure_data(c)).data)[0]
  anchors = prepared.window_anchors(8)
  log = EventLog(windows._generator(RunSpec.from_config(configure_data(c)).data)[0])
  e = log.events
  labels = (e["played_ratio_pct"][anchors] >= 50).astype(np.float32)
  assert s["teacher_auc"] == pytest.approx(roc_auc(labels, e["p_plus"][anchors]), abs=1e-6)
  t0 = prepared.metadata["anchor_t_min"] + 8 * 86400
  before = log.listens(end_s=t0)
  plus = np.bincount(before["item_id"], before["label"], minlength=150)
  seen = np.bincount(before["item_id"], minlength=150)
  rate = (plus + 10 * before["label"].mean()) / (seen + 10)
  assert s["popularity_auc"] == pytest.approx(roc_auc(labels, rate[e["item_id"][anchors]]),
                                              abs=1e-6)
  assert s["eval_samples"] == len(anchors)
  assert [r["step"] for r in result.records] == [3, 6]
  text = trainer.format_summary(s)
  assert f"teacher AUC      {s['teacher_auc']:.4f}" in text
  assert f"popularity AUC   {s['popularity_auc']:.4f}" in text


def test_a_run_resumed_mid_window_ends_as_an_uninterrupted_one(tmp_path):
  """A 4-step run (its last batch mid-window) trained on to 8 steps ends with the
  parameters, tables and records of an 8-step run, bit for bit; its checkpoint restores
  onto 8 devices, and is refused by name to another network or optimiser state."""
  c = tiny_config(tmp_path / "log")
  c.checkpoint.enabled, c.checkpoint.async_save, c.test_freq = True, False, 4
  c.num_batches = 4
  trainer.train_and_evaluate(c, str(tmp_path / "resumed"))
  data = windows.make(RunSpec.from_config(configure_data(c)))
  offsets = data._offsets(32)
  assert 4 not in offsets, offsets  # step 4 is inside a window
  c.num_batches = 8
  resumed = trainer.train_and_evaluate(c, str(tmp_path / "resumed"))
  whole = trainer.train_and_evaluate(c, str(tmp_path / "whole"))
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed.state)),
                  jax.tree.leaves(jax.device_get(whole.state)), strict=True):
    np.testing.assert_array_equal(a, b)
  strip = lambda rs: [{k: v for k, v in r.items() if k not in trainer.TIMINGS} for r in rs]  # noqa: E731
  assert strip(resumed.records) == strip(whole.records)
  with pytest.raises(CheckpointError, match="holds a dlrmv4 run: predict scores DLRM runs"):
    predict.load_model(str(tmp_path / "whole"))  # not yet a DLRMv4 scorer

  # Onto 8 devices (the tables re-laid out from the saved plan): the same arrays.
  c8 = tiny_config(tmp_path / "log", devices=8)
  c8.checkpoint.enabled, c8.num_batches = True, 8
  task8 = Task(RunSpec.from_config(configure_data(c8)))
  with checkpoint.Checkpointer(str(tmp_path / "whole" / "checkpoints")) as ckpt:
    restored = ckpt.restore(task8)
  assert restored.step == 8
  for a, b in zip(whole.task.embedding.to_arrays(whole.state.tables),
                  task8.embedding.to_arrays(restored.state.tables), strict=True):
    np.testing.assert_array_equal(a, b)

  # Another network, or clipping switched off, is refused by name, not taken for damage.
  for key, value, named in (("num_layers", 3, "dlrmv4.num_layers: checkpoint 2, config 3"),
                            ("grad_clip_norm", 0.0, "grad_clip_norm: checkpoint > 0")):
    other = tiny_config(tmp_path / "log")
    other.checkpoint.enabled, other.num_batches = True, 9
    (other.dlrmv4 if key == "num_layers" else other)[key] = value
    with pytest.raises(checkpoint.CheckpointMismatchError, match=re.escape(named)):
      trainer.train_and_evaluate(other, str(tmp_path / "whole"))
  with checkpoint.Checkpointer(str(tmp_path / "whole" / "checkpoints")) as ckpt:
    assert ckpt.steps() == [4, 8]  # nothing moved aside


@pytest.mark.parametrize("change, message", [
    ({"data.kind": "synthetic_ctr"}, "model='dlrmv4' does not train on data.kind='synthetic_ctr'"),
    ({"qr_flag": True}, "qr_flag and md_flag are DLRM's"),
    ({"dlrmv4.attention": "flash"}, "dlrmv4.attention='flash' is not one of"),
    ({"dlrmv4.cross_rows": "5-5"}, "dlrmv4.cross_rows='5-5' gives 2 sizes for the 7 crosses"),
    ({"dlrmv4.history_length": 40}, "num_position_buckets=16 is less than history_length + 1"),
    ({"data.eval_window": 99}, "eval windows 99 are not within the log's 12 windows"),
    ({"data.num_train_windows": 9}, "the train windows 0 to 8 and the eval windows 8 overlap"),
    ({"dlrmv4.item_rows": 100}, "dlrmv4.item_rows=100, but"),
    ({"data.event_log.drift": 2.0}, "data.event_log: drift=2.0 must be in [0, 1]"),
    ({"data.event_log.seed": 3}, "data.event_log.seed is not a knob of the synthetic log"),
    ({"compute_dtype": "bfloat16"}, "DLRMv4 computes in float32 only"),
    ({"loss_function": "mse"}, "DLRMv4's loss is the reference's"),
])
def test_bad_dlrmv4_configs_are_one_line_errors(tmp_path, change, message):
  c = tiny_config(tmp_path / "log")
  for key, value in change.items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(ConfigError, match=None) as e:
    trainer.set_up(c, str(tmp_path / "run"), False, None)
  assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_dropout_trains_and_leaves_evaluation_alone(tmp_path):
  """With the reference's dropout, the train step's loss is the network's in training
  mode: drawn from the seed and the step (the same twice, another at the next step or
  seed), unlike the eval-mode loss; with rates 0 it is the eval-mode loss."""
  losses = {}
  for rates, seed in (((0.0, 0.0), 0), ((0.2, 0.1), 0), ((0.2, 0.1), 1)):
    c = tiny_config(tmp_path / "log")
    c.dlrmv4.input_dropout, c.dlrmv4.linear_dropout = rates
    c.seed = seed
    task = Task(RunSpec.from_config(configure_data(c)))
    batch = task.device_batch(windows.make(task.run).batch(0))
    step = jax.jit(task.functions.train_step)
    state = task.init_state(0)  # the same parameters for every seed
    eval_loss = float(task.functions.loss(state.params, state.tables, batch))
    train = [float(step(state, batch)[1]["loss"]) for _ in range(2)]
    state = dataclasses.replace(state, step=state.step + 1)
    next_step = float(step(state, batch)[1]["loss"])
    losses[rates, seed] = (eval_loss, train, next_step)
  eval0, train0, _ = losses[(0.0, 0.0), 0]
  assert train0 == [pytest.approx(eval0, rel=1e-6)] * 2
  eval1, train1, next1 = losses[(0.2, 0.1), 0]
  assert eval1 == pytest.approx(eval0, rel=1e-6)  # evaluation: no dropout
  assert train1[0] == train1[1] != pytest.approx(eval1, rel=1e-4)
  assert next1 != pytest.approx(train1[0], rel=1e-4)
  assert losses[(0.2, 0.1), 1][1][0] != pytest.approx(train1[0], rel=1e-4)
