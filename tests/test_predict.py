"""Scoring with `dlrm_jax.predict`: unseen values, 39-column and .gz input, device counts,
the three categorical modes, and the exported functions (of raw values too, and a
user's path from real Kaggle rows to a server with jax and numpy only).

One small model per categorical mode is trained once for the module (the same
tiny architecture as test_checkpoint's predict test), so that the XLA compiles
are shared by every test.
"""

import dataclasses
import gzip
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import CRITEO_DIR, REPO, load_config, small_criteo_config
from dlrm_jax import predict, trainer
from dlrm_jax.data import criteo
from dlrm_jax.data.criteo_synth import write_raw

ROWS = 400
BATCH = 64
MODES = {"reference": {}, "hash": {"max_ind_range": 997},
         "frequency": {"max_ind_range": 4093, "frequency_threshold": 3}}


@dataclasses.dataclass
class Run:
  """A prepared directory, the run trained on it and that run's model on one device."""

  mode: str
  data: str
  workdir: str
  meta: dict
  model: predict.Model


@pytest.fixture(scope="module")
def raw_file(tmp_path_factory):
  """The raw training file every mode is prepared from (and scored as raw input)."""
  path = tmp_path_factory.mktemp("raw") / "train.txt"
  write_raw(str(path), ROWS, seed=0)
  return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, raw_file):
  """`runs(mode)`: that mode's Run, prepared and trained on first use only."""
  done = {}

  def get(mode):
    if mode not in done:
      root = tmp_path_factory.mktemp(mode)
      data = root / "prepared"
      meta = criteo.prepare("kaggle", [str(raw_file)], str(data), categorical=mode, workers=1,
                            progress=False, log=lambda m: None, **MODES[mode])
      c = small_criteo_config(data)
      c.checkpoint.enabled = True
      workdir = root / "run"
      trainer.train_and_evaluate(c, str(workdir))
      model = predict.load_model(str(workdir), devices=1)
      done[mode] = Run(mode, str(data), str(workdir), meta, model)
    return done[mode]

  return get


@pytest.fixture(scope="module")
def reference(runs):
  return runs("reference")


@pytest.fixture(scope="module")
def reference_probs(reference, raw_file, tmp_path_factory):
  """Probabilities of the raw training file on one device: what other inputs must match."""
  probs = _score(reference, tmp_path_factory.mktemp("base"), "--input", str(raw_file))
  assert probs.shape == (ROWS,) and 0 < probs.min() and probs.max() < 1
  return probs


def _score(run, tmp, *args):
  """`predict.main` on RUN's checkpoint (one device, batches of 64 unless ARGS say
  otherwise): the probabilities it writes."""
  out = tmp / "probs.txt"
  assert predict.main(["--workdir", run.workdir, "--batch-size", str(BATCH), "--devices", "1",
                       *args, "--output", str(out)]) == 0
  return np.loadtxt(out, dtype=np.float32, ndmin=1)


def _raw_ids(path, data):
  """(dense, table rows, mapper) of a raw file as predict maps it with DATA's vocabulary."""
  mapper = predict.RawMapper(data)
  batches = list(predict.raw_batches(str(path), mapper, BATCH))
  return (np.concatenate([b["dense"] for b in batches]),
          np.concatenate([b["sparse"] for b in batches]), mapper)


def _lines(path):
  with open(path, "rb") as f:
    return f.read().splitlines(keepends=True)


def test_unseen_values_map_to_row_0_are_counted_and_scored_as_row_0(reference, raw_file,
                                                                    tmp_path, capsys):
  """Values absent from a `reference` vocabulary become row 0, exactly those, are counted,
  reported on stderr, and score as the same rows with id 0 given directly."""
  lines = _lines(raw_file)[:48]
  original = tmp_path / "original.txt"
  original.write_bytes(b"".join(lines))
  dense, ids, mapper = _raw_ids(original, reference.data)
  assert mapper.unseen == 0
  vocab = criteo.load_vocabulary(reference.data)

  # Unseen values at cells whose seen value has a row other than 0 (so that the
  # scores must change; line 0 is all row 0, `reference` numbers values by first
  # appearance), one row with several of them; 0xffffffff sorts after every key.
  rng = np.random.default_rng(1)
  cells = [(7, int(f)) for f in np.flatnonzero(ids[7])[[0, 5, -1]]]
  for r in (5, 11, 20, 33, 47):
    nonzero = np.flatnonzero(ids[r])
    cells.append((r, int(nonzero[r % len(nonzero)])))
  fields = [l.rstrip(b"\n").split(b"\t") for l in lines]
  for r, f in cells:
    value = 0xffffffff if r == 5 else int(rng.integers(0, 2**32))
    assert value not in vocab[f][0]
    fields[r][1 + criteo.NUM_DENSE + f] = b"%08x" % value
  unseen = tmp_path / "unseen.txt"
  unseen.write_bytes(b"".join(b"\t".join(x) + b"\n" for x in fields))

  dense_u, ids_u, mapper_u = _raw_ids(unseen, reference.data)
  mask = np.zeros(ids.shape, bool)
  mask[tuple(np.transpose(cells))] = True
  assert mask.sum() == len(cells)
  np.testing.assert_array_equal(ids_u[mask], 0)
  np.testing.assert_array_equal(ids_u[~mask], ids[~mask])
  np.testing.assert_array_equal(dense_u, dense)
  assert mapper_u.unseen == len(cells)

  capsys.readouterr()
  probs_original = _score(reference, tmp_path, "--input", str(original))
  assert "values unseen" not in capsys.readouterr().err
  probs = _score(reference, tmp_path, "--input", str(unseen))
  err = capsys.readouterr().err
  assert f"48 rows scored into {tmp_path / 'probs.txt'} ({len(cells)} values unseen in " \
         "training mapped to row 0)" in err, err

  direct = predict.score(reference.model,
                         iter([{"dense": dense, "sparse": np.where(mask, 0, ids)}]), BATCH)
  np.testing.assert_array_equal(probs, direct)
  changed = sorted({r for r, _ in cells})
  others = np.setdiff1d(np.arange(len(lines)), changed)
  np.testing.assert_array_equal(probs[others], probs_original[others])
  assert np.all(probs[changed] != probs_original[changed])


def test_input_without_label_column_scores_as_with_it(reference, reference_probs, raw_file,
                                                      tmp_path):
  """A 39-column file (no label) gives the probabilities of the 40-column one."""
  path = tmp_path / "nolabel.txt"
  path.write_bytes(b"".join(l.split(b"\t", 1)[1] for l in _lines(raw_file)))
  assert _lines(path)[0].count(b"\t") == 38
  np.testing.assert_array_equal(_score(reference, tmp_path, "--input", str(path)),
                                reference_probs)


def test_gzip_input_scores_as_plain(reference, reference_probs, raw_file, tmp_path):
  """A .gz copy of the raw file gives the probabilities of the plain file."""
  path = tmp_path / "train.txt.gz"
  with gzip.open(path, "wb") as f:
    f.write(raw_file.read_bytes())
  np.testing.assert_array_equal(_score(reference, tmp_path, "--input", str(path)),
                                reference_probs)


def test_bad_input_ends_in_one_line_error(reference, raw_file, tmp_path, capsys):
  """A bad line (a bad integer, undecodable bytes: FILE:LINE: FIELD: reason, LINE in the
  raw file, also past the first batch), a truncated .gz, a missing input file and an
  unwritable output each end `main` with exit status 1 and one line on stderr, no
  exception (a traceback)."""
  lines = _lines(raw_file)[:100]
  bad_int = list(lines)
  fields = bad_int[70].split(b"\t")
  bad_int[70] = b"\t".join(fields[:3] + [b"12x"] + fields[4:])  # I3 of line 71
  garbage = lines[:5] + [b"\x00\x01\xff garbage\n"] + lines[5:]  # line 6
  cut = gzip.compress(b"".join(lines))
  cases = {"bad_int.txt": (b"".join(bad_int), r"bad_int\.txt:71: I3: "),
           "garbage.txt": (b"".join(garbage), r"garbage\.txt:6: "),
           "cut.txt.gz": (cut[:len(cut) // 2], r"cut\.txt\.gz: truncated or corrupt gzip")}
  for name, (data, pattern) in cases.items():
    (tmp_path / name).write_bytes(data)
  cases["missing.txt"] = (None, r"No such file or directory: .*missing\.txt")
  capsys.readouterr()
  for name, (_, pattern) in cases.items():
    args = ["--workdir", reference.workdir, "--devices", "1", "--batch-size", str(BATCH),
            "--input", str(tmp_path / name), "--output", str(tmp_path / "out.txt")]
    assert predict.main(args) == 1, name
    err = [l for l in capsys.readouterr().err.splitlines() if not l.startswith("model of")]
    assert len(err) == 1 and re.match(rf"error: .*{pattern}", err[0]), (name, err)
  args[-1] = str(tmp_path / "no_such_dir" / "out.txt")
  args[-3] = str(raw_file)
  assert predict.main(args) == 1
  assert "error: " in capsys.readouterr().err


def test_a_workdir_without_checkpoint_exits_with_one_line(tmp_path):
  """The command itself, in a process of its own: one line, status 1, and none of Orbax's
  background threads' noise at exit; a mistyped run directory is named as missing and a
  read-only command creates nothing."""
  def predict(workdir):
    return subprocess.run([sys.executable, "-m", "dlrm_jax.predict", "--workdir", str(workdir),
                           "--input", "x.txt", "--output", str(tmp_path / "o.txt")],
                          capture_output=True, text=True, timeout=300)

  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  proc = predict(tmp_path / "run")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"error: {tmp_path}/run/checkpoints holds no complete checkpoint"], proc.stderr
  proc = predict(tmp_path / "runs_typo")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"error: {tmp_path}/runs_typo: no such run directory"], proc.stderr
  assert not (tmp_path / "runs_typo").exists()


@pytest.mark.parametrize("devices", [2, 8])
def test_several_devices_score_as_one(reference, reference_probs, raw_file, tmp_path, capsys,
                                      devices):
  """The checkpoint restored onto several devices (batch size rounded up to a multiple
  of them, a padded last batch) gives the probabilities of one device."""
  capsys.readouterr()
  probs = _score(reference, tmp_path, "--input", str(raw_file), "--devices", str(devices),
                 "--batch-size", "50")
  assert f"on {devices} device(s)" in capsys.readouterr().err
  np.testing.assert_allclose(probs, reference_probs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", list(MODES))
def test_raw_input_scores_as_prepared_rows(runs, raw_file, tmp_path, mode):
  """In each categorical mode, raw rows map to the prepared directory's ids and score
  as its test and val rows do."""
  run = runs(mode)
  assert run.meta["options"]["categorical"] == mode
  from_raw = _score(run, tmp_path, "--input", str(raw_file))
  assert from_raw.shape == (ROWS,)
  _, ids, mapper = _raw_ids(raw_file, run.data)
  assert mapper.unseen == 0  # every value of the file is in its own vocabulary (or none)
  for split in ("test", "val"):
    (lo, hi), = run.meta["splits"][split]
    prepared = list(predict.prepared_batches(run.data, BATCH, split))
    np.testing.assert_array_equal(ids[lo:hi], np.concatenate([b["sparse"] for b in prepared]))
    from_prepared = _score(run, tmp_path, "--input", run.data, "--split", split)
    assert from_prepared.shape == (hi - lo,)
    np.testing.assert_array_equal(from_raw[lo:hi], from_prepared)


@pytest.mark.parametrize("devices", [1, 8])
def test_exported_function_scores_as_the_model(reference, tmp_path, devices):
  """`load_exported` after `--export` (from a model on 1 or 8 devices) gives the model's
  probabilities, for prepared rows, ids at each table's ends, and any batch size."""
  out = tmp_path / "exported"
  assert predict.main(["--workdir", reference.workdir, "--devices", str(devices),
                       "--export", str(out)]) == 0
  model = reference.model
  rows = np.asarray(model.task.spec.table_rows)
  sig = json.loads((out / "signature.json").read_text())
  assert sig["table_rows"] == rows.tolist() and sig["step"] == model.step
  assert sig["table_sets"] == [{"width": model.task.spec.embedding_dim, "suffix": "",
                                "features": list(range(len(rows))),
                                "offsets": np.concatenate([[0], np.cumsum(rows)[:-1]]).tolist()}]

  prepared = list(predict.prepared_batches(reference.data, BATCH, "test"))
  rng = np.random.default_rng(2)
  dense = np.concatenate([b["dense"] for b in prepared]
                         + [rng.exponential(2.0, (3, 13)).astype(np.float32)])
  sparse = np.concatenate([b["sparse"] for b in prepared]
                          + [np.zeros((1, len(rows)), np.int32), (rows - 1)[None],
                             rng.integers(0, rows, (1, len(rows)), dtype=np.int32)])
  expected = predict.score(model, iter([{"dense": dense, "sparse": sparse}]), BATCH)
  f = predict.load_exported(str(out))
  np.testing.assert_allclose(f(dense, sparse), expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(f(dense[-5:], sparse[-5:]), expected[-5:], rtol=1e-6, atol=1e-7)


def test_export_of_a_multi_hot_model_takes_its_flat_bags(tmp_path):
  """A model of multi-hot features (hotness 2, 1, 3, ...): the exported function takes
  each sample's bags end to end, [B, sum of the hotness], and scores as the model does;
  so does its int8 export, as predict's int8 scoring."""
  from dlrm_jax.data import make_data
  from dlrm_jax.specs import RunSpec
  from dlrm_jax.task import Task

  c = load_config("tiny")
  c.data.hotness = "2-1-3-1-1-2-1-4"
  task = Task(c)
  state = task.init_state(0)
  model = predict.Model(task=task, params=state.params, tables=state.tables, config=c, step=0)
  batch = make_data(RunSpec.from_config(c)).batch(0)
  assert batch["sparse"].shape == (64, 15)
  for fmt in (None, "int8"):
    out = tmp_path / str(fmt)
    predict.export(model, str(out), quantize=fmt)
    assert json.loads((out / "signature.json").read_text())["hotness"] == [2, 1, 3, 1, 1, 2, 1, 4]
    if fmt is None:
      want = predict.score(model, iter([batch]), 64)
    else:
      want = predict.score_quantized(model, iter([batch]), 64, fmt)
    got = predict.load_exported(str(out))(batch["dense"], batch["sparse"])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_export_takes_weighted_and_padded_bags(tmp_path, pooling):
  """`bags.jaxexport` scores bags of varying length ([B, F, H] with a mask, garbage ids
  in the padding) and per-id weights as `predict.score` does; flat bags with weights go
  through it too, and full bags with unit weights give the flat function's numbers."""
  from dlrm_jax.data import make_data
  from dlrm_jax.specs import RunSpec
  from dlrm_jax.task import Task

  c = load_config("tiny")
  c.data.hotness = "2-1-3-1-1-2-1-4"
  c.embedding_pooling = pooling
  task = Task(c)
  state = task.init_state(0)
  model = predict.Model(task=task, params=state.params, tables=state.tables, config=c, step=0)
  batch = make_data(RunSpec.from_config(c)).batch(0)
  predict.export(model, str(tmp_path))
  f = predict.load_exported(str(tmp_path))
  rng = np.random.default_rng(0)
  dense, flat = batch["dense"], batch["sparse"]
  weights = rng.uniform(0.2, 2.0, flat.shape).astype(np.float32)
  want = predict.score(model, iter([{"dense": dense, "sparse": flat,
                                     "sparse_weights": weights}]), 64)
  np.testing.assert_allclose(f(dense, flat, weights), want, rtol=1e-5, atol=1e-7)

  ids, unit, full = predict.pad_bags(json.loads((tmp_path / "signature.json").read_text())
                                     ["hotness"], flat)
  assert ids.shape == (64, 8, 4) and full.sum() == flat.size
  np.testing.assert_allclose(f(dense, ids, unit, full), f(dense, flat), rtol=1e-6, atol=1e-7)
  # Bags of random lengths 0..4 (an empty bag pools to zero), random weights, and padding
  # ids out of every table's range: only the mask says what is there.
  mask = np.arange(4)[None, None, :] < rng.integers(0, 5, (64, 8, 1))
  ids = np.where(mask, rng.integers(0, 50, ids.shape), 10**6).astype(np.int32)
  weights = rng.uniform(0.2, 2.0, ids.shape).astype(np.float32)
  padded = {"dense": dense, "sparse": ids, "sparse_weights": weights, "sparse_mask": mask}
  want = predict.score(model, iter([dict(padded, sparse=np.where(mask, ids, 0))]), 64)
  np.testing.assert_allclose(f(dense, ids, weights, mask), want, rtol=1e-5, atol=1e-7)
  assert not np.allclose(want, f(dense, flat))
  if pooling == "sum":  # a masked id counts as one of weight 0
    np.testing.assert_allclose(f(dense, np.where(mask, ids, 0), np.where(mask, weights, 0)),
                               want, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="padded bags"):
    f(dense, flat, None, np.ones(flat.shape, bool))


def _raw_values(path):
  """(counts float32 [n, 13], values uint32 [n, 26]) of a raw file, as a server parses it
  for `raw.jaxexport` (the README's snippet): empty fields 0."""
  fields = [l.decode().rstrip("\r\n").split("\t")[-39:] for l in _lines(path)]
  return (np.array([[float(x or 0) for x in f[:13]] for f in fields], np.float32),
          np.array([[int(x or "0", 16) for x in f[13:]] for f in fields], np.uint32))


@pytest.mark.parametrize("mode", list(MODES))
def test_raw_export_scores_raw_values_as_predict(runs, raw_file, tmp_path, mode):
  """`raw.jaxexport` maps raw counts and 32-bit values to the inputs predict gives the
  model (the same table rows, dense features within 1 ulp), also for empty fields,
  negative and huge counts and values absent from the vocabulary, and scores them as
  `predict --input` does."""
  run = runs(mode)
  lines = _lines(raw_file)[:70]
  fields = [l.rstrip(b"\n").split(b"\t") for l in lines]
  fields[0][1:] = [b""] * 39  # every field empty
  fields[1][1:4] = [b"-3", b"1099511627776", b"0"]  # negative, 2**40, zero
  rng = np.random.default_rng(3)
  for r in (1, 2, 65):  # values the vocabulary has never seen; ffffffff sorts last
    for f in rng.choice(26, 9, replace=False):
      fields[r][14 + f] = b"ffffffff" if f % 3 == 0 else b"%08x" % rng.integers(0, 2**32)
  path = tmp_path / "rows.txt"
  path.write_bytes(b"".join(b"\t".join(x) + b"\n" for x in fields))
  counts, values = _raw_values(path)

  dense, ids, mapper = _raw_ids(path, run.data)
  prep = predict.RawPreprocessing.of(predict.RawMapper(run.data))
  got_dense, got_ids = jax.jit(prep)(prep.vocab, counts, values)
  np.testing.assert_array_equal(np.asarray(got_ids), ids)
  np.testing.assert_array_max_ulp(np.asarray(got_dense), dense, maxulp=1)
  assert dense[1, 1] == np.float32(np.log1p(2.0**40)) and dense[0].max() == 0
  if mode != "hash":
    assert (ids[[1, 2, 65]] == 0).sum() >= 9  # the unseen values are row 0

  want = _score(run, tmp_path, "--input", str(path))
  out = tmp_path / "exported"
  assert predict.main(["--workdir", run.workdir, "--devices", "1", "--export", str(out)]) == 0
  raw = json.loads((out / "signature.json").read_text())["raw_inputs"]
  assert raw["categorical"] == mode and raw["dense"] == predict.RAW_DENSE
  modulus = MODES[mode].get("max_ind_range")
  assert raw["max_ind_range"] == (None if modulus is None else [modulus] * 26)
  assert raw["vocab"] == ([] if mode == "hash" else ["keys", "rows"])
  f = predict.load_exported(str(out), raw=True)
  np.testing.assert_allclose(f(counts, values), want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(f(counts[5:8], values[5:8]), want[5:8], rtol=1e-6, atol=1e-7)


def test_export_needs_no_usable_data_unless_data_is_given(runs, tmp_path, capsys):
  """The checkpoint's data.path no longer a finished preparation: --export writes the
  model's functions and says why there is no raw one; raw --input, or --data naming that
  directory, is a one-line error."""
  run = runs("hash")
  meta = os.path.join(run.data, "metadata.json")
  os.rename(meta, meta + ".away")
  try:
    capsys.readouterr()
    args = ["--workdir", run.workdir, "--devices", "1"]
    assert predict.main(args + ["--export", str(tmp_path / "x")]) == 0
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(f"exported to {tmp_path / 'x'} (no raw.jaxexport: the checkpoint's "
                           f"data.path does not serve: "), line
    assert (tmp_path / "x" / "model.jaxexport").exists()
    assert not (tmp_path / "x" / "raw.jaxexport").exists()
    raw = tmp_path / "rows.txt"
    raw.write_text("0\t" + "1\t" * 13 + "\t".join(["0a0b0c0d"] * 26) + "\n")
    for extra in ([], ["--data", run.data]):
      assert predict.main(args + extra + ["--input", str(raw), "--output",
                                          str(tmp_path / "p.txt")]) == 1
      err = capsys.readouterr().err.strip().splitlines()
      assert len(err) == 2 and err[1].startswith("error: "), err  # the model line, the error
  finally:
    os.rename(meta + ".away", meta)


def test_export_without_vocabulary_has_no_raw_function(tmp_path, capsys):
  """A model trained on synthetic data has no raw values: the export says so on stderr,
  writes no raw.jaxexport (and removes an earlier one), and `load_exported(raw=True)`
  names the reason; a prepared directory for another model's shape is refused."""
  c = load_config("tiny")
  c.checkpoint.enabled = True
  c.num_batches, c.test_freq = 2, 0
  trainer.train_and_evaluate(c, str(tmp_path / "run"))
  out = tmp_path / "exported"
  out.mkdir()
  (out / "raw.jaxexport").write_bytes(b"old")
  capsys.readouterr()
  assert predict.main(["--workdir", str(tmp_path / "run"), "--export", str(out)]) == 0
  assert capsys.readouterr().err.splitlines()[-1] == (
      f"exported to {out} (no raw.jaxexport: the model was trained on data.kind="
      "'synthetic_ctr', which has no raw values; model.jaxexport takes the model's inputs)")
  assert sorted(p.name for p in out.iterdir()) == ["bags.jaxexport", "model.jaxexport",
                                                   "params.npz", "signature.json"]
  assert json.loads((out / "signature.json").read_text())["raw_inputs"] is None
  with pytest.raises(ValueError, match="has no raw.jaxexport: export it with the prepared"):
    predict.load_exported(str(out), raw=True)


def _readme_server_snippet() -> str:
  """The README's server snippet: its python block that loads raw.jaxexport."""
  with open(os.path.join(REPO, "README.md")) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  snippet, = [b for b in blocks if "raw.jaxexport" in b]
  return snippet


def test_users_path_kaggle_rows_to_a_server_with_jax_and_numpy(tmp_path):
  """The user's commands, each in a process of its own: prepare 3,000 real Kaggle rows,
  train a tiny model on them, `predict --export` with `--input` of 300 later raw lines
  (values unseen in training among them), then the README's server snippet, in a
  process that imports only jax and numpy, scores those lines as predict does."""
  kaggle = os.path.join(CRITEO_DIR, "kaggle_train_head10k.tsv")
  if not os.path.exists(kaggle):
    pytest.skip(f"{kaggle} is absent")
  lines = _lines(kaggle)
  (tmp_path / "train.txt").write_bytes(b"".join(lines[:3000]))
  (tmp_path / "test.txt").write_bytes(b"".join(lines[3000:3300]))
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=os.path.join(REPO, "src"))  # a user's one CPU device

  def shell(*args):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc

  shell("-m", "dlrm_jax.data.criteo", "prepare", "--dataset", "kaggle", "--input",
        "train.txt", "--output", "prepared", "--workers", "1", "--no-progress")
  shell(os.path.join(REPO, "train.py"), f"--config={REPO}/configs/criteo_kaggle.py",
        "--workdir=run", "--config.data.path=prepared", "--config.arch_sparse_feature_size=4",
        "--config.arch_mlp_bot=13-8-4", "--config.arch_mlp_top=8-1",
        "--config.mini_batch_size=32", "--config.num_batches=20", "--config.test_freq=0",
        "--config.test_mini_batch_size=256", "--config.progress_bar=False")
  err = shell("-m", "dlrm_jax.predict", "--workdir", "run", "--input", "test.txt",
              "--output", "probs.txt", "--export", "exported").stderr.splitlines()
  assert err[-2] == "exported to exported (raw.jaxexport: raw Criteo values)", err
  assert re.fullmatch(r"300 rows scored into probs\.txt \([\d,]+ values unseen in training "
                      r"mapped to row 0\)", err[-1]), err
  want = np.loadtxt(tmp_path / "probs.txt", dtype=np.float32)
  sig = json.loads((tmp_path / "exported" / "signature.json").read_text())
  assert sig["raw_inputs"]["categorical"] == "reference"
  assert sig["raw_inputs"]["vocab_offsets"][-1] == sum(sig["table_rows"])

  (tmp_path / "server.py").write_text(
      _readme_server_snippet() + "import sys\n"
      "assert not {'dlrm_jax', 'flax'} & set(sys.modules), sorted(sys.modules)\n"
      "np.save('server.npy', probs)\n")
  shell("server.py")
  got = np.load(tmp_path / "server.npy")
  assert got.shape == (300,) and got.std() > 0.01  # a model that tells rows apart
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
