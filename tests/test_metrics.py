"""Metrics against scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss as sk_log_loss, roc_auc_score

from dlrm_jax.metrics import accuracy, evaluate, log_loss, roc_auc


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
