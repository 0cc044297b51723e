"""Synthetic click data, generated batch by batch and never materialised.

Two generators:

- `RandomData`: what the reference's random mode does (uniform dense values in
  [0, 1), uniform ids, coin-flip labels). There is nothing to learn; it is for
  throughput work.
- `SyntheticCTR`: Criteo-like statistics (Zipf id frequencies, heavy-tailed
  non-negative counts with missing values, log(1 + x) transformed as Criteo
  preprocessing does) with labels drawn from a hidden teacher, a fixed logistic
  model over the dense features, per-id effects and a few pairwise id
  interactions. A model can learn it, and the teacher's own AUC on held-out
  samples is the best any model can do.

Multi-hot data (a hotness per feature) comes as flat bags, 'sparse' [B, L] with
L = sum(hotness) and feature f's ids in columns offsets[f] .. offsets[f] + h_f,
as the prepared Criteo files store a row; one-hot data is the case h_f = 1.

Every batch is a pure function of (seed, split, batch index), so a run can
resume at any step and streams of billions of rows cost no memory.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

Batch = dict[str, np.ndarray]

_SPLITS = {"train": 0, "eval": 1}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _split_code(split: str) -> int:
  if split not in _SPLITS:
    raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
  return _SPLITS[split]


_MASK64 = (1 << 64) - 1


def mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective, well-mixing hash of uint64 values."""
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _mix64_int(x: int) -> int:
  """`mix64` on a Python int (no numpy scalar overflow checks)."""
  x &= _MASK64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
  return x ^ (x >> 31)


def hashed_uniform(seed: int, table: int | np.ndarray, ids: np.ndarray,
                   component: int = 0) -> np.ndarray:
  """A fixed pseudo-random value in [-1, 1) for each (seed, table, id, component).

  `table` is an int, or an array of table indices that broadcasts against `ids`
  (e.g. `np.arange(F)` for ids of shape [B, F]).
  """
  tables = np.asarray(table, dtype=np.int64)
  keys = np.array([_mix64_int(seed * 1_000_003 + int(t) * 4099 + component * 131 + 1)
                   for t in tables.reshape(-1)], dtype=np.uint64).reshape(tables.shape)
  x = mix64(ids.astype(np.uint64) * _GOLDEN + keys)
  return ((x >> np.uint64(11)).astype(np.float64) * 2.0**-52 - 1.0).astype(np.float32)


class _Generator:
  """Shared plumbing: per-batch RNG streams and iteration (a `DataSource`)."""

  process_local = False  # every batch is the whole global batch

  def __init__(self, table_rows: Sequence[int], num_dense: int, batch_size: int, seed: int):
    self.table_rows = np.asarray(table_rows, dtype=np.int64)
    self.num_dense = int(num_dense)
    self.batch_size = int(batch_size)
    self.seed = int(seed)

  @property
  def num_tables(self) -> int:
    return len(self.table_rows)

  def _rng(self, split: str, index: int, batch_size: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, _split_code(split), int(index), int(batch_size)])

  def batch(self, index: int, split: str = "train", batch_size: int | None = None) -> Batch:
    """Batch number `index` of `split`: {'dense' [B, nd] f32, 'sparse' [B, L] i32 (L:
    the sum of the hotness, F for one-hot data), 'label' [B] f32}."""
    b = self.batch_size if batch_size is None else int(batch_size)
    return self._make(self._rng(split, index, b), b)

  def batches(self, start: int = 0, split: str = "train",
              batch_size: int | None = None) -> "GeneratedStream":
    """Endless stream of batches from `start` on."""
    return GeneratedStream(self, split, start, batch_size)

  def teacher_probability(self, batch: Batch) -> np.ndarray | None:
    """None: no model is known to be the best on this data."""
    del batch
    return None

  def _make(self, rng: np.random.Generator, b: int) -> Batch:
    raise NotImplementedError


class GeneratedStream:
  """A generator's batches from a position on; the position is all a checkpoint needs
  (each batch is a function of its number)."""

  def __init__(self, source: _Generator, split: str, start: int, batch_size: int | None):
    self.source, self.split, self.batch_size = source, split, batch_size
    self.position = int(start)

  def __iter__(self) -> "GeneratedStream":
    return self

  def __next__(self) -> Batch:
    batch = self.source.batch(self.position, self.split, self.batch_size)
    self.position += 1
    return batch

  def state_at(self, position: int) -> dict:
    return {"position": int(position)}

  def restore(self, state: dict) -> None:
    self.position = int(state["position"])


def per_feature(hotness: int | Sequence[int], num_tables: int) -> tuple[int, ...]:
  """One hotness for all features, or one per feature, as a tuple of `num_tables` values."""
  hot = (int(hotness),) * num_tables if np.isscalar(hotness) else tuple(int(h) for h in hotness)
  if len(hot) != num_tables or min(hot) < 1:
    raise ValueError(f"hotness={hotness}: give one value >= 1, or one per table "
                     f"({num_tables})")
  return hot


class RandomData(_Generator):
  """The reference's random mode: uniform dense, uniform ids, random 0/1 labels.

  `hotness` (one for all features, or one per feature) gives each feature a bag
  of that many ids: flat bags, 'sparse' [B, sum(hotness)]. With
  `variable_hotness` feature f's bag holds 1..h_f ids, padded: 'sparse' is
  [B, F, max(hotness)] and 'sparse_mask' marks the ids present (padding ids are 0).
  """

  def __init__(self, table_rows: Sequence[int], num_dense: int, batch_size: int, seed: int, *,
               hotness: int | Sequence[int] = 1, variable_hotness: bool = False):
    super().__init__(table_rows, num_dense, batch_size, seed)
    self.hotness = per_feature(hotness, self.num_tables)
    self.variable_hotness = bool(variable_hotness)

  def _make(self, rng: np.random.Generator, b: int) -> Batch:
    dense = rng.random((b, self.num_dense), dtype=np.float32)
    width = max(self.hotness)
    if self.variable_hotness:
      shape, rows = (b, self.num_tables, width), self.table_rows[:, None]
    else:  # flat bags (one id per feature where every hotness is 1)
      shape, rows = (b, sum(self.hotness)), np.repeat(self.table_rows, self.hotness)
    sparse = (rng.random(shape) * rows).astype(np.int32)
    label = np.round(rng.random(b, dtype=np.float32))
    batch = {"dense": dense, "sparse": sparse, "label": label}
    if self.variable_hotness:
      most = width if len(set(self.hotness)) == 1 else np.asarray(self.hotness)
      lengths = rng.integers(1, most + 1, (b, self.num_tables))
      mask = np.arange(width)[None, None, :] < lengths[:, :, None]
      batch["sparse"] = np.where(mask, sparse, 0).astype(np.int32)
      batch["sparse_mask"] = mask
    return batch


class SyntheticCTR(_Generator):
  """Criteo-like features with labels from a hidden logistic teacher.

  Args:
    table_rows: rows of each table (ids are drawn in [0, rows)).
    num_dense: number of dense features.
    batch_size: default batch size.
    seed: everything (teacher and data) derives from it.
    zipf_exponent: id frequencies fall as rank^-exponent (Criteo's are ~1.1).
    dense_missing_rate: largest per-feature probability that a dense value is
      missing (-> 0); each feature draws its own rate in [0, this].
    sparse_missing_rate: the same for categorical features (missing -> id 0,
      as the reference maps an empty field).
    teacher_dense_scale, teacher_id_scale, teacher_pair_scale: spread of the
      teacher's dense weights, per-id effects and pairwise id interactions.
    teacher_num_pairs: how many feature pairs interact in the teacher.
    positive_rate: the click rate the teacher's bias is set for (roughly).
    hotness: ids per feature (one for all, or one per feature): each id of a
      bag is drawn (and missing) independently; the teacher sees a bag through
      the mean of its ids' effects and of their interaction vectors. With
      hotness 1 the teacher is the one-hot one, and one-hot batches are those
      of the one-hot generator.
  """

  def __init__(self, table_rows: Sequence[int], num_dense: int, batch_size: int, seed: int, *,
               zipf_exponent: float = 1.1, dense_missing_rate: float = 0.3,
               sparse_missing_rate: float = 0.1, teacher_dense_scale: float = 0.5,
               teacher_id_scale: float = 0.6, teacher_pair_scale: float = 1.0,
               teacher_num_pairs: int = 8, positive_rate: float = 0.25,
               hotness: int | Sequence[int] = 1):
    super().__init__(table_rows, num_dense, batch_size, seed)
    self.hotness = per_feature(hotness, self.num_tables)
    if zipf_exponent <= 0:
      raise ValueError(f"zipf_exponent={zipf_exponent} must be > 0")
    for name, rate in (("dense_missing_rate", dense_missing_rate),
                       ("sparse_missing_rate", sparse_missing_rate)):
      if not 0 <= rate < 1:
        raise ValueError(f"{name}={rate} must be in [0, 1)")
    self.zipf_exponent = float(zipf_exponent)
    fixed = np.random.default_rng([self.seed, 7919])
    f, nd = self.num_tables, self.num_dense
    # Feature statistics.
    self.dense_mu = fixed.uniform(0.0, 4.0, nd)
    self.dense_sigma = fixed.uniform(0.5, 2.0, nd)
    self.dense_missing = fixed.uniform(0.0, dense_missing_rate, nd)
    self.sparse_missing = fixed.uniform(0.0, sparse_missing_rate, f)
    # A bijection per table so that the hottest ids are scattered over the table.
    self.id_shift = fixed.integers(0, 2**31, f) % self.table_rows
    self.id_mult = np.array([_coprime_multiplier(int(r), fixed) for r in self.table_rows])
    # The teacher.
    self.teacher_dense_w = fixed.normal(0.0, teacher_dense_scale, nd) / np.sqrt(nd)
    self.teacher_dense_center = self.dense_mu * 0.8
    self.teacher_id_scale = teacher_id_scale / np.sqrt(f) * 2.0
    num_pairs = min(teacher_num_pairs, f * (f - 1) // 2)
    all_pairs = [(i, j) for i in range(f) for j in range(i)]
    chosen = fixed.choice(len(all_pairs), num_pairs, replace=False) if num_pairs else []
    self.teacher_pairs = [all_pairs[k] for k in chosen]
    self.teacher_pair_scale = teacher_pair_scale / max(1.0, np.sqrt(num_pairs))
    self.teacher_pair_rank = 4
    self.teacher_bias = math.log(positive_rate / (1 - positive_rate))

  def _ids(self, rng: np.random.Generator, b: int) -> np.ndarray:
    """Bounded power-law ranks via the inverse CDF, then scattered per table: [b, L],
    each column drawn from its feature's table (L = F for one-hot data)."""
    per_id = lambda values: np.repeat(values, self.hotness)  # noqa: E731
    table_rows = per_id(self.table_rows)
    u = rng.random((b, len(table_rows)))
    rows = table_rows.astype(np.float64)
    s = self.zipf_exponent
    if abs(s - 1.0) < 1e-9:
      x = np.power(rows + 1.0, u)
    else:
      top = np.power(rows + 1.0, 1.0 - s)
      x = np.power(1.0 + u * (top - 1.0), 1.0 / (1.0 - s))
    rank = np.minimum(np.floor(x).astype(np.int64) - 1, table_rows - 1)
    ids = (rank * per_id(self.id_mult) + per_id(self.id_shift)) % table_rows
    missing = rng.random((b, len(table_rows))) < per_id(self.sparse_missing)
    return np.where(missing, 0, ids).astype(np.int32)

  def _dense(self, rng: np.random.Generator, b: int) -> np.ndarray:
    counts = np.floor(np.exp(rng.normal(self.dense_mu, self.dense_sigma, (b, self.num_dense))))
    counts = counts - 1.0  # Criteo counts start at 0 and are heavy-tailed.
    missing = rng.random((b, self.num_dense)) < self.dense_missing
    counts = np.where(missing, 0.0, np.maximum(counts, 0.0))
    return np.log1p(counts).astype(np.float32)

  def teacher_logit(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """The hidden model's click logit for each sample of a batch (ids [B, F], or flat
    bags [B, sum(hotness)])."""
    logit = self.teacher_bias + (dense - self.teacher_dense_center) @ self.teacher_dense_w
    effects = self._feature_values(sparse, 0)
    logit = logit + self.teacher_id_scale * effects.sum(axis=1, dtype=np.float64)
    if self.teacher_pairs:
      f, g = np.array(self.teacher_pairs).T
      for k in range(self.teacher_pair_rank):
        values = self._feature_values(sparse, 1 + k)
        vf, vg = values[:, f], values[:, g]
        logit = logit + self.teacher_pair_scale * 1.5 * (vf * vg).sum(axis=1, dtype=np.float64)
    return logit.astype(np.float64)

  def _feature_values(self, sparse: np.ndarray, component: int) -> np.ndarray:
    """The teacher's value `component` of each feature, [B, F] float32: its id's, or the
    mean over its bag's ids."""
    f = self.num_tables
    if sparse.ndim != 2 or sparse.shape[1] not in (f, sum(self.hotness)):
      raise ValueError(f"ids must be [batch, {f}] or flat bags [batch, {sum(self.hotness)}], "
                       f"got {sparse.shape}")
    if sparse.shape[1] == f:
      return hashed_uniform(self.seed, np.arange(f), sparse, component)
    values = hashed_uniform(self.seed, np.repeat(np.arange(f), self.hotness), sparse, component)
    starts = np.concatenate([[0], np.cumsum(self.hotness)[:-1]])
    sums = np.add.reduceat(values, starts, axis=1, dtype=np.float64)
    return (sums / np.asarray(self.hotness)).astype(np.float32)

  def teacher_probability(self, batch: Batch) -> np.ndarray:
    """The hidden teacher's click probability: the best achievable."""
    return 1.0 / (1.0 + np.exp(-self.teacher_logit(batch["dense"], batch["sparse"])))

  def _make(self, rng: np.random.Generator, b: int) -> Batch:
    dense = self._dense(rng, b)
    sparse = self._ids(rng, b)
    p = 1.0 / (1.0 + np.exp(-self.teacher_logit(dense, sparse)))
    label = (rng.random(b) < p).astype(np.float32)
    return {"dense": dense, "sparse": sparse, "label": label}


def _coprime_multiplier(n: int, rng: np.random.Generator) -> int:
  """A multiplier coprime to n, so that id -> (a * id + c) mod n is a bijection."""
  if n <= 2:
    return 1
  while True:
    a = int(rng.integers(1, n))
    if math.gcd(a, n) == 1:
      return a
