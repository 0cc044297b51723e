"""The reference's MLPerf settings on the Criteo 1TB click logs
(`bench/run_and_time.sh`): D=128, bottom 13-512-256-128, top
1024-1024-512-256-1, dot interaction, rows hashed modulo 40,000,000, batch
2048, SGD with lr 1.0, 2750 warmup steps, quadratic decay from step 49315 over
27772 steps (by step number, whatever the run's length), one epoch evaluated 20
times; the run stops at a validation AUC of 0.8025.

Needs the 24 days prepared into `data.path` with the reference's
`--max-ind-range=40000000` (see README.md, "Training on Criteo"):

    python -m dlrm_jax.data.criteo prepare --dataset terabyte \\
        --input day_{0..23}.gz --output data/criteo_terabyte \\
        --categorical reference --max-ind-range 40000000

(`--categorical hash` is the fast alternative, as TorchRec does it: every
table then has 40,000,000 rows.) The table sizes come from the prepared
directory's metadata.json; `arch_embedding_size` below is what the
reference's preprocessing gives. Every evaluation scores the whole test half
of day 23 (about 89M rows), as the reference does, streamed batch by batch
with the exact AUC (`dlrm_jax.evaluation`).
"""

from dlrm_jax.config import base_config

MAX_IND_RANGE = 40_000_000

# Rows per table of the Terabyte set with --max-ind-range=40000000 (distinct
# values per categorical feature, capped by the hashing range).
TERABYTE_TABLE_ROWS = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36)


def get_config():
  c = base_config()
  c.arch_sparse_feature_size = 128
  c.arch_mlp_bot = "13-512-256-128"
  c.arch_mlp_top = "1024-1024-512-256-1"
  c.arch_embedding_size = "-".join(str(r) for r in TERABYTE_TABLE_ROWS)
  c.arch_interaction_op = "dot"
  c.learning_rate = 1.0
  c.mini_batch_size = 2048
  c.test_mini_batch_size = 16384
  c.test_num_batches = 0  # the whole test split (half of day 23, about 89M rows).
  c.lr_num_warmup_steps = 2750
  c.lr_decay_start_step = 49315
  c.lr_num_decay_steps = 27772
  # One epoch of the prepared train split (the reference's --nepochs=1), stopping early at
  # the target AUC; 20 evaluations per epoch (its --test-freq=102400 at batch 2048 on the
  # 23 days), each with a checkpoint.
  c.num_batches = 0
  c.num_epochs = 1.0
  c.test_freq = 0
  c.eval_every_epochs = 0.05
  c.target_auc = 0.8025
  c.data.kind = "criteo_terabyte"
  c.data.path = "data/criteo_terabyte"
  c.data.max_ind_range = MAX_IND_RANGE
  c.data.eval_split = "test"
  return c
