"""A TFDS builder for the Criteo click logs (manual download), usable without TensorFlow.

    pip install 'dlrm_jax[tfds]'

    import tensorflow_datasets as tfds
    from dlrm_jax.data import tfds_criteo  # registers "criteo_click_logs"

    builder = tfds_criteo.CriteoClickLogs(config="kaggle", data_dir=DATA_DIR)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=RAW))
    source = tfds.data_source("criteo_click_logs/kaggle", data_dir=DATA_DIR)
    block = source["train"][0]  # {"label": [R], "dense": [R, 13], "sparse": [R, 26]}

The name `criteo` is taken in the TFDS catalog (Criteo's uplift modelling
set), hence `criteo_click_logs`. Put the raw files in `manual_dir`: `train.txt`
for `kaggle*` configs, `day_0` .. `day_23` (optionally `.gz`) for
`terabyte*`. The raw files are prepared with `dlrm_jax.data.criteo.prepare`
(the same parsing, modes and splits) into `download_dir/criteo_prepared_CONFIG`,
which resumes if interrupted and can also be read by the loader directly.

Each record holds a block of `block_rows` consecutive rows, not one row:
TFDS decodes records one by one, so one row per record would cap reading at
its record rate (docs/criteo.md). Splits: train, test, val as
the reference makes them.

A malformed raw line stops the build with one `BadLineError` naming
FILE:LINE and the field (the grammar: README.md, "Criteo's raw format"); a
config with `skip_bad_lines=True` skips and counts such lines instead:

    config = tfds_criteo.CriteoConfig(name="kaggle_lenient", skip_bad_lines=True)
    builder = tfds_criteo.CriteoClickLogs(config=config, data_dir=DATA_DIR)
"""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np
import tensorflow_datasets as tfds

from dlrm_jax.data import criteo
from dlrm_jax.data.format import NUM_DENSE, NUM_SPARSE, PreparedData


@dataclasses.dataclass
class CriteoConfig(tfds.core.BuilderConfig):
  """Which set, which categorical mode, how many rows per record."""

  dataset: str = "kaggle"
  categorical: str = "reference"
  max_ind_range: int = -1
  frequency_threshold: int = 3
  block_rows: int = 1024
  skip_bad_lines: bool = False  # True: malformed raw lines are skipped and counted


class CriteoClickLogs(tfds.core.GeneratorBasedBuilder):
  """Criteo's Kaggle and 1TB click logs as blocks of prepared rows."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Blocks of rows from dlrm_jax's Criteo preparation (format 1)."}
  BUILDER_CONFIGS = [
      CriteoConfig(name="kaggle", description="Kaggle, the reference's renumbering."),
      CriteoConfig(name="kaggle_hashed", description="Kaggle, values modulo 10,000,000.",
                   categorical="hash", max_ind_range=10_000_000),
      CriteoConfig(name="terabyte", dataset="terabyte", max_ind_range=40_000_000,
                   description="1TB, modulo 40,000,000 then the reference's renumbering."),
      CriteoConfig(name="terabyte_hashed", dataset="terabyte", categorical="hash",
                   max_ind_range=40_000_000, description="1TB, values modulo 40,000,000."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download the raw click logs from Criteo and place them in `manual_dir`:
  kaggle configs: `train.txt` from dac.tar.gz
  (https://labs.criteo.com/2014/02/kaggle-display-advertising-challenge-dataset);
  terabyte configs: `day_0` .. `day_23`, gzipped or not
  (https://labs.criteo.com/2013/12/download-terabyte-click-logs).
  """

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        disable_shuffling=True,  # Records in row order: the splits stay as prepared.
        description="Criteo click logs: label, 13 dense (log(1 + x)), 26 categorical (table "
                    "rows), in blocks of consecutive rows.",
        features=tfds.features.FeaturesDict({
            "label": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
            "dense": tfds.features.Tensor(shape=(None, NUM_DENSE), dtype=np.float32),
            "sparse": tfds.features.Tensor(shape=(None, NUM_SPARSE), dtype=np.int32),
        }),
        homepage="https://labs.criteo.com/2013/12/download-terabyte-click-logs",
    )

  def _raw_files(self, manual_dir: str) -> list[str]:
    c = self.builder_config
    if c.dataset == "kaggle":
      files = [os.path.join(manual_dir, "train.txt")]
    else:
      files = sorted(glob.glob(os.path.join(manual_dir, "day_*")))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
      raise FileNotFoundError(f"no raw Criteo files in {manual_dir}: "
                              + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return files

  def _split_generators(self, dl_manager):
    c = self.builder_config
    prepared = os.path.join(os.fspath(dl_manager.download_dir), f"criteo_prepared_{c.name}")
    try:
      criteo.prepare(c.dataset, self._raw_files(os.fspath(dl_manager.manual_dir)), prepared,
                     categorical=c.categorical, max_ind_range=c.max_ind_range,
                     frequency_threshold=c.frequency_threshold,
                     skip_bad_lines=c.skip_bad_lines, progress=False)
    except criteo.BadLineError as e:  # the same line, with this builder's way to skip it
      raise criteo.BadLineError(
          e.path, e.line, e.field, e.message,
          hint="fix or remove the line, or build a CriteoConfig with skip_bad_lines=True "
               "to skip, count and report such lines") from None
    return {split: self._generate_examples(prepared, split) for split in ("train", "test", "val")}

  def _generate_examples(self, prepared: str, split: str):
    store = PreparedData(prepared)
    block = self.builder_config.block_rows
    for a, b in store.split_ranges(split):
      for start in range(a, b, block):
        rows = store.read(start, min(start + block, b))
        yield start, rows


def load_blocks(source, split: str = "train") -> dict[str, np.ndarray]:
  """All rows of a split of `tfds.data_source(...)`, concatenated (for small sets and tests)."""
  blocks = [source[split][i] for i in range(len(source[split]))]
  return {k: np.concatenate([b[k] for b in blocks]) for k in ("label", "dense", "sparse")}
