"""A very small model and a few steps, for tests and quick checks."""

from dlrm_jax.config import base_config


def get_config():
  c = base_config()
  c.arch_sparse_feature_size = 4
  c.arch_mlp_bot = "13-8-4"
  c.arch_mlp_top = "8-1"
  c.arch_embedding_size = "-".join(["50"] * 8)
  c.mini_batch_size = 64
  c.num_batches = 20
  c.test_freq = 10
  c.test_mini_batch_size = 256
  c.test_num_batches = 2
  c.progress_bar = False
  # Orbax saves cost more than these few steps; the checkpoint tests turn them on.
  c.checkpoint.enabled = False
  return c
