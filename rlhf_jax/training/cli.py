"""How every entry point meets its user: a mistake (bad flag, bad config, bad or missing data,
see rlhf_jax.errors) is one line on stderr and exit status 2; a bug keeps its traceback.

  if __name__ == "__main__":
    cli.run(main)
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags

from rlhf_jax.errors import UserError

USAGE_ERROR = 2  # the shell's convention for a command used wrongly

# A missing file named by the user is their mistake too; its message carries the path.
_USER_ERRORS = (UserError, FileNotFoundError)


def fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr, flush=True)
  raise SystemExit(USAGE_ERROR)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parsing, with an unknown or malformed flag (e.g. --config.train.stepz) reported as
  one line instead of a usage dump."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a setting that does not exist
    detail = " ".join(str(e).replace("\\n", " ").replace("\\'", "").replace("'", "").strip('"').split())
    fail(f"no such setting: {detail}")


def reporting_user_errors(main: Callable[[Sequence[str]], None]) -> Callable[[Sequence[str]], None]:
  @functools.wraps(main)
  def wrapped(argv):
    try:
      main(argv)
    except _USER_ERRORS as e:
      fail(str(e))
  return wrapped


def run(main: Callable[[Sequence[str]], None]) -> None:
  app.run(reporting_user_errors(main), flags_parser=parse_flags)
