"""Orbax checkpoints of a training run: save, resume exactly, restore onto another mesh.

A checkpoint is one step directory of an Orbax `CheckpointManager` under
WORKDIR/checkpoints with two items:

  state  the `TrainState` arrays as they are laid out (dense parameters and
         their optax state, the stacked embedding tables of each sharding type
         and their sparse optimiser slots, the step); each process writes only
         the shards it holds, nothing is gathered; a replicated array is
         written whole by its first replica (see `_state_handler`).
  meta   JSON: the config, the sharding plan, the mesh, the data position, the
         seeds, the losses of the unfinished evaluation interval and the
         evaluation records so far; enough to resume bit for bit.

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

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding

from dlrm_jax.config import ConfigError
from dlrm_jax.embedding import EmbeddingCollection
from dlrm_jax.embedding.planner import Placement, Plan
from dlrm_jax.embedding.sharded import plan_groups, stack_rows, unstack_rows

FORMAT_VERSION = 2  # 2: the dense optimiser's state holds no schedule count

# Config fields that define the saved arrays: a checkpoint restores only into
# a config that agrees on all of them (unless a partial restore is asked for).
MODEL_KEYS = ("arch_sparse_feature_size", "arch_mlp_bot", "arch_mlp_top", "arch_embedding_size",
              "arch_interaction_op", "arch_interaction_itself", "embedding_pooling",
              "dense_optimizer", "embedding_optimizer", "data.num_dense_features")


class CheckpointError(RuntimeError):
  """No usable checkpoint: the message says which steps were tried and why they failed."""


class CheckpointMismatchError(ConfigError):
  """The config does not match the checkpoint's; the message lists the differences."""


def plan_to_json(plan: Plan) -> dict:
  """A sharding plan as JSON-friendly values."""
  d = dataclasses.asdict(plan)
  d["placements"] = [[p.kind, p.device] for p in plan.placements]
  return d


def plan_from_json(d: dict) -> Plan:
  """The inverse of `plan_to_json`."""
  d = dict(d)
  d["placements"] = tuple(Placement(kind, int(device)) for kind, device in d["placements"])
  for k in ("table_bytes", "lookups", "dims", "rows", "names"):
    d[k] = tuple(d[k])
  return Plan(**d)


def same_layout(a: Plan, b: Plan) -> bool:
  """Whether two plans store the tables in identical stacked arrays."""
  return (a.num_shards == b.num_shards and tuple(a.placements) == tuple(b.placements)
          and tuple(a.rows) == tuple(b.rows) and tuple(a.dims) == tuple(b.dims))


def _get(config: dict, key: str):
  for part in key.split("."):
    if not isinstance(config, dict) or part not in config:
      return None
    config = config[part]
  return config


def config_differences(saved: dict, config) -> list[str]:
  """The model-defining fields (MODEL_KEYS) on which `config` differs from a saved config."""
  current = json.loads(config.to_json())
  out = []
  for key in MODEL_KEYS:
    a, b = _get(saved, key), _get(current, key)
    if a != b:
      out.append(f"{key}: checkpoint {a!r}, config {b!r}")
  return out


@dataclasses.dataclass
class Restored:
  """A restored training state with its JSON metadata."""

  state: Any  # trainer.TrainState
  meta: dict
  step: int
  partial: bool = False  # parts that did not match the config were left fresh


def _as_dict(state) -> dict:
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's array handling, except that each replicated array is written whole
  by its first replica.

  Orbax's default on CPU splits a replicated array's write between its
  replicas, which slices every array on every device with a freshly compiled
  program: on 4 simulated CPU devices that took 56 s (24 compiles) for six
  small arrays on a 2-core machine, against 3 s written whole
  (benchmarks/checkpoint_replicated.py). The arrays
  replicated here are the dense parameters and the small replicated tables.
  """
  registry = ocp.type_handlers.create_type_handler_registry(
      (int, ocp.type_handlers.ScalarHandler()),
      (float, ocp.type_handlers.ScalarHandler()),
      (np.number, ocp.type_handlers.ScalarHandler()),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class _SavesWithoutMetrics(logging.Filter):
  """Drops Orbax's warning for a save without metrics: saves between evaluations
  (`checkpoint.every_steps`) have none by design."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_SavesWithoutMetrics())


class Checkpointer:
  """An Orbax CheckpointManager for train states: keeps the last `max_to_keep`
  checkpoints and, with `keep_best`, the one with the best evaluation AUC."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, keep_best: bool = True,
               async_save: bool = True, log: Callable[[str], None] | None = None):
    self.directory = os.path.abspath(directory)
    self.log = log or (lambda s: None)
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
        item_handlers={"state": _state_handler(),
                       "meta": ocp.JsonCheckpointHandler()})
    self.last_save_blocked = 0.0

  # Saving ---------------------------------------------------------------------
  def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> bool:
    """Starts an asynchronous save of `state` and `meta` as `step`; False if it exists.

    Returns once the state has been copied to host memory (the time that took
    is `last_save_blocked`); the write goes on in the background.
    """
    if step in self.manager.all_steps():
      return False
    t = time.perf_counter()
    meta = {**meta, "format_version": FORMAT_VERSION, "step": int(step)}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(_as_dict(state)), meta=ocp.args.JsonSave(meta)),
        metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
        force=True)
    self.last_save_blocked = time.perf_counter() - t
    return True

  def delete_all(self) -> None:
    """Deletes every checkpoint (a fresh run in a used directory)."""
    for step in self.steps():
      self.manager.delete(step)

  def wait(self) -> None:
    """Blocks until the saves in flight are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the saves in flight and stops Orbax's background threads."""
    self.manager.close()

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

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, task, config, *, partial: bool = False, step: int | None = None,
              fresh: Callable[[], Any] | None = None) -> Restored | None:
    """The newest checkpoint that restores into `task` (None when there is none).

    A checkpoint that cannot be read is reported through `log`, moved aside
    (renamed `STEP.damaged`) and the previous one is tried. A config whose
    model fields differ from the checkpoint's raises CheckpointMismatchError,
    unless `partial`: then the arrays whose shapes match are restored and the
    others come from `fresh()` (a fresh train state).
    """
    steps = [step] if step is not None else self.steps()[::-1]
    failures = []
    for s in steps:
      try:
        meta = self.read_meta(s)
      except Exception as e:  # a damaged or foreign step directory
        failures.append(self._damaged(s, e))
        continue
      if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{self.directory}/{s}: checkpoint format version "
                              f"{meta.get('format_version')!r}, this code reads {FORMAT_VERSION}")
      diffs = config_differences(meta["config"], config)
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
          saved = self._read(s, self._targets(s, task, meta))
      except Exception as e:
        failures.append(self._damaged(s, e))
        continue
      if diffs:
        state = self._partial_state(saved, task, meta, fresh())
      else:
        state = self._state(saved, task, meta)
      return Restored(state=state, meta=meta, step=s, partial=bool(diffs))
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

  def _targets(self, step: int, task, meta: dict) -> dict:
    """Restore targets: `task`'s shardings, or for tables of another layout, the host."""
    target = _as_dict(task.abstract_state())
    if same_layout(plan_from_json(meta["plan"]), task.plan):
      return target
    return {**target, **self._host_targets(step, ("tables", "emb_opt_state"))}

  def _state(self, saved: dict, task, meta: dict):
    """The train state from arrays read with `_targets` (re-laying out tables if needed)."""
    from dlrm_jax.trainer import TrainState

    saved_plan = plan_from_json(meta["plan"])
    if not same_layout(saved_plan, task.plan):
      saved["tables"], saved["emb_opt_state"] = relayout(
          _collection(meta), saved_plan, task, saved["tables"], saved["emb_opt_state"])
    return TrainState(**saved)

  def _partial_state(self, saved: dict, task, meta: dict, fresh):
    """Dense arrays whose path and shape match `fresh`'s and tables whose shape
    matches; everything else (and the sparse optimiser slots) as in `fresh`."""
    from dlrm_jax.trainer import TrainState

    out = {"step": jax.device_put(np.asarray(saved["step"], np.int32), fresh.step.sharding),
           "emb_opt_state": fresh.emb_opt_state}
    for name in ("params", "opt_state"):
      saved_flat = {_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(saved[name])[0]}

      def pick(path, leaf):
        v = saved_flat.get(_key(path))
        if v is None or np.shape(v) != leaf.shape:
          return leaf
        return jax.device_put(np.asarray(v, leaf.dtype), leaf.sharding)

      out[name] = jax.tree_util.tree_map_with_path(pick, getattr(fresh, name))
    old = plan_groups(_collection(meta), plan_from_json(meta["plan"]))
    new_tables = task.embedding.to_arrays(fresh.tables)
    for t, a in enumerate(unstack_rows(old, saved["tables"])):
      if t < len(new_tables) and a.shape == new_tables[t].shape:
        new_tables[t] = a
    out["tables"] = task.embedding.from_arrays(new_tables)
    return TrainState(**out)

  def _host_targets(self, step: int, names) -> dict:
    """Restore targets on this host's first device for the saved arrays of `names`."""
    tree = self.manager.item_metadata(step)["state"]
    tree = getattr(tree, "tree", tree)
    device = SingleDeviceSharding(jax.local_devices()[0])
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


def _collection(meta: dict) -> EmbeddingCollection:
  config = meta["config"]
  rows = [int(r) for r in str(config["arch_embedding_size"]).split("-")]
  return EmbeddingCollection.uniform(rows, int(config["arch_sparse_feature_size"]),
                                     config.get("embedding_pooling", "sum"))


def relayout(collection: EmbeddingCollection, saved_plan: Plan, task, tables: dict,
             slots: dict) -> tuple[dict, dict]:
  """Tables and sparse optimiser slots stored by `saved_plan` -> `task`'s layout, placed."""
  old = plan_groups(collection, saved_plan)
  new = task.embedding.groups
  target = task.abstract_state()
  per_table = unstack_rows(old, {k: np.asarray(v) for k, v in tables.items()})
  new_tables = stack_rows(new, per_table, {k: v.shape for k, v in target.tables.items()})
  placed_tables = {k: jax.device_put(v, target.tables[k].sharding) for k, v in new_tables.items()}
  placed_slots = {}
  any_group = next(iter(slots.values())) if slots else {}
  for leaf_name in (any_group or {}):
    per_table = unstack_rows(old, {k: np.asarray(v[leaf_name]) for k, v in slots.items()})
    stacked = stack_rows(new, per_table,
                         {k: v[leaf_name].shape for k, v in target.emb_opt_state.items()})
    for k, v in stacked.items():
      placed_slots.setdefault(k, {})[leaf_name] = jax.device_put(
          v, target.emb_opt_state[k][leaf_name].sharding)
  if not placed_slots:
    placed_slots = {k: {} for k in new}
  return placed_tables, placed_slots
