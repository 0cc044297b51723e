"""Criteo click logs, from raw TSV (or .gz) files to the prepared format.

    python -m dlrm_jax.data.criteo prepare --dataset kaggle --input train.txt --output DIR
    python -m dlrm_jax.data.criteo prepare --dataset terabyte --input day_{0..23}.gz \\
        --output DIR --categorical hash --max-ind-range 40000000
    python -m dlrm_jax.data.criteo info DIR

Each raw line is `label, I1..I13, C1..C26`, TAB-separated. Dense features:
missing -> 0, negative -> 0, then log(1 + x) (as the reference does; stored as
float32). Categorical features: 8 hex digits -> a 32-bit value (missing -> 0,
as the reference maps an empty field), then one of three modes:

- `hash`: value modulo `max_ind_range` (per feature if 26 values are given),
  what TorchRec's Criteo scripts do. Deterministic, no vocabulary pass.
- `reference`: modulo `max_ind_range` if given, then renumbered consecutively
  per feature in order of first appearance over all input rows in input order,
  as the reference's `getCriteoAdData` numbers them.
- `frequency`: a vocabulary counted on the training rows (modulo
  `max_ind_range` first, if given); values seen at least `frequency_threshold`
  times get rows 1..V in order of decreasing count (ties: smaller value
  first); rare and unseen values share row 0, the out-of-vocabulary row, as
  NVIDIA's DLRM preprocessing does with its frequency limit.

Splits are those of the reference, so that results are comparable: Kaggle
(one `train.txt`, or its parts in order): the rows are cut into 7 "days" as the
reference cuts them (`divmod(rows, 7)`, the first `rows % 7` days one row
longer); days 0-5 train, day 6 split into test (first half, rounded up) and
val (the rest). Terabyte: every file but the last (`day_0` .. `day_22`) trains,
the last (`day_23`) is split the same way into test and val.

How it runs: each input is cut into pieces (byte ranges of about
`piece_bytes`, aligned on lines; a .gz file is one piece), worker processes
(forked, so they start at once, when the parent runs a single thread; spawned
otherwise) parse pieces in blocks of `block_bytes` (a few MB, so that a
block's parsed columns stay in the CPU caches) with pyarrow's CSV reader and a
vectorised hex decoder, and each piece writes its own shard files. A piece is
recorded as done only when its files are complete, so an interrupted run
resumes where it stopped (run the same command again). Memory: a worker holds
one block of `block_bytes` of raw text and its parsed arrays (a few hundred
MB); the `hash` mode needs nothing else. The vocabulary modes keep one entry
of 12 bytes (value, first position or count) per distinct value per feature
being counted, merged in sorted arrays (a merge briefly needs about twice the
entries of the feature being merged); when they exceed `vocab_memory_bytes`
the largest features are left to a further pass over the prepared shards, so
the bound holds whatever the input size (a single feature must fit by itself).
No intermediate copy is written: the vocabulary modes store the raw 32-bit
values in the shards' sparse files and rewrite them shard by shard (one shard
of temporary space).

Negative subsampling (`sub_sample_rate`, the reference's
`--data-sub-sample-rate`) runs after parsing, when the splits are known:
train shards are rewritten without the dropped negatives (see
`sub_sample_keep`), before any vocabulary is counted.

Modules: `parse` (a block of lines -> arrays, the errors), `pieces` (input files cut
into pieces, read as blocks), `shards` (the task that parses a piece into its shards),
`vocabulary` (counting in bounded memory, applying), `subsample`, `preparation`
(`prepare`: the stages, resuming, the splits), `multihot`, `cli` (`main`). The worker
pool is `dlrm_jax.data.workers`.
"""

from dlrm_jax.data.criteo.cli import main
from dlrm_jax.data.criteo.multihot import make_multi_hot, multi_hot_ids
from dlrm_jax.data.criteo.parse import (NAMES, NUM_COLUMNS, NUM_DENSE, NUM_SPARSE, BadLineError,
                                        Block, InputError, decode_hex, parse_block)
from dlrm_jax.data.criteo.pieces import Piece
from dlrm_jax.data.criteo.preparation import (CATEGORICAL_MODES, DATASETS, KAGGLE_DAYS,
                                              kaggle_days, make_splits, parse_max_ind_range,
                                              prepare)
from dlrm_jax.data.criteo.subsample import sub_sample_keep
from dlrm_jax.data.criteo.vocabulary import load_vocabulary, vocab_rows

__all__ = [
    "BadLineError", "Block", "CATEGORICAL_MODES", "DATASETS", "InputError", "KAGGLE_DAYS",
    "NAMES", "NUM_COLUMNS", "NUM_DENSE", "NUM_SPARSE", "Piece", "decode_hex", "kaggle_days",
    "load_vocabulary", "main", "make_multi_hot", "make_splits", "multi_hot_ids",
    "parse_block", "parse_max_ind_range", "prepare", "sub_sample_keep", "vocab_rows",
]
