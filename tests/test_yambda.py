"""DLRMv4's data preparation (dlrm_jax.data.yambda) on small synthetic logs: the prepared
columns, anchors and windows against direct re-derivations, the interleaved history
against a naive reading of the rule, the sample's fields, the streaming order, reruns,
bad input and the command line."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from conftest import REPO
from dlrm_jax.data import format as fmt
from dlrm_jax.data import anchors as anchors_lib
from dlrm_jax.data import yambda
from dlrm_jax.data.event_log import EventLog, EventLogSpec

SPEC = EventLogSpec(num_users=200, num_items=500, num_artists=40, num_albums=120,
                    listens_per_user=50, like_rate=0.3, seed=5)
MIN_HISTORY = 12


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  root = tmp_path_factory.mktemp("yambda") / "raw"
  EventLog(SPEC).write(str(root))
  return root


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
  out = tmp_path_factory.mktemp("prepared") / "out"
  # Batches of 97 rows: users and the order check cross batch boundaries.
  yambda.prepare(str(raw), str(out), min_history=MIN_HISTORY, batch_rows=97, log=lambda s: None)
  return anchors_lib.PreparedEvents(str(out))


@pytest.fixture(scope="module")
def frame(raw):
  """The log re-derived with pandas: one row per event, in file order."""
  events = pq.read_table(raw / "flat" / "multi_event.parquet").to_pandas()
  events["event_type"] = events["event_type"].astype(str)
  for name in ("artist", "album"):
    mapping = pq.read_table(raw / f"{name}_item_mapping.parquet").to_pandas()
    events[name] = events["item_id"].map(mapping.set_index("item_id")[f"{name}_id"])
  pct = events["played_ratio_pct"].fillna(0)
  listen = events["event_type"] == "listen"
  events["action"] = np.select([listen & (pct >= 50), events["event_type"] == "like", listen],
                               [1, 2, 4], 0)
  events["position"] = events.groupby("uid").cumcount()
  return events


def test_prepared_columns_match_a_pandas_rederivation(prepared, frame):
  e = prepared.events
  for ours, theirs in (("uid", "uid"), ("item", "item_id"), ("timestamp", "timestamp"),
                       ("artist", "artist"), ("album", "album"), ("action", "action"),
                       ("is_organic", "is_organic")):
    np.testing.assert_array_equal(e[ours], frame[theirs].to_numpy(), err_msg=ours)
  # Every pool is present (the like rate is raised so that the like pool is not empty).
  assert set(np.unique(e["action"])) == {0, 1, 2, 4}
  bounds = frame.reset_index().groupby("uid")["index"].agg(["min", "max"])
  np.testing.assert_array_equal(prepared.users, bounds.index.to_numpy())
  np.testing.assert_array_equal(prepared.user_start, bounds["min"].to_numpy())
  np.testing.assert_array_equal(prepared.user_end, bounds["max"].to_numpy() + 1)
  meta = prepared.metadata
  assert meta["events"] == len(frame) and meta["users"] == SPEC.num_users
  assert meta["pools"] == {"listen_plus": int((frame.action == 1).sum()),
                           "like": int((frame.action == 2).sum()),
                           "skip": int((frame.action == 4).sum()),
                           "none": int((frame.action == 0).sum())}


def test_anchors_and_windows_match_a_direct_computation(prepared, frame):
  anchor = (frame["event_type"] == "listen") & (frame["position"] >= MIN_HISTORY)
  expected = np.flatnonzero(anchor.to_numpy())
  np.testing.assert_array_equal(prepared.anchors, expected)
  ts = frame["timestamp"].to_numpy()[expected].astype(np.int64)
  window = (ts - ts.min()) // 86_400
  np.testing.assert_array_equal(prepared.anchor_window, window)
  meta = prepared.metadata
  assert meta["anchors"] == len(expected) and meta["windows"] == window.max() + 1
  assert meta["anchors_per_window"] == np.bincount(window).tolist()
  assert meta["anchor_t_min"] == ts.min() and meta["anchor_t_max"] == ts.max()
  w = int(np.argmax(meta["anchors_per_window"]))
  np.testing.assert_array_equal(prepared.window_anchors(w), expected[window == w])


def naive_history(actions, uids, p, history_length, scan_window):
  """The rule read literally, one event at a time: the scan window is the events of
  the anchor's user before it, at most `scan_window` of them; from it the last L // 3
  of each pool, merged in log order, the most recent L kept."""
  low = p
  while low > 0 and uids[low - 1] == uids[p] and p - (low - 1) <= scan_window:
    low -= 1
  per_pool = max(1, history_length // 3)
  kept = []
  for bit in (1, 2, 4):
    members = [j for j in range(low, p) if actions[j] == bit]
    kept += members[len(members) - per_pool:] if len(members) > per_pool else members
  return sorted(kept)[-history_length:], low


@pytest.mark.parametrize("history_length,scan_window", [(9, 14), (30, 20_000), (2, 6)])
def test_the_interleaved_history_matches_a_naive_reading_of_the_rule(
    prepared, history_length, scan_window):
  actions = prepared.events["action"].tolist()
  uids = prepared.events["uid"].tolist()
  anchors = prepared.anchors[::7].tolist()
  samples = prepared.samples(anchors, history_length=history_length, scan_window=scan_window)
  capped = cut = False
  for i, p in enumerate(anchors):
    want, low = naive_history(actions, uids, p, history_length, scan_window)
    got = prepared.history(p, history_length, scan_window)
    assert got.tolist() == want, p
    n = samples["history_length"][i]
    assert n == len(want)
    for k in ("item", "artist", "album", "action", "timestamp"):
      np.testing.assert_array_equal(samples[f"history_{k}"][i, :n], prepared.events[k][want])
      assert not samples[f"history_{k}"][i, n:].any()  # padding
    window = actions[low:p]
    capped |= max(window.count(b) for b in (1, 2, 4)) > max(1, history_length // 3)
    cut |= low > prepared.user_start[np.searchsorted(prepared.user_start, p, "right") - 1]
  # The cases the rule is about occur: a pool longer than L // 3, a scan window that
  # stops before the user's first event.
  assert capped and (cut or scan_window == 20_000)


def per_anchor_history(action, user_start, p, history_length, scan_window):
  """The rule in numpy, one anchor at a time: the reference of the batched
  `anchors_lib.histories`."""
  user = np.searchsorted(user_start, p, side="right") - 1
  low = max(int(user_start[user]), p - scan_window)
  window = action[low:p]
  per_pool = max(1, history_length // 3)
  keep = np.unique(np.concatenate([np.flatnonzero(window & bit)[-per_pool:]
                                   for bit in (1, 2, 4)]))
  return (low + keep)[-history_length:]


@pytest.mark.parametrize("seed", range(4))
def test_batched_histories_match_the_rule_anchor_by_anchor(seed, monkeypatch):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, 70, 30)
  sizes[::5] = 1  # users of one event
  user_start = np.r_[0, np.cumsum(sizes)[:-1]]
  # Pools of uneven sizes (some rare); in the last seed, events in several pools.
  values = [0, 1, 2, 4] + [3, 5, 6, 7] * (seed == 3)
  action = rng.choice(values, sizes.sum(), p=rng.dirichlet(np.ones(len(values)) / 2))
  action = action.astype(np.uint8)
  # User starts (empty histories), the events just after, any event; unsorted, repeated.
  anchors = np.r_[user_start, np.minimum(user_start + 1, sizes.sum() - 1),
                  rng.integers(0, sizes.sum(), 150)]
  anchors = rng.permutation(np.r_[anchors, anchors[:10]])
  seen = {"empty": 0, "pool capped": 0, "cut to L": 0, "window cut": 0}
  for chunk in (40, 1 << 20):  # one anchor or a few per chunk; all in one chunk
    monkeypatch.setattr(anchors_lib, "_CHUNK_EVENTS", chunk)
    for history_length in (1, 2, 3, 4, 5, 7, 10, 31):
      for scan_window in (1, 3, 8, 25, 1000):
        lengths, index = anchors_lib.histories(action, user_start, anchors, history_length,
                                          scan_window)
        assert lengths.shape == anchors.shape and lengths.sum() == len(index)
        for p, got in zip(anchors, np.split(index, np.cumsum(lengths)[:-1])):
          want = per_anchor_history(action, user_start, p, history_length, scan_window)
          assert got.tolist() == want.tolist(), (p, history_length, scan_window)
          start = user_start[np.searchsorted(user_start, p, "right") - 1]
          window = action[max(start, p - scan_window):p]
          per_pool = max(1, history_length // 3)
          seen["empty"] += not len(want)
          seen["pool capped"] += any(np.count_nonzero(window & b) > per_pool for b in (1, 2, 4))
          seen["cut to L"] += sum(min(per_pool, np.count_nonzero(window & b))
                                  for b in (1, 2, 4)) > len(want) > 0
          seen["window cut"] += p - scan_window > start
  assert all(seen.values()), seen
  lengths, index = anchors_lib.histories(action, user_start, [], 5, 8)
  assert lengths.shape == index.shape == (0,)


def test_no_history_event_is_at_or_after_its_anchor_or_of_another_user(prepared):
  window = int(np.argmax(prepared.metadata["anchors_per_window"]))
  for p in prepared.window_anchors(window):
    h = prepared.history(int(p), 30, 25)
    assert len(h) and h.max() < p
    assert np.all(prepared.events["uid"][h] == prepared.events["uid"][p])
    assert np.all(prepared.events["timestamp"][h] <= prepared.events["timestamp"][p])


def test_the_candidate_label_query_time_and_contextual_ids(raw, tmp_path, prepared, frame):
  # min_history 0: a user's first listen is an anchor with an empty history.
  out = tmp_path / "zero"
  yambda.prepare(str(raw), str(out), min_history=0, log=lambda s: None)
  zero = anchors_lib.PreparedEvents(str(out))
  empty = [int(s) for s in zero.user_start if zero.events["action"][s] in (1, 4)][:3]
  assert empty
  s = zero.samples(empty, history_length=9)
  assert not s["history_length"].any()
  np.testing.assert_array_equal(s["query_time"], frame["timestamp"].to_numpy()[empty])

  anchors = prepared.anchors[::50]
  sizes = (1000, 999, 24, 77, 5, 2, 123_456)
  s = prepared.samples(anchors, history_length=9, scan_window=40, cross_sizes=sizes)
  rows = frame.iloc[anchors]
  np.testing.assert_array_equal(s["candidate_item"], rows["item_id"])
  np.testing.assert_array_equal(s["candidate_artist"], rows["artist"])
  np.testing.assert_array_equal(s["candidate_album"], rows["album"])
  np.testing.assert_array_equal(s["label"], (rows["played_ratio_pct"] >= 50).astype(np.float32))
  assert 0 < s["label"].mean() < 1
  last = s["history_timestamp"][np.arange(len(anchors)), s["history_length"] - 1]
  np.testing.assert_array_equal(s["query_time"], last)  # the last history event's, not the anchor's
  assert np.any(s["query_time"] < s["anchor_timestamp"])
  for i, (_, r) in enumerate(rows.iterrows()):
    hour = int(r.timestamp) // 3600 % 24
    keys = [(r.uid, r.artist), (r.uid, r.album), (r.uid, hour), (r.item_id, hour),
            (r.artist, hour), (r.uid, r.is_organic), (r.uid, r.artist, hour)]
    want = [int(r.uid)] + [
        xxhash.xxh64(struct.pack(f"<{len(k)}q", *map(int, k)), seed=0).intdigest() % n
        for k, n in zip(keys, sizes)]
    assert s["contextual"][i].tolist() == want


def test_cross_hash_is_xxh64_of_the_packed_keys():
  rng = np.random.default_rng(0)
  edges = np.array([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, -1, -2**63])
  for n in (1, 2, 3):
    keys = np.concatenate([
        rng.integers(0, 2**32, (3000, n), endpoint=True),
        rng.integers(-2**63, 2**63 - 1, (1000, n), endpoint=True),
        np.stack(np.meshgrid(*[edges] * n), -1).reshape(-1, n)])
    digests = [xxhash.xxh64_intdigest(struct.pack(f"<{n}q", *map(int, k)), seed=0)
               for k in keys]
    for size in (1, 24, 2_000_000, 100_000_000, 2**62 + 5):
      got = anchors_lib.cross_hash(keys, size)
      assert got.dtype == np.int64
      assert got.tolist() == [d % size for d in digests], (n, size)
  with pytest.raises(ValueError, match=r"keys of shape \(2, 4\): \[B, 1 to 3\] expected"):
    anchors_lib.cross_hash(np.zeros((2, 4), np.int64), 10)


def test_batches_follow_the_streaming_order_and_resume_mid_window(prepared):
  window = int(np.argmax(prepared.metadata["anchors_per_window"]))
  anchors = prepared.window_anchors(window)
  assert np.all(np.diff(anchors) > 0)  # user-major: ascending flat index
  procs, size = 3, 5
  kept = anchors[:len(anchors) - len(anchors) % procs]
  for r in range(procs):
    batches = [anchors_lib.window_batch_anchors(anchors, size, b, r, procs)
               for b in range(prepared.num_batches(window, size, procs))]
    mine = kept[r::procs]
    assert len(batches) == len(mine) // size >= 2
    np.testing.assert_array_equal(np.concatenate(batches), mine[:len(batches) * size])
  with pytest.raises(IndexError):  # the partial last batch is dropped
    anchors_lib.window_batch_anchors(anchors, size, len(kept) // procs // size, 0, procs)
  everything = list(prepared.batches(window, size, process_index=1, process_count=procs,
                                     history_length=9))
  resumed = list(prepared.batches(window, size, start=2, process_index=1, process_count=procs,
                                  history_length=9))
  assert len(resumed) == len(everything) - 2
  for a, b in zip(everything[2:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  np.testing.assert_array_equal(everything[0]["anchor"], kept[1::procs][:size])


def test_rerun_is_a_no_op_and_other_options_a_one_line_error(raw, tmp_path):
  out = tmp_path / "out"
  yambda.prepare(str(raw), str(out), min_history=MIN_HISTORY, log=lambda s: None)
  stamps = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
  said = []
  yambda.prepare(str(raw), str(out), min_history=MIN_HISTORY, log=said.append)
  assert said == [f"{out} is already prepared with these options."]
  assert {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)} == stamps
  with pytest.raises(fmt.FormatError) as e:
    yambda.prepare(str(raw), str(out), min_history=MIN_HISTORY + 1, log=said.append)
  assert str(e.value) == (f"{out} already holds data prepared with other options "
                          f"(min_history: {MIN_HISTORY} before, {MIN_HISTORY + 1} now); "
                          "choose a new --output")
  # An unfinished directory (no metadata) is prepared again; a foreign one is refused.
  os.remove(out / "metadata.json")
  (out / "anchors.npy").write_bytes(b"half")
  meta = yambda.prepare(str(raw), str(out), min_history=MIN_HISTORY, log=said.append)
  assert len(anchors_lib.PreparedEvents(str(out)).anchors) == meta["anchors"] > 0
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("x")
  with pytest.raises(fmt.FormatError, match="is not empty"):
    yambda.prepare(str(raw), str(tmp_path / "other"), log=said.append)


def _write_log(root, table):
  """A copy of the raw log with `table` as its events."""
  os.makedirs(root / "flat", exist_ok=True)
  pq.write_table(table, root / "flat" / "multi_event.parquet")
  return root


@pytest.fixture
def table(raw):
  return pq.read_table(raw / "flat" / "multi_event.parquet")


@pytest.fixture
def copy(raw, tmp_path):
  root = tmp_path / "bad"
  root.mkdir()
  for name in ("album", "artist"):
    (root / f"{name}_item_mapping.parquet").write_bytes(
        (raw / f"{name}_item_mapping.parquet").read_bytes())
  return root


def test_bad_input_is_one_clear_line(copy, table, tmp_path):
  def error(t):
    _write_log(copy, t)
    with pytest.raises(yambda.InputError) as e:
      yambda.prepare(str(copy), str(tmp_path / "out"), min_history=1, log=lambda s: None)
    assert "\n" not in str(e.value)
    return str(e.value)

  events = str(copy / "flat" / "multi_event.parquet")
  assert error(table.drop_columns(["timestamp"])) == (
      f"{events}: no column 'timestamp' (it has uid, item_id, is_organic, event_type, "
      "played_ratio_pct, track_length_seconds)")
  assert error(table.set_column(2, "item_id", table["item_id"].cast(pa.string()))) == (
      f"{events}: column 'item_id' is string, not integers")
  shuffled = table.take(np.r_[1:len(table), 0])
  assert error(shuffled).startswith(f"{events}: rows are not in (uid, timestamp) order at row ")
  assert error(shuffled).endswith("; sort the log by uid, then timestamp")
  kinds = pa.array(["listen"] * (len(table) - 1) + ["pause"])
  assert error(table.set_column(4, "event_type", kinds)) == (
      f"{events}: event_type 'pause' is none of listen, like, dislike, unlike, undislike")
  (copy / "flat" / "multi_event.parquet").write_text("uid,item_id\n1,2\n")
  with pytest.raises(yambda.InputError, match=r"^\S+multi_event.parquet: not a readable "
                     r"parquet file \([^\n]*\)$"):
    yambda.prepare(str(copy), str(tmp_path / "out"), log=lambda s: None)
  os.remove(copy / "album_item_mapping.parquet")
  assert error(table) == f"{copy / 'album_item_mapping.parquet'}: no such file"


def test_a_log_without_is_organic_and_with_integer_event_types(copy, table, tmp_path, prepared):
  codes = pa.array(np.asarray(table["event_type"].combine_chunks().indices), pa.int8())
  t = table.drop_columns(["is_organic"]).set_column(3, "event_type", codes)
  _write_log(copy, t)
  meta = yambda.prepare(str(copy), str(tmp_path / "out"), min_history=MIN_HISTORY,
                        batch_rows=500, log=lambda s: None)
  assert not meta["has_is_organic"]
  other = anchors_lib.PreparedEvents(str(tmp_path / "out"))
  assert not other.events["is_organic"].any()
  for k in ("action", "artist", "item"):
    np.testing.assert_array_equal(other.events[k], prepared.events[k])
  np.testing.assert_array_equal(other.user_start, prepared.user_start)
  np.testing.assert_array_equal(other.anchors, prepared.anchors)
  np.testing.assert_array_equal(other.anchor_window, prepared.anchor_window)


def _cli(*args):
  env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "src")}
  return subprocess.run([sys.executable, "-m", "dlrm_jax.data.yambda", *map(str, args)],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_the_command_line(raw, tmp_path):
  out = tmp_path / "out"
  r = _cli("prepare", "--input", raw, "--output", out, "--min-history", MIN_HISTORY)
  assert r.returncode == 0, r.stderr
  meta = json.loads((out / "metadata.json").read_text())
  assert r.stderr == (f"{out}: {meta['events']:,} events of {SPEC.num_users} users, "
                      f"{meta['anchors']:,} anchors in {meta['windows']} windows\n")
  r = _cli("prepare", "--input", raw, "--output", out, "--min-history", MIN_HISTORY)
  assert (r.returncode, r.stderr) == (0, f"{out} is already prepared with these options.\n")
  r = _cli("prepare", "--input", raw, "--output", out, "--min-history", 3)
  assert r.returncode == 1 and r.stderr.count("\n") == 1
  assert r.stderr.startswith(f"error: {out} already holds data prepared with other options")
  r = _cli("info", out)
  assert r.returncode == 0 and r.stdout.splitlines()[2] == (
      f"  anchors  {meta['anchors']:,} in {meta['windows']} windows, "
      f"{min(meta['anchors_per_window']):,} to {max(meta['anchors_per_window']):,} anchors each")
  r = _cli("info", tmp_path / "nowhere")
  assert (r.returncode, r.stderr) == (1, (
      f"error: {tmp_path / 'nowhere'}: no such directory. Prepare it first: python -m "
      f"dlrm_jax.data.yambda prepare --input ROOT --output {tmp_path / 'nowhere'}\n"))
  r = _cli("prepare", "--input", tmp_path / "nowhere", "--output", out)
  assert (r.returncode, r.stderr) == (1, f"error: {tmp_path / 'nowhere'}: no such directory\n")
