"""DLRMv4's data: a listening log in Yambda's layout -> anchors with their histories,
in daily windows (docs/dlrmv4.md, "Data preparation"; the rules are those of
docs/dlrmv4_reference.md, section 1).

`prepare(input_root, output)` reads `multi_event.parquet` (uid, item_id, timestamp,
event_type, played_ratio_pct, and is_organic where present) and the album and artist
mappings of the items, as Yambda lays them out (`flat[/<size>]/multi_event.parquet`
beside `album_item_mapping.parquet` and `artist_item_mapping.parquet`; the synthetic
`dlrm_jax.data.event_log.EventLog.write` writes the same), and writes a prepared
directory of .npy files:

- per event, in the input's (uid, timestamp) order: `uid`, `item`, `artist`, `album`,
  `timestamp` (seconds, as given), `action` (the bitmask LP=1 for a listen played
  >= 50%, LIKE=2 for a like, SKIP=4 for any other listen, a missing ratio included;
  0 for dislikes, unlikes and undislikes, which are in no pool) and `is_organic`;
- per user: `users` (the uid values, ascending), `user_start` and `user_end` (the
  users' events are `[user_start, user_end)`);
- the anchors: `anchors` (the flat index of every listen with at least `min_history`
  earlier events of its user, ascending), `anchor_timestamp` and `anchor_window` (its
  daily window: `(timestamp - t_min) // window_seconds`, where t_min is the earliest
  anchor's timestamp);
- `metadata.json`: the counts (events, users, anchors, windows, anchors per window),
  the options and the sources with their sizes. It is written last: a directory
  with it is finished.

What scales: the log is read in record batches (`batch_rows` rows at a time) and each
column is appended to its file, so memory follows the batch, not the log; the order
is checked across batches, not sorted (a log out of (uid, timestamp) order is an
error). What does not: the item -> artist and item -> album maps are held whole (an
array per map of the largest item id + 1 entries: about 75 MB each for Yambda's
9.4 M items), and so are the per-user offsets and, while the windows are computed,
the anchors' timestamps (8 bytes an anchor: about 18 GB for the 5b log's 2.3 B
anchors).

`dlrm_jax.data.anchors.PreparedEvents(path)` opens a prepared directory and builds
the anchors' samples.

The command line: `python -m dlrm_jax.data.yambda {prepare,info}` (see `main`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

import numpy as np

from dlrm_jax.data import commands
from dlrm_jax.data import format as fmt

FORMAT_NAME = "dlrmv4_events"
FORMAT_VERSION = 1
EVENT_TYPES = ("listen", "like", "dislike", "unlike", "undislike")  # integer codes 0..4
LISTEN, LIKE = 0, 1
LISTEN_PLUS_PCT = 50
LP_BIT, LIKE_BIT, SKIP_BIT = 1, 2, 4
POOLS = (LP_BIT, LIKE_BIT, SKIP_BIT)
DAY_S = 86_400
REQUIRED = ("uid", "item_id", "timestamp", "event_type", "played_ratio_pct")
# Per-event columns of a prepared directory and their types.
EVENT_COLUMNS = {"uid": np.uint32, "item": np.uint32, "artist": np.uint32, "album": np.uint32,
                 "timestamp": np.int64, "action": np.uint8, "is_organic": np.uint8}
# Every .npy file of a prepared directory.
_FILES = tuple(EVENT_COLUMNS) + ("users", "user_start", "user_end", "anchors",
                                 "anchor_timestamp", "anchor_window")


class InputError(ValueError):
  """The raw log or its mappings cannot be prepared; the message says why."""


# Preparation ------------------------------------------------------------------------
def find_inputs(root: str, size: str | None = None) -> dict[str, str]:
  """The paths of the events and the two mappings under ROOT (Yambda's layout):
  `flat/<size>/multi_event.parquet` with `size`, else `flat/multi_event.parquet`."""
  if not os.path.isdir(root):
    raise InputError(f"{root}: no such directory")
  flat = os.path.join(root, "flat")
  events = os.path.join(flat, size, "multi_event.parquet") if size else os.path.join(
      flat, "multi_event.parquet")
  if not os.path.isfile(events):
    sizes = sorted(d for d in (os.listdir(flat) if os.path.isdir(flat) else [])
                   if os.path.isfile(os.path.join(flat, d, "multi_event.parquet")))
    if sizes and not size:
      raise InputError(f"{flat} holds the sizes {', '.join(sizes)}: choose one with --size")
    raise InputError(f"{events}: no such file")
  paths = {"events": events}
  for name in ("album", "artist"):
    paths[name] = os.path.join(root, f"{name}_item_mapping.parquet")
    if not os.path.isfile(paths[name]):
      raise InputError(f"{paths[name]}: no such file")
  return paths


def prepare(input_root: str, output: str, *, min_history: int = 4086,
            window_seconds: int = DAY_S, size: str | None = None, batch_rows: int = 1 << 20,
            log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
  """Prepares the log under INPUT_ROOT into OUTPUT (see the module docstring); returns
  the metadata. Rerun on a finished OUTPUT with the same options, it does nothing; with
  others it raises FormatError. An unfinished OUTPUT (no metadata.json) is prepared
  again from the start."""
  if min_history < 0:
    raise ValueError(f"min_history={min_history} must be >= 0")
  if window_seconds < 1:
    raise ValueError(f"window_seconds={window_seconds} must be >= 1")
  paths = find_inputs(input_root, size)
  options = {"input": os.path.abspath(paths["events"]), "min_history": min_history,
             "window_seconds": window_seconds}
  meta_path = os.path.join(output, fmt.METADATA_FILE)
  if os.path.exists(output) and not os.path.isdir(output):
    raise fmt.FormatError(f"{output} is a file, not a directory; choose a new --output")
  if os.path.exists(meta_path):
    meta = read_metadata(output)
    if meta["options"] == options:
      log(f"{output} is already prepared with these options.")
      return meta
    changed = ", ".join(f"{k}: {meta['options'].get(k)!r} before, {v!r} now"
                        for k, v in options.items() if meta["options"].get(k) != v)
    raise fmt.FormatError(f"{output} already holds data prepared with other options "
                          f"({changed}); choose a new --output")
  os.makedirs(output, exist_ok=True)
  ours = ({f"{n}.npy" for n in _FILES} | {f"{n}.npy.tmp" for n in _FILES}
          | {fmt.METADATA_FILE + ".tmp"})  # a write of the metadata cut short
  foreign = sorted(set(os.listdir(output)) - ours)
  if foreign:
    raise fmt.FormatError(f"{output} is not empty ({foreign[0]}, ...) and is no unfinished "
                          "preparation; choose an empty or new --output")
  artist, album = (_read_mapping(paths[n], n) for n in ("artist", "album"))
  counts = _write_events(paths["events"], output, artist, album, min_history, batch_rows)
  counts.update(_write_windows(output, window_seconds))
  meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "options": options,
          "sources": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)}
                      for p in paths.values()], **counts}
  fmt.write_json_atomic(meta_path, meta)
  log(f"{output}: {counts['events']:,} events of {counts['users']:,} users, "
      f"{counts['anchors']:,} anchors in {counts['windows']} windows")
  return meta


def _read_mapping(path: str, name: str) -> np.ndarray:
  """item -> `name`_id as a dense array (0 for items the file does not list)."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  column = f"{name}_id"
  try:
    table = pq.read_table(path)
  except (OSError, pa.ArrowException) as e:
    raise InputError(f"{path}: not a readable parquet file ({e})") from None
  for c in ("item_id", column):
    if c not in table.column_names:
      raise InputError(f"{path}: no column {c!r} (it has {', '.join(table.column_names)})")
    if not pa.types.is_integer(table.schema.field(c).type):
      raise InputError(f"{path}: column {c!r} is {table.schema.field(c).type}, not integers")
  items = table.column("item_id").to_numpy().astype(np.int64)
  ids = table.column(column).to_numpy().astype(np.int64)
  if len(items) and (min(items.min(), ids.min()) < 0 or max(items.max(), ids.max()) >= 2**32):
    raise InputError(f"{path}: ids outside [0, 2**32)")
  out = np.zeros(int(items.max()) + 1 if len(items) else 0, np.uint32)
  out[items] = ids
  return out


def _check_schema(path: str, schema) -> None:
  import pyarrow as pa

  missing = [c for c in REQUIRED if c not in schema.names]
  if missing:
    raise InputError(f"{path}: no column {missing[0]!r} (it has {', '.join(schema.names)})")
  for c in REQUIRED + (("is_organic",) if "is_organic" in schema.names else ()):
    t = schema.field(c).type
    if c == "event_type":
      t = t.value_type if pa.types.is_dictionary(t) else t
      if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
        raise InputError(f"{path}: column 'event_type' is {schema.field(c).type}, not strings "
                         f"({', '.join(EVENT_TYPES)}) or their codes 0..4")
    elif not pa.types.is_integer(t) and not (c == "played_ratio_pct" and pa.types.is_floating(t)):
      raise InputError(f"{path}: column {c!r} is {t}, not integers")


def _event_codes(path: str, column) -> np.ndarray:
  """event_type as codes 0..4 (EVENT_TYPES' order), from strings or codes."""
  import pyarrow as pa
  import pyarrow.compute as pc

  if pa.types.is_dictionary(column.type):
    column = column.cast(column.type.value_type)
  index = column if pa.types.is_integer(column.type) else pc.index_in(
      column, pa.array(EVENT_TYPES))  # null for other strings
  codes = np.where(index.is_null().to_numpy(zero_copy_only=False), -1,
                   index.fill_null(0).to_numpy().astype(np.int64))
  bad = np.flatnonzero((codes < 0) | (codes >= len(EVENT_TYPES)))
  if len(bad):
    raise InputError(f"{path}: event_type {column[int(bad[0])].as_py()!r} is none of "
                     f"{', '.join(EVENT_TYPES)}")
  return codes


def _actions(path: str, col: dict) -> tuple[np.ndarray, np.ndarray]:
  """A record batch's listens and action bitmasks: LP_BIT for a listen played >= 50%,
  SKIP_BIT for any other (a missing ratio counts as 0), LIKE_BIT for a like, 0 else."""
  etype = _event_codes(path, col["event_type"])
  pct = col["played_ratio_pct"].fill_null(0).to_numpy()
  pct = np.nan_to_num(pct.astype(np.float64), nan=0.0)
  listen = etype == LISTEN
  action = np.where(listen, np.where(pct >= LISTEN_PLUS_PCT, LP_BIT, SKIP_BIT),
                    np.where(etype == LIKE, LIKE_BIT, 0)).astype(np.uint8)
  return listen, action


def _write_events(path: str, output: str, artist: np.ndarray, album: np.ndarray,
                  min_history: int, batch_rows: int) -> dict:
  """One pass over the log in record batches: the per-event columns, the users' offsets
  and the anchors (with their timestamps), each appended to its file."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  try:
    source = pq.ParquetFile(path)
  except (OSError, pa.ArrowException) as e:
    raise InputError(f"{path}: not a readable parquet file ({e})") from None
  schema = source.schema_arrow
  _check_schema(path, schema)
  has_organic = "is_organic" in schema.names
  files = {n: fmt.NpyAppender(os.path.join(output, f"{n}.npy"), d)
           for n, d in EVENT_COLUMNS.items()}
  files.update((n, fmt.NpyAppender(os.path.join(output, f"{n}.npy"), np.int64))
               for n in ("users", "user_start", "anchors", "anchor_timestamp"))
  pools = np.zeros(8, np.int64)
  largest = {"uid": -1, "item": -1}
  row, last_uid, last_ts, user_start = 0, -1, -1, 0
  try:
    for batch in source.iter_batches(batch_size=batch_rows,
                                     columns=list(REQUIRED) + ["is_organic"] * has_organic):
      n = batch.num_rows
      col = dict(zip(batch.schema.names, batch.columns))
      for c in ("uid", "item_id", "timestamp"):
        if col[c].null_count:
          raise InputError(f"{path}: column {c!r} has missing values")
      uid = col["uid"].to_numpy().astype(np.int64)
      ts = col["timestamp"].to_numpy().astype(np.int64)
      item = col["item_id"].to_numpy().astype(np.int64)
      if n and (min(uid.min(), item.min()) < 0 or max(uid.max(), item.max()) >= 2**32):
        raise InputError(f"{path}: uid or item_id outside [0, 2**32)")
      # (uid, timestamp) order, within the batch and across its start.
      prev_uid = np.concatenate([[last_uid], uid[:-1]])
      prev_ts = np.concatenate([[last_ts], ts[:-1]])
      bad = np.flatnonzero((uid < prev_uid) | ((uid == prev_uid) & (ts < prev_ts)))
      if len(bad):
        i = int(bad[0])
        raise InputError(f"{path}: rows are not in (uid, timestamp) order at row {row + i:,} "
                         f"(uid {uid[i]} at {ts[i]} s after uid {prev_uid[i]} at "
                         f"{prev_ts[i]} s); sort the log by uid, then timestamp")
      listen, action = _actions(path, col)
      pools += np.bincount(action, minlength=8)
      for name, values in (("uid", uid), ("item", item)):
        largest[name] = max(largest[name], int(values.max()) if n else -1)
      organic = (col["is_organic"].fill_null(0).to_numpy() if has_organic
                 else np.zeros(n, np.uint8))
      # Users: each uid's first row starts it; each event's index within its user.
      new = np.flatnonzero(uid != prev_uid)
      starts = np.concatenate([[user_start], row + new])
      position = row + np.arange(n) - starts[np.searchsorted(new, np.arange(n), side="right")]
      anchor = listen & (position >= min_history)
      files["users"].append(uid[new])
      files["user_start"].append(row + new)
      files["anchors"].append(row + np.flatnonzero(anchor))
      files["anchor_timestamp"].append(ts[anchor])
      for name, values in (("uid", uid), ("item", item), ("timestamp", ts),
                           ("artist", _lookup(artist, item)), ("album", _lookup(album, item)),
                           ("action", action), ("is_organic", organic)):
        files[name].append(values)
      if n:
        row, last_uid, last_ts, user_start = row + n, int(uid[-1]), int(ts[-1]), int(starts[-1])
  except BaseException:
    for f in files.values():
      f.abort()
    raise
  for f in files.values():
    f.close()
  starts = np.load(os.path.join(output, "user_start.npy"))
  _save(output, "user_end", np.append(starts[1:], row)[:len(starts)].astype(np.int64))
  largest["artist"] = int(artist.max()) if len(artist) else 0
  largest["album"] = int(album.max()) if len(album) else 0
  return {"events": row, "users": len(starts), "anchors": files["anchors"].rows,
          "max_ids": largest,
          "has_is_organic": has_organic, "items_in_mappings": {"artist": len(artist),
                                                               "album": len(album)},
          "pools": {"listen_plus": int(pools[LP_BIT]), "like": int(pools[LIKE_BIT]),
                    "skip": int(pools[SKIP_BIT]), "none": int(pools[0])}}


def _lookup(table: np.ndarray, item: np.ndarray) -> np.ndarray:
  """table[item], 0 for items beyond the table (as for items a mapping does not list)."""
  inside = item < len(table)
  return np.where(inside, table[np.where(inside, item, 0)] if len(table) else 0, 0)


def _write_windows(output: str, window_seconds: int) -> dict:
  """Each anchor's window, counted from the earliest anchor's timestamp."""
  ts = np.load(os.path.join(output, "anchor_timestamp.npy"), mmap_mode="r")
  t_min = int(ts.min()) if len(ts) else 0
  window = ((ts - t_min) // window_seconds).astype(np.int32)
  _save(output, "anchor_window", window)
  per_window = np.bincount(window) if len(window) else np.zeros(0, np.int64)
  return {"windows": len(per_window), "anchor_t_min": t_min if len(ts) else None,
          "anchor_t_max": int(ts.max()) if len(ts) else None,
          "anchors_per_window": per_window.tolist()}


def _save(output: str, name: str, array: np.ndarray) -> None:
  path = os.path.join(output, f"{name}.npy")
  with open(path + ".tmp", "wb") as f:
    np.save(f, array)
  os.replace(path + ".tmp", path)


def read_metadata(path: str) -> dict:
  """The metadata of a finished prepared directory; FormatError saying why not."""
  meta_path = os.path.join(path, fmt.METADATA_FILE)
  if not os.path.isdir(path):
    raise fmt.FormatError(f"{path}: no such directory. Prepare it first: python -m "
                          f"dlrm_jax.data.yambda prepare --input ROOT --output {path}")
  meta = fmt.read_json(meta_path) if os.path.exists(meta_path) else None
  if meta is None:
    raise fmt.FormatError(f"{path} is not a finished preparation (no {fmt.METADATA_FILE}); "
                          "run the prepare command (again)")
  if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
    raise fmt.FormatError(f"{meta_path}: format {meta.get('format')!r} version "
                          f"{meta.get('format_version')}, not {FORMAT_NAME!r} version "
                          f"{FORMAT_VERSION}: prepare the log again into a new directory")
  return meta


# Command line -----------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
  """Runs one command; returns the exit status: 1 with a one-line message for bad input
  or a directory that cannot be used, 130 when interrupted (2 for bad arguments)."""
  args = _parser().parse_args(argv)

  def command() -> None:
    if args.command == "prepare":
      prepare(args.input, args.output, min_history=args.min_history,
              window_seconds=args.window_seconds, size=args.size, batch_rows=args.batch_rows)
    else:
      meta = read_metadata(args.path)
      print(json.dumps(meta, indent=1) if args.json else format_info(args.path, meta))

  return commands.run(command, interrupted="interrupted" + (
      ": run the same command again to prepare it" if args.command == "prepare" else ""))


def format_info(path: str, meta: dict) -> str:
  """`info`'s summary: the counts, the pools, the windows and the options."""
  per_window = meta["anchors_per_window"]
  spread = (f", {min(per_window):,} to {max(per_window):,} anchors each" if per_window else "")
  pools = ", ".join(f"{k} {meta['pools'][k]:,}" for k in ("listen_plus", "like", "skip", "none"))
  options = ", ".join(f"{k}={v}" for k, v in meta["options"].items() if k != "input")
  return "\n".join([
      f"{path}: DLRMv4 events from {meta['options']['input']}",
      f"  events   {meta['events']:,} of {meta['users']:,} users ({pools})",
      f"  anchors  {meta['anchors']:,} in {meta['windows']} windows{spread}",
      f"  options  {options}"])


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m dlrm_jax.data.yambda",
                                   description="Yambda-style listening logs -> DLRMv4's "
                                               "anchors in daily windows.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prepare", help="prepare a log into a directory",
                     formatter_class=commands.WithDefaults)
  p.add_argument("--input", required=True,
                 help="the log's root: flat[/SIZE]/multi_event.parquet and the album and "
                      "artist item mappings")
  p.add_argument("--output", required=True, help="the prepared directory (new or unfinished)")
  p.add_argument("--size", default=None, help="Yambda's size folder under flat/ (50m, 500m, 5b)")
  p.add_argument("--min-history", type=commands.int_at_least(0), default=4086,
                 help="earlier events of its user an anchor needs")
  p.add_argument("--window-seconds", type=commands.int_at_least(1), default=DAY_S,
                 help="the windows' length")
  p.add_argument("--batch-rows", type=commands.int_at_least(1), default=1 << 20,
                 help="rows read at a time (memory follows it)")
  i = sub.add_parser("info", help="summarise a prepared directory")
  i.add_argument("path")
  i.add_argument("--json", action="store_true", help="the whole metadata as JSON")
  return parser


if __name__ == "__main__":
  sys.exit(main())
