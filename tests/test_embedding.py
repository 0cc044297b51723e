"""Embedding collection and sparse optimisers against numpy references.

Every optimiser must equal its documented row-wise definition applied to the
summed gradient of each touched row (duplicates included), and untouched rows
and their optimiser state must not change.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config
from dlrm_jax.embedding import (EmbeddingCollection, IdOutOfRangeError, TableSpec, kernels,
                                make_sparse_optimizer, sum_duplicates)
from dlrm_jax.task import Task

LR = 0.3


def np_update(name, table, state, rows, grads, step):
  """The documented update rules in float64 numpy, one touched row at a time."""
  table = table.astype(np.float64).copy()
  state = {k: v.astype(np.float64).copy() for k, v in state.items()}
  for r in np.unique(rows):
    g = grads[rows == r].astype(np.float64).sum(0)
    if name == "sgd":
      table[r] -= LR * g
    elif name == "rowwise_adagrad":
      state["accumulator"][r] += np.mean(g * g)
      table[r] -= LR * g / (np.sqrt(state["accumulator"][r]) + 1e-8)
    elif name == "adagrad":
      state["accumulator"][r] += g * g
      table[r] -= LR * g / (np.sqrt(state["accumulator"][r]) + 1e-10)
    elif name == "adam":
      t = step + 1
      state["mu"][r] = 0.9 * state["mu"][r] + 0.1 * g
      state["nu"][r] = 0.999 * state["nu"][r] + 0.001 * g * g
      m_hat = state["mu"][r] / (1 - 0.9**t)
      v_hat = state["nu"][r] / (1 - 0.999**t)
      table[r] -= LR * m_hat / (np.sqrt(v_hat) + 1e-8)
  return table, state


OPTIMIZERS = ["sgd", "rowwise_adagrad", "adagrad", "adam"]
# The local lookups that apply the optimisers: the portable one (XLA's scatter-adds) and
# the GPU's, which sums repeated rows with a segmented scan and has no scatter-add.
KERNELS = {"portable": kernels.PortableLookup(), "sorted": kernels.SortedLookup()}


def _kernel_update(kernel, opt):
  def update(tables, state, rows, grads, lr, step):
    table, state = KERNELS[kernel].update(opt, tables["stacked"], state, rows, grads, lr, step)
    return {"stacked": table}, state
  return update


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_matches_numpy_with_duplicates(name, kernel):
  rng = np.random.default_rng(0)
  total, dim, n = 50, 4, 40
  table = rng.normal(size=(total, dim)).astype(np.float32)
  opt = make_sparse_optimizer(name)
  tables = {"stacked": jnp.asarray(table)}
  state = opt.init(tables)
  ref_table, ref_state = table, {k: np.asarray(v) for k, v in state.items()}
  update = jax.jit(_kernel_update(kernel, opt))
  for step in range(3):
    rows = rng.integers(0, 12, n).astype(np.int32)  # many duplicates, rows >= 12 untouched
    grads = rng.normal(size=(n, dim)).astype(np.float32)
    tables, state = update(tables, state, jnp.asarray(rows), jnp.asarray(grads),
                           jnp.float32(LR), jnp.int32(step))
    ref_table, ref_state = np_update(name, ref_table, ref_state, rows, grads, step)
  # Adam's bias corrections (1 - 0.999^t in float32) cost it about 1e-5 absolute.
  atol = 2e-5 if name == "adam" else 2e-6
  np.testing.assert_allclose(np.asarray(tables["stacked"]), ref_table, rtol=2e-5, atol=atol)
  for k in ref_state:
    np.testing.assert_allclose(np.asarray(state[k]), ref_state[k], rtol=2e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(tables["stacked"])[12:], table[12:])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_out_of_range_slots_are_dropped(name, kernel):
  """Rows equal to the table size (padding) leave table and state untouched."""
  opt = make_sparse_optimizer(name)
  tables = {"stacked": jnp.ones((5, 2))}
  state = opt.init(tables)
  new_tables, new_state = _kernel_update(kernel, opt)(tables, state, jnp.array([5, 5, 1], jnp.int32),
                                     jnp.ones((3, 2)), 0.1, 0)
  changed = np.any(np.asarray(new_tables["stacked"]) != 1.0, axis=1)
  assert changed.tolist() == [False, True, False, False, False]


@pytest.mark.parametrize("method", ["segment_sum", "scan"])
def test_sum_duplicates(method):
  rows = jnp.array([3, 1, 3, 0, 1, 3], jnp.int32)
  grads = jnp.arange(12, dtype=jnp.float32).reshape(6, 2)
  unique, summed = sum_duplicates(rows, grads, fill_row=10, method=method)
  assert np.asarray(unique).tolist() == [0, 1, 3, 10, 10, 10]
  np.testing.assert_allclose(np.asarray(summed)[:3], [[6, 7], [2 + 8, 3 + 9], [0 + 4 + 10, 1 + 5 + 11]])
  np.testing.assert_array_equal(np.asarray(summed)[3:], 0)


def _bag_collection():
  return EmbeddingCollection([TableSpec("a", 7, 3, "sum"), TableSpec("b", 5, 3, "mean"),
                              TableSpec("c", 9, 3, "sum")])


def test_pooling_sum_and_mean_with_weights_and_mask():
  coll = _bag_collection()
  rng = np.random.default_rng(0)
  tables = coll.init(0)
  per_table = coll.to_arrays(tables)
  ids = np.stack([rng.integers(0, r, (4, 5)) for r in coll.rows], axis=1).astype(np.int32)
  weights = rng.random((4, 3, 5)).astype(np.float32)
  mask = rng.random((4, 3, 5)) < 0.6
  mask[0, 1] = False  # an empty bag
  got = np.asarray(coll.lookup(tables, jnp.asarray(ids), jnp.asarray(weights), jnp.asarray(mask)))
  want = np.zeros((4, 3, 3))
  for b in range(4):
    for f, spec in enumerate(coll.specs):
      vecs = per_table[f][ids[b, f]] * (weights[b, f] * mask[b, f])[:, None]
      want[b, f] = vecs.sum(0)
      if spec.pooling == "mean":
        want[b, f] /= max(1, mask[b, f].sum())
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[0, 1], 0.0)


def test_one_hot_lookup_and_offsets():
  coll = _bag_collection()
  tables = coll.init(1)
  per_table = coll.to_arrays(tables)
  ids = np.array([[6, 4, 8], [0, 0, 0]], np.int32)
  got = np.asarray(coll.lookup(tables, jnp.asarray(ids)))
  for f in range(3):
    np.testing.assert_array_equal(got[:, f], per_table[f][ids[:, f]])


def test_init_bounds_and_determinism():
  coll = EmbeddingCollection([TableSpec("small", 4, 8), TableSpec("big", 10000, 8),
                              TableSpec("fixed", 10, 8, init_scale=0.5)])
  a = coll.to_arrays(jax.jit(coll.init)(7))
  b = coll.to_arrays(coll.init(7))
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert np.abs(a[0]).max() <= 0.5 and np.abs(a[1]).max() <= 0.01
  assert np.abs(a[1]).max() > 0.0099 and abs(a[1].mean()) < 1e-3
  assert np.abs(a[2]).max() <= 0.5 and np.abs(a[2]).max() > 0.4
  assert not np.array_equal(a[1], coll.to_arrays(coll.init(8))[1])


def test_blocked_init_equals_whole_table_init(monkeypatch):
  """Tables are initialised a block of rows at a time (the last block overlapping the one
  before it); the values are those of the whole-table computation, on one device and on a
  mixed plan over 8 devices."""
  from dlrm_jax.embedding import collection as collection_lib

  coll = EmbeddingCollection([TableSpec("a", 37, 8), TableSpec("b", 5, 8), TableSpec("c", 61, 8)])
  whole = np.asarray(coll.init_rows(3, jnp.arange(coll.total_rows, dtype=jnp.int32),
                                    jnp.arange(8, dtype=jnp.uint32)))
  monkeypatch.setattr(collection_lib, "INIT_BLOCK_ROWS", 16)  # 103 rows: 7 blocks
  np.testing.assert_array_equal(np.asarray(jax.jit(coll.init)(3)["stacked"]), whole)
  c = load_config("tiny", devices=8)
  c.arch_sparse_feature_size = 8
  c.arch_mlp_bot = "13-8-8"
  c.arch_embedding_size = "-".join(str(r) for r in (500, 300, 200, 120, 500, 64, 40, 250))
  c.sharding.min_column_width = 1
  c.sharding.overrides = "t0:table_wise:3,t1:row_wise,t2:column_wise,t3:replicated,t4:row_wise"
  task = Task(c)
  tables = jax.jit(task.embedding.init, out_shardings=task.state_shardings.tables)(
      jnp.uint32(3))
  coll = task.collection
  whole = np.asarray(coll.init_rows(3, jnp.arange(coll.total_rows, dtype=jnp.int32),
                                    jnp.arange(8, dtype=jnp.uint32)))
  for got, o, r in zip(task.embedding.to_arrays(tables), coll.offsets, coll.rows, strict=True):
    np.testing.assert_array_equal(got, whole[o:o + r])


def test_check_ids_bags_ignore_padding():
  coll = _bag_collection()
  ids = np.zeros((2, 3, 4), np.int32)
  mask = np.ones((2, 3, 4), bool)
  ids[1, 2, 3] = 9  # table c has 9 rows
  with pytest.raises(IdOutOfRangeError, match="feature 2 .*sample 1.*position 3"):
    coll.check_ids(ids, mask)
  mask[1, 2, 3] = False
  coll.check_ids(ids, mask)
  with pytest.raises(ValueError, match="shape"):
    coll.check_ids(np.zeros((2, 4), np.int32))


def test_table_spec_validation():
  with pytest.raises(ValueError, match="pooling"):
    TableSpec("x", 3, 2, pooling="max")
  with pytest.raises(ValueError, match="rows"):
    TableSpec("x", 0, 2)
  mixed = EmbeddingCollection([TableSpec("x", 3, 2), TableSpec("y", 3, 4)])  # test_mixed.py
  assert (mixed.dim, mixed.widths, mixed.nbytes) == (4, (4, 2), 3 * 6 * 4)


def _bag_batch(task, rng, hot=3, batch=32):
  rows = np.array(task.spec.table_rows)
  # Few distinct ids so that rows repeat within and across bags.
  ids = (rng.integers(0, 4, (batch, len(rows), hot)) % rows[None, :, None]).astype(np.int32)
  return {"dense": rng.random((batch, 13)).astype(np.float32),
          "sparse": ids,
          "sparse_weights": rng.random((batch, len(rows), hot)).astype(np.float32) + 0.5,
          "sparse_mask": rng.random((batch, len(rows), hot)) < 0.7,
          "label": (rng.random(batch) < 0.5).astype(np.float32)}


@pytest.mark.parametrize("name,pooling", [
    ("sgd", "mean"), ("rowwise_adagrad", "sum"), ("adagrad", "mean"), ("adam", "sum")])
def test_train_step_with_bags_matches_dense_reference(name, pooling):
  """Through the whole train step: per-row gradients of weighted, masked bags."""
  c = load_config("tiny")
  c.embedding_optimizer = name
  c.embedding_pooling = pooling
  c.learning_rate = LR
  task = Task(c)
  assert set(task.embedding.groups) == {"table_wise"}  # one device: the plain stacked layout
  state = task.init_state(0)
  rng = np.random.default_rng(1)
  ref_table = _stacked(task, state.tables)
  ref_state = {k: np.asarray(v) for k, v in state.emb_opt_state["table_wise"].items()}
  dense_grad_fn = jax.jit(jax.grad(task.functions.loss, argnums=1))
  for step in range(2):
    batch = _bag_batch(task, rng)
    # The dense gradient of the loss with respect to the whole table.
    dense_grad = _stacked(task, dense_grad_fn(state.params, state.tables,
                                              task.device_batch(batch)))
    touched = np.unique(np.asarray(task.collection.global_rows(batch["sparse"]))[batch["sparse_mask"]])
    ref_table, ref_state = np_update(name, ref_table, ref_state, touched, dense_grad[touched], step)
    state, _ = task.train_step(state, batch)
  atol = 2e-5 if name == "adam" else 5e-6
  np.testing.assert_allclose(_stacked(task, state.tables), ref_table, rtol=5e-5, atol=atol)
  for k in ref_state:
    np.testing.assert_allclose(np.asarray(state.emb_opt_state["table_wise"][k]), ref_state[k],
                               rtol=5e-5, atol=1e-8)


def _stacked(task, tables):
  """All tables of a (sharded) tables pytree as one [total_rows, D] host array."""
  return np.concatenate(task.embedding.to_arrays(tables))


def test_bag_sgd_step_equals_dense_optax_sgd():
  c = load_config("tiny")
  c.learning_rate = LR
  task = Task(c)
  state = task.init_state(0)
  host_batch = _bag_batch(task, np.random.default_rng(2))
  batch = task.device_batch(host_batch)

  @jax.jit
  def dense_sgd(params, tables):
    grads = jax.grad(task.functions.loss, argnums=(0, 1))(params, tables, batch)
    tx = optax.sgd(LR)
    return optax.apply_updates((params, tables), tx.update(grads, tx.init((params, tables)))[0])

  ref_params, ref_tables = dense_sgd(state.params, state.tables)
  new_state, _ = task.train_step(state, batch)
  np.testing.assert_allclose(_stacked(task, new_state.tables), _stacked(task, ref_tables),
                             rtol=1e-6, atol=1e-7)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(ref_params),
                       strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)


def test_optimizer_hyper_parameters_come_from_the_config():
  from dlrm_jax.config import ConfigError
  from dlrm_jax.embedding import SparseLazyAdam, SparseRowWiseAdagrad

  opt = make_sparse_optimizer("rowwise_adagrad", "eps=0.001, initial_accumulator_value=0.5")
  assert opt == SparseRowWiseAdagrad(eps=1e-3, initial_accumulator_value=0.5)
  assert make_sparse_optimizer("adam", {"b1": 0.8}) == SparseLazyAdam(b1=0.8)
  with pytest.raises(ConfigError, match=r"adam has no \['eps2'\]; .*'b1', 'b2', 'eps'"):
    make_sparse_optimizer("adam", "eps2=1")
  with pytest.raises(ConfigError, match="'b1' is not NAME=NUMBER"):
    make_sparse_optimizer("adam", "b1")
  with pytest.raises(ConfigError, match="embedding_optimizer='foo' is not one of"):
    make_sparse_optimizer("foo")
  c = load_config("tiny")
  c.embedding_optimizer = "rowwise_adagrad"
  c.embedding_optimizer_args = "initial_accumulator_value=0.25"
  state = Task(c).init_state(0)
  np.testing.assert_array_equal(np.asarray(state.emb_opt_state["table_wise"]["accumulator"]), 0.25)


def _flat_bag_collection():
  return EmbeddingCollection([TableSpec("a", 7, 3, "sum", hotness=2),
                              TableSpec("b", 5, 3, "mean", hotness=1),
                              TableSpec("c", 9, 3, "mean", hotness=4)])


def test_flat_bags_pool_as_padded_bags_and_numpy():
  """Flat bags [B, 7] (2, 1 and 4 ids end to end) pool to what the same bags padded to 4
  with a mask give, and to numpy's sums and means, with and without per-id weights."""
  coll = _flat_bag_collection()
  tables = coll.init(2)
  per_table = coll.to_arrays(tables)
  rng = np.random.default_rng(3)
  flat = np.concatenate([rng.integers(0, s.rows, (6, s.hotness)) for s in coll.specs],
                        axis=1).astype(np.int32)
  weights = rng.uniform(0.5, 1.5, flat.shape).astype(np.float32)
  starts = [0, 2, 3]
  padded, padded_w = np.zeros((6, 3, 4), np.int32), np.zeros((6, 3, 4), np.float32)
  mask = np.zeros((6, 3, 4), bool)
  for f, (o, s) in enumerate(zip(starts, coll.specs)):
    padded[:, f, :s.hotness], padded_w[:, f, :s.hotness] = (flat[:, o:o + s.hotness],
                                                            weights[:, o:o + s.hotness])
    mask[:, f, :s.hotness] = True
  for w, pw in ((None, None), (weights, padded_w)):
    got = np.asarray(coll.lookup(tables, jnp.asarray(flat), w))
    want = np.asarray(coll.lookup(tables, jnp.asarray(padded), pw, jnp.asarray(mask)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    ref = np.zeros((6, 3, 3))
    for f, (o, s) in enumerate(zip(starts, coll.specs)):
      ids = flat[:, o:o + s.hotness]
      scale = np.ones(ids.shape) if w is None else w[:, o:o + s.hotness]
      ref[:, f] = (per_table[f][ids] * scale[..., None]).sum(1)
      if s.pooling == "mean":
        ref[:, f] /= s.hotness
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
  # One id per feature [B, F] still means one id per feature (not flat bags).
  one = flat[:, starts]
  np.testing.assert_array_equal(np.asarray(coll.lookup(tables, jnp.asarray(one))),
                                np.stack([per_table[f][one[:, f]] for f in range(3)], 1))
  with pytest.raises(ValueError, match=r"\[batch, 7\] \(flat bags.*2-1-4.*\[batch, 3\]"):
    coll.lookup(tables, jnp.zeros((6, 5), jnp.int32))


def test_check_ids_of_flat_bags_names_the_feature_and_position():
  coll = _flat_bag_collection()
  ids = np.zeros((3, 7), np.int32)
  coll.check_ids(ids)
  ids[2, 5] = 9  # column 5: table c (9 rows), position 2 of its bag
  with pytest.raises(IdOutOfRangeError, match=r"feature 2 \(table 'c', 9 rows\) has id 9 at "
                                              r"sample 2 of the batch, position 2 of its bag"):
    coll.check_ids(ids)
  ids[2, 5], ids[1, 2] = 0, 5  # column 2: table b (5 rows, one id per sample)
  with pytest.raises(IdOutOfRangeError, match=r"feature 1 .* at sample 1 of the batch \("):
    coll.check_ids(ids)
  with pytest.raises(ValueError, match="hotness"):
    TableSpec("x", 3, 2, hotness=0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(dtype):
  from dlrm_jax.embedding.optimizers import stochastic_round

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=64), jnp.float32)
  near = x.astype(dtype).astype(jnp.float32)
  down = jnp.minimum(near, jnp.nextafter(x.astype(dtype), jnp.full_like(x, -jnp.inf, dtype))
                     .astype(jnp.float32))
  draws = 4000
  u = jnp.asarray(rng.random((draws, 64)), jnp.float32)
  r = jax.vmap(lambda u: stochastic_round(x, dtype, u))(u).astype(jnp.float32)
  lo = jnp.where(near <= x, near, down)
  hi = jnp.where(near <= x, jnp.nextafter(x.astype(dtype), jnp.full_like(x, jnp.inf, dtype))
                 .astype(jnp.float32), near)
  assert bool(jnp.all((r == lo) | (r == hi)))
  # Unbiased: the mean of the draws is x to within a few standard errors of a step.
  gap = np.asarray(hi - lo)
  err = np.abs(np.asarray(r.mean(0) - x))
  assert np.all(err <= 4 * gap * 0.5 / np.sqrt(draws) + 1e-12), err / gap
  # Values the type holds exactly stay as they are.
  exact = jnp.asarray([1.0, -0.5, 0.0, 3.0], jnp.float32)
  np.testing.assert_array_equal(stochastic_round(exact, dtype, jnp.full(4, 0.999)), exact)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_tables_are_stored_in_pairs_and_updated_in_place(dtype):
  """16-bit tables of even width are stored two values per 32-bit element: the compiled
  train step (tables donated) then needs no copy of them (XLA:CPU copies a whole 16-bit
  array to scatter rows into it: 2x the tables' bytes of temporaries before this), the
  tables read back as [rows, D] values, and a packed table's update is the unpacked
  one's, bit for bit."""
  from dlrm_jax.data import make_data
  from dlrm_jax.embedding.collection import PACKED, pack, unpack
  from dlrm_jax.embedding.optimizers import SparseRowWiseAdagrad
  from dlrm_jax.specs import RunSpec

  c = load_config("tiny")
  c.arch_embedding_size = "-".join(["50000"] * 8)
  c.embedding_dtype, c.embedding_optimizer = dtype, "rowwise_adagrad"
  task = Task(c)
  state = task.init_state(0)
  table_bytes = sum(t.nbytes for t in state.tables.values())
  assert table_bytes == 8 * 50000 * 4 * 2
  assert {t.dtype for t in state.tables.values()} == {PACKED[jnp.dtype(dtype)]}
  batch = task.device_batch(make_data(RunSpec.from_config(c)).batch(0))
  memory = task.lower_train_step(state, batch).compile().memory_analysis()
  assert memory.temp_size_in_bytes < table_bytes / 20, memory
  arrays = task.embedding.to_arrays(state.tables)
  assert arrays[0].shape == (50000, 4) and arrays[0].dtype == jnp.dtype(dtype)

  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(64, 6)), dtype)
  rows = jnp.asarray([3, 7, 7, 40], jnp.int32)
  grads = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  opt = SparseRowWiseAdagrad()
  args = (rows, grads, jnp.float32(0.1), jnp.int32(5))
  plain, plain_state = opt.update({"stacked": table}, opt.init({"stacked": table}), *args)
  packed = {"stacked": pack(table)}
  paired, paired_state = opt.update(packed, opt.init(packed), *args)
  assert paired["stacked"].dtype == PACKED[jnp.dtype(dtype)]
  np.testing.assert_array_equal(np.asarray(unpack(paired["stacked"])),
                                np.asarray(plain["stacked"]))
  np.testing.assert_array_equal(paired_state["accumulator"], plain_state["accumulator"])


def test_16_bit_sgd_keeps_updates_smaller_than_half_a_step():
  """lr * g of an eighth of bfloat16's step at 1.0 (2^-7): round-to-nearest would keep
  every row at 1.0; stochastic rounding moves an eighth of the values one step down, so
  the table's mean moves by the update on average."""
  from dlrm_jax.embedding.optimizers import SparseSGD

  n, d = 4096, 8
  table = jnp.ones((n, d), jnp.bfloat16)
  rows = jnp.arange(n, dtype=jnp.int32)
  grads = jnp.full((n, d), 2.0 ** -10, jnp.float32)
  out, _ = SparseSGD().update({"stacked": table}, {}, rows, grads, jnp.float32(1.0),
                              jnp.int32(3))
  new = np.asarray(out["stacked"], np.float32)
  assert out["stacked"].dtype == jnp.bfloat16
  moved = new != 1.0
  assert set(np.unique(new[moved])) == {1.0 - 2.0 ** -8}  # one step down (below 1: 2^-8)
  assert abs(moved.mean() - 0.25) < 0.03  # 2^-10 / 2^-8 of the values
  assert abs((1.0 - new).mean() - 2.0 ** -10) < 0.1 * 2.0 ** -10
  # Another step's noise differs; the same step's is the same (a fixed function).
  again, _ = SparseSGD().update({"stacked": table}, {}, rows, grads, jnp.float32(1.0),
                                jnp.int32(3))
  np.testing.assert_array_equal(np.asarray(again["stacked"], np.float32), new)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_row_wise_quantised_tables_against_numpy(fmt):
  """Each row as unsigned ints with a scale and a bias (FBGEMM's fused formats): the
  bytes per row, the nibble order, the error bound, and lookups (multi-hot, pooled) of
  the quantised set equal to lookups of the float table it stands for."""
  from dlrm_jax.embedding import quantized

  bits, scale_dtype = quantized.FORMATS[fmt]
  assert [quantized.row_bytes(fmt, d) for d in (16, 128)] == (
      [24, 136] if fmt == "int8" else [12, 68])
  rng = np.random.default_rng(0)
  table = rng.normal(size=(300, 16)).astype(np.float32) * rng.uniform(0.01, 1, (300, 1))
  table[7] = 0.25  # a constant row
  q = quantized.quantize(table, fmt)
  assert sum(v.nbytes for v in q.values()) == 300 * quantized.row_bytes(fmt, 16)
  assert q["scale"].dtype == scale_dtype and q[fmt].dtype == np.uint8
  # numpy re-derivation: levels, scale = range / levels, bias = min, round to nearest.
  levels = 2 ** bits - 1
  scale = q["scale"].astype(np.float64)[:, None]
  bias = q["bias"].astype(np.float64)[:, None]
  want = np.clip(np.rint((table - bias) / scale), 0, levels)
  np.testing.assert_allclose(q["bias"], table.min(1).astype(scale_dtype))
  codes = q[fmt] if bits == 8 else np.stack([q[fmt] & 15, q[fmt] >> 4], -1).reshape(300, 16)
  np.testing.assert_array_equal(codes, want)
  back = quantized.dequantize(q, 16)
  np.testing.assert_allclose(back, codes * scale + bias, rtol=1e-6, atol=1e-7)
  step = (table.max(1) - table.min(1))[:, None] / levels
  assert np.all(np.abs(back - table) <= 0.5 * step * (1 + 2 ** -9) + 1e-7)  # half a step
  np.testing.assert_allclose(back[7], 0.25, atol=1e-3)
  coll = EmbeddingCollection.uniform([100, 120, 80], 16, hotness=[1, 3, 2])
  flat = jnp.asarray(np.concatenate([rng.integers(0, r, (5, h)) for r, h in
                                     ((100, 1), (120, 3), (80, 2))], 1), jnp.int32)
  got = coll.lookup({k: jnp.asarray(v) for k, v in q.items()}, flat)
  np.testing.assert_allclose(got, coll.lookup({"stacked": jnp.asarray(back)}, flat),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dim", [1, 3, 5])
def test_row_wise_quantised_tables_of_odd_width(fmt, dim):
  """Odd widths (mixed-dimension tables): int4 rows take ceil(D / 2) bytes, the last
  high nibble 0 and unused; the dequantised rows are D wide and match the codes."""
  from dlrm_jax.embedding import quantized

  bits, _ = quantized.FORMATS[fmt]
  table = np.random.default_rng(dim).normal(size=(40, dim)).astype(np.float32)
  q = quantized.quantize(table, fmt)
  assert quantized.row_bytes(fmt, dim) == (dim if bits == 8 else (dim + 1) // 2) + (
      8 if bits == 8 else 4)
  assert sum(v.nbytes for v in q.values()) == 40 * quantized.row_bytes(fmt, dim)
  codes = q[fmt]
  if bits == 4:
    assert dim % 2 == 0 or np.all(codes[:, -1] >> 4 == 0)
    codes = np.stack([codes & 15, codes >> 4], -1).reshape(40, -1)[:, :dim]
  scale, bias = (q[k].astype(np.float64)[:, None] for k in ("scale", "bias"))
  np.testing.assert_array_equal(codes, np.clip(np.rint((table - bias) / scale), 0, 2 ** bits - 1))
  back = quantized.dequantize(q, dim)
  assert back.shape == (40, dim)
  np.testing.assert_allclose(back, codes * scale + bias, rtol=1e-6, atol=1e-7)
