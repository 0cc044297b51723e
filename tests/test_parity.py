"""Parity with the reference PyTorch DLRM on real Criteo rows.

The fixtures (../shared/data/reference_parity) hold the reference's initial
weights, its predictions, its losses over 4 SGD steps and its weights after
them. Loading the initial weights here must reproduce all of that to float32
tolerance. Skips when the folder is absent.
"""

import json
import os

import numpy as np
import pytest

from conftest import PARITY_DIR
from dlrm_jax.config import base_config
from dlrm_jax.reference import config_from_reference, from_reference, to_reference
from dlrm_jax.trainer import Task

if not os.path.isdir(PARITY_DIR):
  pytest.skip(f"reference parity fixtures not found in {PARITY_DIR}", allow_module_level=True)

with open(os.path.join(PARITY_DIR, "fixtures.json")) as f:
  FIXTURES = {fx["name"]: fx for fx in json.load(f)}


def _setup(name):
  fx = FIXTURES[name]
  data = dict(np.load(os.path.join(PARITY_DIR, f"{name}.npz")))
  c = base_config()
  c.arch_sparse_feature_size = fx["arch_sparse_feature_size"]
  c.arch_mlp_bot = fx["arch_mlp_bot"]
  c.arch_mlp_top = fx["arch_mlp_top"]
  c.arch_interaction_op = fx["arch_interaction_op"]
  c.arch_interaction_itself = fx["arch_interaction_itself"]
  c.arch_embedding_size = "-".join([str(fx["rows_per_table"])] * data["cat"].shape[1])
  c.learning_rate = fx["learning_rate"]
  c.mini_batch_size = fx["mini_batch_size"]
  c.mesh.num_devices = 1
  task = Task(c)
  init = {k[len("init/"):]: v for k, v in data.items() if k.startswith("init/")}
  params, tables = from_reference(task.spec, task.embedding, init)
  batch = {"dense": data["dense"], "sparse": data["cat"].astype(np.int32), "label": data["label"]}
  return fx, data, task, params, tables, batch


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_initial_predictions_match_reference(name):
  _, data, task, params, tables, batch = _setup(name)
  pred = np.asarray(task.predict(params, tables, batch))
  np.testing.assert_allclose(pred, data["pred_init"], rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_sgd_steps_match_reference(name):
  fx, data, task, params, tables, batch = _setup(name)
  state = task.state_from(params, tables)
  b = fx["mini_batch_size"]
  n = batch["label"].shape[0]
  losses = []
  for s in range(fx["sgd_steps"]):
    lo = (s * b) % n
    state, out = task.train_step(state, {k: v[lo:lo + b] for k, v in batch.items()})
    losses.append(float(out["loss"]))
  np.testing.assert_allclose(losses, data["losses"], rtol=1e-5, atol=1e-6)

  ours = to_reference(state.params, task.embedding, state.tables)
  after = {k[len("after/"):]: v for k, v in data.items() if k.startswith("after/")}
  assert set(ours) == set(after)
  for key, expected in after.items():
    np.testing.assert_allclose(ours[key], expected, rtol=1e-4, atol=2e-6, err_msg=key)
  pred = np.asarray(task.predict(state.params, state.tables, batch))
  np.testing.assert_allclose(pred, data["pred_after"], rtol=0, atol=5e-6)


def test_untouched_rows_unchanged():
  fx, data, task, params, tables, batch = _setup("small_cat")
  state = task.state_from(params, tables)
  b = fx["mini_batch_size"]
  for s in range(fx["sgd_steps"]):
    lo = (s * b) % batch["label"].shape[0]
    state, _ = task.train_step(state, {k: v[lo:lo + b] for k, v in batch.items()})
  for k, table in enumerate(task.embedding.to_arrays(state.tables)):
    untouched = np.setdiff1d(np.arange(table.shape[0]), data["cat"][:, k])
    np.testing.assert_array_equal(table[untouched], data[f"init/emb_l.{k}.weight"][untouched])


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_architecture_is_read_off_the_weights(name):
  """`config_from_reference` finds each fixture's sizes and interaction (dot, dot with the
  diagonal, cat) from the shapes alone."""
  fx, data, *_ = _setup(name)
  init = {k[len("init/"):]: v for k, v in data.items() if k.startswith("init/")}
  fields = config_from_reference(init)
  assert fields == {
      "arch_sparse_feature_size": fx["arch_sparse_feature_size"],
      "arch_embedding_size": "-".join([str(fx["rows_per_table"])] * 26),
      "arch_mlp_bot": fx["arch_mlp_bot"], "arch_mlp_top": fx["arch_mlp_top"],
      "arch_interaction_op": fx["arch_interaction_op"],
      "arch_interaction_itself": fx["arch_interaction_itself"] and fx["arch_interaction_op"] == "dot",
      "arch_dot_pair_order": "lower", "data.num_dense_features": 13, "qr_flag": False,
      "md_flag": False}
