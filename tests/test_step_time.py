"""The planner's time model (dlrm_jax.embedding.step_time): each layout's bytes per
device and phase as its docstring states them, counted here by hand, and the plan's
estimate of the slowest device."""

import numpy as np
import pytest

from dlrm_jax.embedding import EmbeddingCollection
from dlrm_jax.embedding.planner import plan_tables
from dlrm_jax.embedding.step_time import CPU, PHASES, Bandwidths, table_time

B, N, H, D, ROWS = 4096, 4, 3, 16, 100_000  # batch, devices, ids a sample, width, rows
PART = (N - 1) / N
IDS, VEC = B * H * 4, B * D * 4  # bytes of the batch's ids and of its pooled vectors


def _bytes(kind, device=0, slots=0, rows=ROWS):
  t = table_time(kind, device, rows=rows, dim=D, hot=H, batch=B, n=N, itemsize=4,
                 slots=lambda d: slots)
  return t.hbm, t.link


def test_table_wise_bytes_fall_on_its_owner():
  hbm, link = _bytes("table_wise", device=2, slots=D)  # per-element Adagrad
  lookup, exchange, update = range(3)
  want_update = B * H * D * 4 + min(B * H, ROWS) * (2 * D * 4 + 2 * D * 4)
  np.testing.assert_allclose(hbm[2], [B * H * D * 4 + VEC, 2 * VEC, want_update])
  assert not hbm[[0, 1, 3]].any()  # the others only send and receive their samples'
  share = PART * (IDS + 2 * VEC) / N
  np.testing.assert_allclose(link[:, exchange], [share, share, PART * (IDS + 2 * VEC) + share,
                                                 share])
  assert not link[:, [lookup, update]].any()


def test_row_wise_each_device_its_share_and_the_whole_exchange():
  hbm, link = _bytes("row_wise")
  want = [B * H / N * D * 4 + VEC, 2 * VEC, B * H / N * D * 4 + B * H / N * 2 * D * 4]
  np.testing.assert_allclose(hbm, [want] * N)
  np.testing.assert_allclose(link[:, 1], [PART * (IDS + 2 * VEC)] * N)


def test_column_wise_every_id_at_a_slice_of_the_width():
  hbm, link = _bytes("column_wise")
  w = D // N
  want = [B * H * w * 4 + B * w * 4, 2 * B * w * 4, B * H * w * 4 + B * H * 2 * w * 4]
  np.testing.assert_allclose(hbm, [want] * N)
  np.testing.assert_allclose(link[:, 1], [PART * (IDS + 2 * B * w * 4)] * N)


@pytest.mark.parametrize("rows", [100, ROWS])
def test_replicated_copies_exchange_touched_rows_or_a_dense_gradient(rows):
  """Fewer rows than twice the batch's ids: a dense gradient of every row all-reduced
  (twice its bytes over the ring) and every row updated; else every device's ids and
  gradients all-gathered and all of them applied on each copy."""
  hbm, link = _bytes("replicated", rows=rows)
  lookup, exchange, update = range(3)
  np.testing.assert_allclose(hbm[:, lookup], (B * H * D * 4 + VEC) / N)
  assert not hbm[:, exchange].any() and not link[:, exchange].any()
  if rows < B * H / 2:
    np.testing.assert_allclose(link[:, update], PART * 2 * rows * (D + 1) * 4)
    np.testing.assert_allclose(hbm[:, update], rows * D * 4 + rows * 2 * D * 4 + rows * D * 4)
  else:
    np.testing.assert_allclose(link[:, update], PART * B * H * (D + 1) * 4)
    np.testing.assert_allclose(hbm[:, update], B * H * D * 4 + B * H * 2 * D * 4)


def test_the_plan_estimates_its_slowest_device_and_prints_each_table():
  """`Plan.step_seconds` is the slowest device's sum over its tables, by phase, at the
  plan's bandwidths; the printed plan gives every table's phases and that step."""
  specs = EmbeddingCollection.uniform([400_000, 300_000, 2_000, 50], D).specs
  bw = Bandwidths(hbm=2e12, interconnect=1e11, source="test figures")
  plan = plan_tables(specs, N, batch_size=B, lookups=[H, 1, 2, 1], bandwidths=bw)
  per_device = np.zeros((N, len(PHASES)))
  for p, spec, h in zip(plan.placements, specs, [H, 1, 2, 1]):
    t = table_time(p.kind, p.device, rows=spec.rows, dim=D, hot=h, batch=B, n=N, itemsize=4,
                   slots=lambda d: 0)
    per_device += t.hbm / bw.hbm + t.link / bw.interconnect
  slowest = per_device[per_device.sum(1).argmax()]
  got = plan.step_seconds()
  assert [got[p] for p in PHASES] == pytest.approx(list(slowest))
  assert got["total"] == pytest.approx(slowest.sum())
  text = plan.describe()
  assert "test figures" in text and all(f"  {s.name} " in text for s in specs)
  assert f"{got['total'] * 1e3:.3f} ms on device" in text
  assert plan_tables(specs, N, batch_size=B).bandwidths == CPU  # the default: this CPU's


def test_without_bandwidths_there_is_no_estimate_and_splits_go_column_wise():
  """An accelerator without figures in `dlrm_jax.targets` gets no time model: the plan
  prints no estimate, `step_seconds` is empty, and a table too big for one device is
  split column-wise wherever its width allows (the rule without a time model)."""
  from dlrm_jax.task import device_bandwidths

  class Device:
    device_kind, platform = "an accelerator nobody described", "gpu"

  assert device_bandwidths(Device()) is None
  Device.platform = "cpu"
  assert device_bandwidths(Device()) == CPU
  specs = EmbeddingCollection.uniform([1_000_000, 1_000_000], 64).specs
  plan = plan_tables(specs, N, batch_size=B, memory_budget=130 * 2**20, min_column_width=16,
                     bandwidths=None)
  assert [p.kind for p in plan.placements] == ["column_wise"] * 2
  assert plan.step_seconds() == {} and "estimated time" not in plan.describe()
