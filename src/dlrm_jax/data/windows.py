"""DLRMv4's data source: a prepared listening log streamed in time windows.

`WindowedEvents` serves the anchors of a prepared directory (`dlrm_jax.data.yambda`)
as the trainer's batches (`dlrm_jax.data.source.DataSource`): the train split is the
train windows' anchors, window after window in time order and, within a window, in
the reference's streaming order (`window_batch_anchors`: user-major, full
batches only); an epoch is one pass over them. The eval split is the eval windows'
anchors, all of them (the last batch partial). Batch `k` of the train stream is a
function of `k` and the process count alone, so a run resumes mid-window.

A batch is flat, as `dlrm_jax.dlrmv4.BATCH_KEYS` lists: "sparse" [B, 11] int32 (the
candidate's item, artist and album, the uid and the 7 crosses: the pooled features,
in `dlrmv4.POOLED` order), "history_{item,artist,album,action,timestamp}" [B, L]
int32, "history_length" [B] int32, "query_time" [B] int32 and "label" [B] float32.
Eval batches of a synthetic log also carry the generator's hidden listen-plus
probability (`evaluation.TEACHER`), the best any model can reach.

`synthetic_log(path, spec, ...)` generates a synthetic log (`dlrm_jax.data.event_log`)
into PATH/raw, prepares it into PATH/prepared and keeps the hidden probabilities in
PATH/p_plus.npy; the same spec at the same path reuses them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Iterator, Sequence

import numpy as np

from dlrm_jax import metrics as metrics_lib
from dlrm_jax.config import ConfigError
from dlrm_jax.data import yambda
from dlrm_jax.data.anchors import PreparedEvents, window_batch_anchors
from dlrm_jax.data.event_log import EventLog, EventLogSpec, listen_plus_rates
from dlrm_jax.data.format import FormatError, write_json_atomic
from dlrm_jax.data.source import Batch
from dlrm_jax.evaluation import TEACHER

HISTORY_FIELDS = ("item", "artist", "album", "action", "timestamp")
POPULARITY_MAX_EVENTS = 100_000_000  # a larger log gets no popularity baseline (one pass)


@dataclasses.dataclass(frozen=True)
class Windows:
  """Which windows a run trains on and evaluates on: train `first`, ..., `first +
  num_train - 1` in order, evaluate on `eval_first`, ..., `eval_first + eval_count - 1`."""

  first: int
  num_train: int
  eval_first: int
  eval_count: int

  @classmethod
  def resolve(cls, num_windows: int, first: int, num_train: int, eval_window: int,
              eval_count: int) -> "Windows":
    """The windows of a log of `num_windows`: `num_train` 0 trains on every window from
    `first` to the eval windows; `eval_window` -1 evaluates on the last `eval_count`.
    ValueError for windows the log does not have."""
    if eval_count < 1:
      raise ValueError(f"eval_num_windows={eval_count} must be >= 1")
    if eval_window < -1:
      raise ValueError(f"eval_window={eval_window} is not a window (-1: the last)")
    eval_first = num_windows - eval_count if eval_window == -1 else eval_window
    if num_train <= 0:
      if eval_first <= first:
        raise ValueError(f"num_train_windows=0 trains on the windows from first_window="
                         f"{first} to the eval windows, but those start at {eval_first}")
      num_train = eval_first - first
    out = cls(first, num_train, eval_first, eval_count)
    if eval_first < 0 or eval_first + eval_count > num_windows:
      raise ValueError(f"eval windows {out.describe_eval()} are not within the log's "
                       f"{num_windows} windows (0 to {num_windows - 1})")
    if first < 0 or num_train < 1 or first + num_train > num_windows:
      raise ValueError(f"train windows {out.describe_train()} are not within the log's "
                       f"{num_windows} windows (0 to {num_windows - 1})")
    if eval_first < first + num_train and first < eval_first + eval_count:
      raise ValueError(f"the train windows {out.describe_train()} and the eval windows "
                       f"{out.describe_eval()} overlap")
    return out

  @property
  def train(self) -> range:
    return range(self.first, self.first + self.num_train)

  @property
  def eval(self) -> range:
    return range(self.eval_first, self.eval_first + self.eval_count)

  def describe_train(self) -> str:
    return _span(self.train)

  def describe_eval(self) -> str:
    return _span(self.eval)


def _span(r: range) -> str:
  return str(r.start) if len(r) == 1 else f"{r.start} to {r.stop - 1}"


class WindowedEvents:
  """The trainer's data source over a prepared directory (see the module docstring).

  `batch_size` is the global batch; in a multi-process run each process builds its
  `batch_size / process_count` rows (`process_local`)."""

  process_local = True

  def __init__(self, prepared: PreparedEvents, batch_size: int, windows: Windows, *,
               history_length: int, scan_window: int, cross_sizes: Sequence[int],
               p_plus: np.ndarray | None = None, process_index: int = 0,
               process_count: int = 1):
    if batch_size % process_count:
      raise ValueError(f"batch {batch_size} is not a multiple of {process_count} processes")
    self.prepared, self.windows, self.batch_size = prepared, windows, batch_size
    self.sample_options = dict(history_length=history_length, scan_window=scan_window,
                               cross_sizes=tuple(cross_sizes))
    self.p_plus = p_plus
    self.process_index, self.process_count = process_index, process_count
    # Held apart, so that the train stream's window stays PreparedEvents' cached one.
    self._eval_anchors = np.concatenate([prepared.window_anchors(w) for w in windows.eval])
    self._train_offsets = {}  # batch size -> each train window's first batch, and the total

  # Counts ---------------------------------------------------------------------------
  def num_rows(self, split: str) -> int:
    """Anchors of the split (train: every full global batch's, as trained)."""
    if split == "eval":
      return len(self._eval_anchors)
    return self.num_batches("train", self.batch_size) * self.batch_size

  def train_anchors(self) -> int:
    """Every anchor of the train windows (`num_rows("train")` counts those of full
    batches, as trained): MLPerf DLRMv4's train_samples."""
    counts = self.prepared.metadata["anchors_per_window"]
    return sum(int(counts[w]) for w in self.windows.train)

  def num_batches(self, split: str = "train", batch_size: int | None = None) -> int:
    """Global batches of the split: train, full ones per window; eval, the last partial."""
    b = batch_size or self.batch_size
    if split == "eval":
      return -(-len(self._eval_anchors) // b)
    return int(self._offsets(b)[-1])

  def _offsets(self, batch_size: int) -> np.ndarray:
    """The first global batch of each train window, then the total (from the metadata's
    counts: `window_batch_anchors`' full batches of each process)."""
    if batch_size not in self._train_offsets:
      per_process, p = batch_size // self.process_count, self.process_count
      per_window = self.prepared.metadata["anchors_per_window"]
      counts = [int(per_window[w]) // p // per_process for w in self.windows.train]
      self._train_offsets[batch_size] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return self._train_offsets[batch_size]

  # Batches --------------------------------------------------------------------------
  def batch(self, index: int, split: str = "train", batch_size: int | None = None) -> Batch:
    """This process's rows of global batch `index` of `split` (train: epochs repeat)."""
    b = batch_size or self.batch_size
    per_process = b // self.process_count
    if split == "eval":
      if not 0 <= index < self.num_batches("eval", b):
        raise IndexError(f"eval batch {index} of {self.num_batches('eval', b)}")
      # This process's share of the global batch: none in a last batch of fewer rows
      # than processes (the evaluation pads it).
      mine = self._eval_anchors[self.process_index::self.process_count]
      return self._batch(mine[index * per_process:(index + 1) * per_process], teacher=True)
    offsets = self._offsets(b)
    if offsets[-1] == 0:
      raise ValueError(f"the train windows {self.windows.describe_train()} hold no full batch "
                       f"of {b}")
    step = index % int(offsets[-1])
    w = int(np.searchsorted(offsets, step, side="right")) - 1
    window = self.windows.train[w]
    anchors = window_batch_anchors(self.prepared.window_anchors(window), per_process,
                                   step - int(offsets[w]), self.process_index,
                                   self.process_count)
    return self._batch(anchors)

  def _batch(self, anchors: np.ndarray, teacher: bool = False) -> Batch:
    s = self.prepared.samples(anchors, **self.sample_options)
    out = {"sparse": np.concatenate(
        [np.stack([s["candidate_item"], s["candidate_artist"], s["candidate_album"]], axis=1),
         s["contextual"]], axis=1).astype(np.int32)}
    for k in HISTORY_FIELDS:
      out[f"history_{k}"] = s[f"history_{k}"].astype(np.int32)
    out["history_length"] = s["history_length"].astype(np.int32)
    out["query_time"] = s["query_time"].astype(np.int32)
    out["label"] = s["label"]
    if teacher and self.p_plus is not None:
      out[TEACHER] = self.p_plus[anchors].astype(np.float32)
    return out

  def batches(self, start: int = 0, split: str = "train",
              batch_size: int | None = None) -> "Stream":
    return Stream(self, start, batch_size or self.batch_size)

  # Baselines ------------------------------------------------------------------------
  def teacher_probability(self, batch: Batch) -> np.ndarray | None:
    """The generator's hidden listen-plus probability of each eval sample (synthetic
    logs only; None otherwise)."""
    return batch.get(TEACHER)

  def popularity_auc(self) -> float | None:
    """The eval AUC of each candidate item's listen-plus rate over the listens before
    the eval windows (`event_log.listen_plus_rates`):
    what a model without the user's history reaches. None for a log of more than
    POPULARITY_MAX_EVENTS events (not computed: a pass over every event)."""
    e, meta = self.prepared.events, self.prepared.metadata
    if meta["events"] > POPULARITY_MAX_EVENTS or not len(self._eval_anchors):
      return None
    start = meta["anchor_t_min"] + self.windows.eval_first * meta["options"]["window_seconds"]
    action, ts, item = (np.asarray(e[k]) for k in ("action", "timestamp", "item"))
    listen = ((action & (yambda.LP_BIT | yambda.SKIP_BIT)) != 0) & (ts < start)
    plus = (action[listen] & yambda.LP_BIT) != 0
    rate = listen_plus_rates(item[listen], plus, int(item.max()) + 1)
    labels = ((action[self._eval_anchors] & yambda.LP_BIT) != 0).astype(np.float32)
    return metrics_lib.roc_auc(labels, rate[item[self._eval_anchors]])


class Stream:
  """The train batches from a position on; a checkpoint keeps the position (a global
  batch number) with what it depends on (`state_at`)."""

  def __init__(self, data: WindowedEvents, start: int, batch_size: int):
    self.data, self.position, self.batch_size = data, start, batch_size

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    batch = self.data.batch(self.position, "train", self.batch_size)
    self.position += 1
    return batch

  def state_at(self, position: int) -> dict:
    """The position and what it means: the batch, the processes that split it, the
    train windows and the log's anchors."""
    d = self.data
    return {"batch": position, "batch_size": self.batch_size,
            "process_count": d.process_count, "first_window": d.windows.first,
            "num_train_windows": d.windows.num_train,
            "anchors": int(d.prepared.metadata["anchors"])}

  def restore(self, state: dict) -> None:
    mine = self.state_at(state.get("batch", 0))
    if {k: state.get(k) for k in mine} != mine:
      raise ValueError(f"the checkpoint's data position {state} is of other windows, another "
                       f"batch size, process count or log than this run's ({mine})")
    self.position = int(state["batch"])


def synthetic_log(path: str, spec: EventLogSpec, *, min_history: int, window_seconds: int,
                  log=print) -> tuple[PreparedEvents, np.ndarray]:
  """A synthetic log generated by `spec`, prepared with these options under PATH (made
  on first use: PATH/raw, PATH/prepared, PATH/p_plus.npy, PATH/generator.json), and
  its hidden listen-plus probabilities, one per event. FormatError where PATH holds
  another spec's log or options, or other files.

  It is made in a directory beside PATH and renamed to PATH when finished, so that a
  run cut short leaves no half-made PATH and processes that make it at once keep the
  first one finished."""
  settings = {"generator": dataclasses.asdict(spec), "min_history": min_history,
              "window_seconds": window_seconds}
  if not _finished(path, settings):
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
      raise FormatError(f"{path} is not empty and holds no synthetic log; choose another "
                        "data.path")
    log(f"generating a synthetic listening log into {path} ({spec.num_users:,} users, "
        f"{spec.num_items:,} items)")
    work = f"{os.path.abspath(path)}.making-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    generated = EventLog(spec)
    generated.write(os.path.join(work, "raw"))
    yambda.prepare(os.path.join(work, "raw"), os.path.join(work, "prepared"),
                   min_history=min_history, window_seconds=window_seconds,
                   log=lambda m: log(m.replace(work, path)))  # where it will be
    np.save(os.path.join(work, "p_plus.npy"), generated.events["p_plus"].astype(np.float32))
    write_json_atomic(os.path.join(work, "generator.json"), settings)
    try:
      if os.path.isdir(path):
        os.rmdir(path)  # empty
      os.rename(work, path)
    except OSError:  # another process finished first: its log is this one
      shutil.rmtree(work, ignore_errors=True)
      if not _finished(path, settings):
        raise
  return PreparedEvents(os.path.join(path, "prepared")), np.load(
      os.path.join(path, "p_plus.npy"))


def _finished(path: str, settings: dict) -> bool:
  """Whether PATH holds a finished synthetic log of these settings; FormatError where it
  holds one of others."""
  marker = os.path.join(path, "generator.json")
  if not os.path.exists(marker):
    return False
  with open(marker) as f:
    found = json.load(f)
  if found != settings:
    changed = sorted(k for k in set(found["generator"]) | set(settings["generator"])
                     if found["generator"].get(k) != settings["generator"].get(k))
    changed += [k for k in ("min_history", "window_seconds") if found[k] != settings[k]]
    raise FormatError(f"{path} holds a synthetic log made with other settings (it differs "
                      f"in {', '.join(changed)}); choose another data.path")
  return True


# The run's side ----------------------------------------------------------------------
def _generator(data) -> tuple[EventLogSpec, int, int]:
  """The synthetic log's spec (`data.event_log`, seeded by `data.seed`) and its
  preparation's min_history and window_seconds."""
  knobs = dict(data.event_log)
  min_history, window = int(knobs.pop("min_history")), int(knobs.pop("window_seconds"))
  fields = {f.name: f for f in dataclasses.fields(EventLogSpec) if f.name != "seed"}
  unknown = sorted(set(knobs) - set(fields))
  if unknown:
    raise ConfigError(f"data.event_log.{unknown[0]} is not a knob of the synthetic log "
                      f"(dlrm_jax.data.event_log.EventLogSpec: {', '.join(fields)}; its seed "
                      "is data.seed)")
  try:
    spec = EventLogSpec(**{k: type(getattr(EventLogSpec, k))(v) for k, v in knobs.items()},
                        seed=data.seed)
  except ValueError as e:
    raise ConfigError(f"data.event_log: {e}") from None
  return spec, min_history, window


def open_data(data, log=print) -> tuple[PreparedEvents, np.ndarray | None]:
  """The prepared log of `data` (a `DataSpec`): a synthetic one made on first use in
  data.path (`event_log`), or the prepared directory data.path (`yambda`); with the
  hidden probabilities of a synthetic one. ConfigError where it cannot be opened."""
  if not data.path:
    raise ConfigError(f"data.kind={data.kind!r} needs data.path: "
                      + ("the directory to keep the synthetic log in" if data.kind == "event_log"
                         else "a directory prepared by python -m dlrm_jax.data.yambda prepare"))
  try:
    if data.kind == "event_log":
      spec, min_history, window = _generator(data)
      return synthetic_log(data.path, spec, min_history=min_history, window_seconds=window,
                           log=log)
    return PreparedEvents(data.path), None
  except FormatError as e:
    raise ConfigError(f"data.path={data.path!r}: {e}") from None


def table_rows(prepared: PreparedEvents) -> dict[str, int]:
  """The rows each entity's table needs: its largest id in the log + 1."""
  found = prepared.metadata.get("max_ids")
  if found is None:
    raise ConfigError(f"{prepared.path} was prepared before its metadata recorded the largest "
                      "ids: prepare it again, or give every dlrmv4.*_rows")
  return {k: int(v) + 1 for k, v in found.items()}


def configure(config, data):
  """`config` with DLRMv4's tables sized from the data where their rows are 0 and
  `test_num_batches` made every eval anchor's batches where it is <= 0 or more than
  those (data.kind 'event_log' makes its log here, on first use)."""
  prepared, _ = open_data(data)
  new = config.copy_and_resolve_references()
  needed = table_rows(prepared) if any(
      int(config.dlrmv4[f"{k}_rows"]) == 0 for k in ("item", "artist", "album", "uid")) else {}
  for k in ("item", "artist", "album", "uid"):
    if int(config.dlrmv4[f"{k}_rows"]) == 0:
      new.dlrmv4[f"{k}_rows"] = needed[k]
  w = _windows(prepared, data)
  rows = sum(int(prepared.metadata["anchors_per_window"][i]) for i in w.eval)
  every = max(1, -(-rows // int(new.test_mini_batch_size)))  # all the eval anchors' batches
  if not 0 < int(new.test_num_batches) <= every:
    new.test_num_batches = every
  return new


def _windows(prepared: PreparedEvents, data) -> Windows:
  try:
    return Windows.resolve(prepared.num_windows, data.first_window, data.num_train_windows,
                           data.eval_window, data.eval_num_windows)
  except ValueError as e:
    raise ConfigError(f"data: {e}") from None


def make(run) -> WindowedEvents:
  """The run's data source: its prepared log in its windows, the tables checked to hold
  the log's ids."""
  import jax

  data, spec = run.data, run.model
  prepared, p_plus = open_data(data)
  latest = prepared.metadata.get("anchor_t_max") or 0
  if latest >= 2**31:  # every history event is before its anchor
    raise ConfigError(f"{data.path}: timestamps up to {latest:,} s do not fit the int32 "
                      "batches (JAX's default): shift the log's timestamps to start near 0 "
                      "(only differences matter)")
  found = prepared.metadata.get("max_ids")
  if found is not None:
    rows = dict(zip(("item", "artist", "album", "uid"), spec.table_rows))
    small = [(k, rows[k], int(found[k]) + 1) for k in rows if rows[k] <= int(found[k])]
    if small:
      name, have, need = small[0]
      raise ConfigError(f"dlrmv4.{name}_rows={have:,}, but {data.path} has {name} ids up to "
                        f"{need - 1:,}: set it to at least {need:,} (0 sizes it from the data)")
  return WindowedEvents(
      prepared, run.training.mini_batch_size, _windows(prepared, data),
      history_length=spec.history_length, scan_window=spec.scan_window,
      cross_sizes=spec.cross_rows, p_plus=p_plus, process_index=jax.process_index(),
      process_count=jax.process_count())
