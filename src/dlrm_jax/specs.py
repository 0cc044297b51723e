"""Typed, validated specs of a run, built once from its ConfigDict.

`RunSpec.from_config(config)` reads every field of the config (whose defaults
are in `dlrm_jax.config.base_config`, the one place for them) into frozen
dataclasses: the model (`dlrm_jax.model.ModelSpec`), training, mesh, sharding,
processes, data and checkpoints. Each checks its values where it is built and
raises a `ConfigError` that names the field. Choices whose registry lives with
its owner (optimisers, losses, interactions, poolings, data kinds) are checked
by that owner. This module imports no JAX.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from typing import TYPE_CHECKING

from dlrm_jax.config import ConfigError, dash_list, parse_floats, parse_widths

if TYPE_CHECKING:
  from dlrm_jax.model import ModelSpec

AXIS_TYPES = ("explicit", "auto")
FAMILIES = ("dlrm", "dlrmv4")  # config.model
DLRMV4_DATA = ("event_log", "yambda")
CPU_COLLECTIVES = ("gloo", "mpi")  # JAX's CPU collectives between processes


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
  """Loss, optimisers, learning-rate policy, steps and evaluation."""

  loss_function: str
  loss_weights: tuple[float, ...]
  learning_rate: float
  lr_num_warmup_steps: int
  lr_decay_start_step: int
  lr_num_decay_steps: int
  dense_optimizer: str
  dense_optimizer_args: str
  grad_clip_norm: float  # 0: none
  embedding_optimizer: str
  embedding_optimizer_args: str
  embedding_pooling: str
  mini_batch_size: int
  num_batches: int  # 0: num_epochs epochs of the data
  num_epochs: float
  test_freq: int
  eval_every_epochs: float
  eval_start_step: int  # no evaluation before it but the last step's
  test_mini_batch_size: int
  test_num_batches: int
  target_auc: float
  seed: int
  progress_bar: bool
  profile_steps: tuple[int, int] | None  # first and last step traced (1-based)

  def __post_init__(self):
    if self.loss_function == "wbce" and len(self.loss_weights) != 2:
      raise ConfigError(f"loss_weights={dash_list(self.loss_weights)!r} must give two weights, "
                        "for label 0 and label 1")
    for name in ("mini_batch_size", "test_mini_batch_size"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
    if self.num_batches < 0:
      raise ConfigError(f"num_batches={self.num_batches} must be >= 0 (0: num_epochs epochs "
                        "of the data)")
    if self.num_batches == 0 and not self.num_epochs > 0:
      raise ConfigError(f"num_batches=0 trains num_epochs epochs of the data, but "
                        f"num_epochs={self.num_epochs}: set num_epochs > 0 or num_batches >= 1")
    if self.grad_clip_norm < 0:
      raise ConfigError(f"grad_clip_norm={self.grad_clip_norm} must be >= 0 (0: no clipping)")
    if not self.learning_rate > 0:
      raise ConfigError(f"learning_rate={self.learning_rate} must be > 0")
    for name in ("lr_num_warmup_steps", "lr_decay_start_step", "lr_num_decay_steps"):
      if getattr(self, name) < 0:
        raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
    if self.test_freq < 0 or self.eval_every_epochs < 0:
      raise ConfigError(f"test_freq={self.test_freq} and eval_every_epochs="
                        f"{self.eval_every_epochs} must be >= 0 (0: off)")
    if self.eval_start_step < 0:
      raise ConfigError(f"eval_start_step={self.eval_start_step} must be >= 0 (0: evaluate "
                        "from the first step the cadence names)")
    if self.test_freq > 0 and self.eval_every_epochs > 0:
      raise ConfigError(f"test_freq={self.test_freq} and eval_every_epochs="
                        f"{self.eval_every_epochs} both set a cadence: set one of them to 0")
    if self.lr_num_decay_steps > 0 and self.lr_decay_start_step < self.lr_num_warmup_steps:
      raise ConfigError(
          f"lr_decay_start_step={self.lr_decay_start_step} is before the end of the warmup "
          f"(lr_num_warmup_steps={self.lr_num_warmup_steps}): the warmup must finish before "
          "the decay starts")

  @classmethod
  def from_config(cls, c) -> "TrainingSpec":
    return cls(
        loss_function=str(c.loss_function),
        loss_weights=parse_floats("loss_weights", c.loss_weights),
        learning_rate=float(c.learning_rate),
        lr_num_warmup_steps=int(c.lr_num_warmup_steps),
        lr_decay_start_step=int(c.lr_decay_start_step),
        lr_num_decay_steps=int(c.lr_num_decay_steps),
        dense_optimizer=str(c.dense_optimizer),
        dense_optimizer_args=str(c.dense_optimizer_args),
        grad_clip_norm=float(c.grad_clip_norm),
        embedding_optimizer=str(c.embedding_optimizer),
        embedding_optimizer_args=str(c.embedding_optimizer_args),
        embedding_pooling=str(c.embedding_pooling),
        mini_batch_size=int(c.mini_batch_size),
        num_batches=int(c.num_batches),
        num_epochs=float(c.num_epochs),
        test_freq=int(c.test_freq),
        eval_every_epochs=float(c.eval_every_epochs),
        eval_start_step=int(c.eval_start_step),
        test_mini_batch_size=int(c.test_mini_batch_size),
        test_num_batches=int(c.test_num_batches),
        target_auc=float(c.target_auc),
        seed=int(c.seed),
        progress_bar=bool(c.progress_bar),
        profile_steps=_step_range("profile_steps", c.profile_steps))


def _step_range(name: str, text: str) -> tuple[int, int] | None:
  """"START-END" -> (START, END), 1 <= START <= END; "" -> None."""
  text = str(text).strip()
  if not text:
    return None
  first, sep, last = text.partition("-")
  try:
    start, end = int(first), int(last if sep else first)
  except ValueError:
    start = end = 0
  if not 1 <= start <= end:
    raise ConfigError(f"{name}={text!r} is not START-END with 1 <= START <= END (e.g. '10-15')")
  return start, end


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  num_devices: int  # 0: all
  replicas: int
  axis_types: str
  platform: str = ""  # "": the default backend's devices; "cpu", "gpu", "tpu"

  def __post_init__(self):
    if self.axis_types not in AXIS_TYPES:
      raise ConfigError(f"mesh.axis_types={self.axis_types!r} is not one of {AXIS_TYPES}")
    if self.num_devices < 0:
      raise ConfigError(f"mesh.num_devices={self.num_devices} must be >= 0 (0: all)")

  @classmethod
  def from_config(cls, c) -> "MeshSpec":
    return cls(num_devices=int(c.num_devices), replicas=int(c.replicas),
               axis_types=str(c.axis_types).lower(), platform=str(c.get("platform", "")).lower())


@dataclasses.dataclass(frozen=True)
class ShardingSpec:
  overrides: str  # "t3:row_wise,t7:table_wise:2" (parsed by the planner)
  memory_budget_mb: float  # 0: the device's own
  min_column_width: int  # 0: the devices' platform's (dlrm_jax.embedding.planner)
  row_wise_capacity: float = 2.0  # x an even share of a row-wise group's ids; 0: all

  def __post_init__(self):
    if self.min_column_width < 0:
      raise ConfigError(f"sharding.min_column_width={self.min_column_width} must be >= 0 "
                        "(0: the devices' platform's)")
    if self.row_wise_capacity < 0:
      raise ConfigError(f"sharding.row_wise_capacity={self.row_wise_capacity} must be >= 0 "
                        "(0: every id)")

  @classmethod
  def from_config(cls, c) -> "ShardingSpec":
    return cls(overrides=str(c.overrides), memory_budget_mb=float(c.memory_budget_mb),
               min_column_width=int(c.min_column_width),
               row_wise_capacity=float(c.get("row_wise_capacity", 2.0)))


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  coordinator_address: str
  num_processes: int
  process_id: int
  cpu_collectives: str

  def __post_init__(self):
    if self.cpu_collectives not in CPU_COLLECTIVES:
      raise ConfigError(f"distributed.cpu_collectives={self.cpu_collectives!r} is not one of "
                        f"{CPU_COLLECTIVES}")

  @classmethod
  def from_config(cls, c) -> "DistributedSpec":
    return cls(coordinator_address=str(c.coordinator_address),
               num_processes=int(c.num_processes), process_id=int(c.process_id),
               cpu_collectives=str(c.cpu_collectives) or "gloo")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The data source and its knobs (see base_config for their meaning)."""

  kind: str
  num_dense_features: int
  seed: int
  zipf_exponent: float
  dense_missing_rate: float
  sparse_missing_rate: float
  teacher_num_pairs: int
  teacher_pair_scale: float
  teacher_dense_scale: float
  hotness: tuple[int, ...]  # ids per feature: one for all, or one per table
  variable_hotness: bool
  epoch_rows: int
  path: str
  max_ind_range: int
  eval_split: str
  tables_from_metadata: bool
  shuffle: bool
  block_rows: int
  shuffle_buffer: int
  first_window: int
  num_train_windows: int
  eval_window: int
  eval_num_windows: int
  event_log: tuple[tuple[str, float], ...] = ()  # the synthetic log's knobs (data.event_log)

  def __post_init__(self):
    if self.eval_split not in ("test", "val"):
      raise ConfigError(f"data.eval_split={self.eval_split!r} is not one of ('test', 'val')")
    if self.epoch_rows < 0:
      raise ConfigError(f"data.epoch_rows={self.epoch_rows} must be >= 0 (0: no epochs)")
    if not self.hotness or min(self.hotness) < 1:
      raise ConfigError(f"data.hotness={dash_list(self.hotness)!r}: every value must be >= 1")

  @classmethod
  def from_config(cls, c, num_tables: int | None = None) -> "DataSpec":
    """The data fields of config `c`; with `num_tables` (the model's), `hotness` has a
    value per table (one value given: the same for all; another count: a ConfigError)."""
    hotness = parse_widths("data.hotness", c.hotness)
    if num_tables is not None and len(hotness) != num_tables:
      if len(hotness) != 1:
        raise ConfigError(
            f"data.hotness={c.hotness!r} gives {len(hotness)} values, but the model has "
            f"{num_tables} tables (arch_embedding_size): give one value per table, or one "
            "for all")
      hotness = hotness * num_tables
    return cls(hotness=hotness, event_log=tuple(sorted(c.event_log.items())),
               **{f.name: _cast(f.type, c[f.name])
                  for f in dataclasses.fields(cls) if f.name not in ("hotness", "event_log")})


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
  enabled: bool
  every_steps: int
  max_to_keep: int
  keep_best: bool
  async_save: bool
  resume: bool
  restore_partial: bool

  @classmethod
  def from_config(cls, c) -> "CheckpointSpec":
    return _from_fields(cls, c)


@dataclasses.dataclass(frozen=True)
class QRSpec:
  """Quotient-remainder tables (dlrm_jax.embedding.qr)."""

  qr_flag: bool
  qr_collisions: int
  qr_operation: str
  qr_threshold: int

  def __post_init__(self):
    operations = ("mult", "add", "concat")  # dlrm_jax.embedding.qr.OPERATIONS
    if self.qr_operation not in operations:
      raise ConfigError(f"qr_operation={self.qr_operation!r} is not one of {operations}")
    if self.qr_collisions < 1:
      raise ConfigError(f"qr_collisions={self.qr_collisions} must be >= 1")
    if self.qr_threshold < 0:
      raise ConfigError(f"qr_threshold={self.qr_threshold} must be >= 0")

  @classmethod
  def from_config(cls, c) -> "QRSpec":
    return _from_fields(cls, c)


@dataclasses.dataclass(frozen=True)
class LoggingSpec:
  tensorboard: bool
  every_steps: int
  mlperf: bool
  mlperf_org: str
  mlperf_platform: str
  mlperf_division: str

  def __post_init__(self):
    if self.every_steps < 0:
      raise ConfigError(f"logging.every_steps={self.every_steps} must be >= 0 (0: never)")
    if self.mlperf and importlib.util.find_spec("mlperf_logging") is None:
      raise ConfigError("logging.mlperf=True needs the mlperf-logging package: pip install "
                        "'dlrm_jax[mlperf]' (or mlperf-logging), or set logging.mlperf=False")
    if self.mlperf_division not in ("closed", "open"):
      raise ConfigError(f"logging.mlperf_division={self.mlperf_division!r} is not one of "
                        "('closed', 'open')")

  @classmethod
  def from_config(cls, c) -> "LoggingSpec":
    return _from_fields(cls, c)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """A whole run, typed; `source` is the config it came from, as JSON (checkpoints keep it)."""

  model: "ModelSpec"  # DLRM's; dlrm_jax.dlrmv4.ModelSpec where family is "dlrmv4"
  training: TrainingSpec
  mesh: MeshSpec
  sharding: ShardingSpec
  distributed: DistributedSpec
  data: DataSpec
  checkpoint: CheckpointSpec
  logging: LoggingSpec
  qr: QRSpec
  source: dict
  family: str = "dlrm"  # config.model

  @classmethod
  def from_config(cls, config) -> "RunSpec":
    from dlrm_jax.model import ModelSpec  # JAX, for the interactions' registry

    family = str(config.get("model", "dlrm"))
    if family not in FAMILIES:
      raise ConfigError(f"model={family!r} is not one of {FAMILIES}")
    kind = str(config.data.kind)
    if (family == "dlrmv4") != (kind in DLRMV4_DATA):
      raise ConfigError(
          f"model={family!r} does not train on data.kind={kind!r}: DLRMv4 trains on "
          f"{' or '.join(DLRMV4_DATA)} data, DLRM on the others")
    if family == "dlrmv4":
      from dlrm_jax import dlrmv4

      if bool(config.qr_flag) or bool(config.md_flag):
        raise ConfigError("qr_flag and md_flag are DLRM's: DLRMv4's tables are all "
                          "dlrmv4.embedding_dim wide, without quotient-remainder pairs")
      if str(config.compute_dtype) != "float32":
        raise ConfigError(f"compute_dtype={config.compute_dtype!r}: DLRMv4 computes in "
                          "float32 only (bfloat16 is not here yet)")
      if str(config.loss_function) != "bce":
        raise ConfigError(f"loss_function={config.loss_function!r}: DLRMv4's loss is the "
                          "reference's, 0.2 times the mean binary cross-entropy ('bce')")
      model = dlrmv4.ModelSpec.from_config(config)
    else:
      model = ModelSpec.from_config(config)
    if bool(config.qr_flag) and bool(config.md_flag):
      raise ConfigError("qr_flag and md_flag together are not supported: quotient-remainder "
                        "tables keep D columns, mixed-dimension ones narrow them; pick one")
    if bool(config.qr_flag) and str(config.qr_operation) == "concat" and model.embedding_dim % 2:
      raise ConfigError(f"qr_operation='concat' joins two halves of arch_sparse_feature_size="
                        f"{model.embedding_dim}: it must be even")
    return cls(model=model,
               training=TrainingSpec.from_config(config),
               mesh=MeshSpec.from_config(config.mesh),
               sharding=ShardingSpec.from_config(config.sharding),
               distributed=DistributedSpec.from_config(config.distributed),
               data=DataSpec.from_config(config.data, model.num_tables),
               checkpoint=CheckpointSpec.from_config(config.checkpoint),
               logging=LoggingSpec.from_config(config.logging),
               qr=QRSpec.from_config(config),
               source=json.loads(config.to_json()), family=family)


def _from_fields(cls, c):
  """`cls` from the config fields of its own names, each cast to its declared type."""
  return cls(**{f.name: _cast(f.type, c[f.name]) for f in dataclasses.fields(cls)})


def _cast(annotation: str, value):
  """A config value as the field's declared type (`from __future__ import annotations`
  keeps the annotations as strings)."""
  return {"int": int, "float": float, "bool": bool, "str": str}[annotation](value)
