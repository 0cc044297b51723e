"""Synthetic generators: determinism, statistics, a learnable teacher."""

import numpy as np
import pytest

from dlrm_jax.data import RandomData, SyntheticCTR
from dlrm_jax.data.prefetch import prefetch
from dlrm_jax.metrics import roc_auc

ROWS = [1000, 50, 7, 20000]


def test_batches_are_deterministic_and_random_access():
  g = SyntheticCTR(ROWS, 13, 64, seed=3)
  a, b = g.batch(5), SyntheticCTR(ROWS, 13, 64, seed=3).batch(5)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  stream = g.batches(start=4)
  next(stream)
  np.testing.assert_array_equal(next(stream)["sparse"], a["sparse"])
  assert not np.array_equal(g.batch(6)["sparse"], a["sparse"])
  assert not np.array_equal(g.batch(5, "eval")["dense"], a["dense"])
  assert not np.array_equal(SyntheticCTR(ROWS, 13, 64, seed=4).batch(5)["dense"], a["dense"])


@pytest.mark.parametrize("cls", [RandomData, SyntheticCTR])
def test_shapes_dtypes_and_id_ranges(cls):
  g = cls(ROWS, 13, 512, seed=0)
  b = g.batch(0)
  assert b["dense"].shape == (512, 13) and b["dense"].dtype == np.float32
  assert b["sparse"].shape == (512, 4) and b["sparse"].dtype == np.int32
  assert b["label"].shape == (512,) and b["label"].dtype == np.float32
  assert set(np.unique(b["label"])) <= {0.0, 1.0}
  assert (b["sparse"] >= 0).all() and (b["sparse"] < np.array(ROWS)).all()
  assert (b["dense"] >= 0).all()
  assert g.batch(1, batch_size=7)["dense"].shape == (7, 13)


def test_synthetic_ctr_statistics():
  g = SyntheticCTR([10000] * 3, 13, 4096, seed=0, zipf_exponent=1.2, dense_missing_rate=0.5)
  batches = [g.batch(i) for i in range(10)]
  ids = np.concatenate([b["sparse"][:, 0] for b in batches])
  counts = np.sort(np.bincount(ids, minlength=10000))[::-1]
  # Power law: the 10 hottest ids take a large share, most ids are rare.
  assert counts[:10].sum() > 0.2 * ids.size
  assert (counts > 0).sum() < 0.6 * 10000
  # Hot ids are scattered over the table, not packed at the front.
  hottest = np.argsort(np.bincount(ids, minlength=10000))[::-1][:10]
  assert hottest.max() > 1000
  dense = np.concatenate([b["dense"] for b in batches])
  assert (dense == 0).mean() > 0.1  # missing values (and zero counts) map to 0
  assert dense.max() > 5.0  # heavy tail: log(1 + count) of large counts
  labels = np.concatenate([b["label"] for b in batches])
  assert 0.1 < labels.mean() < 0.5


def test_teacher_is_informative_and_random_is_not():
  g = SyntheticCTR(ROWS, 13, 4096, seed=0)
  b = g.batch(0, "eval")
  assert roc_auc(b["label"], g.teacher_probability(b)) > 0.7
  r = RandomData(ROWS, 13, 4096, seed=0).batch(0)
  assert abs(r["label"].mean() - 0.5) < 0.05


def test_invalid_generator_arguments():
  with pytest.raises(ValueError, match="zipf_exponent"):
    SyntheticCTR(ROWS, 13, 8, seed=0, zipf_exponent=0.0)
  with pytest.raises(ValueError, match="dense_missing_rate"):
    SyntheticCTR(ROWS, 13, 8, seed=0, dense_missing_rate=1.5)
  with pytest.raises(ValueError, match="split"):
    RandomData(ROWS, 13, 8, seed=0).batch(0, "test")


def test_prefetch_keeps_order_and_reraises():
  assert list(prefetch(iter(range(10)), size=3)) == list(range(10))

  def failing():
    yield 1
    raise RuntimeError("boom")

  it = prefetch(failing())
  assert next(it) == 1
  with pytest.raises(RuntimeError, match="boom"):
    next(it)


def test_random_multi_hot_bags():
  g = RandomData(ROWS, 13, 64, seed=0, hotness=3)
  b = g.batch(0)
  assert b["sparse"].shape == (64, 4, 3) and "sparse_mask" not in b
  assert (b["sparse"] < np.array(ROWS)[None, :, None]).all()
  v = RandomData(ROWS, 13, 64, seed=0, hotness=4, variable_hotness=True).batch(0)
  lengths = v["sparse_mask"].sum(-1)
  assert lengths.min() >= 1 and lengths.max() <= 4 and len(np.unique(lengths)) > 1
  assert (v["sparse"][~v["sparse_mask"]] == 0).all()
