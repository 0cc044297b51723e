"""Preparing raw Criteo files: `prepare` checks its arguments, resumes an unfinished run,
and runs the stages (parsing the pieces, negative subsampling, the vocabulary) on one
pool of workers; then writes the metadata. The reference's splits are made here too.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time
from typing import Callable, Sequence

from dlrm_jax.data import format as fmt
from dlrm_jax.data.criteo.parse import InputError
from dlrm_jax.data.criteo.pieces import Piece, plan_pieces
from dlrm_jax.data.criteo.shards import piece_task
from dlrm_jax.data.criteo.subsample import sub_sample_shards
from dlrm_jax.data.criteo.vocabulary import apply_vocabulary, build_vocabulary
from dlrm_jax.data.format import FormatError, NUM_DENSE, NUM_SPARSE
from dlrm_jax.data.workers import WorkerPool, progress_bar

DATASETS = ("kaggle", "terabyte")
CATEGORICAL_MODES = ("hash", "reference", "frequency")
KAGGLE_DAYS = 7
_MAX_INT32 = 2**31 - 1


def _sort_inputs(dataset: str, inputs: Sequence[str]) -> list[str]:
  """Terabyte days in numeric order (day_2 before day_10); other inputs as given."""
  if dataset != "terabyte":
    return list(inputs)
  days = [re.search(r"day_(\d+)", os.path.basename(p)) for p in inputs]
  if all(days):
    return [p for _, p in sorted(zip([int(d.group(1)) for d in days], inputs))]
  return list(inputs)


class OutputError(OSError):
  """The output directory cannot be written (a full disk, no permission); the message
  says what to do. Finished pieces are kept: the same call resumes."""


def _output_error(output: str, e: OSError) -> OutputError:
  where = f" ({e.filename})" if e.filename else ""
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    message = (f"{output}: no space left on the device{where}. Free some space (or choose "
               "another --output) and run the same command again: it resumes where it "
               "stopped.")
  else:
    message = f"{output}: cannot write the prepared data{where}: {e.strerror or e}."
  error = OutputError(message)
  error.errno = e.errno
  return error


def parse_max_ind_range(value) -> list[int] | None:
  """None, one int for every feature, or 26 comma-separated ints -> 26 moduli (or None)."""
  if value is None or value == "" or value == -1 or value == 0:
    return None
  try:
    if isinstance(value, str):
      parts = [int(v) for v in value.split(",")]
    elif isinstance(value, int):
      parts = [value]
    else:
      parts = [int(v) for v in value]
  except (TypeError, ValueError):
    raise ValueError(f"max_ind_range={value!r}: give one integer or {NUM_SPARSE} "
                     "comma-separated integers") from None
  if len(parts) == 1:
    parts = parts * NUM_SPARSE
  if len(parts) != NUM_SPARSE or any(not 1 <= p <= _MAX_INT32 for p in parts):
    raise ValueError(f"max_ind_range={value!r}: give one value or {NUM_SPARSE}, each in "
                     f"[1, {_MAX_INT32}] (table rows are int32)")
  return parts


def kaggle_days(rows: int) -> list[int]:
  """The reference's cut of Kaggle's rows into 7 days: divmod, the first days one longer."""
  per, extra = divmod(rows, KAGGLE_DAYS)
  return [per + (1 if d < extra else 0) for d in range(KAGGLE_DAYS)]


def make_splits(dataset: str, file_rows: Sequence[int]) -> dict[str, list[list[int]]]:
  """Row ranges of train, test and val over all prepared rows, as the reference splits."""
  total = int(sum(file_rows))
  if dataset == "kaggle":
    eval_start = total - kaggle_days(total)[-1]
  else:
    eval_start = total - int(file_rows[-1])
  eval_rows = total - eval_start
  test_end = eval_start + (eval_rows + 1) // 2
  return {"train": [[0, eval_start]], "test": [[eval_start, test_end]], "val": [[test_end, total]]}


def _fingerprint(path: str) -> dict:
  st = os.stat(path)
  return {"path": os.path.abspath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def prepare(dataset: str, inputs: Sequence[str], output: str, *, categorical: str = "reference",
            max_ind_range=None, frequency_threshold: int = 3, skip_bad_lines: bool = False,
            workers: int | None = None, shard_rows: int = 1 << 21, piece_bytes: int = 64 << 20,
            block_bytes: int = 4 << 20, vocab_memory_bytes: int = 1 << 30,
            sub_sample_rate: float = 0.0, sub_sample_seed: int = 0,
            progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
  """Prepares raw Criteo files into OUTPUT (see the package docstring); returns the metadata.

  Rerunning the same call after an interruption resumes it: finished pieces
  are kept. A call with other options on an unfinished directory is refused.
  `sub_sample_rate` drops that fraction of the negative train rows (the
  reference's `--data-sub-sample-rate`; see `sub_sample_keep`).
  """
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  moduli = _check_modes(dataset, categorical, max_ind_range, frequency_threshold,
                        sub_sample_rate)
  for name, value in (("shard_rows", shard_rows), ("piece_bytes", piece_bytes),
                      ("block_bytes", block_bytes), ("vocab_memory_bytes", vocab_memory_bytes)):
    if int(value) < 1:
      raise ValueError(f"{name}={value} must be >= 1")
  inputs = _check_inputs(dataset, inputs)
  workers = int(workers or os.cpu_count() or 1)
  threshold = int(frequency_threshold) if categorical == "frequency" else None
  options = {"dataset": dataset, "categorical": categorical, "max_ind_range": moduli,
             "frequency_threshold": threshold,
             "skip_bad_lines": bool(skip_bad_lines), "shard_rows": int(shard_rows),
             "piece_bytes": int(piece_bytes), "inputs": [os.path.abspath(p) for p in inputs]}
  if sub_sample_rate:  # Only when used: directories prepared without it keep their options.
    options["sub_sample"] = {"rate": float(sub_sample_rate), "seed": int(sub_sample_seed)}
  job = _Job(dataset, inputs, output, categorical, moduli, frequency_threshold, piece_bytes,
             vocab_memory_bytes, sub_sample_rate, sub_sample_seed, progress, log)
  try:
    meta = _open_output(output, options, log)
    if meta is not None:
      return meta
    pieces, records, sources = _plan_parsing(job)
    cfg = {"output": output, "moduli": moduli, "categorical": categorical,
           "shard_rows": int(shard_rows), "block_bytes": int(block_bytes),
           "skip_bad_lines": bool(skip_bad_lines), "threads": len(pieces) < workers}
    pool = WorkerPool(workers, preload=("pyarrow.csv",))
    try:
      return _run_stages(job, pieces, records, sources, options, cfg, pool)
    finally:
      pool.close()
  except OutputError:
    raise
  except OSError as e:  # The inputs' read errors are InputErrors: this one is the output's.
    raise _output_error(output, e) from None


@dataclasses.dataclass(frozen=True)
class _Job:
  """One prepare call's checked arguments, as its stages need them."""

  dataset: str
  inputs: list[str]  # in the order of the rows (terabyte days sorted)
  output: str
  categorical: str
  moduli: list[int] | None
  frequency_threshold: int
  piece_bytes: int
  vocab_memory_bytes: int
  sub_sample_rate: float
  sub_sample_seed: int
  progress: bool
  log: Callable[[str], None]

  @property
  def progress_dir(self) -> str:
    return os.path.join(self.output, fmt.PROGRESS_DIR)


def _check_modes(dataset: str, categorical: str, max_ind_range, frequency_threshold: int,
                 sub_sample_rate: float) -> list[int] | None:
  """Refuses unknown or inconsistent options; returns the moduli of `max_ind_range`."""
  if dataset not in DATASETS:
    raise ValueError(f"dataset={dataset!r} is not one of {DATASETS}")
  if categorical not in CATEGORICAL_MODES:
    raise ValueError(f"categorical={categorical!r} is not one of {CATEGORICAL_MODES}")
  moduli = parse_max_ind_range(max_ind_range)
  if categorical == "hash" and moduli is None:
    raise ValueError("categorical='hash' needs max_ind_range (e.g. 40000000): the table "
                     "rows are the values modulo it")
  if categorical == "frequency" and int(frequency_threshold) < 1:
    raise ValueError(f"frequency_threshold={frequency_threshold} must be >= 1")
  if not 0.0 <= float(sub_sample_rate) <= 1.0:
    raise ValueError(f"sub_sample_rate={sub_sample_rate} must be in [0, 1] (the fraction of "
                     "negative train rows to drop)")
  return moduli


def _check_inputs(dataset: str, inputs: Sequence[str]) -> list[str]:
  """The input files in the order of their rows; refuses missing, empty or too few files."""
  if not inputs:
    raise ValueError("no input files")
  inputs = _sort_inputs(dataset, inputs)
  for p in inputs:
    if os.path.isdir(p):
      raise InputError(f"{p}: a directory, not a raw Criteo file")
    if not os.path.isfile(p):
      raise InputError(f"{p}: no such file")
    if os.path.getsize(p) == 0:
      raise InputError(f"{p}: empty file (0 bytes)")
    try:
      open(p, "rb").close()
    except OSError as e:
      raise InputError(f"{p}: cannot be read ({e.strerror})") from None
  if dataset == "terabyte" and len(inputs) < 2:
    raise ValueError("terabyte needs at least two day files: the last one is split into test "
                     "and val, the others train")
  return inputs


def _open_output(output: str, options: dict, log: Callable[[str], None]) -> dict | None:
  """The metadata where OUTPUT is already prepared with `options`; else makes OUTPUT ready
  for this run (new, or unfinished with the same options) and returns None."""
  progress_dir = os.path.join(output, fmt.PROGRESS_DIR)
  meta_path = os.path.join(output, fmt.METADATA_FILE)
  if os.path.exists(output) and not os.path.isdir(output):
    raise FormatError(f"{output} is a file, not a directory; choose a new --output.")
  if os.path.exists(meta_path):
    meta = fmt.read_metadata(output)
    if meta.get("options") == options:
      # A run stopped after writing the metadata but before removing its progress
      # records: finish that clean-up (the output is complete).
      shutil.rmtree(progress_dir, ignore_errors=True)
      log(f"{output} is already prepared with these options.")
      return meta
    raise FormatError(f"{output} already holds data prepared with other options "
                      f"({_diff(meta.get('options', {}), options)}); choose a new --output.")
  os.makedirs(os.path.join(output, fmt.SHARD_DIR), exist_ok=True)
  os.makedirs(progress_dir, exist_ok=True)
  plan_path = os.path.join(progress_dir, "options.json")
  if os.path.exists(plan_path):
    with open(plan_path) as f:
      previous = json.load(f)
    if previous == {**options, "skip_bad_lines": False} and options["skip_bad_lines"]:
      # The advice of a stop on a bad line: its finished pieces had no bad line, so they
      # stand as they are when bad lines are skipped from here on.
      log(f"{output}: continuing the unfinished preparation, now skipping bad lines.")
      fmt.write_json_atomic(plan_path, options)
    elif previous != options:
      raise FormatError(f"{output} holds an unfinished preparation with other options "
                        f"({_diff(previous, options)}); rerun it with the same options to "
                        "resume, or choose a new --output.")
  else:
    others = [n for n in os.listdir(output) if n not in (fmt.SHARD_DIR, fmt.PROGRESS_DIR)]
    if others or os.listdir(os.path.join(output, fmt.SHARD_DIR)):
      raise FormatError(f"{output} is not empty and holds no unfinished preparation; "
                        "choose an empty or new --output.")
    fmt.write_json_atomic(plan_path, options)
  return None


def _plan_parsing(job: _Job) -> tuple[list[Piece], dict[str, dict], list[dict]]:
  """Stage 1's plan: the pieces still to parse, the records of those done in an earlier
  run (the pieces of a file changed since are redone), and each input's fingerprint."""
  pieces: list[Piece] = []
  records: dict[str, dict] = {}
  sources = []
  for i, path in enumerate(job.inputs):
    fp = _fingerprint(path)
    file_pieces = plan_pieces(i, path, job.piece_bytes)
    fp_path = os.path.join(job.progress_dir, f"file-{i:04d}.json")
    old = fmt.read_json(fp_path)
    if old is not None and old != fp:  # The file changed since: redo its pieces.
      _forget_file(job.output, i)
    fmt.write_json_atomic(fp_path, fp)
    sources.append(fp)
    for piece in file_pieces:
      rec = fmt.read_json(os.path.join(job.progress_dir, f"piece-{piece.name}.json"))
      if rec is not None:
        records[piece.name] = rec
      else:
        _remove_piece_files(job.output, piece.name)
        pieces.append(piece)
  done_before = len(records)
  if done_before:
    job.log(f"Resuming: {done_before} of {done_before + len(pieces)} pieces already done.")
  return pieces, records, sources


def _run_stages(job: _Job, pieces: list[Piece], records: dict[str, dict], sources: list[dict],
                options: dict, cfg: dict, pool: WorkerPool) -> dict:
  """Parsing, subsampling, the vocabulary (for its modes) and the metadata, on one pool."""
  _parse_pieces(pieces, cfg, pool, records, job)
  shards, file_rows, bad_lines, examples = _gather_records(job, records, sources)
  total = int(sum(file_rows))
  if total == 0:
    raise InputError("the inputs hold no rows")
  splits = make_splits(job.dataset, file_rows)
  sub_sample = None
  if job.sub_sample_rate:  # Drop train negatives; the evaluation rows follow the kept ones.
    shards, splits, sub_sample = _sub_sample_train(job, shards, splits, total, pool)
    total -= sub_sample["dropped"]

  # Stages 2 and 3: vocabulary.
  if job.categorical == "hash":
    vocab_sizes = list(job.moduli)
  else:
    vocab_sizes = build_vocabulary(job.output, shards, job.categorical, splits,
                                   int(job.frequency_threshold), pool, job.vocab_memory_bytes,
                                   job.progress, job.log)
    apply_vocabulary(job.output, shards, job.categorical, pool, job.progress)

  meta = {
      "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "dataset": job.dataset,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "options": options,
      "rows": total, "file_rows": file_rows, "splits": splits, "sub_sample": sub_sample,
      "split_rows": {k: sum(b - a for a, b in v) for k, v in splits.items()},
      "num_dense": NUM_DENSE, "num_sparse": NUM_SPARSE, "hotness": [1] * NUM_SPARSE,
      "vocab_sizes": [int(v) for v in vocab_sizes],
      "oov_row": 0 if job.categorical == "frequency" else None,
      "dtypes": {k: v.str for k, v in fmt.DTYPES.items()},
      "shards": shards, "sources": sources, "bad_lines": bad_lines,
      "bad_line_examples": examples[:20],
  }
  _write_metadata(job, meta)
  return meta


def _parse_pieces(pieces: list[Piece], cfg: dict, pool: WorkerPool, records: dict[str, dict],
                  job: _Job) -> None:
  """Stage 1: every piece not yet done, in parallel; each done piece gets its record on disk."""
  bar = progress_bar(sum(p.end - p.start for p in pieces), "parse", "B", job.progress)
  t0, last = time.perf_counter(), [0]
  pool.reset()

  def tick():
    b = pool.counters[1].value
    bar.update(b - last[0])
    last[0] = b
    rows = pool.counters[0].value
    bar.set_postfix_str(f"{rows:,} rows, {rows / max(time.perf_counter() - t0, 1e-9):,.0f} rows/s",
                        refresh=False)

  def done(task, rec):
    records[task[0].name] = rec
    fmt.write_json_atomic(os.path.join(job.progress_dir, f"piece-{task[0].name}.json"), rec)

  pool.run(piece_task, [(p, cfg) for p in pieces], done, tick)
  tick()
  bar.close()
  seconds, rows = time.perf_counter() - t0, pool.counters[0].value
  if pieces:
    job.log(f"Parsed {rows:,} rows in {seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} rows/s).")


def _gather_records(job: _Job, records: dict[str, dict], sources: list[dict]
                    ) -> tuple[list[dict], list[int], int, list[str]]:
  """(shards, rows per file, bad lines, their examples) of all pieces, in input order;
  adds each file's checksums, rows and lines to its entry of `sources`."""
  all_pieces = [plan_pieces(i, p, job.piece_bytes) for i, p in enumerate(job.inputs)]
  shards, file_rows, bad_lines, examples = [], [], 0, []
  for i, file_pieces in enumerate(all_pieces):
    rows = 0
    for piece in file_pieces:
      rec = records[piece.name]
      shards.extend(rec["parts"])
      rows += rec["rows"]
      bad_lines += rec["bad_lines"]
      examples.extend(rec["bad_examples"])
    file_rows.append(rows)
    digests = [records[p.name]["sha256"] for p in file_pieces]
    if len(file_pieces) == 1:
      sources[i]["sha256"] = digests[0]
    else:
      sources[i]["sha256_pieces"] = {
          "ranges": [[p.start, p.end] for p in file_pieces], "sha256": digests,
          "combined": hashlib.sha256(b"".join(bytes.fromhex(d) for d in digests)).hexdigest()}
    sources[i]["rows"] = rows
    sources[i]["lines"] = sum(records[p.name]["lines"] for p in file_pieces)
  return shards, file_rows, bad_lines, examples


def _sub_sample_train(job: _Job, shards: list[dict], splits: dict, total: int,
                      pool: WorkerPool) -> tuple[list[dict], dict, dict]:
  """Drops train negatives (see `sub_sample_keep`) and moves the evaluation splits down by
  the dropped rows; returns the new shards, the new splits and the metadata's record."""
  train_before = splits["train"][0][1]
  shards = sub_sample_shards(job.output, shards, train_before, job.sub_sample_rate,
                             job.sub_sample_seed, pool, job.progress)
  dropped = total - sum(s["rows"] for s in shards)
  splits = {k: [[max(0, a - dropped) if k != "train" else a,
                 b - dropped] for a, b in v] for k, v in splits.items()}
  record = {"rate": float(job.sub_sample_rate), "seed": int(job.sub_sample_seed),
            "train_rows_before": int(train_before), "dropped": int(dropped)}
  job.log(f"Negative subsampling at rate {job.sub_sample_rate}: dropped {dropped:,} of "
          f"{train_before:,} train rows.")
  return shards, splits, record


def _write_metadata(job: _Job, meta: dict) -> None:
  """Writes the metadata (the directory is then complete), drops the progress records, logs."""
  fmt.write_json_atomic(os.path.join(job.output, fmt.METADATA_FILE), meta)
  shutil.rmtree(job.progress_dir, ignore_errors=True)
  if meta["bad_lines"]:
    n = meta["bad_lines"]
    job.log(f"Skipped {n:,} bad line{'s' if n != 1 else ''}; the first "
            f"{'ones' if n != 1 else 'one'}:\n  "
            + "\n  ".join(meta["bad_line_examples"]))
  job.log(f"Prepared {meta['rows']:,} rows in {len(meta['shards'])} shards into {job.output} "
          f"(train {meta['split_rows']['train']:,}, test {meta['split_rows']['test']:,}, "
          f"val {meta['split_rows']['val']:,}).")


def _diff(old: dict, new: dict) -> str:
  keys = sorted(set(old) | set(new))
  return ", ".join(f"{k}: {old.get(k)!r} before, {new.get(k)!r} now"
                   for k in keys if old.get(k) != new.get(k)) or "none"


def _remove_piece_files(root: str, piece_name: str) -> None:
  d = os.path.join(root, fmt.SHARD_DIR)
  for n in os.listdir(d):
    if n.startswith(piece_name + "-"):
      os.remove(os.path.join(d, n))
  d = os.path.join(root, fmt.PROGRESS_DIR)
  for n in os.listdir(d):  # Records of the later stages on its shards.
    if n.startswith(f"sub-{piece_name}-"):
      os.remove(os.path.join(d, n))


def _forget_file(root: str, index: int) -> None:
  prefixes = (f"piece-{index:04d}-", f"sub-{index:04d}-")
  d = os.path.join(root, fmt.PROGRESS_DIR)
  for n in os.listdir(d):
    if n.startswith(prefixes):
      os.remove(os.path.join(d, n))
  sd = os.path.join(root, fmt.SHARD_DIR)
  for n in os.listdir(sd):
    if n.startswith(f"{index:04d}-"):
      os.remove(os.path.join(sd, n))
