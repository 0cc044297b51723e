"""Data sources: synthetic generators and prepared Criteo click logs."""

from __future__ import annotations

from dlrm_jax.config import ConfigError, dash_list, parse_widths
from dlrm_jax.data.synthetic import Batch, RandomData, SyntheticCTR, hashed_uniform
from dlrm_jax.specs import DLRMV4_DATA, DataSpec, RunSpec

DATA_KINDS = ("synthetic_ctr", "random", "criteo_kaggle", "criteo_terabyte", "event_log",
              "yambda")
CRITEO_KINDS = {"criteo_kaggle": "kaggle", "criteo_terabyte": "terabyte"}
DLRMV4_KINDS = DLRMV4_DATA  # listening logs in time windows (DLRMv4)


def configure_data(config):
  """`config`, or for Criteo data a copy sized from the prepared directory's metadata.

  The tables get the prepared vocabulary sizes (`arch_embedding_size`; with
  `data.tables_from_metadata` False they keep the config's, which must hold each
  vocabulary) and the
  features the directory's hotness (`data.hotness`: one value where all agree, else
  a dash list); `test_num_batches` <= 0 becomes every batch of the evaluation split
  (the last one partial: it is padded and its filler rows masked out, see
  `dlrm_jax.evaluation`), so that every row is evaluated once. Errors (no
  prepared directory, another dataset, another `max_ind_range`) are
  ConfigErrors that say what to do.
  """
  data = DataSpec.from_config(config.data)  # checked and typed, as the run will read it
  if data.kind in DLRMV4_KINDS:
    from dlrm_jax.data import windows

    return windows.configure(config, data)
  if data.kind not in CRITEO_KINDS:
    return config
  from ml_collections import config_dict

  from dlrm_jax.data.format import FormatError, read_metadata

  path = data.path
  try:
    meta = read_metadata(path, CRITEO_KINDS[data.kind])
  except FormatError as e:
    raise ConfigError(f"data.path={path!r}: {e}") from None
  want = CRITEO_KINDS[data.kind]
  if meta["dataset"] != want:
    raise ConfigError(f"data.kind={data.kind!r} but {path} holds the {meta['dataset']} dataset")
  max_ind_range = data.max_ind_range
  prepared = meta["options"].get("max_ind_range")
  if max_ind_range > 0 and prepared != [max_ind_range] * len(prepared or [0]):
    raise ConfigError(
        f"data.max_ind_range={max_ind_range}, but {path} was prepared with max_ind_range="
        f"{prepared if prepared is None else sorted(set(prepared))}: prepare it with "
        f"--max-ind-range {max_ind_range}, or set data.max_ind_range=-1 to train on it as it is")
  new = config.copy_and_resolve_references()
  if data.tables_from_metadata:
    new.arch_embedding_size = dash_list(meta["vocab_sizes"])
  else:
    _check_tables_hold(parse_widths("arch_embedding_size", config.arch_embedding_size),
                       meta["vocab_sizes"], path)
  hotness = [int(h) for h in meta["hotness"]]
  # An int or a dash list: the field takes either (a resolved copy would keep one type).
  new.data.hotness = config_dict.FieldReference(
      hotness[0] if len(set(hotness)) == 1 else dash_list(hotness), field_type=object)
  if int(new.test_num_batches) <= 0:
    rows = sum(b - a for a, b in meta["splits"][data.eval_split])
    new.test_num_batches = max(1, -(-rows // int(new.test_mini_batch_size)))
  return new


def _check_tables_hold(rows, vocab_sizes, path) -> None:
  small = [(f, r, v) for f, (r, v) in enumerate(zip(rows, vocab_sizes)) if r < v]
  if len(rows) != len(vocab_sizes) or small:
    detail = (f"table {small[0][0]} has {small[0][1]} rows for {small[0][2]} values" if small
              else f"{len(rows)} tables for {len(vocab_sizes)} features")
    raise ConfigError(
        f"data.tables_from_metadata=False keeps arch_embedding_size, but {path}'s vocabularies "
        f"({dash_list(vocab_sizes)}) do not fit in it: {detail}; set "
        "data.tables_from_metadata=True to size the tables from the data")


def make_data(run: RunSpec):
  """The data source that `data.kind` names, sized for the run's model."""
  data, spec = run.data, run.model
  if data.kind in DLRMV4_KINDS:
    from dlrm_jax.data import windows

    return windows.make(run)
  common = dict(table_rows=spec.table_rows, num_dense=spec.num_dense,
                batch_size=run.training.mini_batch_size, seed=data.seed)
  if data.kind == "random":
    return RandomData(**common, hotness=data.hotness, variable_hotness=data.variable_hotness)
  if data.kind == "synthetic_ctr":
    if data.variable_hotness:
      raise ConfigError("data.variable_hotness=True: synthetic_ctr draws bags of a fixed "
                        "hotness per feature (data.hotness); bags of varying length are "
                        "available with data.kind='random'")
    return SyntheticCTR(
        **common, hotness=data.hotness, zipf_exponent=data.zipf_exponent,
        dense_missing_rate=data.dense_missing_rate,
        sparse_missing_rate=data.sparse_missing_rate, teacher_num_pairs=data.teacher_num_pairs,
        teacher_pair_scale=data.teacher_pair_scale, teacher_dense_scale=data.teacher_dense_scale)
  if data.kind in CRITEO_KINDS:
    return _make_criteo(run)
  raise ConfigError(f"data.kind={data.kind!r} is not one of {DATA_KINDS}")


def _make_criteo(run: RunSpec):
  from dlrm_jax.data.format import FormatError
  from dlrm_jax.data.loader import CriteoData
  import jax

  data, spec = run.data, run.model
  try:
    source = CriteoData(
        data.path, run.training.mini_batch_size, seed=data.seed, eval_split=data.eval_split,
        shuffle=data.shuffle, block_rows=data.block_rows, shuffle_buffer=data.shuffle_buffer,
        process_index=jax.process_index(), process_count=jax.process_count())
  except FormatError as e:
    raise ConfigError(f"data.path={data.path!r}: {e}") from None
  small = [(f, have, need) for f, (have, need)
           in enumerate(zip(spec.table_rows, source.table_rows)) if have < need]
  if len(spec.table_rows) != len(source.table_rows) or small:
    raise ConfigError(
        f"arch_embedding_size has {len(spec.table_rows)} tables, but {data.path} needs "
        f"{len(source.table_rows)} with rows {list(source.table_rows)}"
        + (f" (table {small[0][0]} has {small[0][1]} < {small[0][2]})" if small else "")
        + ": size the config with dlrm_jax.data.configure_data(config)")
  if tuple(data.hotness) != tuple(source.hotness):
    raise ConfigError(
        f"data.hotness={dash_list(data.hotness)!r}, but {data.path} holds bags of hotness "
        f"{dash_list(source.hotness)!r} (its rows are [{sum(source.hotness)}] ids): "
        "set data.hotness to that (dlrm_jax.data.configure_data(config) does)")
  return source


__all__ = ["Batch", "CRITEO_KINDS", "DATA_KINDS", "RandomData", "SyntheticCTR", "configure_data",
           "hashed_uniform", "make_data"]
