"""Training on prepared Criteo data: configs sized from metadata, real rows learn."""

import os

import numpy as np
import pytest

from conftest import CRITEO_DIR, load_config
from dlrm_jax.config import ConfigError
from dlrm_jax.data import configure_data, criteo
from dlrm_jax.data.loader import CriteoData

KAGGLE_HEAD = os.path.join(CRITEO_DIR, "kaggle_train_head10k.tsv")


def test_configs_read_table_sizes_from_the_prepared_directory(tmp_path):
  from dlrm_jax.data.criteo_synth import write_raw

  raw = tmp_path / "train.txt"
  write_raw(str(raw), 300, seed=0)
  out = tmp_path / "kaggle"
  meta = criteo.prepare("kaggle", [str(raw)], str(out), categorical="reference", workers=1,
                        progress=False, log=lambda m: None)
  c = load_config("criteo_kaggle")
  c.data.path = str(out)
  c.test_mini_batch_size = 16
  sized = configure_data(c)
  assert sized.arch_embedding_size == "-".join(str(v) for v in meta["vocab_sizes"])
  # 0: the whole split, the last batch partial
  assert sized.test_num_batches == -(-meta["split_rows"]["test"] // 16)
  assert c.arch_embedding_size != sized.arch_embedding_size  # the caller's config is untouched
  t = load_config("criteo_terabyte")
  t.data.path = str(out)
  with pytest.raises(ConfigError, match="holds the kaggle dataset"):
    configure_data(t)
  c.data.path = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match="no such directory.*dlrm_jax.data.criteo prepare"):
    configure_data(c)

  # Tables kept at the config's sizes (as MLPerf's DLRM-DCNv2 config does): each
  # vocabulary must fit in its table, and the one that does not is named.
  c.data.path, c.data.tables_from_metadata = str(out), False
  c.arch_embedding_size = "-".join(str(v + 5) for v in meta["vocab_sizes"])
  assert configure_data(c).arch_embedding_size == c.arch_embedding_size
  small = list(meta["vocab_sizes"])
  small[3] -= 1
  c.arch_embedding_size = "-".join(map(str, small))
  with pytest.raises(ConfigError, match=f"table 3 has {small[3]} rows for {small[3] + 1} values"):
    configure_data(c)


def _kaggle_head_config(tmp_path):
  """A small model for one epoch of the real Kaggle rows, prepared into tmp_path."""
  out = tmp_path / "kaggle"
  criteo.prepare("kaggle", [KAGGLE_HEAD], str(out), categorical="hash", max_ind_range=3000,
                 workers=1, progress=False, log=lambda m: None)
  c = load_config("criteo_kaggle")
  c.data.path = str(out)
  c.arch_sparse_feature_size = 8
  c.arch_mlp_bot = "13-32-8"
  c.arch_mlp_top = "32-16-1"
  c.dense_optimizer = "adagrad"
  c.embedding_optimizer = "rowwise_adagrad"
  c.learning_rate = 0.05
  c.mini_batch_size = 128
  c.num_batches = 67  # one epoch of the 8,572 train rows (66 full batches) and a batch
  c.test_freq, c.eval_every_epochs = 0, 0.0
  c.test_mini_batch_size = 352  # the 714 test rows: 2 full batches and one of 10 rows
  c.test_num_batches = 0
  c.progress_bar = False
  c.mesh.num_devices = 1  # the data path is under test here, not the sharding
  return c


@pytest.mark.skipif(not os.path.exists(KAGGLE_HEAD), reason="real Criteo rows not present")
def test_training_on_real_kaggle_rows_learns(tmp_path, monkeypatch):
  from checkpoint_worker import Injected
  from dlrm_jax import trainer

  c = _kaggle_head_config(tmp_path)
  c.eval_every_epochs = 0.5  # the loader's epoch: 66 full batches (8,572 // 128)
  seen = {}  # the train batches, as the loader gives them (it reads a few ahead)
  make_data = trainer.make_data
  monkeypatch.setattr(trainer, "make_data", lambda run: Injected(
      make_data(run), lambda i, batch: seen.setdefault(i, batch)))
  result = trainer.train_and_evaluate(c, str(tmp_path / "run"))
  assert result.summary["steps"] == 67
  assert [(r["step"], r["epoch"]) for r in result.records] == [(33, 0.5), (66, 1.0),
                                                               (67, 67 / 66)]
  assert result.summary["auc"] > 0.68, result.records  # 0.728 when written
  # Every row of the test split evaluated once: sklearn's metrics of the model's
  # probabilities of those rows, scored here in one batch.
  from sklearn.metrics import log_loss, roc_auc_score

  test = CriteoData(c.data.path, 714).batch(0, "test")
  assert result.summary["eval_samples"] == result.records[-1]["eval_rows"] == 714
  probs = np.asarray(result.task.predict(result.state.params, result.state.tables, test))
  assert result.summary["auc"] == pytest.approx(roc_auc_score(test["label"], probs), abs=1e-6)
  assert result.summary["logloss"] == pytest.approx(log_loss(test["label"], probs), rel=1e-5)
  # The dense features alone reach about 0.71 here: the tables must have learned too.
  # Every row the train batches looked up has moved, and no other row.
  task = result.task
  train_ids = np.concatenate([seen[i]["sparse"] for i in range(67)])
  before = task.embedding.to_arrays(task.init_state(int(c.seed)).tables)
  after = task.embedding.to_arrays(result.state.tables)
  for t, (old, new) in enumerate(zip(before, after, strict=True)):
    moved = np.flatnonzero(np.any(old != new, axis=1))
    np.testing.assert_array_equal(moved, np.unique(train_ids[:, t]), err_msg=f"table {t}")


@pytest.mark.skipif(not os.path.exists(KAGGLE_HEAD), reason="real Criteo rows not present")
def test_16_bit_compute_and_tables_on_real_kaggle_rows_stay_within_0_0075_auc(tmp_path):
  """An epoch with the MLPs and the interaction in bfloat16 (float32 parameters,
  optimiser state and loss), or with bfloat16 or float16 tables (stochastically
  rounded updates), ends, on average over 8 seeds, within 0.0075 AUC of float32's.
  One seed's runs differ by up to 0.015 either way, as float32's own runs differ from
  seed to seed (0.715 to 0.744) on these test rows. When written (jax 0.10.2), the means
  were float32 0.7295, bfloat16 compute 0.7293, bfloat16 tables 0.7258, float16 tables
  0.7310 (over the first 4 seeds alone float16 tables were 0.007 above float32); on jax
  0.12.1 float32 0.7314 and bfloat16 tables 0.7263, 0.00504 below: the mean of 8 seeds'
  differences has a standard error near 0.003, so the bound is 0.0075."""
  from dlrm_jax import trainer

  variants = {"float32": {}, "bf16 compute": {"compute_dtype": "bfloat16"},
              "bf16 tables": {"embedding_dtype": "bfloat16"},
              "fp16 tables": {"embedding_dtype": "float16"}}
  auc = {name: [] for name in variants}
  for seed in range(8):
    for name, fields in variants.items():
      workdir = tmp_path / f"{name.replace(' ', '_')}{seed}"
      c = _kaggle_head_config(workdir)
      c.update(fields)
      c.seed, c.checkpoint.enabled = seed, False
      auc[name].append(trainer.train_and_evaluate(c, str(workdir / "run")).summary["auc"])
  assert min(auc["float32"]) > 0.68, auc
  for name in variants:
    assert abs(np.mean(auc[name]) - np.mean(auc["float32"])) < 0.0075, (name, auc)


@pytest.mark.skipif(not os.path.exists(KAGGLE_HEAD), reason="real Criteo rows not present")
def test_the_kaggle_command_trains_one_epoch_of_the_prepared_rows(tmp_path):
  """The README's Kaggle commands on the 10,000 real rows (a tiny model): one epoch of
  the prepared train split (66 steps of 128, not the full set's 306,968), evaluated and
  checkpointed every 0.1 epoch, stated at start-up; a length of many epochs is warned of."""
  import json
  import subprocess
  import sys

  from conftest import REPO

  env = dict(os.environ, XLA_FLAGS="")  # the host's one CPU device, as a user's run

  def run(*args):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout

  run("-m", "dlrm_jax.data.criteo", "prepare", "--dataset", "kaggle", "--input", KAGGLE_HEAD,
      "--output", "data/criteo_kaggle", "--workers", "1")
  train = [os.path.join(REPO, "train.py"), f"--config={REPO}/configs/criteo_kaggle.py",
           "--config.data.path=data/criteo_kaggle", "--config.arch_sparse_feature_size=4",
           "--config.arch_mlp_bot=13-8-4", "--config.arch_mlp_top=8-1",
           "--config.test_mini_batch_size=256", "--config.progress_bar=False"]
  out = run(*train)
  assert ("schedule: 66 steps of 128 = 1 epoch of 66 steps (num_epochs=1); an evaluation "
          "every 0.1 epoch (about 7 steps) and at the end, a checkpoint at each") in out, out
  assert "learning rate: 0.1, constant" in out
  assert "WARNING: this run" not in out
  workdir = tmp_path / "runs" / "criteo_kaggle"
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [7, 13, 20, 26, 33, 40, 46, 53, 59, 66]
  assert records[-1]["epoch"] == 1.0
  assert "66" in os.listdir(workdir / "checkpoints")

  # The full set's length on these rows: 5.2 epochs, said at start-up.
  out = run(*train, "--config.num_batches=340", "--config.eval_every_epochs=0",
            "--workdir=runs/long")
  assert ("WARNING: this run's 340 steps are 5.15 epochs of its data (66 steps each): it sees "
          "every train row about 5.2 times; num_batches=0 trains num_epochs=1 instead") in out
