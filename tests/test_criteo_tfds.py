"""The TFDS builder: prepares blocks of rows into array_record, read back with tfds.data_source."""

import importlib.util
import os

import numpy as np
import pytest

from dlrm_jax.data import format as fmt
from dlrm_jax.data.criteo_synth import write_raw


# CI installs the tfds extra (.ci/run): there a missing package is a failure, not a skip.
needs_tfds = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_datasets") is None and os.environ.get("CI") != "true",
    reason="tensorflow-datasets not installed (pip install 'dlrm_jax[tfds]')")


@needs_tfds
def test_tfds_builder_round_trip(tmp_path):
  import tensorflow_datasets as tfds

  from dlrm_jax.data import tfds_criteo

  manual = tmp_path / "manual"
  write_raw(str(manual / "train.txt"), 700, seed=4)
  builder = tfds_criteo.CriteoClickLogs(config="kaggle_hashed", data_dir=str(tmp_path / "data"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  source = tfds.data_source("criteo_click_logs/kaggle_hashed", data_dir=str(tmp_path / "data"))
  prepared = fmt.PreparedData(str(tmp_path / "data" / "downloads" /
                                  "criteo_prepared_kaggle_hashed"))
  for split in ("train", "test", "val"):
    block = source[split][0]
    assert len(block["label"]) == min(1024, prepared.split_rows(split))  # rows per record
    got = tfds_criteo.load_blocks(source, split)
    (a, b), = prepared.split_ranges(split)
    want = prepared.read(a, b)
    for k in ("label", "dense", "sparse"):
      np.testing.assert_array_equal(got[k], want[k])


@needs_tfds
def test_tfds_builder_bad_line_is_one_exception_or_skipped(tmp_path):
  """A raw file with a line of undecodable bytes and one with too few fields: the build
  stops with one BadLineError naming FILE:LINE and the field, with the builder's own way
  out and no chained error; a config with skip_bad_lines=True builds the good rows."""
  import tensorflow_datasets as tfds

  from dlrm_jax.data import criteo, tfds_criteo

  manual = tmp_path / "manual"
  raw = manual / "train.txt"
  write_raw(str(raw), 300, seed=4)
  lines = raw.read_bytes().split(b"\n")
  lines[57], lines[120] = b"\x00\x01\xff garbage", b"1\t2"
  raw.write_bytes(b"\n".join(lines))
  download = tfds.download.DownloadConfig(manual_dir=str(manual))
  builder = tfds_criteo.CriteoClickLogs(config="kaggle_hashed", data_dir=str(tmp_path / "a"))
  with pytest.raises(criteo.BadLineError) as caught:
    builder.download_and_prepare(download_config=download)
  e = caught.value
  assert str(e).startswith(f"{raw}:58: columns: has 1 field, expected 40"), str(e)
  assert "skip_bad_lines=True" in str(e) and "--skip-bad-lines" not in str(e)
  assert e.__cause__ is None and e.__suppress_context__

  lenient = tfds_criteo.CriteoConfig(name="kaggle_hashed_lenient", dataset="kaggle",
                                     categorical="hash", max_ind_range=10_000_000,
                                     skip_bad_lines=True)
  builder = tfds_criteo.CriteoClickLogs(config=lenient, data_dir=str(tmp_path / "b"))
  builder.download_and_prepare(download_config=download)
  prepared = fmt.PreparedData(str(tmp_path / "b" / "downloads" /
                                  "criteo_prepared_kaggle_hashed_lenient"))
  assert sum(prepared.split_rows(s) for s in ("train", "test", "val")) == 298
