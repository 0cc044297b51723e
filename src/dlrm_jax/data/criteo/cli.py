"""The command line, `python -m dlrm_jax.data.criteo {prepare,multihot,info}` (see `main`)."""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from dlrm_jax.data import commands
from dlrm_jax.data import format as fmt
from dlrm_jax.data.criteo.multihot import make_multi_hot
from dlrm_jax.data.criteo.preparation import CATEGORICAL_MODES, DATASETS, prepare
from dlrm_jax.data.workers import WorkerError


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one command; returns the exit status: 1, with a one-line message, for bad input,
  a full disk or a worker that died; 130 when interrupted (2 for bad arguments)."""
  args = _parser().parse_args(argv)

  def command() -> None:
    if args.command == "prepare":
      prepare(args.dataset, args.input, args.output, categorical=args.categorical,
              max_ind_range=args.max_ind_range, frequency_threshold=args.frequency_threshold,
              skip_bad_lines=args.skip_bad_lines, workers=args.workers or None,
              shard_rows=args.shard_rows, piece_bytes=args.piece_mb << 20,
              vocab_memory_bytes=int(args.vocab_memory_gb * 2**30),
              sub_sample_rate=args.data_sub_sample_rate, sub_sample_seed=args.sub_sample_seed,
              progress=not args.no_progress)
    elif args.command == "multihot":
      make_multi_hot(args.input, args.output, args.hotness, seed=args.seed)
    else:
      meta = fmt.read_metadata(args.path)
      summary = {k: meta[k] for k in ("dataset", "rows", "split_rows", "vocab_sizes", "hotness",
                                      "bad_lines", "options")}
      print(json.dumps(summary, indent=1) if args.json else format_info(args.path, summary))

  return commands.run(command, errors=(WorkerError,), interrupted="interrupted" + (
      ": run the same command again to resume" if args.command == "prepare" else ""))


def format_info(path: str, summary: dict) -> str:
  """`info`'s table: the rows per split, the bad lines, the options, and each categorical
  feature's table rows and hotness."""
  rows = summary["split_rows"]
  splits = ", ".join(f"{k} {rows[k]:,}" for k in ("train", "test", "val") if k in rows)

  def value(v):  # 26 equal moduli as one
    return v[0] if isinstance(v, list) and v and all(x == v[0] for x in v) else v

  options = ", ".join(f"{k}={value(v)}" for k, v in summary["options"].items()
                      if k not in ("dataset", "inputs") and v is not None)
  lines = [f"{path}: Criteo {summary['dataset']}",
           f"  rows       {summary['rows']:,} ({splits})",
           f"  bad lines  {summary['bad_lines']:,} skipped",
           f"  inputs     {' '.join(summary['options'].get('inputs', []))}",
           f"  options    {options}",
           f"  {'feature':<8} {'table rows':>14} {'hotness':>8}"]
  lines += [f"  C{j + 1:<7} {v:>14,} {h:>8}"
            for j, (v, h) in enumerate(zip(summary["vocab_sizes"], summary["hotness"]))]
  lines.append(f"  {'total':<8} {sum(summary['vocab_sizes']):>14,}")
  return "\n".join(lines)


def _hotness(text: str) -> list[int]:
  try:
    return [int(h) for h in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: give one integer or 26 comma-separated "
                                     "integers") from None


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m dlrm_jax.data.criteo",
                                   description="Criteo click logs -> prepared shards for "
                                               "dlrm_jax.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prepare", help="parse raw TSV/.gz files into a prepared directory",
                     formatter_class=commands.WithDefaults)
  p.add_argument("--dataset", choices=DATASETS, required=True)
  p.add_argument("--input", nargs="+", required=True,
                 help="raw files (train.txt; day_0 .. day_23[.gz])")
  p.add_argument("--output", required=True, help="the prepared directory (new or unfinished)")
  p.add_argument("--categorical", choices=CATEGORICAL_MODES, default="reference",
                 help="hash: value mod --max-ind-range; reference: the reference's renumbering "
                      "in order of first appearance; frequency: vocabulary of values seen "
                      ">= --frequency-threshold times in train, others -> row 0")
  p.add_argument("--max-ind-range", default=None,
                 help="modulus for the values: one int, or 26 comma-separated ints")
  p.add_argument("--frequency-threshold", type=commands.int_at_least(1), default=3,
                 help="with --categorical frequency: the fewest train occurrences a value "
                      "needs for a row of its own")
  p.add_argument("--skip-bad-lines", action="store_true",
                 help="skip, count and report malformed lines instead of stopping at the first")
  p.add_argument("--data-sub-sample-rate", type=float, default=0.0,
                 help="drop this fraction of the negative train rows (seeded, reproducible), "
                      "as the reference's --data-sub-sample-rate")
  p.add_argument("--sub-sample-seed", type=int, default=0,
                 help="seed of --data-sub-sample-rate's choice")
  p.add_argument("--workers", type=commands.int_at_least(0), default=0,
                 help="processes; 0: one per core")
  p.add_argument("--shard-rows", type=commands.int_at_least(1), default=1 << 21,
                 help="rows per prepared shard file")
  p.add_argument("--piece-mb", type=commands.int_at_least(1), default=64,
                 help="input bytes per parallel piece")
  p.add_argument("--vocab-memory-gb", type=commands.positive_float, default=1.0,
                 help="bound for vocabulary counting; features beyond it wait for another pass")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  m = sub.add_parser("multihot", help="derive a multi-hot directory (fixed hotness per feature)",
                     formatter_class=commands.WithDefaults)
  m.add_argument("--input", required=True, help="a prepared one-hot directory")
  m.add_argument("--output", required=True)
  m.add_argument("--hotness", required=True, type=_hotness,
                 help="one int or 26 comma-separated ints")
  m.add_argument("--seed", type=int, default=0, help="seed of the extra ids")
  i = sub.add_parser("info", help="print a prepared directory's metadata summary")
  i.add_argument("path")
  i.add_argument("--json", action="store_true", help="the summary as JSON")
  return parser
