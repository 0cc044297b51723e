"""Metrics against scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss as sk_log_loss, roc_auc_score

from dlrm_jax.metrics import (StreamingMetrics, accuracy, auc_of_sorted_keys, evaluate,
                              log_loss, roc_auc, score_keys)


@pytest.mark.parametrize("seed", range(3))
def test_auc_random_scores(seed):
  rng = np.random.default_rng(seed)
  labels = (rng.random(5000) < 0.3).astype(np.float32)
  scores = rng.random(5000) + 0.3 * labels
  assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("levels", [2, 5, 50])
def test_auc_tied_scores(levels):
  rng = np.random.default_rng(levels)
  labels = (rng.random(4000) < 0.4).astype(np.float32)
  scores = np.round(rng.random(4000) * (levels - 1) + labels * 0.7) / levels
  assert len(np.unique(scores)) < 4000
  assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_edge_cases():
  assert roc_auc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 1.0
  assert roc_auc([0, 1, 0, 1], [0.9, 0.1, 0.8, 0.2]) == 0.0
  assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
  assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_log_loss_and_accuracy():
  rng = np.random.default_rng(0)
  labels = (rng.random(1000) < 0.5).astype(np.float32)
  probs = np.clip(rng.random(1000) * 0.8 + 0.2 * labels, 0.01, 0.99)
  assert log_loss(labels, probs) == pytest.approx(sk_log_loss(labels, probs), rel=1e-9)
  assert accuracy(labels, probs) == pytest.approx(accuracy_score(labels, probs > 0.5))
  assert set(evaluate(labels, probs)) == {"auc", "logloss", "accuracy"}


def _ctr_rows(n, seed, levels=None):
  """Labels and float32 probabilities of n rows; `levels` distinct values: heavy ties."""
  rng = np.random.default_rng(seed)
  labels = (rng.random(n) < 0.25).astype(np.float32)
  p = np.clip(rng.random(n) * 0.7 + 0.25 * labels, 0, 1)
  if levels:
    p = np.round(p * (levels - 1)) / (levels - 1)
  return labels, (0.01 + 0.98 * p).astype(np.float32)  # not 0 or 1: no log loss clipping


@pytest.mark.parametrize("levels", [None, 3, 40])
def test_streamed_metrics_equal_sklearn_over_padded_batches(levels):
  """Batches of a split of 10,007 rows, the last one partial and padded with masked
  filler rows: sklearn's AUC (ties included), log loss and accuracy of exactly the real
  rows; and the same AUC from the sorted keys in chunks much smaller than a run of ties."""
  labels, probs = _ctr_rows(10_007, seed=levels or 0, levels=levels)
  batch = 1024
  m = StreamingMetrics(rows=10 * batch)
  assert m.nbytes == 4 * 10 * batch  # 4 bytes per row
  for start in range(0, labels.size, batch):
    y, p = labels[start:start + batch], probs[start:start + batch]
    mask = np.arange(batch) < y.size
    pad = batch - y.size  # filler rows that would change every metric if counted
    m.add(np.r_[y, np.ones(pad)], np.r_[p, np.zeros(pad, np.float32)], mask)
  got = m.result()
  assert got["rows"] == labels.size
  assert got["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
  assert got["logloss"] == pytest.approx(sk_log_loss(labels, probs.astype(np.float64)), rel=1e-9)
  assert got["accuracy"] == pytest.approx(accuracy_score(labels, probs > 0.5), abs=1e-12)
  keys = score_keys(labels, probs)
  keys.sort()
  for chunk in (1, 7, 1000):
    assert auc_of_sorted_keys(keys, chunk) == pytest.approx(got["auc"], abs=1e-12)


def test_streamed_metrics_merge_processes_exactly():
  """Three "processes" with their own rows: merged keys and sums give sklearn's metrics of
  all rows, which is not the mean of their own AUCs."""
  labels, probs = _ctr_rows(9_000, seed=3, levels=25)
  parts = [StreamingMetrics() for _ in range(3)]  # no pre-allocation: they grow
  for i, m in enumerate(parts):
    m.add(labels[i::3][: 1000 + 1000 * i], probs[i::3][: 1000 + 1000 * i])
  y = np.concatenate([labels[i::3][: 1000 + 1000 * i] for i in range(3)])
  p = np.concatenate([probs[i::3][: 1000 + 1000 * i] for i in range(3)])
  own = [m.result()["auc"] for m in parts]

  def gather(keys, sums):  # what an all-gather across the processes would return
    del keys, sums
    return (np.concatenate([m._keys[:m.rows] for m in parts]),
            np.sum([[m._log_loss, m._correct, m.rows] for m in parts], axis=0))

  got = parts[0].result(gather=gather)
  assert got["rows"] == y.size == 6000
  assert got["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
  assert got["logloss"] == pytest.approx(sk_log_loss(y, p.astype(np.float64)), rel=1e-9)
  assert abs(np.mean(own) - got["auc"]) > 1e-6


def test_streamed_metrics_refuse_scores_that_are_not_probabilities():
  m = StreamingMetrics()
  with pytest.raises(ValueError, match="probabilities"):
    m.add([0, 1], [0.5, np.nan])
  with pytest.raises(ValueError, match="probabilities"):
    m.add([0, 1], [-0.5, 2.0])
  assert np.isnan(m.result()["auc"]) and m.result()["rows"] == 0
  m.add([1, 1], [0.2, 0.3])
  assert np.isnan(m.result()["auc"])  # one class only
