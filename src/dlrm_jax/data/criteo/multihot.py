"""Multi-hot data: the MLPerf DLRM-DCNv2 "Criteo multi-hot" shape, derived from a one-hot
prepared directory (`python -m dlrm_jax.data.criteo multihot`)."""

from __future__ import annotations

import os
import shutil
from typing import Sequence

import numpy as np

from dlrm_jax.data import format as fmt
from dlrm_jax.data.format import FormatError, NUM_SPARSE
from dlrm_jax.data.synthetic import mix64


def multi_hot_ids(ids: np.ndarray, feature: int, hotness: int, rows: int, seed: int) -> np.ndarray:
  """[n] one-hot ids of a feature -> [n, hotness]: the id itself, then hotness-1 fixed
  pseudo-random rows of the table, a pure function of (seed, feature, id, k)."""
  out = np.empty((len(ids), hotness), np.int32)
  out[:, 0] = ids
  if hotness > 1:
    base = ids.astype(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)
    k = np.arange(1, hotness, dtype=np.uint64)[None, :]
    key = np.uint64((seed * 1_000_003 + feature * 7919 + 1) & (2**64 - 1))
    with np.errstate(over="ignore"):
      h = mix64(base + k * np.uint64(0xD1B54A32D192ED03) + key)
    out[:, 1:] = (h % np.uint64(rows)).astype(np.int32)
  return out


def make_multi_hot(source: str, output: str, hotness: Sequence[int], *, seed: int = 0,
                   progress: bool = True) -> dict:
  """Writes a multi-hot copy of a one-hot prepared directory (labels and dense hard-linked).

  Feature f gets hotness[f] ids per row: its one-hot id first, then ids that
  are a fixed function of (seed, f, id), as MLPerf's synthetic multi-hot
  Criteo draws a fixed random bag per id (the values differ from MLPerf's own
  files; the shapes and the structure are the same).
  """
  meta = fmt.read_metadata(source)
  hotness = [int(h) for h in hotness]
  if len(hotness) == 1:
    hotness = hotness * NUM_SPARSE
  if len(hotness) != NUM_SPARSE or min(hotness) < 1:
    raise ValueError(f"hotness={hotness}: give {NUM_SPARSE} values >= 1 (or one for all)")
  if any(h != 1 for h in meta["hotness"]):
    raise ValueError(f"{source} is already multi-hot")
  if os.path.exists(os.path.join(output, fmt.METADATA_FILE)):
    raise FormatError(f"{output} already holds prepared data; choose a new output")
  os.makedirs(os.path.join(output, fmt.SHARD_DIR), exist_ok=True)
  sizes = meta["vocab_sizes"]
  for s in _progress_iter(meta["shards"], "multi-hot", progress):
    for f in ("label", "dense"):
      dst = fmt.shard_path(output, s["name"], f)
      if os.path.exists(dst):
        os.remove(dst)
      try:
        os.link(fmt.shard_path(source, s["name"], f), dst)
      except OSError:
        shutil.copyfile(fmt.shard_path(source, s["name"], f), dst)
    sparse = np.load(fmt.shard_path(source, s["name"], "sparse"), mmap_mode="r")
    writer = fmt.NpyAppender(fmt.shard_path(output, s["name"], "sparse"), np.int32,
                             (sum(hotness),))
    for lo in range(0, len(sparse), 1 << 18):
      one = np.asarray(sparse[lo:lo + (1 << 18)])
      writer.append(np.concatenate([multi_hot_ids(one[:, f], f, hotness[f], sizes[f], seed)
                                    for f in range(NUM_SPARSE)], axis=1))
    writer.close()
  new = dict(meta, hotness=hotness, multi_hot={"source": os.path.abspath(source), "seed": seed})
  fmt.write_json_atomic(os.path.join(output, fmt.METADATA_FILE), new)
  return new


def _progress_iter(items, desc, enabled):
  from tqdm.auto import tqdm

  return tqdm(items, desc=desc, disable=not enabled, dynamic_ncols=True)
