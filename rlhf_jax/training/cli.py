"""How every entry point meets its user: a mistake (bad flag, bad config, bad or missing data,
see rlhf_jax.errors) is one line on stderr and exit status 2; a bug keeps its traceback.

  if __name__ == "__main__":
    cli.run(main)
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, NoReturn, Sequence

import jax
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


def define_distributed_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Callable[[], None]:
  """Defines the flags that make a job one process of many; returns the function that joins them.

  --jax_distributed alone: jax.distributed.initialize() finds its peers itself (TPU pod, SLURM,
  Open MPI, Kubernetes). On bare machines (or several processes on one host) name them:
  --jax_coordinator=HOST:PORT --jax_num_processes=N --jax_process_id=I, the same coordinator and
  count in every process."""
  auto = flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() first (multi-host "
                           "TPU/GPU).", flag_values=flag_values)
  coordinator = flags.DEFINE_string("jax_coordinator", "", "HOST:PORT of process 0's coordinator, for "
                                    "processes jax cannot discover by itself (implies --jax_distributed).",
                                    flag_values=flag_values)
  count = flags.DEFINE_integer("jax_num_processes", None, "With --jax_coordinator: how many processes.",
                               flag_values=flag_values)
  index = flags.DEFINE_integer("jax_process_id", None, "With --jax_coordinator: this process's index.",
                               flag_values=flag_values)

  def initialize() -> None:
    if not coordinator.value:
      if count.value is not None or index.value is not None:
        fail("--jax_num_processes and --jax_process_id need --jax_coordinator=HOST:PORT")
      if auto.value:
        jax.distributed.initialize()
      return
    if count.value is None or index.value is None:
      fail("--jax_coordinator needs --jax_num_processes and --jax_process_id")
    if not 0 <= index.value < count.value:
      fail(f"--jax_process_id={index.value} is not in [0, --jax_num_processes={count.value})")
    jax.distributed.initialize(coordinator_address=coordinator.value, num_processes=count.value,
                               process_id=index.value)

  return initialize
