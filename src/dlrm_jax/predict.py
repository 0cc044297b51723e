"""Scoring with a trained checkpoint, and an exported inference function.

    python -m dlrm_jax.predict --workdir DIR --input FILE --output FILE
    python -m dlrm_jax.predict --workdir DIR --export DIR2

`--input` is raw Criteo TSV (with or without the label column; .gz too) or a
prepared directory (`--split`, default test). Raw values become table rows as
the prepared directory the model was trained on maps them (its `categorical`
mode, moduli and vocabulary: `--data`, default the checkpoint's
`data.path`). The output gets one click probability per input row. It runs
on every local device (`--devices N` for fewer), in batches of
`--batch-size` rows, with the sharding plan the planner picks for them: a
checkpoint restores onto any device count.

`--export` writes the inference functions and their parameters: `model.jaxexport`
(`jax.export` serialisation, batch size symbolic), `params.npz` (dense
parameters, the tables stacked, one array per width, with which tables each holds
at which offsets in `signature.json`, and the vocabulary).
`load_exported(DIR)` runs it with jax and numpy alone: no config, no Flax, no
code of this package. It takes the model's inputs (dense log(1 + count), ids that
are table rows); its ids are flat bags, each feature's ids end to end
([B, sum of the hotness]; one-hot data: [B, F]); `bags.jaxexport` beside it
takes bags of any length, padded to a common H ([B, F, H], H symbolic too),
with per-id weights and a mask, as `dlrm_jax.predict` scores them. For a one-hot
model trained on a prepared Criteo directory (`--data`, as for raw input),
`raw.jaxexport` takes raw Criteo values (counts, and the 32-bit integers of the
hex strings) and applies the preparation in the function (`RawPreprocessing`).

`--quantize int8|int4` scores (on one device) and exports with every table
row-wise quantised, a scale and a bias per row as FBGEMM's fused formats
(`dlrm_jax.embedding.quantized`: D + 8 bytes per row for int8, ceil(D / 2) + 4 for
int4, against 4 D for float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import sys
import zlib
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from dlrm_jax import checkpoint as checkpoint_lib
from dlrm_jax import parallel
from dlrm_jax.config import base_config
from dlrm_jax.data import CRITEO_KINDS
from dlrm_jax.data import format as fmt
from dlrm_jax.data.criteo.parse import BadLineError, InputError, parse_block
from dlrm_jax.data.criteo.vocabulary import load_vocabulary, vocab_rows
from dlrm_jax.embedding import quantized
from dlrm_jax.task import Task


@dataclasses.dataclass
class Model:
  """A trained model restored for inference: the task, its parameters and tables."""

  task: Task
  params: nnx.State
  tables: dict
  config: ConfigDict
  step: int


def load_model(workdir: str, *, step: int | None = None, devices: int = 0) -> Model:
  """The model of WORKDIR's latest (or `step`'s) checkpoint on `devices` devices (0: all).

  The config comes from the checkpoint; the sharding plan is the planner's for
  the devices at hand (the tables are re-laid out if it differs).
  """
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # read only: create nothing
    raise checkpoint_lib.CheckpointError(
        f"{workdir}: no such run directory" if not os.path.isdir(workdir) else
        f"{workdir} has no checkpoints/ (is it the --workdir that train.py wrote?)")
  # Closed on every way out: Orbax's background threads would otherwise outlive an error
  # and print their own traceback at interpreter exit.
  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   log=lambda s: print(s, file=sys.stderr)) as checkpointer:
    steps = checkpointer.steps()
    if not steps:
      raise checkpoint_lib.CheckpointError(f"{workdir}/checkpoints holds no complete checkpoint")
    contents = checkpointer.read_contents(step if step is not None else steps[-1])
    config = base_config()  # fields newer than the checkpoint keep their defaults
    config.update(contents.config)
    if str(config.model) != "dlrm":
      raise checkpoint_lib.CheckpointError(
          f"{workdir} holds a {config.model} run: predict scores DLRM runs (DLRMv4's "
          "scoring and export are not here yet; its eval AUC is in metrics.jsonl)")
    config.mesh.num_devices = int(devices)
    config.mesh.replicas = 1
    config.distributed.coordinator_address = ""
    if contents.plan.num_shards != (devices or jax.device_count()):
      config.sharding.overrides = ""  # pinned placements were for the saved device count
    task = Task(config)
    restored = checkpointer.restore(task, step=step)
  if restored is None:
    raise checkpoint_lib.CheckpointError(f"no checkpoint in {workdir}/checkpoints restores")
  return Model(task=task, params=restored.state.params, tables=restored.state.tables,
               config=config, step=restored.step)


def score(model: Model, batches: Iterator[dict], batch_size: int) -> np.ndarray:
  """Probabilities for every row of `batches` (host batches of at most `batch_size`
  rows; each is padded to `batch_size` so that one compiled program serves all)."""
  return _score(model, batches, batch_size, lambda padded: parallel.gather_to_host(
      model.task.predict(model.params, model.tables, padded)))


def _score(model: Model, batches: Iterator[dict], batch_size: int,
           probabilities: Callable[[dict], np.ndarray]) -> np.ndarray:
  """`probabilities` of each batch padded to `batch_size`, ids checked, padding dropped."""
  out = []
  for batch in batches:
    n = len(batch["dense"])
    if n == 0:
      continue
    padded = {k: _pad(np.asarray(v), batch_size) for k, v in batch.items() if k != "label"}
    model.task.check_ids(padded["sparse"], padded.get("sparse_mask"))
    out.append(np.asarray(probabilities(padded))[:n])
  return np.concatenate(out) if out else np.zeros(0, np.float32)


def _pad(x: np.ndarray, rows: int) -> np.ndarray:
  if len(x) == rows:
    return x
  return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])


# Input ---------------------------------------------------------------------------

def prepared_batches(path: str, batch_size: int, split: str = "test") -> Iterator[dict]:
  """Every row of a split of a prepared Criteo directory, in order, in batches."""
  from dlrm_jax.data.loader import CriteoData

  data = CriteoData(path, batch_size, shuffle=False)
  for i in range(data.num_batches(split, batch_size)):
    yield data.batch(i, split, batch_size)


class RawMapper:
  """Raw categorical values (uint32 hex) -> table rows, as a prepared directory maps them."""

  def __init__(self, data_dir: str):
    self.meta = fmt.read_metadata(data_dir)
    options = self.meta["options"]
    self.mode = options["categorical"]
    moduli = options.get("max_ind_range")
    self.moduli = None if moduli is None else np.asarray(moduli, np.uint32)
    self.vocab = None if self.mode == "hash" else load_vocabulary(data_dir)
    self.unseen = 0  # values missing from a `reference` vocabulary (mapped to row 0)

  def __call__(self, raw: np.ndarray) -> np.ndarray:
    if self.moduli is not None:
      raw = raw % self.moduli
    if self.vocab is None:
      return raw.astype(np.int32)
    out = np.empty(raw.shape, np.int32)
    for f, (keys, ids) in enumerate(self.vocab):
      out[:, f], found = vocab_rows(keys, ids, raw[:, f])
      self.unseen += int((~found).sum()) if self.mode == "reference" else 0
    return out


def raw_batches(path: str, mapper: RawMapper, batch_size: int) -> Iterator[dict]:
  """Batches of a raw Criteo TSV file (40 columns, or 39 without the label).

  A bad line stops with the file, the line and the field.
  """
  opener = gzip.open if path.endswith(".gz") else open
  line_no = 0
  with opener(path, "rb") as f:
    while True:
      try:
        lines = [l for l in (f.readline() for _ in range(batch_size)) if l]
      except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InputError(f"{path}: truncated or corrupt gzip data after line {line_no} "
                         f"({e})") from None
      if not lines:
        return
      if lines[0].rstrip(b"\r\n").count(b"\t") == 38:  # no label column: add one
        lines = [b"0\t" + l for l in lines]
      data = b"".join(l if l.endswith(b"\n") else l + b"\n" for l in lines)
      block = parse_block(data)
      if block.bad:
        local, field, message = block.bad[0]
        raise BadLineError(path, line_no + local, field, message,
                           hint="every input line needs a probability: fix or remove it")
      line_no += len(lines)
      yield {"dense": block.dense, "sparse": mapper(block.raw)}


# Raw values in the export ---------------------------------------------------------

RAW_DENSE = (f"float32 [B, {fmt.NUM_DENSE}]: I1..I{fmt.NUM_DENSE}, the raw integer counts (the "
             "function takes log(1 + x)); an empty field is 0, and negative values and NaN "
             "become 0 too, as the Criteo preparation maps empty and negative counts to 0")
RAW_SPARSE = (f"uint32 [B, {fmt.NUM_SPARSE}]: C1..C{fmt.NUM_SPARSE}, each the 32-bit integer "
              "its 8 hex digits encode (int(s, 16)); an empty field is 0, as the Criteo "
              "preparation reads it")


@dataclasses.dataclass(eq=False)  # hashable, for jax.jit
class RawPreprocessing:
  """The Criteo preparation of raw values as jax operations, for `raw.jaxexport`:
  `self(vocab, counts, values) -> (dense, table rows)` for counts float32 [B, 13] and
  values uint32 [B, 26] (`RAW_DENSE`, `RAW_SPARSE`): log(1 + x) of the counts (0 for
  empty, negative and NaN), the values modulo `moduli` (if the directory was prepared
  with `max_ind_range`), then looked up in the vocabulary, as `RawMapper` does.
  `vocab` ({"keys", "rows"}; empty in `hash` mode) holds every feature's sorted values
  and their table rows end to end, feature f at `offsets[f]:offsets[f + 1]`."""

  mode: str
  moduli: list[int] | None
  vocab: dict[str, np.ndarray]
  offsets: list[int] | None

  @classmethod
  def of(cls, mapper: RawMapper) -> "RawPreprocessing":
    moduli = None if mapper.moduli is None else [int(m) for m in mapper.moduli]
    if mapper.vocab is None:
      return cls(mapper.mode, moduli, {}, None)
    sizes = [len(keys) for keys, _ in mapper.vocab]
    vocab = {"keys": np.concatenate([keys for keys, _ in mapper.vocab]).astype(np.uint32),
             "rows": np.concatenate([rows for _, rows in mapper.vocab]).astype(np.int32)}
    return cls(mapper.mode, moduli, vocab, [0] + np.cumsum(sizes).tolist())

  def __call__(self, vocab: dict, counts: jax.Array, values: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    dense = jnp.log1p(jnp.where(counts > 0, counts, 0.0))  # NaN > 0 is False
    if self.moduli is not None:
      values = values % jnp.asarray(self.moduli, jnp.uint32)
    if self.offsets is None:
      return dense, values.astype(jnp.int32)
    return dense, _vocab_search(vocab["keys"], vocab["rows"], self.offsets, values)


def _vocab_search(keys: jax.Array, rows: jax.Array, offsets: Sequence[int],
                  values: jax.Array) -> jax.Array:
  """`vocab_rows` of every feature at once: a binary search of each value [B, F] in its
  feature's segment of `keys` (segment f: offsets[f]:offsets[f + 1], sorted), row 0 where
  it is absent. No slice of the (large) vocabulary is copied."""
  if offsets[-1] == 0:
    return jnp.zeros(values.shape, jnp.int32)
  ends = jnp.broadcast_to(jnp.asarray(offsets[1:], jnp.int32), values.shape)
  lo, hi = jnp.broadcast_to(jnp.asarray(offsets[:-1], jnp.int32), values.shape), ends
  longest = max(b - a for a, b in zip(offsets, offsets[1:]))
  for _ in range(longest.bit_length()):  # each step at least halves every interval
    mid = lo + (hi - lo) // 2
    open_ = lo < hi
    right = open_ & (jnp.take(keys, mid, mode="clip") < values)
    lo, hi = jnp.where(right, mid + 1, lo), jnp.where(open_ & ~right, mid, hi)
  found = (lo < ends) & (jnp.take(keys, lo, mode="clip") == values)
  return jnp.where(found, jnp.take(rows, lo, mode="clip"), 0)


# Export --------------------------------------------------------------------------

@dataclasses.dataclass
class Inference:
  """The model as one pure function of host arrays, on one device, for export and for
  scoring with quantised tables: `fn(param_leaves, tables, dense, sparse, weights,
  mask)` with the tables stacked (per width: [sum of its tables' rows, w], or a
  quantised set; `table_sets`), flat ids [B, sum of the hotness] (one-hot data: [B, F])
  or padded bags [B, F, H], optional per-id weights of the ids' shape and, for padded
  bags, a mask (None: absent)."""

  fn: Callable
  leaves: list[np.ndarray]
  tables: dict[str, np.ndarray]
  sparse_width: int
  num_dense: int
  jitted: Callable = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    self.jitted = jax.jit(self.fn)

  def __call__(self, dense: np.ndarray, sparse: np.ndarray, weights: np.ndarray | None = None,
               mask: np.ndarray | None = None) -> np.ndarray:
    return np.asarray(self.jitted(self.leaves, self.tables, dense, sparse, weights, mask))


def inference(model: Model, quantize: str | None = None) -> Inference:
  """`model` as an `Inference`; `quantize` "int8" or "int4" stores its tables row-wise
  quantised (`dlrm_jax.embedding.quantized`), dequantised row by row in the lookup."""
  task = model.task
  leaves, treedef = jax.tree.flatten(model.params)
  leaves = [np.asarray(parallel.gather_to_host(x)) for x in leaves]
  graphdef, collection = task.graphdef, task.collection
  arrays, tables = task.embedding.to_arrays(model.tables), {}
  for w in collection.widths:  # one gather serves every table (of a width)
    stacked = np.concatenate([arrays[t] for t in collection.features_of(w)], axis=0)
    part = {"stacked": stacked} if quantize is None else quantized.quantize(stacked, quantize)
    tables.update({collection.key(w, name): v for name, v in part.items()})

  def infer(param_leaves, tables, dense, sparse, weights=None, mask=None):
    params = jax.tree.unflatten(treedef, param_leaves)
    if mask is not None:  # padding ids may be anything: row 0 of their table, weight 0
      sparse = jnp.where(mask, sparse, 0)
    bags = {"sparse": sparse, "sparse_weights": weights, "sparse_mask": mask}
    bags = task.qr.split({k: v for k, v in bags.items() if v is not None})  # QR pairs' ids
    emb = task.qr.combine(collection.lookup(tables, bags["sparse"], bags.get("sparse_weights"),
                                            bags.get("sparse_mask")))
    return jax.nn.sigmoid(nnx.merge(graphdef, params)(dense, emb))

  return Inference(infer, leaves, tables, sum(task.qr.feature_hotness), task.spec.num_dense)


def score_quantized(model: Model, batches: Iterator[dict], batch_size: int,
                    fmt: str) -> np.ndarray:
  """`score` with the tables quantised to `fmt`, on one device."""
  run = inference(model, fmt)
  return _score(model, batches, batch_size, lambda padded: run(
      padded["dense"], padded["sparse"], padded.get("sparse_weights"),
      padded.get("sparse_mask")))


def export(model: Model, directory: str, *, platforms: Sequence[str] | None = None,
           quantize: str | None = None, raw: RawMapper | None = None) -> None:
  """Writes the inference functions (jax.export) and their parameters to `directory`.

  `model.jaxexport` takes (dense-parameter leaves, the tables, dense [B, 13] float32,
  sparse [B, sum of the hotness] int32: each feature's bag of ids end to end, one id
  per feature for one-hot data) with a symbolic B and returns probabilities [B];
  `bags.jaxexport` takes, after the same leaves and tables, dense, bags padded to H
  ids [B, F, H] int32, per-id weights [B, F, H] float32 and a mask [B, F, H] bool
  (padding: False), B and H symbolic. Both take the model's inputs: dense features
  log(1 + count) and ids that are table rows. The tables are stacked, one array per
  width ([sum of its tables' rows, w]; `signature.json`'s `table_sets` say which tables
  at which offsets), or with `quantize` ("int8" or "int4") row-wise quantised.

  With `raw`, the mapper of the prepared Criteo directory the (one-hot) model was
  trained on (`_raw_mapper_for`), `raw.jaxexport` takes raw Criteo values instead, after the leaves, the tables and the
  vocabulary arrays (`RawPreprocessing`): counts [B, 13] float32 and categorical values
  [B, 26] uint32 (`RAW_DENSE`, `RAW_SPARSE`). `load_exported` wraps all three.
  """
  run = inference(model, quantize)
  task = model.task
  features = len(task.qr.feature_hotness)
  prep = None if raw is None else RawPreprocessing.of(raw)
  struct = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  head = ([struct(x) for x in run.leaves], {k: struct(v) for k, v in run.tables.items()})
  b = jax.export.symbolic_shape("b")[0]
  dense = jax.ShapeDtypeStruct((b, run.num_dense), jnp.float32)
  exported = {"model": jax.export.export(
      jax.jit(lambda p, t, d, s: run.fn(p, t, d, s)), platforms=platforms)(
          *head, dense, jax.ShapeDtypeStruct((b, run.sparse_width), jnp.int32))}
  if prep is not None:
    exported["raw"] = jax.export.export(
        jax.jit(lambda p, t, v, d, s: run.fn(p, t, *prep(v, d, s))), platforms=platforms)(
            *head, {k: struct(v) for k, v in prep.vocab.items()}, dense,
            jax.ShapeDtypeStruct((b, features), jnp.uint32))
  b, h = jax.export.symbolic_shape("b, h")
  bag = lambda dtype: jax.ShapeDtypeStruct((b, features, h), dtype)
  exported["bags"] = jax.export.export(jax.jit(run.fn), platforms=platforms)(
      *head, jax.ShapeDtypeStruct((b, run.num_dense), jnp.float32), bag(jnp.int32),
      bag(jnp.float32), bag(jnp.bool_))
  os.makedirs(directory, exist_ok=True)
  for name, fn in exported.items():
    with open(os.path.join(directory, f"{name}.jaxexport"), "wb") as f:
      f.write(fn.serialize())
  if prep is None and os.path.exists(os.path.join(directory, "raw.jaxexport")):
    os.remove(os.path.join(directory, "raw.jaxexport"))  # of an earlier export here
  arrays = {f"param_{i:04d}": x for i, x in enumerate(run.leaves)}
  arrays.update({f"tables_{k}": v for k, v in run.tables.items()})
  if prep is not None:
    arrays.update({f"vocab_{k}": v for k, v in prep.vocab.items()})
  np.savez(os.path.join(directory, "params.npz"), **arrays)
  raw = None if prep is None else {
      "call": "raw.call(params, tables, vocab, dense, sparse)",
      "dense": RAW_DENSE, "sparse": RAW_SPARSE, "output": "click probability float32 [B]",
      "categorical": prep.mode, "max_ind_range": prep.moduli,
      "vocab": sorted(prep.vocab), "vocab_offsets": prep.offsets,
      "unseen": None if prep.offsets is None else "a value not in the vocabulary (after "
                                                   "max_ind_range) is row 0"}
  with open(os.path.join(directory, "signature.json"), "w") as f:
    json.dump({"num_params": len(run.leaves), "num_tables": task.spec.num_tables,
               "tables": sorted(run.tables), "quantize": quantize,
               "table_bytes": int(sum(v.nbytes for v in run.tables.values())),
               "table_sets": table_sets(task.collection),
               "num_dense": run.num_dense, "table_rows": list(task.spec.table_rows),
               "hotness": list(task.qr.feature_hotness),
               "step": model.step, "platforms": list(exported["model"].platforms),
               "inputs": f"dense float32 [B, {run.num_dense}]: the model's dense features "
                         "(Criteo: log(1 + count), empty and negative counts 0), sparse int32 "
                         f"[B, {run.sparse_width}]: table rows, each feature's ids end to end",
               "bags_inputs": f"dense float32 [B, {run.num_dense}], sparse int32 "
                              f"[B, {features}, H], weights float32 [B, {features}, H], "
                              f"mask bool [B, {features}, H] (False: padding)",
               "raw_inputs": raw,
               "output": "click probability float32 [B]"}, f, indent=1)


def _raw_mapper_for(model: Model, data: str) -> RawMapper:
  """The mapper of prepared directory `data`, checked against a one-hot Criteo model."""
  spec, hotness = model.task.spec, model.task.qr.feature_hotness
  if (spec.num_dense, len(hotness), set(hotness)) != (fmt.NUM_DENSE, fmt.NUM_SPARSE, {1}):
    raise InputError(f"raw Criteo values need a one-hot model of {fmt.NUM_DENSE} dense and "
                     f"{fmt.NUM_SPARSE} categorical features; this one has {spec.num_dense} "
                     f"and hotness {list(hotness)}")
  mapper = RawMapper(data)
  if any(h != 1 for h in mapper.meta["hotness"]):
    raise InputError(f"{data} is multi-hot: its ids are not a function of raw values alone")
  sizes = mapper.meta["vocab_sizes"]
  big = [f for f, (v, r) in enumerate(zip(sizes, spec.table_rows)) if v > r]
  if big:
    raise InputError(f"{data}'s vocabulary of C{big[0] + 1} has {sizes[big[0]]} rows, the "
                     f"model's table {spec.table_rows[big[0]]}: not the directory it was "
                     "trained on (--data)")
  return mapper


def table_sets(collection) -> list[dict]:
  """`signature.json`'s description of the table arrays: one set per width (every table's
  width D: one set), each with the suffix of its arrays' keys (`stacked`, or `int8`,
  `scale`, `bias`, then the suffix: "" for the widest, `_dW` for narrower), its tables
  (features, in order) and where each starts in the set's stacked rows."""
  out = []
  for w in collection.widths:
    part = collection.of_width(w)
    out.append({"width": int(w), "suffix": collection.key(w, ""),
                "features": [int(f) for f in collection.features_of(w)],
                "offsets": [int(o) for o in part.offsets]})
  return out


def load_exported(directory: str, raw: bool = False) -> Callable[..., np.ndarray]:
  """The exported model as `f(dense, sparse, weights=None, mask=None) -> probabilities`,
  with jax and numpy only.

  `sparse`: flat bags [B, sum of the hotness] (or one id per feature [B, F]) with
  optional per-id weights of its shape, or bags padded to H [B, F, H] with optional
  weights and mask (False: padding) of its shape. With `raw`, `f(counts, values)` of
  raw Criteo values (`raw.jaxexport`: `RAW_DENSE`, `RAW_SPARSE`).
  """
  def load(name):
    with open(os.path.join(directory, f"{name}.jaxexport"), "rb") as f:
      return jax.export.deserialize(bytearray(f.read()))

  with open(os.path.join(directory, "signature.json")) as f:
    sig = json.load(f)
  arrays = np.load(os.path.join(directory, "params.npz"))
  leaves = [arrays[f"param_{i:04d}"] for i in range(sig["num_params"])]
  tables = {k: arrays[f"tables_{k}"] for k in sig.get("tables", ["stacked"])}
  if raw:
    if not sig.get("raw_inputs"):
      raise ValueError(f"{directory} has no raw.jaxexport: export it with the prepared "
                       "directory the model was trained on (--data)")
    from_raw = load("raw")
    vocab = {k: arrays[f"vocab_{k}"] for k in sig["raw_inputs"]["vocab"]}
    return lambda counts, values: np.asarray(from_raw.call(
        leaves, tables, vocab, np.asarray(counts, np.float32), np.asarray(values, np.uint32)))
  flat = load("model")
  hotness = sig["hotness"]
  padded = load("bags") if os.path.exists(os.path.join(directory, "bags.jaxexport")) else None

  def run(dense, sparse, weights=None, mask=None):
    dense, sparse = np.asarray(dense, np.float32), np.asarray(sparse, np.int32)
    if sparse.ndim == 2 and weights is None and mask is None:
      return np.asarray(flat.call(leaves, tables, dense, sparse))
    if padded is None:
      raise ValueError(f"{directory} was exported before weighted and padded bags were: "
                       "export it again")
    if sparse.ndim == 2:
      if mask is not None:
        raise ValueError("a mask goes with padded bags [batch, features, H]; flat bags "
                         "[batch, sum(hotness)] have none")
      sparse, weights, mask = pad_bags(hotness, sparse, weights)
    ones = np.ones(sparse.shape, np.float32)
    return np.asarray(padded.call(
        leaves, tables, dense, sparse, ones if weights is None else np.asarray(weights, np.float32),
        ones.astype(bool) if mask is None else np.asarray(mask, bool)))

  return run


def pad_bags(hotness: Sequence[int], sparse: np.ndarray, weights: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Flat bags [B, sum(hotness)] (or one id per feature [B, F]) and their optional weights
  -> ids, weights and mask [B, F, max(hotness)], with numpy alone."""
  widths = [1] * len(hotness) if sparse.shape[1] == len(hotness) else list(hotness)
  if sparse.shape[1] != sum(widths):
    raise ValueError(f"flat bags must be [batch, {sum(hotness)}] or [batch, {len(hotness)}], "
                     f"got {sparse.shape}")
  if weights is not None and np.shape(weights) != sparse.shape:
    raise ValueError(f"weights {np.shape(weights)} must have the ids' shape {sparse.shape}")
  n, h = len(sparse), max(widths)
  ids, w, mask = (np.zeros((n, len(widths), h), t) for t in (np.int32, np.float32, bool))
  start = 0
  for f, width in enumerate(widths):
    ids[:, f, :width] = sparse[:, start:start + width]
    w[:, f, :width] = 1.0 if weights is None else weights[:, start:start + width]
    mask[:, f, :width] = True
    start += width
  return ids, w, mask


# Command line --------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m dlrm_jax.predict", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="the training run's directory")
  p.add_argument("--input", help="raw Criteo TSV (.gz too) or a prepared directory")
  p.add_argument("--output", help="file for the probabilities, one per input row")
  p.add_argument("--export", help="directory for the exported inference function")
  p.add_argument("--data", help="prepared directory whose vocabulary maps raw values "
                 "(default: the checkpoint's data.path)")
  p.add_argument("--split", default="test", help="split of a prepared --input (default test)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--batch-size", type=int, default=4096)
  p.add_argument("--devices", type=int, default=0, help="devices to use (0: all)")
  p.add_argument("--platforms", default="", help="export for these platforms, e.g. cpu,cuda "
                 "(default: this machine's)")
  p.add_argument("--quantize", choices=tuple(quantized.FORMATS), default=None,
                 help="score and export with the tables row-wise quantised (a scale and a "
                      "bias per row; on one device)")
  args = p.parse_args(argv)
  if not args.export and not (args.input and args.output):
    p.error("give --input and --output, or --export")
  try:
    return _run(args)
  except (checkpoint_lib.CheckpointError, ValueError, OSError) as e:  # InputError, BadLineError
    # One line, no traceback: a damaged input line (FILE:LINE: FIELD: reason), a missing
    # file or checkpoint, an unwritable output.
    print(f"error: {e}", file=sys.stderr)
    return 1


def _run(args: argparse.Namespace) -> int:
  model = load_model(args.workdir, step=args.step, devices=args.devices)
  print(f"model of step {model.step} from {args.workdir} on {model.task.mesh.size} device(s)",
        file=sys.stderr)
  raw_input = bool(args.input) and not os.path.isdir(args.input)
  mapper, missing = (_raw_mapper(args, model) if args.export or raw_input
                     else (None, "not needed"))
  if args.export:
    export(model, args.export, platforms=[s for s in args.platforms.split(",") if s] or None,
           quantize=args.quantize, raw=mapper)
    print(f"exported to {args.export}"
          + (" (raw.jaxexport: raw Criteo values)" if mapper else
             f" (no raw.jaxexport: {missing}; model.jaxexport takes the model's inputs)"),
          file=sys.stderr)
  if args.input:
    batch_size = -(-args.batch_size // model.task.mesh.size) * model.task.mesh.size
    if os.path.isdir(args.input):
      batches = prepared_batches(args.input, batch_size, args.split)
    else:
      if mapper is None:
        raise InputError(f"raw input: {missing}")
      batches = raw_batches(args.input, mapper, batch_size)
    probs = (score(model, batches, batch_size) if args.quantize is None
             else score_quantized(model, batches, batch_size, args.quantize))
    with open(args.output, "w") as f:
      f.writelines(f"{x:.9g}\n" for x in probs)
    print(f"{len(probs):,} rows scored into {args.output}"
          + (f" ({mapper.unseen:,} values unseen in training mapped to row 0)"
             if not os.path.isdir(args.input) and mapper.unseen else ""), file=sys.stderr)
  return 0


def _raw_mapper(args: argparse.Namespace, model: Model) -> tuple[RawMapper | None, str]:
  """(the mapper of the prepared directory whose vocabulary maps raw values, "") or (None,
  why there is none). `--data` must serve (an error otherwise); the checkpoint's
  `data.path` serves where it can: an export needs no data."""
  if args.data:
    return _raw_mapper_for(model, args.data), ""
  data_dir, hotness = model.config.data.path, model.task.qr.feature_hotness
  if model.config.data.kind not in CRITEO_KINDS:
    return None, (f"the model was trained on data.kind={model.config.data.kind!r}, which has "
                  "no raw values")
  if set(hotness) != {1}:
    return None, (f"the model is multi-hot (hotness {'-'.join(map(str, hotness))}): its ids "
                  "are not a function of the raw line")
  if not data_dir or not os.path.isdir(data_dir):
    return None, (f"the prepared directory the model was trained on is not at hand (--data; "
                  f"the checkpoint names {data_dir!r})")
  try:
    return _raw_mapper_for(model, data_dir), ""
  except (ValueError, OSError) as e:  # an unfinished or another preparation
    return None, f"the checkpoint's data.path does not serve: {e}"


if __name__ == "__main__":
  parallel.cpu_unless_accelerator()
  sys.exit(main())
