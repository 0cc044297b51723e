"""configs/dcnv2_small.py: DLRM-DCNv2's recipe on synthetic multi-hot data learns, in
float32 and in bfloat16."""

import pytest

from conftest import load_config
from dlrm_jax import trainer


def _run(tmp_path, dtype):
  c = load_config("dcnv2_small")
  # Half the config's 600 steps at twice its rate, to keep the default test set fast:
  # 0.7006 against the config's 0.7079 (teacher 0.7229) when written.
  c.num_batches, c.learning_rate, c.test_freq = 300, 0.02, 0
  c.compute_dtype, c.progress_bar, c.checkpoint.enabled = dtype, False, False
  return trainer.train_and_evaluate(c, str(tmp_path / dtype)).summary


def test_dcnv2_small_learns_close_to_its_teacher_in_float32_and_bfloat16(tmp_path):
  f32 = _run(tmp_path, "float32")
  assert f32["teacher_auc"] - f32["auc"] < 0.03, f32
  bf16 = _run(tmp_path, "bfloat16")
  # 0.6997 against float32's 0.7006 when written.
  assert abs(bf16["auc"] - f32["auc"]) < 0.005, (f32, bf16)
