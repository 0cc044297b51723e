"""What the data command lines share (`python -m dlrm_jax.data.criteo`,
`python -m dlrm_jax.data.yambda`): argument types, help text with defaults, and
errors as one line with an exit status."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


class WithDefaults(argparse.HelpFormatter):
  """Help text with each optional flag's default (not for required or switch flags)."""

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ""
    if action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
      return text
    return f"{text} (default: %(default)s)".lstrip()


def int_at_least(low: int) -> Callable[[str], int]:
  """An argument type: an integer >= `low`."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
    return value
  return parse


def positive_float(text: str) -> float:
  """An argument type: a number > 0."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not value > 0:
    raise argparse.ArgumentTypeError(f"{value} must be > 0")
  return value


def run(command: Callable[[], None], *, errors: tuple[type[BaseException], ...] = (),
        interrupted: str = "interrupted") -> int:
  """Runs `command`; returns the exit status: 0; 1, with one line on stderr, for a
  ValueError (bad input: the modules' InputErrors, FormatErrors, BadLineErrors), one of
  `errors` or an OSError (a full disk, no permission); 130, with `interrupted`, for
  Ctrl-C."""
  try:
    command()
  except (ValueError, *errors) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except OSError as e:
    text = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
    print(f"error: {text}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(interrupted, file=sys.stderr)
    return 130
  return 0
