"""Models trained in PyTorch as dlrm_jax runs (`python -m dlrm_jax.from_torch`).

The PyTorch models are built here with torch, with the state-dict names and the
forward passes of the reference's DLRM_Net (dot interaction, lower triangle) and
of TorchRec's DLRM (dot, `triu_indices(offset=1)`) and DLRM_DCN (low-rank cross
network); their probabilities must come back from `dlrm_jax.predict` on the
converted run. Skipped without torch (`pip install 'dlrm_jax[torch]'`).
"""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from dlrm_jax import from_torch, predict  # noqa: E402
from dlrm_jax.data import make_data  # noqa: E402
from dlrm_jax.specs import RunSpec  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, D, F = 50, 4, 8  # configs/tiny.py: 8 tables of 50 rows, D = 4, bottom 13-8-4, top 8-1


def _mlp(widths, last_relu):
  layers = []
  for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
    layers.append(nn.Linear(a, b))
    if last_relu or i < len(widths) - 2:
      layers.append(nn.ReLU())
  return layers


class ReferenceNet(nn.Module):
  """The reference's DLRM_Net: bot_l / top_l (Linear, ReLU, ...; a sigmoid at the end),
  emb_l a list of EmbeddingBags, dot products of [x, e_0 ..] for i > j in row order."""

  def __init__(self, bottom=(13, 8, 4), top=(40, 8, 1), qr_collisions=0, md_dims=()):
    super().__init__()
    # With qr_collisions c, features 0-3 get the reference's QREmbeddingBag (mult) of
    # ROWS rows and features 4-7 plain tables of ROWS // 2 rows (below its threshold);
    # with md_dims, every feature its PrEmbeddingBag of that width.
    self.emb_l = nn.ModuleList(
        (QRBag(ROWS, qr_collisions) if qr_collisions and k < 4 else
         PrBag(ROWS, md_dims[k]) if md_dims else
         nn.EmbeddingBag(ROWS // 2 if qr_collisions else ROWS, D, mode="sum"))
        for k in range(F))
    self.bot_l = nn.Sequential(*_mlp(bottom, last_relu=True))
    self.top_l = nn.Sequential(*_mlp(top, last_relu=False), nn.Sigmoid())
    for p in self.emb_l.parameters():
      nn.init.uniform_(p, -0.5, 0.5)

  def forward(self, dense, ids):
    x = self.bot_l(dense)
    t = torch.stack([x] + [e(ids[:, k:k + 1]) for k, e in enumerate(self.emb_l)], dim=1)
    z = torch.bmm(t, t.transpose(1, 2))
    pairs = [z[:, i, j] for i in range(F + 1) for j in range(i)]
    return self.top_l(torch.cat([x, torch.stack(pairs, dim=1)], dim=1))[:, 0]


class QRBag(nn.Module):
  """The reference's QREmbeddingBag with operation "mult": rows id // c and id % c."""

  def __init__(self, n, c):
    super().__init__()
    self.c = c
    self.weight_q = nn.Parameter(torch.empty(-(-n // c), D))
    self.weight_r = nn.Parameter(torch.empty(c, D))

  def forward(self, ids):
    q = nn.functional.embedding_bag(ids // self.c, self.weight_q, mode="sum")
    return q * nn.functional.embedding_bag(ids % self.c, self.weight_r, mode="sum")


class PrBag(nn.Module):
  """The reference's PrEmbeddingBag: a table of width d, then a Linear(d, D, bias=False)
  where d < D (an Identity, with no weights, where d = D)."""

  def __init__(self, n, d):
    super().__init__()
    self.embs = nn.EmbeddingBag(n, d, mode="sum")
    self.proj = nn.Linear(d, D, bias=False) if d < D else nn.Identity()

  def forward(self, ids):
    return self.proj(self.embs(ids))


class _Perceptron(nn.Module):
  def __init__(self, a, b):
    super().__init__()
    self._linear = nn.Linear(a, b)

  def forward(self, x):
    return torch.relu(self._linear(x))


class _MLP(nn.Module):
  def __init__(self, widths):
    super().__init__()
    self._mlp = nn.Sequential(*(_Perceptron(a, b) for a, b in zip(widths[:-1], widths[1:])))

  def forward(self, x):
    return self._mlp(x)


class TorchRecNet(nn.Module):
  """TorchRec's DLRM (dcn=False) and DLRM_DCN (dcn=True), by their state-dict names."""

  def __init__(self, dcn: bool, layers=2, rank=3):
    super().__init__()
    self.dcn = dcn
    self.sparse_arch = nn.Module()
    self.sparse_arch.embedding_bag_collection = nn.Module()
    self.sparse_arch.embedding_bag_collection.embedding_bags = nn.ModuleDict(
        {f"t{k}": nn.EmbeddingBag(ROWS, D, mode="sum") for k in range(F)})
    self.dense_arch = nn.Module()
    self.dense_arch.model = _MLP((13, 8, D))
    width = (F + 1) * D if dcn else D + F * (F + 1) // 2
    if dcn:
      self.inter_arch = nn.Module()
      self.inter_arch.crossnet = nn.Module()
      c = self.inter_arch.crossnet
      c.V_kernels = nn.ParameterList(nn.Parameter(0.3 * torch.randn(rank, width))
                                     for _ in range(layers))
      c.W_kernels = nn.ParameterList(nn.Parameter(0.3 * torch.randn(width, rank))
                                     for _ in range(layers))
      c.bias = nn.ParameterList(nn.Parameter(0.1 * torch.randn(width)) for _ in range(layers))
    self.over_arch = nn.Module()
    self.over_arch.model = nn.Sequential(_MLP((width, 8)), nn.Linear(8, 1))
    for emb in self.sparse_arch.embedding_bag_collection.embedding_bags.values():
      nn.init.uniform_(emb.weight, -0.5, 0.5)

  def forward(self, dense, ids):
    x = self.dense_arch.model(dense)
    bags = self.sparse_arch.embedding_bag_collection.embedding_bags
    e = torch.stack([bags[f"t{k}"](ids[:, k:k + 1]) for k in range(F)], dim=1)
    if self.dcn:
      x0 = xl = torch.cat([x, e.flatten(1)], dim=1)
      c = self.inter_arch.crossnet
      for v, w, b in zip(c.V_kernels, c.W_kernels, c.bias):
        xl = x0 * ((xl @ v.T) @ w.T + b) + xl
      r = xl
    else:
      t = torch.cat([x[:, None], e], dim=1)
      z = torch.bmm(t, t.transpose(1, 2))
      i, j = torch.triu_indices(F + 1, F + 1, offset=1)
      r = torch.cat([x, z[:, i, j]], dim=1)
    return torch.sigmoid(self.over_arch.model(r))[:, 0]


def _convert(path, workdir, *overrides):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, "-m", "dlrm_jax.from_torch", f"--input={path}", f"--workdir={workdir}",
       f"--config={ROOT}/configs/tiny.py", *overrides], capture_output=True, text=True,
      env=env, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def _batch(model):
  return make_data(RunSpec.from_config(model.config)).batch(0)


def _torch_probabilities(net, batch):
  with torch.no_grad():
    return net(torch.from_numpy(batch["dense"]), torch.from_numpy(batch["sparse"].astype(np.int64))
               ).numpy()


def test_reference_save_model_file_predicts_as_torch(tmp_path):
  """A file of the reference's --save-model dict (state_dict, SGD state, numpy scalars and
  a 0-d array among the metrics) -> a run that scores as the torch model."""
  torch.manual_seed(0)
  net = ReferenceNet()
  opt = torch.optim.SGD(net.parameters(), lr=0.1)
  path = tmp_path / "model.pt"
  torch.save({"epoch": 0, "nepochs": 1, "nbatches": 20, "nbatches_test": 2, "iter": 20,
              "state_dict": net.state_dict(), "train_acc": np.float64(0.75),
              "train_loss": np.float32(0.5), "test_acc": np.float64(0.7),
              "test_loss": np.float64(0.52), "total_loss": np.array(3.5, np.float32),
              "total_accu": np.int64(12), "opt_state_dict": opt.state_dict()}, path)
  log = _convert(path, tmp_path / "run")
  assert "'test_acc': 0.7" in log and "'iter': 20" in log
  model = predict.load_model(str(tmp_path / "run"))
  batch = _batch(model)
  np.testing.assert_allclose(predict.score(model, iter([batch]), 64),
                             _torch_probabilities(net, batch), rtol=1e-5, atol=1e-6)


def test_reference_quotient_remainder_tables_load(tmp_path):
  """The reference's QREmbeddingBags (weight_q, weight_r) become our pairs: collisions
  and a threshold between the plain and the split tables read off the shapes, the
  config's table sizes kept, the probabilities the torch model's; train.py trains on."""
  torch.manual_seed(2)
  net = ReferenceNet(qr_collisions=8)
  path = tmp_path / "model.pt"
  torch.save({"state_dict": net.state_dict(), "iter": 1}, path)
  log = _convert(path, tmp_path / "run", "--config.arch_embedding_size=50-50-50-50-25-25-25-25")
  assert "qr_collisions: 4 -> 8" in log and "qr_operation='mult' from the config" in log
  model = predict.load_model(str(tmp_path / "run"))
  assert (model.config.qr_flag, model.config.qr_threshold) == (True, 25)
  assert model.task.qr.table_rows == [7, 8] * 4 + [25] * 4
  batch = _batch(model)
  np.testing.assert_allclose(predict.score(model, iter([batch]), 64),
                             _torch_probabilities(net, batch), rtol=1e-5, atol=1e-6)
  # The command from_torch prints (the architecture's overrides) trains on from step 0.
  command = log.split("this trains on from it:\n")[1].split()
  assert command[:2] == ["python", "train.py"] and "--config.qr_flag=True" in command
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, *command[1:], "--config.checkpoint.enabled=True",
       "--config.num_batches=4", "--config.test_freq=4"],
      capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resuming from step 0" in proc.stdout
  trained = predict.load_model(str(tmp_path / "run"))
  assert trained.step == 4
  assert not np.allclose(predict.score(trained, iter([batch]), 64),
                         predict.score(model, iter([batch]), 64))


def test_reference_mixed_dimension_tables_load(tmp_path):
  """The reference's PrEmbeddingBags (embs.weight, proj.weight where narrower than D)
  become our mixed-dimension tables and projections: md_flag and the widths read off the
  shapes, the probabilities the torch model's."""
  torch.manual_seed(3)
  net = ReferenceNet(md_dims=(2, 4, 1, 4, 3, 2, 4, 1))
  for name, p in net.named_parameters():
    if ".proj." in name:
      nn.init.uniform_(p, -1, 1)
  path = tmp_path / "model.pt"
  torch.save({"state_dict": net.state_dict(), "iter": 1}, path)
  log = _convert(path, tmp_path / "run")
  assert "md_flag: False -> True" in log and "md_dims: '' -> '2-4-1-4-3-2-4-1'" in log
  model = predict.load_model(str(tmp_path / "run"))
  assert model.task.spec.dims == (2, 4, 1, 4, 3, 2, 4, 1)
  batch = _batch(model)
  np.testing.assert_allclose(predict.score(model, iter([batch]), 64),
                             _torch_probabilities(net, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dcn", [False, True], ids=["DLRM", "DLRM_DCN"])
def test_torchrec_state_dict_predicts_as_torchrec(tmp_path, dcn):
  """TorchRec's DLRM (upper-triangle pairs) and DLRM_DCN, saved under DDP's "module."
  prefix: the architecture is read off the weights and the probabilities match."""
  torch.manual_seed(1)
  net = TorchRecNet(dcn)
  path = tmp_path / "state.pt"
  torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
  log = _convert(path, tmp_path / "run")
  assert "arch_interaction_op: 'dot' -> 'dcn'" in log if dcn else "'lower' -> 'upper'" in log
  model = predict.load_model(str(tmp_path / "run"))
  assert model.config.arch_interaction_op == ("dcn" if dcn else "dot")
  batch = _batch(model)
  np.testing.assert_allclose(predict.score(model, iter([batch]), 64),
                             _torch_probabilities(net, batch), rtol=1e-5, atol=1e-6)


def test_pickled_code_is_refused_and_foreign_weights_are_named(tmp_path):
  """weights_only: an object of any other class in the file stops the load; a state_dict of
  neither model says so."""
  path = tmp_path / "bad.pt"
  torch.save({"state_dict": ReferenceNet().state_dict(), "hook": ReferenceNet}, path)
  with pytest.raises(pickle.UnpicklingError, match="ReferenceNet"):
    from_torch.load_torch(str(path))
  torch.save({"fc.weight": torch.zeros(2, 2)}, path)
  with pytest.raises(ValueError, match="neither the reference"):
    from_torch.load_torch(str(path))
