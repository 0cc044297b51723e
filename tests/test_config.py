"""Config validation: bad values get errors that name the value and say why."""

import json

import pytest

from conftest import load_config
from dlrm_jax.config import ConfigError, parse_widths
from dlrm_jax.model import ModelSpec
from dlrm_jax.specs import RunSpec, TrainingSpec


def _spec(**overrides):
  c = load_config("default")
  for k, v in overrides.items():
    setattr(c, k, v)
  return ModelSpec.from_config(c)


def test_default_config_is_valid():
  spec = _spec()
  assert spec.num_tables == 26 and spec.embedding_dim == 16


@pytest.mark.parametrize("overrides,message", [
    (dict(arch_mlp_bot="12-64-16"), "first width must be the number of dense features"),
    (dict(arch_mlp_bot="13-64-8"), "last width must equal the embedding dim"),
    (dict(arch_mlp_top="64-2"), "last width must be 1"),
    (dict(arch_mlp_bot=""), "arch_mlp_bot is empty"),
    (dict(arch_mlp_top="64-0-1"), "non-positive"),
    (dict(arch_embedding_size="100--5"), "arch_embedding_size"),
    (dict(arch_embedding_size="100-0"), "non-positive"),
    (dict(arch_mlp_bot="13-x-16"), "not a dash-separated list"),
    (dict(arch_interaction_op="sum"), "arch_interaction_op"),
    (dict(arch_sparse_feature_size=0, arch_mlp_bot="13-0"), "must be"),
])
def test_invalid_architecture(overrides, message):
  with pytest.raises(ConfigError, match=message):
    _spec(**overrides)


def test_error_names_the_value():
  with pytest.raises(ConfigError) as e:
    _spec(arch_mlp_bot="13-64-32")
  assert "arch_mlp_bot=13-64-32" in str(e.value) and "arch_sparse_feature_size=16" in str(e.value)


# A bad loss_function is one of CHOICE_FIELDS below.
@pytest.mark.parametrize("key,value,message", [
    ("mini_batch_size", 0, "mini_batch_size"),
    ("learning_rate", 0.0, "learning_rate"),
    ("lr_num_warmup_steps", -1, "lr_num_warmup_steps"),
])
def test_invalid_training(key, value, message):
  c = load_config("default")
  setattr(c, key, value)
  with pytest.raises(ConfigError, match=message):
    TrainingSpec.from_config(c)


def test_wbce_needs_two_weights():
  c = load_config("default")
  c.loss_function = "wbce"
  c.loss_weights = "1.0-2.0-3.0"
  with pytest.raises(ConfigError, match="two weights"):
    TrainingSpec.from_config(c)


def test_the_decay_cannot_start_before_the_warmup_ends():
  c = load_config("default")
  c.lr_num_warmup_steps, c.lr_decay_start_step, c.lr_num_decay_steps = 10, 5, 20
  with pytest.raises(ConfigError, match="lr_decay_start_step=5 is before the end of the warmup"):
    TrainingSpec.from_config(c)
  c.lr_num_decay_steps = 0  # no decay: its start does not matter
  TrainingSpec.from_config(c)


def test_parse_widths():
  assert parse_widths("x", "13-512-256") == (13, 512, 256)
  assert parse_widths("x", 7) == (7,)


@pytest.mark.parametrize("name", ["default", "tiny", "criteo_kaggle", "criteo_terabyte",
                                  "mlperf_dcnv2"])
def test_shipped_configs_are_valid(name):
  c = load_config(name)
  spec = RunSpec.from_config(c)
  assert spec.model == ModelSpec.from_config(c) and spec.source == json.loads(c.to_json())


@pytest.mark.parametrize("name", ["criteo_kaggle", "criteo_terabyte", "mlperf_dcnv2"])
def test_criteo_configs_say_how_to_get_data(tmp_path, name):
  from dlrm_jax.data import configure_data, make_data

  c = load_config(name)
  c.data.path = str(tmp_path / name)
  with pytest.raises(ConfigError, match="python -m dlrm_jax.data.criteo prepare"):
    configure_data(c)
  with pytest.raises(ConfigError, match="python -m dlrm_jax.data.criteo prepare"):
    make_data(RunSpec.from_config(c))


def test_mlperf_dcnv2_config_is_the_references():
  """configs/mlperf_dcnv2.py against the values of MLPerf's reference command."""
  run = RunSpec.from_config(load_config("mlperf_dcnv2"))
  m, t, d = run.model, run.training, run.data
  assert (m.embedding_dim, m.bottom, m.top) == (128, (13, 512, 256, 128),
                                                (1024, 1024, 512, 256, 1))
  assert (m.interaction, m.dcn_num_layers, m.dcn_low_rank_dim) == ("dcn", 3, 512)
  assert m.interaction_width == 27 * 128
  assert len(m.table_rows) == 26 and sum(m.table_rows) == 204_184_588
  assert sum(d.hotness) == 214 and d.hotness[20] == 100
  assert (t.dense_optimizer, t.embedding_optimizer, t.learning_rate) == ("adagrad", "adagrad",
                                                                         0.005)
  assert "eps=1e-8" in t.dense_optimizer_args and "eps=1e-8" in t.embedding_optimizer_args
  # One epoch of the data: 64,013 full batches of MLPerf's 4,195,197,692 training rows.
  assert (t.mini_batch_size, t.num_batches, t.num_epochs, t.test_freq) == (65_536, 0, 1, 0)
  assert t.target_auc == 0.80275 and not d.tables_from_metadata
  # 20 evaluations in the epoch, each at the step nearest its twentieth, the last at its end.
  from dlrm_jax.trainer import Cadence, run_length

  from configs.mlperf_dcnv2 import GLOBAL_BATCH, TRAIN_ROWS

  steps = run_length(t, TRAIN_ROWS // GLOBAL_BATCH)
  assert steps == 64_013
  cadence = Cadence(steps, t.test_freq, t.eval_every_epochs, steps_per_epoch=64_013)
  due = [s for s in range(1, steps + 1) if cadence.due(s)]
  assert len(due) == 20 and due[-1] == 64_013
  assert all(abs(s - k * 64_013 / 20) <= 0.5 for k, s in enumerate(due, start=1))


# Every field with a fixed set of choices, a bad value for it, and the choices the error
# must list. Each is refused with a ConfigError before anything is compiled or trained.
CHOICE_FIELDS = [
    ("arch_interaction_op", ("dot", "cat", "dcn")),
    ("arch_dot_pair_order", ("lower", "upper")),
    ("compute_dtype", ("float32", "bfloat16")),
    ("loss_function", ("bce", "mse", "wbce")),
    ("dense_optimizer", ("sgd", "adagrad", "adam")),
    ("embedding_optimizer", ("sgd", "rowwise_adagrad", "adagrad", "adam")),
    ("embedding_pooling", ("sum", "mean")),
    ("mesh.axis_types", ("explicit", "auto")),
    ("data.kind", ("synthetic_ctr", "random", "criteo_kaggle", "criteo_terabyte")),
    ("logging.mlperf_division", ("closed", "open")),
    ("qr_operation", ("mult", "add", "concat")),
]


def _set(config, field, value):
  *parents, name = field.split(".")
  for p in parents:
    config = config[p]
  setattr(config, name, value)


@pytest.mark.parametrize("field,choices", CHOICE_FIELDS, ids=[f for f, _ in CHOICE_FIELDS])
def test_every_choice_field_refuses_a_bad_value(field, choices, tmp_path):
  from dlrm_jax import trainer

  c = load_config("tiny")
  _set(c, field, "foo")
  with pytest.raises(ConfigError) as e:
    trainer.train_and_evaluate(c, str(tmp_path))
  message = str(e.value)
  assert f"{field.split('.')[-1]}='foo'" in message, message
  assert all(repr(choice) in message for choice in choices), message


def test_a_platform_without_devices_is_a_config_error(tmp_path):
  from dlrm_jax.task import Task

  c = load_config("tiny")
  c.mesh.platform = "tpu"
  with pytest.raises(ConfigError, match="mesh.platform='tpu'"):
    Task(c)
  c.mesh.platform = "cpu"
  assert Task(c).mesh.devices.flat[0].platform == "cpu"


def test_the_cpu_collectives_are_checked():
  c = load_config("tiny")
  c.distributed.cpu_collectives = "foo"
  with pytest.raises(ConfigError, match=r"distributed.cpu_collectives='foo' is not one of "
                                        r"\('gloo', 'mpi'\)"):
    RunSpec.from_config(c)


@pytest.mark.parametrize("arg,line", [
    ("--config.dense_optimizer=foo",
     "error: dense_optimizer='foo' is not one of ('sgd', 'adagrad', 'adam')"),
    ("--config.learning_rat=0.2", "error: --config.learning_rat=0.2: the config has no field "
                                  "'learning_rat'; did you mean 'learning_rate'?"),
    ("--config.mini_batch_size=-128", "error: mini_batch_size=-128 must be >= 1"),
    ("--config.mini_batch_size=abc", "error: flag --config.mini_batch_size=abc: invalid literal "
                                     "for int() with base 10: 'abc'"),
])
def test_the_command_line_reports_a_bad_config_in_one_line(tmp_path, arg, line):
  """A bad value or a misspelled field, as a user types it: exit status 2 and one line
  on stderr (no traceback, no usage text, no config dump, no JAX start-up news), with
  the nearest field for a misspelling."""
  import subprocess
  import sys

  from conftest import REPO

  proc = subprocess.run(
      [sys.executable, f"{REPO}/train.py", f"--config={REPO}/configs/tiny.py",
       f"--workdir={tmp_path}/run", arg], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines() == [line], proc.stderr[-3000:]
  assert proc.stdout == ""


@pytest.mark.parametrize("dataset,raw", [("kaggle", "train.txt"), ("terabyte", "day_{0..23}.gz")])
def test_a_criteo_config_without_data_gives_its_own_prepare_command(tmp_path, dataset, raw):
  """train.py --config=configs/criteo_DATASET.py before any preparation: one line whose
  advice is the prepare command for that dataset, and no run directory made."""
  import subprocess
  import sys

  from conftest import REPO

  proc = subprocess.run(
      [sys.executable, f"{REPO}/train.py", f"--config={REPO}/configs/criteo_{dataset}.py",
       f"--workdir={tmp_path}/run", f"--config.data.path={tmp_path}/data"],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"error: data.path='{tmp_path}/data': {tmp_path}/data: no such directory. Prepare the "
      f"Criteo data first: python -m dlrm_jax.data.criteo prepare --dataset {dataset} "
      f"--input {raw} --output {tmp_path}/data"], proc.stderr
  assert not (tmp_path / "run").exists()


def test_the_config_goes_to_the_run_directory_and_verbose_prints_it(tmp_path):
  """The config goes to WORKDIR/config.txt, and --verbose prints it. Without --verbose a
  run on the CPU prints no start-up news: not JAX's, and not that of libtpu or a CUDA
  plugin installed for the compile tool (the newest leg has both) with JAX_PLATFORMS
  unset, as a user runs it."""
  import os
  import subprocess
  import sys

  from conftest import REPO

  run = [sys.executable, f"{REPO}/train.py", f"--config={REPO}/configs/tiny.py",
         "--config.num_batches=2", "--config.test_freq=2"]
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  quiet = subprocess.run(run + [f"--workdir={tmp_path}/a"], capture_output=True, text=True,
                         timeout=600, env=env)
  for news in ("Traceback", "libtpu", "TPU_", "Unable to initialize", "plugin"):
    assert news not in quiet.stderr, quiet.stderr[-3000:]
  loud = subprocess.run(run + [f"--workdir={tmp_path}/b", "--verbose"], capture_output=True,
                        text=True, timeout=600)
  assert quiet.returncode == loud.returncode == 0, quiet.stderr[-3000:] + loud.stderr[-3000:]
  written = (tmp_path / "a" / "config.txt").read_text()
  assert "num_batches: 2" in written and "learning_rate:" in written
  assert "learning_rate:" not in quiet.stdout + quiet.stderr
  assert "Config:\n" in loud.stdout and "num_batches: 2" in loud.stdout
