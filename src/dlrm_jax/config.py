"""Parsing and validation of the reference DLRM's architecture knobs.

Configs are `ml_collections.ConfigDict`s (see `configs/`). Their architecture
fields keep the names of the reference implementation's command-line flags
(`--arch-mlp-bot` becomes `arch_mlp_bot`); `dlrm_jax.model.ModelSpec` turns them
into a validated, immutable spec. Errors name the offending value. This module
imports no JAX (the Criteo preprocessing workers import it).
"""

from __future__ import annotations

import os
from typing import Sequence

# The default config of the command-line tools: configs/default.py beside src/ in the
# source checkout of an editable install (a wheel has no configs/: pass --config).
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "default.py")


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the value and why."""


def parse_widths(name: str, value: str | int | Sequence[int]) -> tuple[int, ...]:
  """Parses a reference-style dash-separated list such as "13-512-256-64-16"."""
  if isinstance(value, int):
    parts = [value]
  elif isinstance(value, str):
    if not value.strip():
      raise ConfigError(f"{name} is empty; expected dash-separated positive integers such as '13-512-256'")
    try:
      parts = [int(p) for p in value.strip().split("-")]
    except ValueError:
      raise ConfigError(f"{name}={value!r} is not a dash-separated list of integers") from None
  else:
    parts = [int(p) for p in value]
  if not parts:
    raise ConfigError(f"{name} is empty")
  bad = [p for p in parts if p <= 0]
  if bad:
    raise ConfigError(f"{name}={value!r} contains non-positive size(s) {bad}; every size must be >= 1")
  return tuple(parts)


def dash_list(values: Sequence) -> str:
  """The reference's dash-separated form of a list, the inverse of `parse_widths`."""
  return "-".join(str(v) for v in values)


def parse_floats(name: str, value: str | Sequence[float]) -> tuple[float, ...]:
  """Parses a dash-separated list of floats such as the reference's "1.0-1.0"."""
  if isinstance(value, str):
    try:
      return tuple(float(p) for p in value.split("-"))
    except ValueError:
      raise ConfigError(f"{name}={value!r} is not a dash-separated list of numbers") from None
  return tuple(float(p) for p in value)


def parse_args(field: str, text: str) -> dict[str, float]:
  """"a=1,b=2e-3" -> {"a": 1.0, "b": 0.002} (an optimiser's hyper-parameters); a
  ConfigError naming `field` otherwise."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    key, sep, value = part.partition("=")
    try:
      out[key.strip()] = float(value)
    except ValueError:
      sep = ""
    if not sep or not key.strip():
      raise ConfigError(f"{field}={text!r}: {part!r} is not NAME=NUMBER") from None
  return out


def base_config():
  """Every knob with its default; the files in configs/ start from this.

  Names follow the reference's flags (`--arch-mlp-bot` -> `arch_mlp_bot`,
  `--test-freq` -> `test_freq`, ...).
  """
  import ml_collections

  c = ml_collections.ConfigDict()
  # The model family: "dlrm" (DLRM and DLRM-DCNv2: the arch_* fields) or "dlrmv4" (HSTU
  # over user histories, MLPerf's DLRMv4: the dlrmv4 fields; docs/dlrmv4.md).
  c.model = "dlrm"
  _model_and_training_fields(c)
  c.dlrmv4 = _dlrmv4_fields(ml_collections.ConfigDict())
  c.checkpoint = _checkpoint_fields(ml_collections.ConfigDict())
  c.mesh, c.sharding, c.distributed = _device_fields(ml_collections.ConfigDict)
  c.data = _data_fields(ml_collections.ConfigDict())
  c.logging = _logging_fields(ml_collections.ConfigDict())
  return c


def _model_and_training_fields(c) -> None:
  """The architecture, loss, optimisation, steps and evaluation."""
  # Architecture.
  c.arch_sparse_feature_size = 16
  c.arch_mlp_bot = "13-512-256-64-16"
  c.arch_mlp_top = "512-256-1"
  c.arch_embedding_size = "-".join(["1000"] * 26)
  c.arch_interaction_op = "dot"  # dot | cat | dcn (DLRM-DCNv2's low-rank cross network).
  c.arch_interaction_itself = False  # dot: keep the self dot products too.
  c.arch_dot_pair_order = "lower"  # dot: "lower" (the reference's) | "upper" (TorchRec's DLRM).
  c.dcn_num_layers = 3  # dcn: cross layers ...
  c.dcn_low_rank_dim = 512  # ... and their rank.
  # Arithmetic of the MLPs and the interaction: float32 | bfloat16 (float32 parameters,
  # optimiser state and loss either way).
  c.compute_dtype = "float32"
  # Storage of the tables: float32 | bfloat16 | float16 (16-bit: half the bytes; lookups
  # are float32, optimiser state float32, updates stochastically rounded to the storage).
  c.embedding_dtype = "float32"
  c.embedding_pooling = "sum"  # sum | mean: how a multi-hot bag becomes one vector.
  # Quotient-remainder tables (the reference's --qr-* flags, dlrm_jax.embedding.qr): a
  # table of more than qr_threshold rows becomes two of ceil(n / c) and c rows (c:
  # qr_collisions), looked up at id // c and id % c, combined by mult | add | concat.
  c.qr_flag = False
  c.qr_collisions = 4
  c.qr_operation = "mult"
  c.qr_threshold = 200
  # Mixed-dimension tables (the reference's --md-* flags, dlrm_jax.embedding.mixed): a
  # table of n > md_threshold rows gets round(D * (n_min / n) ** md_temperature) columns
  # (md_round_dims: to a power of two) and a learned projection to D; md_dims "16-4-..."
  # gives the widths instead. Not together with qr_flag.
  c.md_flag = False
  c.md_temperature = 0.3
  c.md_round_dims = False
  c.md_threshold = 200
  c.md_dims = ""
  # Loss and optimisation.
  c.loss_function = "bce"
  c.loss_weights = "1.0-1.0"  # wbce weights of label 0 and label 1.
  c.learning_rate = 0.1
  c.dense_optimizer = "sgd"  # sgd | adagrad | adam (optax).
  # Its hyper-parameters: adagrad "eps=1e-8" (default 1e-10, as torch), adam "b1=..,b2=..,eps=..".
  c.dense_optimizer_args = ""
  c.grad_clip_norm = 0.0  # > 0: the MLPs' gradients clipped to this global norm first.
  # Sparse update of the touched rows only: sgd | rowwise_adagrad | adagrad | adam (lazy).
  c.embedding_optimizer = "sgd"
  # Its hyper-parameters, e.g. "eps=1e-8,initial_accumulator_value=0.1" or "b1=0.9,b2=0.999"
  # (the fields of its class in dlrm_jax.embedding.optimizers); "": its defaults.
  c.embedding_optimizer_args = ""
  c.lr_num_warmup_steps = 0
  c.lr_decay_start_step = 0
  c.lr_num_decay_steps = 0  # 0: no decay.
  # Steps and evaluation.
  c.mini_batch_size = 128
  c.num_batches = 1000  # training steps; 0: num_epochs epochs of the data (the reference's 0).
  # With num_batches=0: epochs of the train data (fractions allowed), as the reference's
  # --nepochs; an epoch is the Criteo train split, or data.epoch_rows of generated data.
  c.num_epochs = 1.0
  c.test_freq = 0  # evaluate every N steps; 0: only at the end (and per eval_every_epochs).
  # Evaluate at every this fraction of an epoch (0.05: 20 evaluations per epoch, as MLPerf);
  # 0: by test_freq. Data without epochs (the generators) needs data.epoch_rows for it.
  c.eval_every_epochs = 0.0
  # No evaluation before this step but the run's last (MLPerf DLRMv4 measures from a
  # first evaluation the rules set by the batch: configs/mlperf_dlrmv4.py); 0: none skipped.
  c.eval_start_step = 0
  c.test_mini_batch_size = 4096
  c.test_num_batches = 8
  c.target_auc = 0.0  # stop once an evaluation reaches it; 0: never.
  c.seed = 0
  c.progress_bar = True
  # "START-END": a jax.profiler trace of train steps START..END (1-based) in
  # WORKDIR/tensorboard, for TensorBoard's profile plugin and Perfetto; "": none.
  c.profile_steps = ""


def _dlrmv4_fields(c):
  """DLRMv4's sizes (model="dlrmv4"); the defaults are the reference's (its gin file for
  Yambda-5b). arch_*, qr_* and md_* fields are DLRM's and do not apply."""
  c.embedding_dim = 512  # D, of the tables and the encoder
  c.preprocessor_hidden_dim = 256  # the event MLPs' hidden width
  c.action_dim = 8  # per action bit (listen-plus, like, skip)
  c.num_heads = 4
  c.attention_dim = 128  # d_qk = d_v per head
  c.hidden_dim = 128
  c.num_layers = 3
  c.num_position_buckets = 8192
  c.num_time_buckets = 2048
  c.input_dropout = 0.2  # on the encoder's input, in training
  c.linear_dropout = 0.1  # on each STU layer's [U, O, U * LN(O)] before its projection
  # dense | chunked: the attention's implementation (dlrm_jax.hstu); chunked takes
  # attention_chunk queries at a time, so that no [B, H, N, N] scores exist at once.
  c.attention = "chunked"
  c.attention_chunk = 256
  # The history: at most history_length events (a third per action pool), found among the
  # scan_window events before the anchor (docs/dlrmv4.md, "Data preparation").
  c.history_length = 4086
  c.scan_window = 20000
  # Table rows; 0: sized from the data (the synthetic log's generator, or the largest id
  # in a prepared log + 1). The 7 crosses' rows are their hash moduli (dash list, in the
  # order of dlrm_jax.data.anchors.CROSSES).
  c.item_rows = 9_390_624
  c.artist_rows = 1_293_395
  c.album_rows = 3_367_692
  c.uid_rows = 1_000_001
  c.cross_rows = "100000000-40000000-24000000-40000000-32000000-2000000-40000000"
  return c


def _checkpoint_fields(c):
  """Checkpoints (Orbax) in WORKDIR/checkpoints; a rerun with the same workdir resumes."""
  c.enabled = True
  c.every_steps = 0  # save every N steps; 0: at every evaluation. Always at the end.
  c.max_to_keep = 2  # the most recent checkpoints kept ...
  c.keep_best = True  # ... and the one with the best evaluation AUC.
  c.async_save = True  # write in the background; the loop waits only for a copy.
  c.resume = True  # continue from the latest complete checkpoint in the workdir.
  # A checkpoint of another model (table sizes, widths, optimisers) is refused; True
  # restores the parameters and tables whose shapes match and starts the rest afresh.
  c.restore_partial = False
  return c


def _logging_fields(c):
  """What a run writes besides metrics.jsonl (dlrm_jax.observe)."""
  c.tensorboard = True  # event files in WORKDIR/tensorboard (needs tensorboardX).
  c.every_steps = 200  # train loss, learning rate and examples/s every N steps; 0: never.
  c.mlperf = False  # an MLPerf-format log, WORKDIR/mlperf.log (needs mlperf-logging).
  c.mlperf_org = ""  # its submission_org.
  c.mlperf_platform = ""  # its submission_platform; "": "<devices>x<device kind>".
  c.mlperf_division = "closed"  # its submission_division: closed | open.
  return c


def _device_fields(config_dict):
  """Devices, sharding (dlrm_jax.parallel, dlrm_jax.embedding.planner), processes."""
  mesh, sharding, distributed = config_dict(), config_dict(), config_dict()
  mesh.num_devices = 0  # devices to use; 0: all of them.
  mesh.replicas = 1  # > 1: a 2-D mesh, tables sharded within each of this many groups.
  mesh.axis_types = "explicit"  # explicit | auto: JAX's sharding mode for the mesh axes.
  mesh.platform = ""  # whose devices: "" the default backend's, or "cpu", "gpu", "tpu".
  # Per-table sharding types, overriding the planner: "t3:row_wise,t7:table_wise:2".
  sharding.overrides = ""
  sharding.memory_budget_mb = 0.0  # per device, tables + optimiser state; 0: 90% of a
  # GPU's or TPU's memory, no limit on CPU.
  sharding.min_column_width = 0  # narrowest column slice the planner makes; 0: the
  # devices' (128 on TPU, its lane width; 32 elsewhere: planner.MIN_COLUMN_WIDTH).
  # Row-wise tables: each device gathers and updates only the ids of its own rows, up
  # to this many times an even share of the batch's ids (0: all of them). A train step
  # with more stops the run, naming this field (dlrm_jax.embedding.layouts.RowWise).
  sharding.row_wise_capacity = 2.0
  # Multi-process runs: jax.distributed.initialize (or set JAX_COORDINATOR_ADDRESS etc.).
  distributed.coordinator_address = ""  # "host:port"; "" and no env: single process.
  distributed.num_processes = 0  # 0: from the environment or the cluster.
  distributed.process_id = -1  # -1: from the environment or the cluster.
  distributed.cpu_collectives = "gloo"  # CPU collectives across processes.
  return mesh, sharding, distributed


def _data_fields(c):
  """The data source and its knobs."""
  import ml_collections
  from ml_collections import config_dict

  # synthetic_ctr | random | criteo_kaggle | criteo_terabyte (DLRM); event_log | yambda
  # (DLRMv4: a synthetic listening log, or a prepared one, in time windows)
  c.kind = "synthetic_ctr"
  c.num_dense_features = 13
  c.seed = 1
  c.zipf_exponent = 1.1
  c.dense_missing_rate = 0.3
  c.sparse_missing_rate = 0.1
  c.teacher_num_pairs = 8  # feature pairs whose ids interact in the teacher.
  c.teacher_pair_scale = 1.0
  c.teacher_dense_scale = 0.5  # 0: the labels depend on the ids alone.
  # Ids per feature: one int for all, or a dash list of one per table ("3-2-1-..."). Batches
  # hold each sample's bags end to end, [B, sum] (prepared Criteo data: its own hotness).
  c.hotness = config_dict.FieldReference(1, field_type=object)  # an int or a str
  c.variable_hotness = False  # bags of 1..hotness ids, padded to the largest, with a mask.
  # Generated data: rows per epoch (it has no epochs of its own), for eval_every_epochs and
  # the MLPerf log's epoch numbers; 0: none. Criteo: ignored (an epoch is its train split).
  c.epoch_rows = 0
  c.path = ""  # prepared Criteo directory (python -m dlrm_jax.data.criteo prepare).
  c.max_ind_range = -1  # Criteo: the modulus the directory must be prepared with; -1: any.
  c.eval_split = "test"  # Criteo: the split evaluated ("test", as the reference, or "val").
  # Criteo: True sizes the tables from the prepared vocabularies; False keeps
  # arch_embedding_size (e.g. MLPerf's sizes), each vocabulary must fit in its table.
  c.tables_from_metadata = True
  c.shuffle = True  # Criteo: block shuffle + shuffle buffer of the train rows.
  c.block_rows = 1024  # Criteo: rows per shuffled block.
  c.shuffle_buffer = 262144  # Criteo: rows shuffled together (whole blocks).
  # DLRMv4: train on windows first_window, ... in order (num_train_windows 0: up to the
  # eval windows), evaluate on eval_num_windows windows from eval_window (-1: the last).
  c.first_window = 0
  c.num_train_windows = 0
  c.eval_window = -1
  c.eval_num_windows = 1
  # event_log: the synthetic log's generator (dlrm_jax.data.event_log.EventLogSpec; its
  # seed is data.seed) and preparation, kept in data.path (made on first use).
  c.event_log = ml_collections.ConfigDict(dict(
      num_users=2000, num_items=5000, num_artists=300, num_albums=1200, listens_per_user=150,
      latent_dim=16, drift=0.15, affinity_scale=1.5, days=60.0, min_history=64,
      window_seconds=86400))
  return c
