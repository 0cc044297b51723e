"""Criteo preprocessing: equal to a per-row re-derivation, splits, bad input, resume, refusals."""

import gzip
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import CRITEO_DIR
from dlrm_jax.data import criteo
from dlrm_jax.data import format as fmt
from dlrm_jax.data.criteo_synth import expected_rows, write_raw

KAGGLE_HEAD = os.path.join(CRITEO_DIR, "kaggle_train_head10k.tsv")
TERABYTE_HEAD = os.path.join(CRITEO_DIR, "terabyte_day0_head1k.tsv")


def run(dataset, inputs, out, **kw):
  kw.setdefault("workers", 1)
  kw.setdefault("progress", False)
  kw.setdefault("log", lambda msg: None)
  return criteo.prepare(dataset, [str(p) for p in inputs], str(out), **kw)


def prepared(out):
  store = fmt.PreparedData(str(out))
  return store, store.read(0, store.num_rows)


def reference_renumbering(raw, moduli=None):
  """The reference's dictionaries: per feature, values numbered in order of first appearance."""
  ids = np.zeros(raw.shape, np.int64)
  for f in range(raw.shape[1]):
    seen = {}
    for i, v in enumerate(raw[:, f]):
      v = int(v) % moduli[f] if moduli else int(v)
      ids[i, f] = seen.setdefault(v, len(seen))
  return ids, [len(set(int(v) % (moduli[f] if moduli else 1 << 40) for v in raw[:, f]))
               for f in range(raw.shape[1])]


def frequency_vocabulary(raw, train_rows, threshold):
  """Per feature: values seen >= threshold times in train -> 1.. by decreasing count, else 0."""
  ids = np.zeros(raw.shape, np.int64)
  sizes = []
  for f in range(raw.shape[1]):
    counts = {}
    for v in raw[:train_rows, f]:
      counts[int(v)] = counts.get(int(v), 0) + 1
    kept = sorted((v for v, c in counts.items() if c >= threshold), key=lambda v: (-counts[v], v))
    row = {v: i + 1 for i, v in enumerate(kept)}
    ids[:, f] = [row.get(int(v), 0) for v in raw[:, f]]
    sizes.append(len(kept) + 1)
  return ids, sizes


def expected_arrays(path):
  rows = expected_rows(str(path))
  label = np.array([r[1] for r in rows])
  dense = np.array([r[2] for r in rows], np.float64).astype(np.float32)
  raw = np.array([r[3] for r in rows], np.uint64)
  return label, dense, raw


@pytest.fixture(scope="module")
def raw_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("raw") / "train.txt"
  write_raw(str(path), 1000, seed=7, vocab_sizes=[3, 50, 400, 1000] * 6 + [7, 7000],
            missing_rate=0.2, negative_rate=0.05)
  return path


@pytest.mark.parametrize("mode", ["hash", "reference", "frequency"])
def test_prepared_rows_equal_a_per_row_rederivation(raw_file, tmp_path, mode):
  """Many small pieces and shards; dense exact to float32 rounding, ids exact."""
  label, dense, raw = expected_arrays(raw_file)
  assert (raw >= 0x80000000).mean() > 0.2  # values above int32's range are exercised
  assert (raw == 0).any()  # missing values
  moduli = {"hash": [997] * 25 + [50], "reference": 997, "frequency": None}[mode]
  meta = run("kaggle", [raw_file], tmp_path / "out", categorical=mode, max_ind_range=moduli,
             frequency_threshold=2, piece_bytes=30_000, shard_rows=100)
  store, got = prepared(tmp_path / "out")
  assert len(meta["shards"]) > 10 and store.num_rows == 1000
  np.testing.assert_array_equal(got["label"], label)
  np.testing.assert_array_max_ulp(got["dense"], dense, maxulp=1)
  train = meta["split_rows"]["train"]
  if mode == "hash":  # one modulus per feature
    want, sizes = (raw % np.array(moduli, np.uint64)).astype(np.int64), moduli
  elif mode == "reference":
    want, sizes = reference_renumbering(raw, [997] * 26)
  else:
    want, sizes = frequency_vocabulary(raw, train, 2)
  np.testing.assert_array_equal(got["sparse"], want)
  assert meta["vocab_sizes"] == sizes
  assert got["sparse"].max(0).tolist() < sizes
  assert meta["options"]["categorical"] == mode
  assert not os.path.exists(tmp_path / "out" / fmt.PROGRESS_DIR)


def test_gzip_input_and_parallel_workers(raw_file, tmp_path):
  gz = tmp_path / "train.txt.gz"
  with open(raw_file, "rb") as f, gzip.open(gz, "wb") as g:
    g.write(f.read())
  a = run("kaggle", [gz], tmp_path / "a", categorical="reference")
  b = run("kaggle", [raw_file], tmp_path / "b", categorical="reference", workers=2,
          piece_bytes=50_000)
  assert a["vocab_sizes"] == b["vocab_sizes"]
  for k, v in prepared(tmp_path / "a")[1].items():
    np.testing.assert_array_equal(v, prepared(tmp_path / "b")[1][k])
  # A process without JAX forks its workers (this one, holding JAX, spawns them): the same rows.
  code = ("import sys; from dlrm_jax.data import criteo, workers; "
          "assert workers.start_method() == 'fork'; "
          "criteo.prepare('kaggle', [sys.argv[1]], sys.argv[2], categorical='reference', "
          "workers=2, piece_bytes=50_000, progress=False)")
  subprocess.run([sys.executable, "-c", code, str(raw_file), str(tmp_path / "c")], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for k, v in prepared(tmp_path / "c")[1].items():
    np.testing.assert_array_equal(v, prepared(tmp_path / "b")[1][k])
  import hashlib
  assert a["sources"][0]["sha256"] == hashlib.sha256(gz.read_bytes()).hexdigest()
  pieces = b["sources"][0]["sha256_pieces"]
  data = raw_file.read_bytes()
  assert [hashlib.sha256(data[s:e]).hexdigest() for s, e in pieces["ranges"]] == pieces["sha256"]


def test_splits_as_the_reference_makes_them(tmp_path):
  # Kaggle: 7 days by divmod, the first rows % 7 days one longer; day 6 -> test, val.
  assert criteo.kaggle_days(45_840_617) == [6_548_660] * 4 + [6_548_659] * 3
  s = criteo.make_splits("kaggle", [1000])
  assert s == {"train": [[0, 858]], "test": [[858, 929]], "val": [[929, 1000]]}
  # Terabyte: every day but the last trains; the last: test (first half, rounded up), val.
  days = []
  for d in range(3):
    days.append(tmp_path / f"day_{d}")
    write_raw(str(days[-1]), 101 + d, seed=d)
  meta = run("terabyte", [days[2], days[0], days[1]], tmp_path / "tb", categorical="hash",
             max_ind_range=1000)
  assert meta["file_rows"] == [101, 102, 103]  # day order, whatever the input order
  assert meta["splits"] == {"train": [[0, 203]], "test": [[203, 255]], "val": [[255, 306]]}


@pytest.mark.parametrize("kind", ["columns", "hex", "dense", "label"])
@pytest.mark.parametrize("where", ["plain", "later_piece", "gz"])
def test_bad_lines_name_file_line_and_field(tmp_path, kind, where):
  path = tmp_path / ("day.gz" if where == "gz" else "day.txt")
  line = 283 if where == "later_piece" else 5
  named = write_raw(str(path), 300, seed=1, bad_lines={line: kind})
  with pytest.raises(criteo.BadLineError) as e:
    run("kaggle", [path], tmp_path / "out", categorical="hash", max_ind_range=100,
        piece_bytes=12_000 if where == "later_piece" else 256 << 20)
  assert (e.value.path, e.value.line, e.value.field) == (str(path), line, named[line])
  assert f"{path}:{line}: {named[line]}:" in str(e.value) and "--skip-bad-lines" in str(e.value)


def test_skip_bad_lines_counts_and_reports(tmp_path):
  path = tmp_path / "day.txt"
  bad = {3: "columns", 10: "hex", 11: "dense", 400: "label", 401: "columns"}
  write_raw(str(path), 600, seed=2, bad_lines=bad)
  with open(path, "a") as f:
    f.write("\n")  # an empty line is a line with one field
  logs = []
  meta = run("kaggle", [path], tmp_path / "out", categorical="hash", max_ind_range=1000,
             skip_bad_lines=True, piece_bytes=20_000, log=logs.append)
  assert meta["bad_lines"] == 6 and meta["rows"] == 595
  assert [e.split(": ")[0] for e in meta["bad_line_examples"]] == [
      f"{path}:{n}" for n in (3, 10, 11, 400, 401, 601)]
  assert "Skipped 6 bad lines" in "\n".join(logs)
  want = expected_rows(str(path), skip_bad_lines=True)
  _, got = prepared(tmp_path / "out")
  np.testing.assert_array_equal(got["sparse"], np.array([r[3] for r in want], np.uint64) % 1000)


@pytest.mark.parametrize("categorical", ["hash", "reference"])
def test_the_bad_line_advice_is_a_command_that_works(tmp_path, categorical):
  """The user's path: a preparation stops on a bad line; the error's advice, the same
  command with --skip-bad-lines, continues it into the same --output, and the result
  equals a preparation that skipped bad lines from the start."""
  days = [tmp_path / f"day_{d}" for d in range(3)]
  for d, day in enumerate(days):
    write_raw(str(day), 300, seed=d, bad_lines={200: "hex"} if d == 1 else None)
  cmd = [sys.executable, "-m", "dlrm_jax.data.criteo", "prepare", "--dataset", "terabyte",
         "--input", *map(str, days), "--categorical", categorical, "--max-ind-range", "1000",
         "--piece-mb", "1", "--workers", "1", "--no-progress"]
  first = subprocess.run(cmd + ["--output", str(tmp_path / "out")], capture_output=True,
                         text=True)
  assert first.returncode == 1
  assert "rerun the same command with --skip-bad-lines" in first.stderr
  again = subprocess.run(cmd + ["--output", str(tmp_path / "out"), "--skip-bad-lines"],
                         capture_output=True, text=True)
  assert again.returncode == 0, again.stderr
  assert "now skipping bad lines" in again.stderr
  assert f"Skipped 1 bad line; the first one:\n  {days[1]}:200:" in again.stderr
  meta = fmt.read_metadata(str(tmp_path / "out"))
  assert meta["rows"] == 899 and meta["bad_lines"] == 1
  fresh = subprocess.run(cmd + ["--output", str(tmp_path / "fresh"), "--skip-bad-lines"],
                         capture_output=True, text=True)
  assert fresh.returncode == 0, fresh.stderr
  assert fmt.read_metadata(str(tmp_path / "fresh"))["vocab_sizes"] == meta["vocab_sizes"]
  for k, v in prepared(tmp_path / "out")[1].items():
    np.testing.assert_array_equal(v, prepared(tmp_path / "fresh")[1][k])


def test_unusable_files_are_refused(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"")
  with pytest.raises(criteo.InputError, match="empty.txt: empty file"):
    run("kaggle", [empty], tmp_path / "o1", categorical="hash", max_ind_range=10)
  gz_empty = tmp_path / "empty.gz"
  with gzip.open(gz_empty, "wb"):
    pass
  with pytest.raises(criteo.InputError, match="empty.gz: empty file"):
    run("kaggle", [gz_empty], tmp_path / "o2", categorical="hash", max_ind_range=10)
  full = tmp_path / "full.gz"
  write_raw(str(full), 2000, seed=3)
  truncated = tmp_path / "truncated.gz"
  truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
  with pytest.raises(criteo.InputError, match="truncated.gz: truncated gzip file"):
    run("kaggle", [truncated], tmp_path / "o3", categorical="hash", max_ind_range=10)
  with pytest.raises(criteo.InputError, match="no such file"):
    run("kaggle", [tmp_path / "missing.txt"], tmp_path / "o4", categorical="hash", max_ind_range=10)
  with pytest.raises(ValueError, match="needs max_ind_range"):
    run("kaggle", [full], tmp_path / "o5", categorical="hash")


def test_resume_keeps_finished_files_and_refuses_other_options(tmp_path):
  day0, day1, day2 = tmp_path / "day_0", tmp_path / "day_1", tmp_path / "day_2"
  write_raw(str(day0), 300, seed=0)
  write_raw(str(day1), 300, seed=1, bad_lines={200: "hex"})  # the run stops here
  write_raw(str(day2), 300, seed=2)
  out = tmp_path / "out"
  opts = dict(categorical="reference", piece_bytes=25_000)
  with pytest.raises(criteo.BadLineError):
    run("terabyte", [day0, day1, day2], out, **opts)
  with pytest.raises(fmt.FormatError, match="incomplete.*resume"):
    fmt.read_metadata(str(out))
  done = sorted(n for n in os.listdir(out / "shards") if n.startswith("0000-"))
  assert done  # day_0 finished before the failure
  stamps = {n: os.stat(out / "shards" / n).st_mtime_ns for n in done}
  with pytest.raises(fmt.FormatError, match="other options.*categorical"):
    run("terabyte", [day0, day1, day2], out, categorical="frequency", piece_bytes=25_000)
  write_raw(str(day1), 300, seed=1)  # fixed
  logs = []
  meta = run("terabyte", [day0, day1, day2], out, log=logs.append, **opts)
  assert any(l.startswith("Resuming:") for l in logs)
  # day_0's shards were not redone (raw values, rewritten only by the vocabulary stage).
  assert meta["rows"] == 900
  for n in done:
    if not n.endswith(".sparse.npy"):
      assert os.stat(out / "shards" / n).st_mtime_ns == stamps[n]
  fresh = run("terabyte", [day0, day1, day2], tmp_path / "fresh", **opts)
  for k, v in prepared(out)[1].items():
    np.testing.assert_array_equal(v, prepared(tmp_path / "fresh")[1][k])
  assert fresh["vocab_sizes"] == meta["vocab_sizes"]
  # Finished: the same command is a no-op; other options are refused.
  assert run("terabyte", [day0, day1, day2], out, **opts)["created"] == meta["created"]
  with pytest.raises(fmt.FormatError, match="already holds data prepared with other options"):
    run("terabyte", [day0, day1, day2], out, categorical="hash", max_ind_range=5)
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("x")
  with pytest.raises(fmt.FormatError, match="not empty"):
    run("terabyte", [day0, day1, day2], other, **opts)


def test_vocabulary_counting_in_bounded_memory_takes_more_passes(raw_file, tmp_path):
  logs = []
  small = run("kaggle", [raw_file], tmp_path / "small", categorical="frequency",
              frequency_threshold=1, vocab_memory_bytes=12 * 2000, log=logs.append)
  assert any("did not fit" in l for l in logs)
  big = run("kaggle", [raw_file], tmp_path / "big", categorical="frequency", frequency_threshold=1)
  assert small["vocab_sizes"] == big["vocab_sizes"]
  np.testing.assert_array_equal(prepared(tmp_path / "small")[1]["sparse"],
                                prepared(tmp_path / "big")[1]["sparse"])


def test_multi_hot_derivation(raw_file, tmp_path):
  run("kaggle", [raw_file], tmp_path / "one", categorical="hash", max_ind_range=500)
  hotness = [3, 1] + [2] * 24
  meta = criteo.make_multi_hot(str(tmp_path / "one"), str(tmp_path / "multi"), hotness, seed=1,
                               progress=False)
  assert meta["hotness"] == hotness
  _, one = prepared(tmp_path / "one")
  _, multi = prepared(tmp_path / "multi")
  assert multi["sparse"].shape == (1000, sum(hotness))
  offsets = fmt.sparse_offsets(hotness)
  np.testing.assert_array_equal(multi["sparse"][:, offsets], one["sparse"])  # the id comes first
  assert multi["sparse"].max() < 500 and multi["sparse"].min() >= 0
  np.testing.assert_array_equal(multi["dense"], one["dense"])
  # Bags are a fixed function of the id: equal ids, equal bags.
  bag = multi["sparse"][:, 0:3]
  first = {}
  for row in bag:
    assert first.setdefault(int(row[0]), tuple(row)) == tuple(row)


@pytest.mark.skipif(not os.path.exists(KAGGLE_HEAD), reason="real Criteo rows not present")
def test_real_kaggle_rows(tmp_path):
  label, dense, raw = expected_arrays(KAGGLE_HEAD)
  meta = run("kaggle", [KAGGLE_HEAD], tmp_path / "k", categorical="reference")
  _, got = prepared(tmp_path / "k")
  np.testing.assert_array_equal(got["label"], label)
  np.testing.assert_array_max_ulp(got["dense"], dense, maxulp=1)
  want, sizes = reference_renumbering(raw)
  np.testing.assert_array_equal(got["sparse"], want)
  assert meta["vocab_sizes"] == sizes
  assert (raw >= 0x80000000).any()  # the reference crashes on these under numpy 2


@pytest.mark.skipif(not os.path.exists(TERABYTE_HEAD), reason="real Criteo rows not present")
def test_real_terabyte_rows_via_the_cli(tmp_path):
  lines = open(TERABYTE_HEAD, "rb").read().splitlines(keepends=True)
  for d in range(2):
    with gzip.open(tmp_path / f"day_{d}.gz", "wb") as f:
      f.writelines(lines[d * 500:(d + 1) * 500])
  out = tmp_path / "tb"
  code = criteo.main(["prepare", "--dataset", "terabyte", "--input", str(tmp_path / "day_1.gz"),
                      str(tmp_path / "day_0.gz"), "--output", str(out), "--categorical", "hash",
                      "--max-ind-range", "40000000", "--workers", "1", "--no-progress"])
  assert code == 0
  _, got = prepared(out)
  _, _, raw = expected_arrays(TERABYTE_HEAD)
  np.testing.assert_array_equal(got["sparse"], raw % 40_000_000)
  meta = fmt.read_metadata(str(out))
  assert meta["splits"]["test"] == [[500, 750]] and meta["vocab_sizes"] == [40_000_000] * 26
  shutil.rmtree(out)
  bad = tmp_path / "bad.txt"
  bad.write_bytes(lines[0].replace(b"\t", b" ", 1))
  assert criteo.main(["prepare", "--dataset", "kaggle", "--input", str(bad), "--output",
                      str(tmp_path / "x"), "--no-progress", "--workers", "1"]) == 1


def test_negative_subsampling_drops_train_negatives_reproducibly(raw_file, tmp_path):
  """The reference's --data-sub-sample-rate: train negatives dropped by a seeded per-row rule."""
  label, dense, raw = expected_arrays(raw_file)
  full = run("kaggle", [raw_file], tmp_path / "full", categorical="hash", max_ind_range=997)
  train = full["split_rows"]["train"]
  keep = np.ones(len(label), bool)
  keep[:train] = criteo.sub_sample_keep(label[:train], np.arange(train), 0.5, 3)
  assert keep[:train][label[:train] == 1].all()  # every positive stays
  dropped = int((~keep).sum())
  assert 0.35 < dropped / (label[:train] == 0).sum() < 0.65
  # Many pieces and shards (some across the train/test boundary), then one piece, another mode.
  a = run("kaggle", [raw_file], tmp_path / "a", categorical="hash", max_ind_range=997,
          sub_sample_rate=0.5, sub_sample_seed=3, piece_bytes=30_000, shard_rows=100)
  b = run("kaggle", [raw_file], tmp_path / "b", categorical="reference", sub_sample_rate=0.5,
          sub_sample_seed=3)
  _, got_full = prepared(tmp_path / "full")
  for meta, name in ((a, "a"), (b, "b")):
    assert meta["rows"] == len(label) - dropped
    assert meta["split_rows"] == {"train": train - dropped, "test": full["split_rows"]["test"],
                                  "val": full["split_rows"]["val"]}
    assert meta["sub_sample"] == {"rate": 0.5, "seed": 3, "train_rows_before": train,
                                  "dropped": dropped}
    _, got = prepared(tmp_path / name)
    np.testing.assert_array_equal(got["label"], label[keep])
    np.testing.assert_array_equal(got["dense"], got_full["dense"][keep])
  np.testing.assert_array_equal(prepared(tmp_path / "a")[1]["sparse"], got_full["sparse"][keep])
  want, sizes = reference_renumbering(raw[keep])  # the vocabulary of the kept rows
  np.testing.assert_array_equal(prepared(tmp_path / "b")[1]["sparse"], want)
  assert b["vocab_sizes"] == sizes
  other = criteo.sub_sample_keep(label[:train], np.arange(train), 0.5, 4)
  assert not np.array_equal(other, keep[:train])  # another seed, other rows
  with pytest.raises(ValueError, match="sub_sample_rate=1.5 must be in"):
    run("kaggle", [raw_file], tmp_path / "c", categorical="hash", max_ind_range=7,
        sub_sample_rate=1.5)


def test_info_is_a_table_and_json_on_request(raw_file, tmp_path, capsys):
  meta = run("kaggle", [raw_file], tmp_path / "out", categorical="hash", max_ind_range=1000)
  assert criteo.main(["info", str(tmp_path / "out")]) == 0
  table = capsys.readouterr().out.splitlines()
  split = meta["split_rows"]
  assert table[1] == (f"  rows       1,000 (train {split['train']:,}, test {split['test']:,}, "
                      f"val {split['val']:,})")
  assert table[2] == "  bad lines  0 skipped"
  assert table[-2].split() == ["C26", "1,000", "1"]  # feature, table rows, hotness
  assert table[-1].split() == ["total", "26,000"]
  assert criteo.main(["info", "--json", str(tmp_path / "out")]) == 0
  import json
  summary = json.loads(capsys.readouterr().out)
  assert summary["vocab_sizes"] == [1000] * 26 and summary["rows"] == 1000


def test_prepare_help_shows_the_defaults():
  out = subprocess.run([sys.executable, "-m", "dlrm_jax.data.criteo", "prepare", "--help"],
                       capture_output=True, text=True, check=True).stdout
  for default in ("(default: reference)", "(default: 3)", "(default: 2097152)",
                  "(default: 64)", "(default: 1.0)", "0: one per core (default: 0)"):
    assert default in " ".join(out.split()), default
  assert "(default: None)" not in out and "(default: False)" not in out
