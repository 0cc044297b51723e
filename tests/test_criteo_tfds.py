"""The TFDS builder: prepares blocks of rows into array_record, read back with tfds.data_source."""

import importlib.util
import os

import numpy as np
import pytest

from dlrm_jax.data import format as fmt
from dlrm_jax.data.criteo_synth import write_raw


# CI installs the tfds extra (.ci/run): there a missing package is a failure, not a skip.
@pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is None
                    and os.environ.get("CI") != "true",
                    reason="tensorflow-datasets not installed (pip install 'dlrm_jax[tfds]')")
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
