"""DLRMv4's data source (dlrm_jax.data.windows): the train windows streamed in the
reference's order, several processes' rows making the one-process batch, every eval
anchor scored once, positions that resume, and the synthetic log kept by its spec."""

import numpy as np
import pytest

from dlrm_jax import dlrmv4
from dlrm_jax.data import anchors as anchors_lib
from dlrm_jax.data import windows
from dlrm_jax.data.event_log import EventLogSpec
from dlrm_jax.data.format import FormatError
from dlrm_jax.evaluation import TEACHER

SPEC = EventLogSpec(num_users=40, num_items=150, num_artists=20, num_albums=50,
                    listens_per_user=60, days=10.0, seed=1)
OPTIONS = dict(history_length=12, scan_window=40, cross_sizes=(31, 29, 23, 19, 17, 5, 13))


@pytest.fixture(scope="module")
def log(tmp_path_factory):
  path = tmp_path_factory.mktemp("windows") / "log"
  return windows.synthetic_log(str(path), SPEC, min_history=8, window_seconds=86400,
                               log=lambda _: None)


def _source(log, batch=16, process_index=0, process_count=1, first=0, train=0, eval_window=8):
  prepared, p_plus = log
  w = windows.Windows.resolve(prepared.num_windows, first, train, eval_window, 1)
  return windows.WindowedEvents(prepared, batch, w, p_plus=p_plus, process_index=process_index,
                                process_count=process_count, **OPTIONS)


def test_the_train_stream_is_the_windows_in_order_in_the_reference_s_batches(log):
  """Batch k of the stream is the reference's batch of its window (user-major anchors,
  full batches only), windows one after the other, then the next epoch from the first."""
  prepared, _ = log
  data = _source(log, first=2, train=3)
  want = [anchors_lib.window_batch_anchors(prepared.window_anchors(w), 16, i)
          for w in (2, 3, 4) for i in range(len(prepared.window_anchors(w)) // 16)]
  assert data.num_batches("train") == len(want) and data.num_rows("train") == 16 * len(want)
  for k in range(len(want) + 2):  # into the second epoch
    got = data.batch(k)
    expected = prepared.samples(want[k % len(want)], **OPTIONS)
    np.testing.assert_array_equal(got["sparse"][:, 0], expected["candidate_item"])
    np.testing.assert_array_equal(got["history_item"], expected["history_item"])
    np.testing.assert_array_equal(got["label"], expected["label"])
    assert TEACHER not in got  # the generator's probabilities go to eval batches only
  # As the compile tool describes a batch.
  shapes = dlrmv4.batch_shapes(dlrmv4.ModelSpec(dlrmv4.DLRMv4Spec(), (1,) * 11,
                                                history_length=12), 16)
  assert {k: (v.shape, v.dtype) for k, v in data.batch(0).items()} == {
      k: (shape, np.dtype(dtype)) for k, (shape, dtype) in shapes.items()}


def test_two_processes_rows_are_the_one_process_batch(log):
  """Each of 2 processes builds half of every global batch; together, the one-process
  batch's rows (the same anchors: the reference's round-robin per rank)."""
  one = _source(log)
  halves = [_source(log, process_index=r, process_count=2) for r in (0, 1)]
  assert one.num_batches("train") == halves[0].num_batches("train")
  for k in (0, 5, one.num_batches("train") - 1):
    whole = one.batch(k)
    parts = [h.batch(k) for h in halves]
    assert all(len(p["label"]) == 8 for p in parts)
    key = lambda b: sorted(zip(b["sparse"][:, 3], b["query_time"], b["sparse"][:, 0]))  # noqa: E731
    assert key({k_: np.concatenate([p[k_] for p in parts]) for k_ in whole}) == key(whole)


def test_every_eval_anchor_is_scored_once_with_its_hidden_probability(log):
  prepared, p_plus = log
  anchors = prepared.window_anchors(8)
  assert len(anchors) % 16 not in (0, 1)  # a partial last batch of more than one row
  for count in (1, 2, 8):  # at 8, some processes have no row in the last batch
    seen = []
    for r in range(count):
      data = _source(log, process_index=r, process_count=count)
      # Every process has each of the split's batches (its share may be empty).
      for i in range(data.num_batches("eval")):
        b = data.batch(i, "eval")
        seen.append(np.stack([b["sparse"][:, 3], b["query_time"], b[TEACHER]], axis=1))
      with pytest.raises(IndexError):
        data.batch(data.num_batches("eval"), "eval")
    seen = np.concatenate(seen)
    assert data.num_rows("eval") == len(anchors) == len(seen)
    s = prepared.samples(anchors, **OPTIONS)
    want = np.stack([s["contextual"][:, 0], s["query_time"], p_plus[anchors]], axis=1)
    np.testing.assert_allclose(sorted(map(tuple, seen)), sorted(map(tuple, want)), rtol=1e-6)


def test_a_stream_resumes_at_its_position_and_refuses_another_order(log):
  data = _source(log)
  stream = data.batches(0)
  for _ in range(7):
    next(stream)
  state = stream.state_at(7)
  resumed = data.batches(0)
  resumed.restore(state)
  np.testing.assert_array_equal(next(resumed)["sparse"], next(stream)["sparse"])
  other = _source(log, first=1, train=3).batches(0)
  with pytest.raises(ValueError, match="of other windows, another batch size"):
    other.restore(state)


@pytest.mark.parametrize("args, message", [
    ((13, 0, 0, -1, 0), "eval_num_windows=0 must be >= 1"),
    ((13, 0, 0, 13, 1), "eval windows 13 are not within the log's 13 windows (0 to 12)"),
    ((13, 5, 9, 2, 1), "train windows 5 to 13 are not within"),
    ((13, 0, 5, 4, 2), "the train windows 0 to 4 and the eval windows 4 to 5 overlap"),
    ((13, 0, 0, -2, 1), "eval_window=-2 is not a window (-1: the last)"),
    ((13, 6, 0, 4, 1), "num_train_windows=0 trains on the windows from first_window=6 to the "
                       "eval windows, but those start at 4"),
])
def test_windows_that_the_log_does_not_have_are_refused(args, message):
  with pytest.raises(ValueError) as e:
    windows.Windows.resolve(*args)
  assert message in str(e.value)


def test_the_default_windows_train_up_to_the_last_and_evaluate_on_it():
  w = windows.Windows.resolve(13, 0, 0, -1, 1)
  assert (w.train, w.eval) == (range(0, 12), range(12, 13))


def test_a_synthetic_log_is_made_once_and_kept_for_its_spec(tmp_path):
  path = str(tmp_path / "log")
  made = []
  first, p1 = windows.synthetic_log(path, SPEC, min_history=8, window_seconds=86400,
                                    log=made.append)
  again, p2 = windows.synthetic_log(path, SPEC, min_history=8, window_seconds=86400,
                                    log=made.append)
  assert len(made) == 2  # the generation and the preparation, once
  np.testing.assert_array_equal(p1, p2)
  with pytest.raises(FormatError, match=r"differs in drift, min_history\); choose another"):
    windows.synthetic_log(path, EventLogSpec(**{**SPEC.__dict__, "drift": 0.5}), min_history=9,
                          window_seconds=86400)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("x")
  with pytest.raises(FormatError, match="is not empty and holds no synthetic log"):
    windows.synthetic_log(str(tmp_path / "other"), SPEC, min_history=8, window_seconds=86400)
