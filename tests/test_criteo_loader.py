"""The prepared-data loader: every row once per epoch across processes, exact restore, refusals."""

import json
import os

import numpy as np
import pytest

from dlrm_jax import parallel
from dlrm_jax.data import format as fmt
from dlrm_jax.data.loader import CriteoData, iterate_epoch


def write_prepared(root, shard_sizes, *, train_rows=None, hotness=None, vocab=1 << 20):
  """A prepared directory whose row r has sparse[:, 0] == r and label r % 2."""
  hotness = hotness or [1] * fmt.NUM_SPARSE
  width = sum(hotness)
  os.makedirs(os.path.join(root, fmt.SHARD_DIR), exist_ok=True)
  shards, start = [], 0
  for i, n in enumerate(shard_sizes):
    name = f"s{i:03d}"
    rows = np.arange(start, start + n)
    sparse = np.tile(rows[:, None], (1, width)).astype(np.int32) % vocab
    sparse[:, 0] = rows
    for field, value, shape in (("label", rows % 2, ()),
                                ("dense", np.repeat(rows[:, None], 13, 1), (13,)),
                                ("sparse", sparse, (width,))):
      w = fmt.NpyAppender(fmt.shard_path(root, name, field), fmt.DTYPES[field], shape)
      w.append(value)
      w.close()
    shards.append({"name": name, "rows": n})
    start += n
  total = start
  train = total * 3 // 4 if train_rows is None else train_rows
  test_end = train + (total - train + 1) // 2
  meta = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "dataset": "kaggle",
          "rows": total, "shards": shards, "hotness": hotness, "vocab_sizes": [vocab] * 26,
          "splits": {"train": [[0, train]], "test": [[train, test_end]], "val": [[test_end, total]]},
          "options": {"max_ind_range": None}}
  fmt.write_json_atomic(os.path.join(root, fmt.METADATA_FILE), meta)
  return meta


def ids(batch):
  return batch["sparse"][:, 0].tolist()


@pytest.mark.parametrize("processes", [1, 2, 3])
@pytest.mark.parametrize("drop_remainder", [False, True])
def test_every_train_row_once_per_epoch_across_processes(tmp_path, processes, drop_remainder):
  write_prepared(str(tmp_path), [700, 333, 1, 1200], train_rows=2011)
  batch = 48 * processes  # the global batch
  loaders = [CriteoData(str(tmp_path), batch, seed=5, block_rows=64, shuffle_buffer=256,
                        process_index=p, process_count=processes, drop_remainder=drop_remainder)
             for p in range(processes)]
  per_epoch = loaders[0].num_batches("train")
  assert per_epoch == (2011 // batch if drop_remainder else -(-2011 // batch))
  for epoch in range(2):
    seen = []
    for data in loaders:
      batches = list(iterate_epoch(data, epoch))
      assert len(batches) == per_epoch  # the same count in every process
      sizes = {len(b["label"]) for b in batches[:-1]}
      assert sizes <= {batch // processes}
      for b in batches:
        assert b["dense"].dtype == np.float32 and b["dense"].shape[1] == 13
        assert b["sparse"].dtype == np.int32 and b["label"].dtype == np.float32
        np.testing.assert_array_equal(b["label"], np.array(ids(b)) % 2)
        np.testing.assert_array_equal(b["dense"][:, 5], np.array(ids(b), np.float32))
        seen.extend(ids(b))
    assert len(seen) == len(set(seen))  # no row twice
    assert set(seen) <= set(range(2011))  # train rows only
    if drop_remainder:
      assert len(seen) == per_epoch * batch
    else:
      assert sorted(seen) == list(range(2011))  # every row exactly once
  # Shuffled: not in order, and another order in the next epoch.
  e0 = [i for b in iterate_epoch(loaders[0], 0) for i in ids(b)]
  e1 = [i for b in iterate_epoch(loaders[0], 1) for i in ids(b)]
  assert e0 != sorted(e0) and e0 != e1


def test_each_epoch_deals_the_blocks_into_new_batches(tmp_path):
  """With a shuffle buffer smaller than the data (4 blocks of 64 rows of 32), the blocks
  that meet in a batch change from epoch to epoch: a new order within the same windows
  would keep every batch's rows within the same 4 blocks. The pairs of blocks that share
  a batch overlap by about 1 in 10 between two epochs when dealt at random."""
  write_prepared(str(tmp_path), [2048], train_rows=2048)
  data = CriteoData(str(tmp_path), 32, seed=7, block_rows=64, shuffle_buffer=256)

  def block_pairs(epoch):
    pairs = set()
    for b in iterate_epoch(data, epoch):
      blocks = sorted({i // 64 for i in ids(b)})
      pairs |= {(x, y) for x in blocks for y in blocks if x < y}
    return pairs

  first, second = block_pairs(0), block_pairs(1)
  assert len(first) >= 32 and len(second) >= 32  # batches span several blocks
  assert len(first & second) < 0.5 * len(second), (len(first & second), len(second))


def test_order_is_seeded_and_unshuffled_reads_in_order(tmp_path):
  write_prepared(str(tmp_path), [500, 500])
  a = [ids(b) for b in iterate_epoch(CriteoData(str(tmp_path), 32, seed=1), 0)]
  b = [ids(b) for b in iterate_epoch(CriteoData(str(tmp_path), 32, seed=1), 0)]
  c = [ids(b) for b in iterate_epoch(CriteoData(str(tmp_path), 32, seed=2), 0)]
  assert a == b and a != c
  plain = [i for b in iterate_epoch(CriteoData(str(tmp_path), 32, shuffle=False), 0) for i in ids(b)]
  assert plain == list(range(len(plain)))


def test_restore_gives_the_identical_next_batches(tmp_path):
  write_prepared(str(tmp_path), [300, 450, 250], train_rows=1000)
  data = CriteoData(str(tmp_path), 64, seed=3, block_rows=32, shuffle_buffer=128)
  it = data.batches(0, "train")
  for _ in range(20):  # past an epoch boundary (15 batches per epoch)
    next(it)
  state = json.loads(json.dumps(it.state()))  # survives a JSON round trip (checkpoints)
  want = [next(it) for _ in range(5)]
  fresh = CriteoData(str(tmp_path), 64, seed=3, block_rows=32, shuffle_buffer=128).batches(0)
  fresh.restore(state)
  for w in want:
    got = next(fresh)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])
  # Prefetching: the state is the next batch to be consumed, not the next produced.
  pre = CriteoData(str(tmp_path), 64, seed=3, block_rows=32, shuffle_buffer=128).batches(0)
  pre = pre.prefetched(size=3)
  for _ in range(20):
    next(pre)
  assert pre.state() == state
  np.testing.assert_array_equal(next(pre)["sparse"], want[0]["sparse"])
  # A state of another order is refused, with the reason.
  other = CriteoData(str(tmp_path), 64, seed=4, block_rows=32, shuffle_buffer=128).batches(0)
  with pytest.raises(ValueError, match="seed was 3, is 4"):
    other.restore(state)


@pytest.mark.parametrize("processes", [1, 3])
def test_eval_batches_in_order_per_process(tmp_path, processes):
  write_prepared(str(tmp_path), [400, 400], train_rows=600)
  loaders = [CriteoData(str(tmp_path), 30, process_index=p, process_count=processes)
             for p in range(processes)]
  n = loaders[0].num_batches("test")
  assert n == -(-100 // 30)
  got = []
  for i in range(n):
    for data in loaders:
      got.extend(ids(data.batch(i, "eval")))  # "eval" is eval_split="test"
  assert got == list(range(600, 700))
  if processes == 1:
    assert [i for b in loaders[0].batches(0, "val") for i in ids(b)] == list(range(700, 800))
  with pytest.raises(IndexError, match="past the end"):
    loaders[0].batch(n, "test")


def test_multi_hot_batches_are_the_stored_rows(tmp_path):
  """A multi-hot directory's batches are its stored flat rows, [B, sum(hotness)]: no
  padding to the widest bag and no mask."""
  hotness = [1, 3] + [2] * 24
  meta = write_prepared(str(tmp_path), [200], hotness=hotness, vocab=1000)
  data = CriteoData(str(tmp_path), 16)
  assert data.hotness == tuple(hotness)
  b = data.batch(0, "eval")
  assert b["sparse"].shape == (16, 52) and "sparse_mask" not in b
  stored = np.load(fmt.shard_path(str(tmp_path), "s000", "sparse"))
  test_start = meta["splits"]["test"][0][0]
  np.testing.assert_array_equal(b["sparse"], stored[test_start:test_start + 16])
  train = next(iter(iterate_epoch(data, 0)))
  np.testing.assert_array_equal(train["sparse"], stored[np.array(ids(train))])
  write_prepared(str(tmp_path / "even"), [50], hotness=[4] * 26)
  e = CriteoData(str(tmp_path / "even"), 4).batch(0, "eval")
  assert e["sparse"].shape == (4, 104) and "sparse_mask" not in e


def test_a_multi_hot_directory_sets_and_checks_the_hotness(tmp_path):
  """configure_data takes the hotness from the prepared metadata, make_data refuses a
  config whose hotness differs, and a train step runs on the flat rows."""
  from conftest import small_criteo_config
  from dlrm_jax.config import ConfigError
  from dlrm_jax.data import configure_data, make_data
  from dlrm_jax.specs import RunSpec
  from dlrm_jax.task import Task

  hotness = [1, 3] + [2] * 24
  write_prepared(str(tmp_path), [300], hotness=hotness, vocab=1000)
  c = configure_data(small_criteo_config(tmp_path))
  assert c.data.hotness == "-".join(str(h) for h in hotness)
  run = RunSpec.from_config(c)
  assert run.data.hotness == tuple(hotness)
  batch = make_data(run).batch(0)
  task = Task(run)
  task.collection.check_ids(batch["sparse"], batch.get("sparse_mask"))
  state, out = task.train_step(task.init_state(0), batch)
  assert np.isfinite(float(out["loss"]))
  c.data.hotness = 2
  with pytest.raises(ConfigError, match=r"data.hotness='2-2-.*holds bags of hotness '1-3-2-"):
    make_data(RunSpec.from_config(c))
  write_prepared(str(tmp_path / "even"), [50], hotness=[4] * 26)
  assert configure_data(small_criteo_config(tmp_path / "even")).data.hotness == 4
  write_prepared(str(tmp_path / "one"), [50])
  one = configure_data(small_criteo_config(tmp_path / "one"))  # one-hot: unchanged
  assert one.data.hotness == 1 and RunSpec.from_config(one).data.hotness == (1,) * 26


def test_refuses_incomplete_and_incompatible_directories(tmp_path):
  root = str(tmp_path / "d")
  write_prepared(root, [100])
  CriteoData(root, 10)
  os.remove(fmt.shard_path(root, "s000", "dense"))
  with pytest.raises(fmt.FormatError, match="incomplete.*s000.dense.npy is missing"):
    CriteoData(root, 10)
  root2 = str(tmp_path / "v")
  meta = write_prepared(root2, [100])
  fmt.write_json_atomic(os.path.join(root2, fmt.METADATA_FILE), dict(meta, format_version=0))
  with pytest.raises(fmt.FormatError, match="format version 0.*reads version 1"):
    CriteoData(root2, 10)
  root3 = str(tmp_path / "p")
  os.makedirs(os.path.join(root3, fmt.PROGRESS_DIR))
  with pytest.raises(fmt.FormatError, match="incomplete.*has not finished"):
    CriteoData(root3, 10)
  with pytest.raises(fmt.FormatError, match="no such directory"):
    CriteoData(str(tmp_path / "nothing"), 10)
  root4 = str(tmp_path / "t")
  write_prepared(root4, [100])
  with open(fmt.shard_path(root4, "s000", "sparse"), "r+b") as f:
    f.truncate(1000)
  with pytest.raises(fmt.FormatError, match="damaged.*s000.sparse.npy has 1000 bytes"):
    CriteoData(root4, 10)
  write_prepared(str(tmp_path / "ok"), [100])
  with pytest.raises(ValueError, match="multiple of process_count"):
    CriteoData(str(tmp_path / "ok"), 10, process_count=3)


def test_global_batch_places_process_local_rows():
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  n = 2 * len(jax.devices())
  batch = {"dense": np.arange(n * 13, dtype=np.float32).reshape(n, 13),
           "sparse": np.arange(n * 26, dtype=np.int32).reshape(n, 26),
           "label": np.arange(n, dtype=np.float32)}
  out = parallel.global_batch(batch, NamedSharding(mesh, P("data")))
  for k, v in batch.items():
    assert out[k].shape == v.shape
    assert len(out[k].sharding.device_set) == len(jax.devices())
    np.testing.assert_array_equal(np.asarray(out[k]), v)
