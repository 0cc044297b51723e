"""Train DLRM: `python train.py [--config=configs/NAME.py] [--workdir=DIR] [--config.KEY=VALUE ...]`.

With no arguments it trains the default config (a small model on synthetic
click data) and prints a summary. See README.md for the configs.
"""

import logging as std_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dlrm_jax import hugepages
from dlrm_jax.config import ConfigError

_HERE = os.path.dirname(os.path.abspath(__file__))

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "default.py"), "Training configuration file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for metrics.jsonl and checkpoints/ (default: runs/<config name>); "
    "a rerun with the same workdir resumes from its latest checkpoint.")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Print the whole config at start-up (it is always written to "
    "WORKDIR/config.txt).")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a misspelled or invalid --config.FIELD as one line (absl
  and ml_collections raise it as a traceback) that names the nearest field."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit_with(str(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = next((a for a in argv[1:] if a.startswith("--config.")), "--config")
    field = bad.split("=", 1)[0][len("--config."):]
    hint = re.search(r'Did you mean "([\w.]+)"', str(e))
    _exit_with(f"{bad}: the config has no field {field!r}"
               + (f"; did you mean {hint.group(1)!r}?" if hint else "")
               if isinstance(e, AttributeError) else f"{bad}: {e}")


def _exit_with(message: str) -> None:
  """A usage error: one line on stderr, exit status 2."""
  print(f"error: {message.splitlines()[0] if message else 'invalid arguments'}", file=sys.stderr)
  sys.exit(2)


class _QuietOrbax(std_logging.Filter):
  """Keeps Orbax's per-save progress messages (INFO) off the console; warnings pass."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  # JAX's start-up news ("Unable to initialize backend 'tpu'", INFO) only with --verbose.
  logging.set_verbosity(logging.INFO if _VERBOSE.value else logging.WARNING)
  from dlrm_jax import checkpoint, parallel, stopping, trainer  # Here: --help stays fast.

  parallel.cpu_unless_accelerator()

  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join(
      "runs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0])
  if _VERBOSE.value:
    print(f"Config:\n{config}", flush=True)
  try:
    result = trainer.train_and_evaluate(config, workdir, log=lambda s: print(s, flush=True))
  except ConfigError as e:
    _exit_with(str(e))
  except (stopping.NonFiniteLossError, stopping.DroppedIdsError, checkpoint.CheckpointError) as e:
    raise SystemExit(f"error: {e}") from None
  except stopping.Stopped as e:  # SIGINT or SIGTERM: a checkpoint of the step reached
    if _is_lead():
      print(e, file=sys.stderr, flush=True)
    parallel.exit_without_teardown(e.exit_status)
  except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
    print("interrupted; nothing saved since the last checkpoint", file=sys.stderr, flush=True)
    os._exit(130)  # no teardown, in which other processes of a run might be waited for
  if _is_lead():
    print(trainer.format_summary(result.summary), flush=True)
  parallel.exit_without_teardown()  # native exit handlers sometimes abort a finished run


def _is_lead() -> bool:
  """Only process 0 of a multi-process run prints."""
  import jax

  return jax.process_index() == 0


if __name__ == "__main__":
  hugepages.use_huge_pages()  # re-executes with glibc's malloc on huge pages
  app.run(main, flags_parser=_parse_flags)
