"""Evaluation metrics: exact ROC AUC (ties handled), log loss, accuracy."""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Exact area under the ROC curve, tied scores counted as half.

  It is the Mann-Whitney U statistic: the probability that a random positive
  scores above a random negative, computed from average ranks so that ties
  get half credit (as scikit-learn's `roc_auc_score` does). NaN when only one
  class is present.
  """
  labels = np.asarray(labels).reshape(-1) > 0.5
  scores = np.asarray(scores, dtype=np.float64).reshape(-1)
  if labels.shape != scores.shape:
    raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
  n_pos = int(labels.sum())
  n_neg = labels.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  # Average rank (1-based) of each group of tied scores.
  starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
  ends = np.r_[starts[1:], sorted_scores.size]
  avg_rank = (starts + ends + 1) / 2.0
  ranks = np.empty(scores.size, dtype=np.float64)
  ranks[order] = np.repeat(avg_rank, ends - starts)
  u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
  """Mean binary cross-entropy of probabilities, clipped to [eps, 1 - eps]."""
  labels = np.asarray(labels, dtype=np.float64).reshape(-1)
  p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), eps, 1.0 - eps)
  return float(-np.mean(labels * np.log(p) + (1.0 - labels) * np.log1p(-p)))


def accuracy(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> float:
  """Fraction of samples whose thresholded probability equals the label."""
  labels = np.asarray(labels).reshape(-1) > 0.5
  return float(np.mean((np.asarray(probs).reshape(-1) > threshold) == labels))


def evaluate(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
  """AUC, log loss and accuracy of predicted click probabilities."""
  return {"auc": roc_auc(labels, probs), "logloss": log_loss(labels, probs),
          "accuracy": accuracy(labels, probs)}
