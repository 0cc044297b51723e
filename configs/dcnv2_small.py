"""DLRM-DCNv2 scaled down to run anywhere: the model family and recipe of
configs/mlperf_dcnv2.py on learnable synthetic multi-hot data.

As MLPerf's: the low-rank cross interaction (3 layers), multi-hot bags with
MLPerf's hotness per feature (214 ids per sample), summed; Adagrad with eps
1e-8 and no warmup or decay on the tables (per element) and the dense layers.
Smaller: D=16, cross layers of rank 64, bottom 13-128-16, top 256-128-1 (the
full model's dense part costs about 96 MFLOP per sample, some 2K samples/s on
2 cores), 26 tables of 2,000 rows, batch 1,024, lr 0.01, 600 steps. The data is
`synthetic_ctr` with Zipf ids in every bag, labelled by a hidden teacher: the
summary gives the model's AUC beside the teacher's (the best achievable).

    python train.py --config=configs/dcnv2_small.py --workdir=runs/dcnv2_small
"""

from dlrm_jax.config import base_config

# configs/mlperf_dcnv2.py's MLPERF_HOTNESS (configs/ is not a package).
MLPERF_HOTNESS = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3,
                  1, 1)


def get_config():
  c = base_config()
  c.arch_sparse_feature_size = 16
  c.arch_mlp_bot = "13-128-16"
  c.arch_mlp_top = "256-128-1"
  c.arch_embedding_size = "-".join(["2000"] * 26)
  c.arch_interaction_op = "dcn"
  c.dcn_num_layers = 3
  c.dcn_low_rank_dim = 64
  c.embedding_pooling = "sum"
  c.learning_rate = 0.01
  c.dense_optimizer = "adagrad"
  c.dense_optimizer_args = "eps=1e-8"
  c.embedding_optimizer = "adagrad"
  c.embedding_optimizer_args = "eps=1e-8"
  c.mini_batch_size = 1024
  c.num_batches = 600
  c.test_freq = 200
  c.test_mini_batch_size = 4096
  c.test_num_batches = 4
  c.data.kind = "synthetic_ctr"
  c.data.hotness = "-".join(str(h) for h in MLPERF_HOTNESS)
  c.data.teacher_num_pairs = 4
  c.data.teacher_pair_scale = 0.5
  return c
