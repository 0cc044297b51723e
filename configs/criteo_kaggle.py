"""The reference's Criteo Kaggle benchmark settings (dlrm_s_pytorch.py's
`bench/dlrm_s_criteo_kaggle.sh`): D=16, bottom 13-512-256-64-16, top
512-256-1, dot interaction, batch 128, SGD with lr 0.1, one epoch of the
prepared training days (six for the whole set), evaluated ten times per epoch
on the test half of day 7 as the reference does.

Needs the Kaggle set prepared into `data.path` (see README.md, "Training on
Criteo"); the reference's preprocessing is the default:

    python -m dlrm_jax.data.criteo prepare --dataset kaggle --input train.txt \\
        --output data/criteo_kaggle

The table sizes come from the prepared directory's metadata.json when
training starts (`dlrm_jax.data.configure_data`); `arch_embedding_size` below
is what the reference's preprocessing gives, for reference.
"""

from dlrm_jax.config import base_config

# Rows per table of the Kaggle set after the reference's preprocessing
# (counts of distinct values per categorical feature, C1..C26).
KAGGLE_TABLE_ROWS = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)


def get_config():
  c = base_config()
  c.arch_sparse_feature_size = 16
  c.arch_mlp_bot = "13-512-256-64-16"
  c.arch_mlp_top = "512-256-1"
  c.arch_embedding_size = "-".join(str(r) for r in KAGGLE_TABLE_ROWS)
  c.arch_interaction_op = "dot"
  c.learning_rate = 0.1
  c.mini_batch_size = 128
  c.test_mini_batch_size = 16384
  c.test_num_batches = 0  # the whole test split (3,274,330 rows).
  # One epoch of whatever train split data.path holds (the reference's --nepochs=1
  # --num-batches=0): 306,968 steps on the six training days, 66 on the 10,000-row sample.
  c.num_batches = 0
  c.num_epochs = 1.0
  # Ten evaluations per epoch (and a checkpoint at each), the last at its end.
  c.test_freq = 0
  c.eval_every_epochs = 0.1
  c.data.kind = "criteo_kaggle"
  c.data.path = "data/criteo_kaggle"
  c.data.eval_split = "test"
  return c
