"""Evaluation metrics: exact ROC AUC (ties handled), log loss, accuracy.

`roc_auc` takes whole arrays. `StreamingMetrics` takes an evaluation split batch
by batch and holds 4 bytes per row (`score_keys`: a float32 score's bits and the
label in one uint32), sorted in place at the end (`auc_of_sorted_keys`), so the
exact AUC of a split of any size costs 4 bytes per row of host memory; several
processes' rows merge exactly (`StreamingMetrics.result(gather=...)`).
"""

from __future__ import annotations

from typing import Callable

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
  """AUC, log loss and accuracy of predicted click probabilities (`StreamingMetrics` of
  one batch)."""
  m = StreamingMetrics(len(probs))
  m.add(labels, probs)
  return {k: v for k, v in m.result().items() if k != "rows"}


def score_keys(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
  """uint32 keys `(bits of the float32 probability << 1) | label`: sorted, they order
  the rows by score (the bits of a non-negative float32 order as its value) and, among
  tied scores, negatives first."""
  p = np.asarray(probs, np.float32).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  if p.shape != labels.shape:
    raise ValueError(f"labels {labels.shape} and scores {p.shape} differ in shape")
  if not np.all((p >= 0) & (p <= 1)):  # NaN fails too
    raise ValueError("scores must be probabilities in [0, 1] (a NaN or a logit?)")
  return (p.view(np.uint32) << np.uint32(1)) | (labels > 0.5).astype(np.uint32)


def auc_of_sorted_keys(keys: np.ndarray, chunk: int = 1 << 20) -> float:
  """Exact ROC AUC, ties as half, of sorted `score_keys`, in chunks of bounded memory.

  The Mann-Whitney U: each positive counts the negatives before it in key order
  (all with lower scores and, as ties sort negatives first, all tied ones), less
  half of the tied ones: U = sum over positives of (negatives before) - 1/2 sum
  over distinct scores of (positives x negatives with that score). Integer counts:
  exact for any number of rows.
  """
  neg_before = pos_total = before_sum = ties = 0
  open_score, open_neg, open_pos = None, 0, 0  # the distinct score the last chunk ended in
  for start in range(0, keys.size, chunk):
    k = keys[start:start + chunk]
    pos = (k & 1).astype(bool)
    negs = np.cumsum(~pos, dtype=np.int64)  # negatives up to each position, in the chunk
    n_pos = int(pos.sum())
    before_sum += neg_before * n_pos + int(negs[pos].sum())
    neg_before += int(negs[-1])
    pos_total += n_pos
    score = k >> 1
    starts = np.flatnonzero(np.r_[True, score[1:] != score[:-1]])
    g_pos = np.add.reduceat(pos.astype(np.int64), starts)
    g_neg = (np.diff(np.r_[starts, k.size]) - g_pos).astype(np.int64)
    if open_score is not None and score[0] == open_score:
      g_pos[0] += open_pos
      g_neg[0] += open_neg
    else:
      ties += open_pos * open_neg
    ties += int(np.dot(g_pos[:-1], g_neg[:-1]))
    open_score, open_neg, open_pos = score[starts[-1]], int(g_neg[-1]), int(g_pos[-1])
  ties += open_pos * open_neg
  neg_total = neg_before
  if pos_total == 0 or neg_total == 0:
    return float("nan")
  return (before_sum - 0.5 * ties) / (pos_total * neg_total)


class StreamingMetrics:
  """AUC, log loss and accuracy of an evaluation pass, batch by batch.

  `add(labels, probs, mask)` takes each batch's rows (`mask`: False for a padded
  batch's filler rows); `result()` gives `evaluate`'s metrics over all of them, the AUC
  exact. Holds 4 bytes per row added (`score_keys`), pre-allocated when `rows` (the
  number expected) is given; the log loss and accuracy are running sums.
  """

  def __init__(self, rows: int = 0):
    self._keys = np.empty(max(int(rows), 0), np.uint32)
    self.rows = 0
    self._log_loss = 0.0
    self._correct = 0

  @property
  def nbytes(self) -> int:
    """Host memory held for the rows (their keys)."""
    return self._keys.nbytes

  def add(self, labels: np.ndarray, probs: np.ndarray, mask: np.ndarray | None = None) -> None:
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, np.float32).reshape(-1)
    if mask is not None:
      mask = np.asarray(mask, bool).reshape(-1)
      labels, probs = labels[mask], probs[mask]
    keys = score_keys(labels, probs)
    end = self.rows + keys.size
    if end > self._keys.size:  # grow geometrically
      grown = np.empty(max(end, 2 * self._keys.size), np.uint32)
      grown[:self.rows] = self._keys[:self.rows]
      self._keys = grown
    self._keys[self.rows:end] = keys
    self.rows = end
    if keys.size:
      self._log_loss += log_loss(labels, probs) * keys.size
      self._correct += round(accuracy(labels, probs) * keys.size)

  def result(self, gather: Callable | None = None) -> dict[str, float]:
    """The metrics of every row added. With several processes, `gather(keys, sums)` returns
    every process's keys (concatenated, a new array) and the element-wise total of `sums`
    (their log loss, correct and row counts), so the AUC is that of all their rows."""
    keys = self._keys[:self.rows]
    sums = np.array([self._log_loss, self._correct, self.rows], np.float64)
    if gather is not None:
      keys, sums = gather(keys, sums)
    keys.sort()  # in place: no copy (the rows added stay the same multiset)
    log_loss_sum, correct, rows = sums
    if rows == 0:
      return {"auc": float("nan"), "logloss": float("nan"), "accuracy": float("nan"), "rows": 0}
    return {"auc": auc_of_sorted_keys(keys), "logloss": float(log_loss_sum / rows),
            "accuracy": float(correct / rows), "rows": int(rows)}
