"""Orbax checkpoints of a training run: save, resume exactly, restore onto another mesh.

A checkpoint is one step directory of an Orbax `CheckpointManager` under
WORKDIR/checkpoints; `Contents` is its schema, one Orbax item per part:

  state   the `TrainState` arrays as they are laid out (dense parameters and
          their optax state, the stacked embedding tables of each sharding type
          and their sparse optimiser slots, the step); each process writes only
          the shards it holds, nothing is gathered; a replicated array is
          written whole by its first replica (see `_state_handler`).
  config  JSON: the format version, the run's config, the sharding plan the
          tables are laid out by, the mesh.
  data    JSON: the data position (the loader's state), as MaxText keeps its
          iterator's state in an item of its own.
  run     JSON: the evaluation records so far, the losses of the unfinished
          evaluation interval, whether the run had finished; with the state,
          enough to resume bit for bit.

Checkpoints of format 2 (one `meta` item holding the same JSON) are read too.

Saves are asynchronous (the loop waits only for the copy of the state to
host memory). Orbax writes each step into a temporary directory and renames
it when complete, so a process killed while saving leaves no step that looks
complete; such leftovers are removed when the manager opens. A step that
fails to restore (damaged files) is reported, moved aside and the previous
one is used.

Restoring onto the plan it was saved with (the same table layout) reads each
shard straight into its target sharding. Onto another plan or device count
(8 devices to 1, another planner choice, ...) the stacked tables and slots
are read whole on each host and re-laid out table by table
(`dlrm_jax.embedding.sharded.unstack_rows` / `stack_rows`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import sys
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from dlrm_jax.config import ConfigError, base_config, parse_widths
from dlrm_jax.embedding import EmbeddingCollection
from dlrm_jax.embedding.collection import unpack
from dlrm_jax.embedding.mixed import dims_from_config
from dlrm_jax.embedding.planner import Plan
from dlrm_jax.embedding.sharded import plan_groups, unstack_rows
from dlrm_jax.parallel import gather_to_host
from dlrm_jax.state import TrainState

FORMAT_VERSION = 3  # 3: items state, config, data, run; 2: state and one "meta" item
READABLE_VERSIONS = (2, 3)

# Config fields that define the saved arrays: a checkpoint restores only into
# a config that agrees on all of them (unless a partial restore is asked for).
MODEL_KEYS = ("arch_sparse_feature_size", "arch_mlp_bot", "arch_mlp_top", "arch_embedding_size",
              "arch_interaction_op", "arch_interaction_itself", "arch_dot_pair_order",
              "dcn_num_layers", "dcn_low_rank_dim", "embedding_pooling", "embedding_dtype",
              "dense_optimizer", "embedding_optimizer", "data.num_dense_features",
              "qr_flag", "qr_collisions", "qr_operation", "qr_threshold")
# Fields that matter only with a flag on (compared when either config has it on).
GATED_KEYS = {"qr_collisions": "qr_flag", "qr_operation": "qr_flag", "qr_threshold": "qr_flag"}
# DLRMv4's fields that define the saved arrays (compared when either config is DLRMv4's).
DLRMV4_KEYS = tuple(f"dlrmv4.{k}" for k in (
    "embedding_dim", "preprocessor_hidden_dim", "action_dim", "num_heads", "attention_dim",
    "hidden_dim", "num_layers", "num_position_buckets", "num_time_buckets", "item_rows",
    "artist_rows", "album_rows", "uid_rows", "cross_rows"))
# The md_* fields matter through the table widths they give, which are compared instead.


class CheckpointError(RuntimeError):
  """No usable checkpoint: the message says which steps were tried and why they failed."""


class CheckpointMismatchError(ConfigError):
  """The config does not match the checkpoint's; the message lists the differences."""


def _get(config: dict, key: str):
  for part in key.split("."):
    if not isinstance(config, dict) or part not in config:
      return None
    config = config[part]
  return config


def config_differences(saved: dict, current: dict) -> list[str]:
  """The model-defining fields (MODEL_KEYS) on which two configs (as JSON) differ; a
  field that an older checkpoint's config lacks has its default (base_config's)."""
  defaults = json.loads(base_config().to_json())
  saved_value = lambda key: _get(defaults, key) if _get(saved, key) is None else _get(saved, key)
  out = []
  v4 = "dlrmv4" in (saved_value("model"), _get(current, "model"))
  for key in ("model",) + MODEL_KEYS + (DLRMV4_KEYS if v4 else ()):
    a, b = saved_value(key), _get(current, key)
    gate = GATED_KEYS.get(key)
    if a != b and (gate is None or saved_value(gate) or _get(current, gate)):
      out.append(f"{key}: checkpoint {a!r}, config {b!r}")
  clipped = [float(c.get("grad_clip_norm") or 0) > 0 for c in (saved, current)]
  if clipped[0] != clipped[1]:  # clipping adds a level to the optimiser's state
    out.append(f"grad_clip_norm: checkpoint {'> 0' if clipped[0] else '0 (none)'}, config "
               f"{'> 0' if clipped[1] else '0 (none)'}")
  shape = ("arch_embedding_size", "arch_sparse_feature_size")
  if all(saved_value(k) == _get(current, k) for k in shape):
    a, b = dims_from_config({**defaults, **saved}), dims_from_config(current)
    if a != b:
      out.append(f"table widths (md_*): checkpoint {'-'.join(map(str, a))}, "
                 f"config {'-'.join(map(str, b))}")
  return out


@dataclasses.dataclass
class Contents:
  """What a checkpoint holds besides the arrays (see the module docstring)."""

  config: dict  # the run's config, as JSON
  plan: Plan  # the layout of the saved tables
  mesh: dict = dataclasses.field(default_factory=dict)  # {"shape": ..., "processes": ...}
  data: dict = dataclasses.field(default_factory=dict)  # the data position
  records: list[dict] = dataclasses.field(default_factory=list)
  interval_losses: list[float] = dataclasses.field(default_factory=list)
  finished: bool = False

  def items(self) -> dict[str, dict]:
    """The JSON items to save."""
    return {"config": {"format_version": FORMAT_VERSION, "config": self.config,
                       "plan": self.plan.to_json(), "mesh": self.mesh},
            "data": self.data,
            "run": {"records": self.records, "interval_losses": self.interval_losses,
                    "finished": self.finished}}

  @classmethod
  def from_items(cls, config: dict, data: dict, run: dict) -> "Contents":
    return cls(config=config["config"], plan=Plan.from_json(config["plan"]),
               mesh=config.get("mesh", {}), data=data, records=run["records"],
               interval_losses=run["interval_losses"], finished=run["finished"])

  @classmethod
  def from_meta(cls, meta: dict) -> "Contents":
    """A format-2 checkpoint's single `meta` item."""
    return cls(config=meta["config"], plan=Plan.from_json(meta["plan"]),
               mesh=meta.get("mesh", {}), data=meta.get("data", {}),
               records=meta.get("records", []),
               interval_losses=meta.get("interval_losses", []),
               finished=bool(meta.get("finished", False)))


@dataclasses.dataclass
class Restored:
  """A restored training state with the rest of its checkpoint."""

  state: TrainState
  contents: Contents
  step: int
  partial: bool = False  # parts that did not match the config were left fresh


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's array handling, except that each replicated array is written whole
  by its first replica.

  Orbax's default on CPU splits a replicated array's write between its
  replicas, which slices every array on every device with a freshly compiled
  program, far slower than one write (figures: docs/checkpoints.md). The arrays
  replicated here are the dense parameters and the small replicated tables.
  """
  registry = ocp.type_handlers.create_type_handler_registry(
      (int, ocp.type_handlers.ScalarHandler()),
      (float, ocp.type_handlers.ScalarHandler()),
      (np.number, ocp.type_handlers.ScalarHandler()),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _is_write_failure(e: BaseException) -> bool:
  """An OSError, or TensorStore's ValueError for a failed write ("RESOURCE_EXHAUSTED:
  ... No space left on device [os_error_code='28']")."""
  return isinstance(e, OSError) or (isinstance(e, ValueError) and (
      "No space left" in str(e) or "os_error_code" in str(e)))


def _is_disk_full(e: BaseException) -> bool:
  return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)


def _chain(e: BaseException | None):
  """An exception and the ones it was raised from or during."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


class _OrbaxNoise(logging.Filter):
  """Drops Orbax's warning for a save without metrics (saves between evaluations,
  `checkpoint.every_steps`, have none by design) and its background threads' error
  logs of a failed write, tracebacks included: Orbax raises the same failure in the
  caller's thread at the next save, wait or close, where `Checkpointer` reports it as
  one CheckpointError. Likewise its traceback of a wait that a second Ctrl-C
  interrupted (`dlrm_jax.stopping`), which the caller gets as KeyboardInterrupt."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "did not provide metrics" in record.getMessage():
      return False
    if record.levelno >= logging.ERROR and "/orbax/" in record.pathname and record.exc_info:
      return not any(_is_write_failure(e) or isinstance(e, KeyboardInterrupt)
                     for e in _chain(record.exc_info[1]))
    return True


logging.getLogger("absl").addFilter(_OrbaxNoise())


def _quiet_closed_loops() -> None:
  """`sys.unraisablehook`, less the "Event loop is closed" that Orbax's save threads
  leave when a failed save cancels the others after their event loops closed."""
  previous = sys.unraisablehook

  def unraisable(info):
    if not (isinstance(info.exc_value, RuntimeError)
            and str(info.exc_value) == "Event loop is closed"):
      previous(info)

  unraisable.quiet_closed_loops = True
  if not getattr(previous, "quiet_closed_loops", False):
    sys.unraisablehook = unraisable


class Checkpointer:
  """An Orbax CheckpointManager for train states: keeps the last `max_to_keep`
  checkpoints and, with `keep_best`, the one with the best evaluation AUC."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, keep_best: bool = True,
               async_save: bool = True, log: Callable[[str], None] | None = None):
    self.directory = os.path.abspath(directory)
    self.log = log or (lambda s: None)
    self._saving = None  # the step of the last save started
    _quiet_closed_loops()
    cm = ocp.checkpoint_managers
    policies = [cm.LatestN(n=max(1, int(max_to_keep)))]
    if keep_best:
      policies.append(cm.BestN(get_metric_fn=lambda m: m["auc"], n=1,
                               keep_checkpoints_without_metrics=False))
    # Orbax writes a step's metrics to disk only with a best_fn; without them a
    # reopened directory (a resumed run) would have forgotten which step was best.
    best = {"best_fn": lambda m: m["auc"], "best_mode": "max"} if keep_best else {}
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True,
        preservation_policy=cm.AnyPreservationPolicy(policies), **best)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": _state_handler(), "config": ocp.JsonCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(), "run": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})  # meta: format 2, read only

  # Saving ---------------------------------------------------------------------
  def save(self, step: int, state: TrainState, contents: Contents,
           metrics: dict | None = None) -> bool:
    """Starts an asynchronous save of `state` and `contents` as `step`; False if it exists.

    Returns once the state has been copied to host memory; the write goes on
    in the background.
    """
    if step in self.manager.all_steps():
      return False
    items = {k: ocp.args.JsonSave(v) for k, v in contents.items().items()}
    with self._write_errors():  # also the previous save's, which Orbax raises here
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state.as_dict()), **items),
          metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
          force=True)
    self._saving = step
    return True

  @contextlib.contextmanager
  def _write_errors(self):
    """A failed write (a full disk, no permission) as one CheckpointError that names the
    save, the last complete checkpoint (untouched: Orbax writes into a temporary
    directory and renames it only when complete) and what to do."""
    try:
      yield
    except (OSError, ValueError) as e:
      self._join_writers()
      if not _is_write_failure(e):
        raise
      full = _is_disk_full(e)
      last = self.latest_step()
      reason = "no space left on the device" if full else (getattr(e, "strerror", None) or e)
      raise CheckpointError(
          f"saving the checkpoint of step {self._saving} in {self.directory} failed: "
          f"{reason}. "
          + (f"The last complete checkpoint, step {last}, is intact; " if last is not None
             else "No checkpoint was completed before it; ")
          + ("free some space and " if full else "")
          + "rerun the same command: it resumes from there.") from None

  def delete_all(self) -> None:
    """Deletes every checkpoint (a fresh run in a used directory)."""
    for step in self.steps():
      self.manager.delete(step)

  def wait(self) -> None:
    """Blocks until the saves in flight are on disk."""
    with self._write_errors():
      self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the saves in flight and stops Orbax's background threads."""
    try:
      with self._write_errors():
        self.manager.close()
    except Exception:  # raised part-way: close the rest too (each error is raised once)
      with contextlib.suppress(Exception):
        self.manager.close()
      raise
    finally:
      # Orbax's close() does not wait for the clean-up of unfinished saves it starts
      # when it opens a directory; a process that exits soon after (an error) would see
      # that thread fail at interpreter shutdown and print its traceback.
      getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()

  def _join_writers(self) -> None:
    """Waits for all writers of the last save: Orbax reports a failed one while the others
    may still write in STEP.orbax-checkpoint-tmp (its ChainedFuture stops at the first)."""
    async_manager = getattr(getattr(self.manager, "_checkpointer", None), "_async_manager", None)
    pending = list(getattr(async_manager, "_commit_futures", None) or [])
    while pending:
      f = pending.pop()
      if hasattr(f, "_futures"):  # a ChainedFuture
        pending.extend(f._futures)
        continue
      with contextlib.suppress(Exception):  # the failure, already reported
        f.result()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # Reading --------------------------------------------------------------------
  def steps(self) -> list[int]:
    """The complete checkpoints' steps, oldest first."""
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def read_contents(self, step: int) -> Contents:
    """A checkpoint's contents besides the arrays; CheckpointError for another format."""
    if os.path.isdir(os.path.join(self.directory, str(step), "meta")):  # format 2
      meta = self._read_json(step, "meta")["meta"]
      version = meta.get("format_version")
      parts = None if version != 2 else Contents.from_meta(meta)
    else:
      config = self._read_json(step, "config")["config"]
      version = config.get("format_version")  # checked before the items it implies are read
      parts = None
      if version == FORMAT_VERSION:
        parts = Contents.from_items(config=config, **self._read_json(step, "data", "run"))
    if parts is None:
      raise CheckpointError(f"{self.directory}/{step}: checkpoint format version "
                            f"{version!r}, this code reads {list(READABLE_VERSIONS)}")
    return parts

  def _read_json(self, step: int, *names: str) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        **{n: ocp.args.JsonRestore() for n in names}))

  def restore(self, task, *, partial: bool = False, step: int | None = None,
              fresh: Callable[[], TrainState] | None = None) -> Restored | None:
    """The newest checkpoint that restores into `task` (None when there is none).

    A checkpoint that cannot be read is reported through `log`, moved aside
    (renamed `STEP.damaged`) and the previous one is tried. If the model fields
    of `task`'s config differ from the checkpoint's, CheckpointMismatchError,
    unless `partial`: then the arrays whose shapes match are restored and the
    others come from `fresh()` (a fresh train state).
    """
    steps = [step] if step is not None else self.steps()[::-1]
    failures = []
    for s in steps:
      try:
        contents = self.read_contents(s)
      except CheckpointError:
        raise
      except Exception as e:  # a damaged or foreign step directory
        failures.append(self._damaged(s, e))
        continue
      diffs = config_differences(contents.config, task.run.source)
      if diffs and not partial:
        raise CheckpointMismatchError(
            f"the config does not match the checkpoint {self.directory}/{s}:\n  "
            + "\n  ".join(diffs)
            + "\nUse another --workdir, or set checkpoint.restore_partial=True to restore "
              "only the parts that match.")
      try:  # reading: a failure here means damaged files
        if diffs:
          saved = self._read(s, self._host_targets(s, None))
        else:
          direct = self._direct(s, task, contents.plan)
          saved = self._read(s, self._targets(s, task, direct))
      except Exception as e:
        failures.append(self._damaged(s, e))
        continue
      if diffs:
        state = self._partial_state(saved, task, contents, fresh())
      else:
        state = self._state(saved, task, contents, direct)
      return Restored(state=state, contents=contents, step=s, partial=bool(diffs))
    if failures and step is not None:
      raise CheckpointError("; ".join(failures))
    return None

  def _damaged(self, step: int, error: Exception) -> str:
    message = (f"checkpoint {self.directory}/{step} is damaged and is skipped "
               f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
    self.log(message)
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      if os.path.isdir(src):
        os.replace(src, f"{src}.damaged")
    ocp.multihost.sync_global_processes(f"dlrm_jax: checkpoint {step} damaged")
    self.manager.reload()
    return message

  def _direct(self, step: int, task, saved_plan: Plan) -> bool:
    """Whether the saved tables read straight into `task`'s: the same layout, stored
    alike (16-bit tables saved before they were stored packed are re-laid out)."""
    if not saved_plan.same_layout(task.plan):
      return False
    saved = self._host_targets(step, ("tables",))["tables"]
    want = task.abstract_state().tables
    return all(np.dtype(saved[k].dtype) == np.dtype(want[k].dtype) for k in want)

  def _targets(self, step: int, task, direct: bool) -> dict:
    """Restore targets: `task`'s shardings, or (not `direct`: tables laid out or stored
    otherwise) the host for the tables."""
    target = task.abstract_state().as_dict()
    if direct:
      return target
    return {**target, **self._host_targets(step, ("tables", "emb_opt_state"))}

  def _state(self, saved: dict, task, contents: Contents, direct: bool) -> TrainState:
    """The train state from arrays read with `_targets` (re-laying out tables if needed)."""
    if not direct:
      saved["tables"], saved["emb_opt_state"] = task.embedding.relayout(
          _collection(contents.config), contents.plan, saved["tables"],
          saved["emb_opt_state"], task.state_shapes.emb_opt_state)
    return TrainState(**saved)

  def _partial_state(self, saved: dict, task, contents: Contents, fresh) -> TrainState:
    """Dense arrays whose path and shape match `fresh`'s and tables whose shape
    matches; everything else (and the sparse optimiser slots) as in `fresh`."""
    out = {"step": jax.device_put(np.asarray(saved["step"], np.int32), fresh.step.sharding),
           "emb_opt_state": fresh.emb_opt_state}
    dims = (dims_from_config(contents.config), task.spec.dims)
    for name in ("params", "opt_state"):
      saved_flat = {_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(saved[name])[0]}

      def pick(path, leaf):
        key = _key(path)
        v = saved_flat.get(key)
        if _PROJECTION.search(key):  # mixed-dimension projections: feature by feature
          v = _projection_rows(key, saved_flat, *dims, gather_to_host(leaf))
        if v is None or np.shape(v) != leaf.shape:
          return leaf
        return jax.device_put(np.asarray(v, leaf.dtype), leaf.sharding)

      out[name] = jax.tree_util.tree_map_with_path(pick, getattr(fresh, name))
    old = plan_groups(_collection(contents.config), contents.plan)
    new_tables = task.embedding.to_arrays(fresh.tables)
    for t, a in enumerate(unstack_rows(old, saved["tables"])):
      a = unpack(a)
      if t < len(new_tables) and a.shape == new_tables[t].shape:
        new_tables[t] = a
    out["tables"] = task.embedding.from_arrays(new_tables)
    return TrainState(**out)

  def _host_targets(self, step: int, names) -> dict:
    """Restore targets on this host's first device for the saved arrays of `names`."""
    tree = self.manager.item_metadata(step)["state"]
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
    names = names or tuple(tree)
    return {n: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            tree[n]) for n in names}

  def _read(self, step: int, target: dict) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))).state


def _key(path) -> str:
  """A key path as a string that plain saved trees and NNX states share."""
  parts = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
    if name != "value":  # an NNX Variable's payload
      parts.append(str(name))
  return "/".join(parts)


_PROJECTION = re.compile(r"projection/kernels/(\d+)$")


def _projection_rows(key: str, saved_flat: dict, saved_dims, dims, fresh: np.ndarray):
  """A projection kernel [n_w, w, D] (or its optimiser slot at `key`) for the features of
  width w now: each feature's own [w, D] from the checkpoint where the feature had width
  w there too, else `fresh`'s (the kernels of a width are in feature order)."""
  narrow = lambda ds: sorted({d for d in ds if d < fresh.shape[-1]}, reverse=True)  # < D
  features = lambda ds, w: [f for f, d in enumerate(ds) if d == w]
  i = int(_PROJECTION.search(key).group(1))
  w = narrow(dims)[i]
  if w not in narrow(saved_dims):
    return fresh
  old = features(saved_dims, w)
  saved = saved_flat.get(_PROJECTION.sub(f"projection/kernels/{narrow(saved_dims).index(w)}",
                                         key))
  if saved is None or np.shape(saved)[1:] != fresh.shape[1:]:
    return fresh
  out = fresh.copy()
  for j, f in enumerate(features(dims, w)):
    if f in old:
      out[j] = np.asarray(saved)[old.index(f)]
  return out


def _collection(config: dict) -> EmbeddingCollection:
  """The tables of a saved config (quotient-remainder pairs and mixed widths included;
  DLRMv4's tables and sequences)."""
  from dlrm_jax.embedding.qr import QRTables

  if config.get("model") == "dlrmv4":
    from ml_collections import ConfigDict

    from dlrm_jax.dlrmv4 import ModelSpec
    from dlrm_jax.task import dlrmv4_collection

    return dlrmv4_collection(ModelSpec.from_config(ConfigDict(config)))

  return EmbeddingCollection(QRTables.from_config(config).table_specs(
      config.get("embedding_pooling", "sum")))
