"""Data sources: synthetic generators now, Criteo click logs to come."""

from __future__ import annotations

from dlrm_jax.config import ConfigError, ModelSpec
from dlrm_jax.data.synthetic import Batch, RandomData, SyntheticCTR, hashed_uniform

DATA_KINDS = ("synthetic_ctr", "random", "criteo_kaggle", "criteo_terabyte")


def make_data(config, spec: ModelSpec):
  """The batch generator that `config.data.kind` names, sized for `spec`."""
  data = config.data
  kind = data.kind
  common = dict(table_rows=spec.table_rows, num_dense=spec.num_dense,
                batch_size=int(config.mini_batch_size), seed=int(data.seed))
  if kind == "random":
    return RandomData(**common, hotness=int(data.hotness),
                      variable_hotness=bool(data.variable_hotness))
  if kind == "synthetic_ctr":
    if int(data.hotness) != 1 or data.variable_hotness:
      raise ConfigError(f"data.hotness={data.hotness}, data.variable_hotness="
                        f"{data.variable_hotness}: synthetic_ctr draws one id per feature; "
                        "multi-hot bags are available with data.kind='random'")
    return SyntheticCTR(
        **common,
        zipf_exponent=float(data.zipf_exponent),
        dense_missing_rate=float(data.dense_missing_rate),
        sparse_missing_rate=float(data.sparse_missing_rate),
        teacher_num_pairs=int(data.teacher_num_pairs),
        teacher_pair_scale=float(data.teacher_pair_scale),
    )
  if kind in ("criteo_kaggle", "criteo_terabyte"):
    raise ConfigError(
        f"data.kind={kind!r}: training on the Criteo click logs needs a prepared data "
        f"directory (data.path={data.get('path')!r}), and this version of dlrm_jax cannot "
        "prepare or read one yet (Criteo preprocessing and loading are planned work). "
        "Train on synthetic data meanwhile: python train.py --config=configs/default.py")
  raise ConfigError(f"data.kind={kind!r} is not one of {DATA_KINDS}")


__all__ = ["Batch", "DATA_KINDS", "RandomData", "SyntheticCTR", "hashed_uniform", "make_data"]
