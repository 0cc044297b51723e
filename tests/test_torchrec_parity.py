"""Parity with TorchRec's DLRM_DCN (DLRM-DCNv2) and DLRM on real Criteo rows.

The fixtures (../shared/data/reference_parity, its README gives the layout)
hold TorchRec's initial weights, multi-hot bags of MLPerf's hotness, its
predictions, its losses over 4 steps (plain SGD; Adagrad with MLPerf's lr and
eps on every parameter) and its weights after them. Loading the initial
weights with `dlrm_jax.torchrec.from_torchrec` must reproduce all of that to
float32 tolerance; rows that no batch touched stay bit-identical. Skips when
the folder is absent.
"""

import json
import os

import numpy as np
import pytest

from conftest import PARITY_DIR
from dlrm_jax.config import base_config
from dlrm_jax.task import Task
from dlrm_jax.torchrec import config_from_torchrec, from_torchrec, to_torchrec

if not os.path.isfile(os.path.join(PARITY_DIR, "dcn_fixtures.json")):
  pytest.skip(f"TorchRec parity fixtures not found in {PARITY_DIR}", allow_module_level=True)

with open(os.path.join(PARITY_DIR, "dcn_fixtures.json")) as f:
  FIXTURES = json.load(f)
NAMES = sorted(FIXTURES)


def _config(fx):
  c = base_config()
  c.arch_sparse_feature_size = fx["dim"]
  c.arch_mlp_bot = "-".join(map(str, fx["bottom"]))
  c.arch_mlp_top = "-".join(map(str, fx["top"]))
  c.arch_embedding_size = "-".join([str(fx["rows_per_table"])] * len(fx["hotness"]))
  c.arch_interaction_op = fx["interaction"]
  if fx["interaction"] == "dcn":
    c.dcn_num_layers, c.dcn_low_rank_dim = fx["dcn_num_layers"], fx["dcn_low_rank_dim"]
  else:
    c.arch_dot_pair_order = "upper"
  c.learning_rate = fx["lr"]
  c.dense_optimizer = c.embedding_optimizer = fx["optimizer"]
  if fx["optimizer"] == "adagrad":
    c.dense_optimizer_args = c.embedding_optimizer_args = f"eps={fx['eps']}"
  c.mini_batch_size = fx["batch"]
  c.mesh.num_devices = 1
  return c


def _padded_bags(data, hotness):
  """The fixture's bags as [B, F, max hotness] ids with a mask."""
  b, width = data["dense"].shape[0], max(hotness)
  ids = np.zeros((b, len(hotness), width), np.int32)
  mask = np.zeros((b, len(hotness), width), bool)
  for k, h in enumerate(hotness):
    ids[:, k, :h] = data[f"sparse/{k}"]
    mask[:, k, :h] = True
  return {"sparse": ids, "sparse_mask": mask}


def _setup(name):
  fx = FIXTURES[name]
  data = dict(np.load(os.path.join(PARITY_DIR, f"{name}.npz")))
  task = Task(_config(fx))
  init = {k[len("init/"):]: v for k, v in data.items() if k.startswith("init/")}
  params, tables = from_torchrec(task.spec, task.embedding, init)
  batch = {"dense": data["dense"], "label": data["label"], **_padded_bags(data, fx["hotness"])}
  return fx, data, task, params, tables, batch


def _rows(batch, lo, hi):
  return {k: v[lo:hi] for k, v in batch.items()}


@pytest.mark.parametrize("name", NAMES)
def test_initial_predictions_match_torchrec(name):
  _, data, task, params, tables, batch = _setup(name)
  pred = np.asarray(task.predict(params, tables, batch))
  np.testing.assert_allclose(pred, data["pred_init"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_training_steps_match_torchrec(name):
  fx, data, task, params, tables, batch = _setup(name)
  state = task.state_from(params, tables)
  b = fx["batch"]
  losses = []
  for s in range(fx["steps"]):
    state, out = task.train_step(state, _rows(batch, s * b, (s + 1) * b))
    losses.append(float(out["loss"]))
  np.testing.assert_allclose(losses, data["losses"], rtol=1e-5, atol=1e-6)

  ours = to_torchrec(state.params, task.embedding, state.tables)
  after = {k[len("after/"):]: v for k, v in data.items() if k.startswith("after/")}
  assert set(ours) == set(after)
  for key, expected in after.items():
    np.testing.assert_allclose(ours[key], expected, rtol=1e-4, atol=2e-6, err_msg=key)
  pred = np.asarray(task.predict(state.params, state.tables, batch))
  np.testing.assert_allclose(pred, data["pred_after"], rtol=0, atol=5e-6)

  # Rows that no batch touched are bit-identical to the initial ones.
  seen = 4 * b
  for k in range(len(fx["hotness"])):
    name_k = f"sparse_arch.embedding_bag_collection.embedding_bags.t{k}.weight"
    untouched = np.setdiff1d(np.arange(fx["rows_per_table"]), data[f"sparse/{k}"][:seen])
    assert len(untouched) > 0 or fx["hotness"][k] > 1
    np.testing.assert_array_equal(ours[name_k][untouched], data[f"init/{name_k}"][untouched])
    np.testing.assert_array_equal(after[name_k][untouched], data[f"init/{name_k}"][untouched])


def test_torchrec_dot_needs_upper_pair_order():
  fx = FIXTURES["torchrec_dot_sgd"]
  c = _config(fx)
  c.arch_dot_pair_order = "lower"
  task = Task(c)
  with pytest.raises(ValueError, match="upper"):
    from_torchrec(task.spec, task.embedding, {})


def test_missing_weight_is_named():
  fx, data, task, params, tables, batch = _setup("dcn_sgd")
  init = {k[len("init/"):]: v for k, v in data.items() if k.startswith("init/")}
  del init["inter_arch.crossnet.W_kernels.1"]
  with pytest.raises(KeyError, match="W_kernels.1"):
    from_torchrec(task.spec, task.embedding, init)


@pytest.mark.parametrize("name", NAMES)
def test_architecture_is_read_off_the_weights(name):
  """`config_from_torchrec` finds DLRM_DCN's cross layers and rank, or DLRM's dot with
  TorchRec's pair order, and the sizes, from the state-dict names and shapes alone."""
  fx = FIXTURES[name]
  data = np.load(os.path.join(PARITY_DIR, f"{name}.npz"))
  init = {k[len("init/"):]: data[k] for k in data.files if k.startswith("init/")}
  c = _config(fx)
  fields = config_from_torchrec(init)
  assert fields.pop("data.num_dense_features") == 13
  assert fields == {k: c[k] for k in fields}
  assert fields["arch_interaction_op"] == fx["interaction"]
  assert ("dcn_num_layers" in fields) == (fx["interaction"] == "dcn")
