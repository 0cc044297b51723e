"""Synthetic event logs in Yambda's schema (dlrm_jax.data.event_log): the files, their
invariants, and a signal that a model of the user's history can learn and popularity
cannot."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from dlrm_jax.data.event_log import EVENT_TYPES, EventLog, EventLogSpec, schema

SMALL = EventLogSpec(num_users=300, num_items=800, num_artists=60, num_albums=200,
                     listens_per_user=60, seed=3)


@pytest.fixture(scope="module")
def log():
  return EventLog(SMALL)


def test_the_files_have_yambdas_layout_and_schema(log, tmp_path):
  log.write(str(tmp_path))
  events = pq.read_table(tmp_path / "flat" / "multi_event.parquet")
  assert events.schema == schema()
  assert events.num_rows == len(log.events["uid"])
  rows = events.to_pydict()
  assert set(rows["event_type"]) <= set(EVENT_TYPES)
  listen = np.array([t == "listen" for t in rows["event_type"]])
  # Listens carry how much was played and the track's length; likes and dislikes do not.
  assert all((p is None) == (not l) for p, l in zip(rows["played_ratio_pct"], listen))
  assert all((s is None) == (not l) for s, l in zip(rows["track_length_seconds"], listen))
  for name in ("album", "artist"):
    mapping = pq.read_table(tmp_path / f"{name}_item_mapping.parquet").to_pydict()
    assert mapping["item_id"] == list(range(SMALL.num_items))
    assert max(mapping[f"{name}_id"]) < getattr(SMALL, f"num_{name}s")


def test_events_are_in_time_order_per_user_in_steps_of_5_s(log):
  e = log.events
  assert np.all(np.diff(e["uid"].astype(np.int64)) >= 0)
  same_user = np.diff(e["uid"].astype(np.int64)) == 0
  assert np.all(np.diff(e["timestamp"].astype(np.int64))[same_user] >= 0)
  assert np.all(e["timestamp"] % 5 == 0)
  assert set(np.unique(e["uid"])) == set(range(SMALL.num_users))
  assert e["item_id"].max() < SMALL.num_items
  # A like follows a listen-plus of the same item, a dislike a skip.
  for kind, plus in ((1, True), (2, False)):
    for i in np.flatnonzero(e["event_type"] == kind)[:50]:
      j = i - 1
      while e["event_type"][j] != 0:
        j -= 1
      assert e["item_id"][j] == e["item_id"][i] and e["uid"][j] == e["uid"][i]
      assert (e["played_ratio_pct"][j] >= 50) == plus


def test_the_same_spec_gives_the_same_log():
  a, b = EventLog(SMALL), EventLog(SMALL)
  for k in a.events:
    np.testing.assert_array_equal(a.events[k], b.events[k])
  other = EventLog(EventLogSpec(**{**SMALL.__dict__, "seed": 4}))
  assert not np.array_equal(a.events["item_id"][:100], other.events["item_id"][:100])


def test_the_history_holds_a_signal_that_popularity_misses(log):
  """On the last 10% of listens: the hidden probability's AUC (the best any model
  reaches) stands well above that of the items' listen-plus rates before."""
  split = log.split_time(0.9)
  best, popular = log.best_auc(start_s=split), log.popularity_auc(split)
  assert 0.75 < best < 0.95, best
  assert best - popular > 0.15, (best, popular)
  rate = log.listens()["label"].mean()
  assert 0.5 < rate < 0.85, rate


def test_bad_sizes_are_refused():
  with pytest.raises(ValueError, match="num_items=0 must be >= 1"):
    EventLogSpec(num_items=0)
  with pytest.raises(ValueError, match=r"drift=1.5 must be in \[0, 1\]"):
    EventLogSpec(drift=1.5)
