"""DLRMv4 at a size a 2-core CPU trains in minutes, on a synthetic listening log.

The log (dlrm_jax.data.event_log) is generated into data.path on first use and
prepared into daily windows (docs/dlrmv4.md): 4,000 users of 1,000 items, each user
with a fixed hidden taste that decides both which items they pick and which plays go
past half the track (listen-plus, the label). A user's history shows the taste; no
single item's popularity does. The run trains two passes over windows 0-44 (345,429
anchors, 339,200 of them in full batches) in time order and evaluates on every anchor
of window 45, the next day; the summary gives the generator's best AUC there (its hidden probability) and
what each item's past listen-plus rate reaches.

    python train.py --config=configs/dlrmv4_small.py

The recipe is the reference's at this size (Adam with beta1 0.95 on the network,
row-wise Adagrad on the tables, one learning rate, clipping at norm 1.0), without its
warm-up; benchmarks/RESULTS.md has the run's figures.
"""

from dlrm_jax.config import base_config


def get_config():
  c = base_config()
  c.model = "dlrmv4"
  v = c.dlrmv4
  v.embedding_dim = 32
  v.preprocessor_hidden_dim = 32
  v.num_heads = 2
  v.attention_dim = 16
  v.hidden_dim = 16
  v.num_layers = 2
  v.history_length = 64
  v.scan_window = 256
  v.num_position_buckets = 128
  v.num_time_buckets = 128
  v.attention = "dense"  # sequences of at most 73 tokens: the whole scores are small
  v.input_dropout = v.linear_dropout = 0.0  # none: benchmarks/RESULTS.md's run had none
  for k in ("item", "artist", "album", "uid"):
    v[f"{k}_rows"] = 0  # from the log
  v.cross_rows = "997-991-983-977-971-89-967"
  c.data.kind = "event_log"
  c.data.path = "data/event_log_small"
  c.data.event_log.update(num_users=4000, num_items=1000, num_artists=100, num_albums=300,
                          latent_dim=4, drift=0.0, affinity_scale=3.0, min_history=32)
  c.data.eval_window = 45  # windows 0-44 train
  c.learning_rate = 3e-3
  c.dense_optimizer = "adam"
  c.dense_optimizer_args = "b1=0.95,b2=0.999,eps=1e-8"
  c.embedding_optimizer = "rowwise_adagrad"
  c.embedding_optimizer_args = "eps=1e-8"
  c.grad_clip_norm = 1.0
  c.mini_batch_size = 256
  c.num_batches = 0
  c.num_epochs = 2.0
  c.eval_every_epochs = 0.25
  c.test_mini_batch_size = 1024
  c.test_num_batches = 0  # every anchor of the eval window
  return c
