"""Sequence features through the sharded embedding engine, against numpy float64.

A batch carries pooled ids (one-hot or multi-hot flat bags) and sequences of ids
(name -> [B, L], with lengths [B]) read from the same tables; the engine returns
the sequences' vectors unpooled, [B, L, D], and the sparse optimiser receives one
gradient per valid position. The one-device step equals numpy's, and every
sharding type, alone and mixed, on 8 simulated devices gives the one-device step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from dlrm_jax import parallel
from dlrm_jax.embedding import (EmbeddingCollection, IdOutOfRangeError, SequenceSpec, TableSpec,
                                make_sparse_optimizer)
from dlrm_jax.embedding.planner import parse_overrides, plan_tables
from dlrm_jax.embedding.sharded import ShardedEmbedding
from dlrm_jax.specs import MeshSpec

BATCH, DIM, LR = 16, 8, 0.1
ROWS = (40, 24, 16, 32)
# (name, table, capacity): two sequences of t0 (ids repeat across them), one of t2.
SEQUENCES = (("items", 0, 6), ("recent", 0, 3), ("cats", 2, 5))
OPTIMIZERS = {"sgd": "", "adagrad": "initial_accumulator_value=0.1"}
# The pooled features' ids per sample: one id each ([B, 4]; every bag of width 1), or flat
# multi-hot bags ([B, 7]; bags of several widths, pooled by segment sums).
HOTNESS = {"one_hot": (1, 1, 1, 1), "multi_hot": (2, 1, 3, 1)}


def _collection(hotness=HOTNESS["one_hot"]):
  return EmbeddingCollection([TableSpec(f"t{i}", r, DIM, hotness=h)
                              for i, (r, h) in enumerate(zip(ROWS, hotness))],
                             sequences=[SequenceSpec(n, f"t{t}") for n, t, _ in SEQUENCES])


def _batch(hotness=HOTNESS["one_hot"], seed=0):
  """Pooled ids (flat bags of `hotness`) and sequences with lengths 0, 1, ragged and full,
  their ids drawn mostly from a few rows (repeats within a sequence, across sequences,
  samples and the pooled bags); padding positions hold the table's last row (used nowhere
  else) or junk ids."""
  rng = np.random.default_rng(seed)
  sparse = np.concatenate([rng.integers(0, 3, (BATCH, h)) for h in hotness], 1).astype(np.int32)
  sequences, lengths = {}, {}
  for name, t, cap in SEQUENCES:
    ids = np.where(rng.random((BATCH, cap)) < 0.6, rng.integers(0, 4, (BATCH, cap)),
                   rng.integers(0, ROWS[t] - 1, (BATCH, cap)))
    length = rng.integers(0, cap + 1, BATCH)
    length[:4] = (0, 1, cap, cap // 2)
    pad = np.arange(cap)[None, :] >= length[:, None]
    junk = rng.choice([ROWS[t] - 1, -1, ROWS[t] + 7], (BATCH, cap))
    sequences[name] = np.where(pad, junk, ids).astype(np.int32)
    lengths[name] = length.astype(np.int32)
  return {"sparse": sparse, "sequences": sequences, "sequence_lengths": lengths}


def _targets(seed=1):
  """The loss's weights: loss = sum(pooled * wp) + sum over sequences of sum(seq * ws)."""
  rng = np.random.default_rng(seed)
  return {"pooled": rng.normal(size=(BATCH, len(ROWS), DIM)).astype(np.float32),
          **{n: rng.normal(size=(BATCH, cap, DIM)).astype(np.float32)
             for n, _, cap in SEQUENCES}}


def _reference(tables, batch, targets, optimizer, hotness=HOTNESS["one_hot"]):
  """numpy float64: the embeddings, and the tables after one step of a linear loss."""
  tables = [np.asarray(t, np.float64) for t in tables]
  grads = [np.zeros_like(t) for t in tables]
  starts = np.cumsum((0,) + hotness)
  bags = [batch["sparse"][:, a:b] for a, b in zip(starts[:-1], starts[1:])]
  pooled = np.stack([tables[f][ids].sum(1) for f, ids in enumerate(bags)], 1)
  for f, ids in enumerate(bags):
    for j in range(ids.shape[1]):
      np.add.at(grads[f], ids[:, j], targets["pooled"][:, f])
  sequences = {}
  for name, t, cap in SEQUENCES:
    ids, length = batch["sequences"][name], batch["sequence_lengths"][name]
    valid = np.arange(cap)[None, :] < length[:, None]
    sequences[name] = np.where(valid[..., None], tables[t][np.where(valid, ids, 0)], 0.0)
    np.add.at(grads[t], ids[valid], targets[name][valid])
  if optimizer == "sgd":
    updated = [w - LR * g for w, g in zip(tables, grads)]
  else:  # element-wise Adagrad from an accumulator of 0.1: untouched rows have g = 0
    updated = [w - LR * g / (np.sqrt(0.1 + g * g) + 1e-10) for w, g in zip(tables, grads)]
  return pooled, sequences, updated


def _step(devices, overrides, optimizer, hotness, replicas=1):
  """One step of the tables alone: (initial tables, pooled, sequences, updated tables)."""
  coll = _collection(hotness)
  batch, targets = _batch(hotness), _targets()
  mesh, axes = parallel.make_mesh(MeshSpec(devices, replicas, "explicit"))
  plan = plan_tables(coll.specs, devices // replicas, batch_size=BATCH, min_column_width=1,
                     overrides=parse_overrides(overrides))
  if overrides:
    kinds = dict(kv.split(":", 1) for kv in overrides.split(","))
    assert [p.kind for p in plan.placements] == [kinds[s.name].split(":")[0] for s in coll.specs]
  emb = ShardedEmbedding(coll, plan, mesh, axes)
  opt = make_sparse_optimizer(optimizer, OPTIMIZERS[optimizer])
  tables = jax.jit(emb.init, out_shardings=emb.table_shardings())(np.uint32(3))
  initial = emb.to_arrays(tables)
  state = emb.init_optimizer(opt, tables)
  rows = NamedSharding(mesh, emb.batch_spec)
  batch, targets = jax.device_put((batch, targets), rows)

  @jax.jit
  def step(tables, state, batch, targets):
    forward = emb.forward(tables, batch)

    def loss(vectors):
      out = forward.exchange(vectors)
      value = jnp.sum(out.pooled * targets["pooled"])
      value += sum(jnp.sum(v * targets[k]) for k, v in out.sequences.items())
      return value, out

    grads, out = jax.grad(loss, has_aux=True)(forward.vectors)
    tables, state = forward.apply_gradients(opt, tables, state, grads, LR, 0)
    return out, tables

  out, tables = step(tables, state, batch, targets)
  return (initial, np.asarray(out.pooled), {k: np.asarray(v) for k, v in out.sequences.items()},
          emb.to_arrays(tables))


_ONE_DEVICE = {}


def _one_device(optimizer, hot):
  if (optimizer, hot) not in _ONE_DEVICE:
    _ONE_DEVICE[optimizer, hot] = _step(1, "", optimizer, HOTNESS[hot])
  return _ONE_DEVICE[optimizer, hot]


def _assert_matches(got, want):
  for a, b in zip(got, want, strict=True):
    if isinstance(a, dict):
      assert set(a) == set(b)
      a, b = [a[k] for k in sorted(a)], [b[k] for k in sorted(b)]
    for x, y in zip(a, b, strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("hot", list(HOTNESS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_one_device_matches_numpy(optimizer, hot):
  """Vectors are the table rows at valid positions and zeros at padding; the update sums
  the gradients of repeated rows (within a sequence, across sequences, samples and the
  pooled bags) and leaves the rows only padding names untouched."""
  batch, targets = _batch(HOTNESS[hot]), _targets()
  initial, pooled, sequences, updated = _one_device(optimizer, hot)
  want_pooled, want_sequences, want_updated = _reference(initial, batch, targets, optimizer,
                                                         HOTNESS[hot])
  np.testing.assert_allclose(pooled, want_pooled, rtol=1e-6, atol=1e-7)
  for name, _, cap in SEQUENCES:
    assert sequences[name].shape == (BATCH, cap, DIM)
    np.testing.assert_allclose(sequences[name], want_sequences[name], rtol=1e-6, atol=1e-7)
  assert not sequences["items"][0].any()  # length 0
  assert sequences["items"][1, 0].any() and not sequences["items"][1, 1:].any()  # length 1
  for t, (got, want) in enumerate(zip(updated, want_updated)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"table t{t}")
  # t2's last row appears only at padding positions: not updated.
  np.testing.assert_array_equal(updated[2][-1], initial[2][-1])


def test_padding_positions_hand_no_rows_to_the_optimiser():
  """Only the pooled ids and the positions below each length reach the sparse update as
  rows of the table; padding positions are past-the-end rows, which it drops (a touched
  row with a zero gradient would still move lazy Adam's moments)."""
  coll = _collection()
  mesh, axes = parallel.make_mesh(MeshSpec(1, 1, "explicit"))
  emb = ShardedEmbedding(coll, plan_tables(coll.specs, 1, batch_size=BATCH), mesh, axes)
  tables = jax.jit(emb.init, out_shardings=emb.table_shardings())(np.uint32(3))
  batch = jax.device_put(_batch(), NamedSharding(mesh, emb.batch_spec))
  rows = np.asarray(jax.jit(emb.lookup)(tables, batch)["table_wise"]["rows"])
  real = sum(int(np.sum(v)) for v in _batch()["sequence_lengths"].values()) + BATCH * len(ROWS)
  assert rows.size > real and int((rows < sum(ROWS)).sum()) == real


# Each sharding type for every table, and mixed plans (the sequences' table t0 row-wise
# and table-wise); t0 and t2 share device 3 in the table-wise plan.
PLANS = {
    "table_wise": "t0:table_wise:3,t1:table_wise:0,t2:table_wise:3,t3:table_wise:7",
    "row_wise": "t0:row_wise,t1:row_wise,t2:row_wise,t3:row_wise",
    "column_wise": "t0:column_wise,t1:column_wise,t2:column_wise,t3:column_wise",
    "replicated": "t0:replicated,t1:replicated,t2:replicated,t3:replicated",
    "mixed": "t0:row_wise,t1:replicated,t2:column_wise,t3:table_wise:5",
    "mixed_2x4": "t0:table_wise:1,t1:row_wise,t2:replicated,t3:column_wise",
}


@pytest.mark.parametrize("optimizer, hot", [("adagrad", "one_hot"), ("adagrad", "multi_hot")])
@pytest.mark.parametrize("plan", list(PLANS))
def test_every_layout_on_8_devices_matches_one_device(plan, optimizer, hot):
  """The same step on 8 devices (a 2 x 4 mesh for mixed_2x4) gives the one-device
  embeddings and updated tables, for every sharding type, with the sequences' positions
  beside one-hot features (bags of one width) and multi-hot bags (of several). Adagrad
  divides by the summed gradient's square, so a repeated row whose gradients were not
  summed (or summed twice) gives another row; SGD is checked here on the mixed plan."""
  got = _step(8, PLANS[plan], optimizer, HOTNESS[hot], replicas=2 if plan == "mixed_2x4" else 1)
  _assert_matches(got, _one_device(optimizer, hot))


def test_sgd_on_8_devices_matches_one_device():
  _assert_matches(_step(8, PLANS["mixed"], "sgd", HOTNESS["one_hot"]),
                  _one_device("sgd", "one_hot"))


def test_the_gpu_kernel_serves_sequences(monkeypatch):
  """`SortedLookup` (matmul pooling, scan-summed updates) gives the portable one-device
  step on the mixed plan, with multi-hot bags beside the sequences."""
  from dlrm_jax.embedding import kernels

  want = _one_device("adagrad", "multi_hot")
  monkeypatch.setitem(kernels.KERNELS, "cpu", kernels.SortedLookup())
  _assert_matches(_step(8, PLANS["mixed"], "adagrad", HOTNESS["multi_hot"]), want)


def test_a_batch_of_sequences_only_and_one_without_sequences():
  """Without "sparse" the pooled part is [B, 0, D] and tables no sequence reads are left
  alone; without "sequences" the collection's pooled lookup is unchanged."""
  coll = _collection()
  mesh, axes = parallel.make_mesh(MeshSpec(8, 1, "explicit"))
  plan = plan_tables(coll.specs, 8, batch_size=BATCH, min_column_width=1,
                     overrides=parse_overrides(PLANS["mixed"]))
  emb = ShardedEmbedding(coll, plan, mesh, axes)
  tables = jax.jit(emb.init, out_shardings=emb.table_shardings())(np.uint32(3))
  arrays = emb.to_arrays(tables)
  batch = _batch()
  rows = NamedSharding(mesh, emb.batch_spec)
  only = jax.device_put({k: batch[k] for k in ("sequences", "sequence_lengths")}, rows)
  out = jax.jit(emb.embed_all)(tables, only)
  assert out.pooled.shape == (BATCH, 0, DIM)
  _, want, _ = _reference(arrays, batch, _targets(), "sgd")
  for name in want:
    np.testing.assert_allclose(out.sequences[name], want[name], rtol=1e-6, atol=1e-7)
  pooled = jax.jit(emb.embed)(tables, jax.device_put({"sparse": batch["sparse"]}, rows))
  np.testing.assert_allclose(pooled, np.asarray(coll.lookup(
      coll.from_arrays(arrays), jnp.asarray(batch["sparse"]))), rtol=1e-6, atol=1e-7)

  opt = make_sparse_optimizer("sgd")
  state = emb.init_optimizer(opt, tables)

  @jax.jit
  def step(tables, state, batch):
    forward = emb.forward(tables, batch)
    grads = jax.grad(lambda v: sum(jnp.sum(x) for x in forward.exchange(v).sequences.values())
                     )(forward.vectors)
    return forward.apply_gradients(opt, tables, state, grads, LR, 0)[0]

  assert set(emb.forward(tables, only).vectors) == {"row_wise", "column_wise"}  # t0 and t2
  updated = emb.to_arrays(step(tables, state, only))
  for t in (1, 3):
    np.testing.assert_array_equal(updated[t], arrays[t])
  assert not np.array_equal(updated[0], arrays[0])


@pytest.mark.parametrize("change, message", [
    (lambda b: b["sequences"].update(items=b["sequences"]["items"][:, 0]),
     r"sequence 'items': ids must have shape \[batch=16, capacity\], got \(16,\)"),
    (lambda b: b["sequence_lengths"].update(cats=np.zeros((16, 1), np.int32)),
     r"sequence_lengths\['cats'\] must have shape \(16,\), got \(16, 1\)"),
    (lambda b: b.pop("sequence_lengths"),
     r"sequence_lengths must give the length of each sequence \['cats', 'items', 'recent'\], "
     r"got None"),
    (lambda b: b["sequences"].pop("recent"),
     r"the batch's sequences \['cats', 'items'\] are not the collection's sequence features "
     r"\['cats', 'items', 'recent'\]"),
    (lambda b: b.pop("sequences"), "the batch has sequence_lengths but no sequences"),
    (lambda b: [b.pop(k) for k in list(b)],
     r"a batch needs categorical ids \(sparse\), sequences, or both"),
    (lambda b: [b.pop(k) for k in list(b) if not k.startswith("sequence")]
     + [b["sequences"].update({k: v[:, :0] for k, v in b["sequences"].items()})],
     r"a batch of sequences only needs a sequence of capacity >= 1"),
])
def test_wrong_sequence_fields_raise_one_line(change, message):
  coll = _collection()
  mesh, axes = parallel.make_mesh(MeshSpec(1, 1, "explicit"))
  emb = ShardedEmbedding(coll, plan_tables(coll.specs, 1, batch_size=BATCH), mesh, axes)
  batch = _batch()
  change(batch)
  with pytest.raises(ValueError, match="^" + message + "$"):
    emb.bags(batch)


def test_collection_checks_sequence_ids_and_tables():
  """Ids are checked at valid positions only, lengths against the capacity; a sequence
  must read a known table."""
  coll = _collection()
  batch = _batch()
  coll.check_sequence_ids(batch["sequences"], batch["sequence_lengths"])  # junk only at padding
  batch["sequences"]["cats"][2, 0] = 16  # sample 2 has the full length
  with pytest.raises(IdOutOfRangeError, match=r"^sequence 'cats' \(table 't2', 16 rows\) has id "
                     r"16 at sample 2, position 0 \(1 out-of-range ids in this batch\); ids "
                     r"must be in \[0, 16\)$"):
    coll.check_sequence_ids(batch["sequences"], batch["sequence_lengths"])
  batch["sequence_lengths"]["recent"][5] = 4
  with pytest.raises(ValueError, match=r"^sequence 'recent' has length 4 at sample 5; lengths "
                     r"must be in \[0, 3\] \(its capacity\)$"):
    coll.check_sequence_ids(batch["sequences"], batch["sequence_lengths"])
  with pytest.raises(ValueError, match=r"sequence feature 'h' reads table 'nope', which is not "
                     r"one of the tables \['t0'\]"):
    EmbeddingCollection([TableSpec("t0", 4, 2)], sequences=[SequenceSpec("h", "nope")])
