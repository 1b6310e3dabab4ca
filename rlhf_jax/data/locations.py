"""Where local copies of the full data sets live: one setting, the environment variable
RLHF_JAX_DATA_DIR, naming a directory laid out as

  hh-rlhf/<subset>/<split>.jsonl.gz     Anthropic's hh-rlhf files, as upstream names them
  evals/bbq/<Category>.jsonl[.gz]       BBQ
  evals/winogender/*.tsv                Winogender schemas

Unset or empty means no local copy: the readers fall back to the samples bundled in the package
(hh-rlhf then downloads what the sample lacks). The package never guesses a place beside its own
checkout: where the data lie is the user's to say (the Makefile passes a copy it finds there).

A second setting, RLHF_JAX_CACHE_DIR (default ~/.cache/rlhf_jax), is where a host keeps its local
stand-ins for data directories configured in a bucket that only a local disk can hold (`local_cache`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from typing import Iterator, Optional

from rlhf_jax import storage
from rlhf_jax.errors import ConfigError

ENV = "RLHF_JAX_DATA_DIR"
CACHE_ENV = "RLHF_JAX_CACHE_DIR"
HH_RLHF = "hh-rlhf"
EVALS = "evals"


def data_dir() -> Optional[str]:
  """The directory $RLHF_JAX_DATA_DIR names (absolute), or None where it is unset or empty.

  Read at each call, so a setting changed in the process is seen. A value that is not a directory
  is a ConfigError: quietly using the samples instead would hide a typo behind smaller results."""
  value = os.environ.get(ENV, "")
  if not value:
    return None
  if not os.path.isdir(value):
    what = "does not exist" if not os.path.exists(value) else "is not a directory"
    raise ConfigError(f"${ENV}={value}: {what}; point it at a directory holding {HH_RLHF}/ and/or "
                      f"{EVALS}/ (see README, Data), or unset it to use the bundled samples")
  return os.path.abspath(value)


def local_copy(*parts: str) -> Optional[str]:
  """$RLHF_JAX_DATA_DIR/<parts...> (e.g. local_copy("evals", "bbq")) where the setting is set and
  that directory exists; else None."""
  root = data_dir()
  if root is None:
    return None
  path = os.path.join(root, *parts)
  return path if os.path.isdir(path) else None


def cache_root() -> str:
  """$RLHF_JAX_CACHE_DIR (absolute), else ~/.cache/rlhf_jax: this host's local disk."""
  value = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "rlhf_jax")
  return os.path.abspath(value)


def local_cache(kind: str, path: str, source: str = "") -> str:
  """`path` itself where it is local, else this host's directory standing in for it:
  <cache root>/<kind>/<sha256 of the URL and `source`, what the data are derived from>. For what
  only a local file system can hold (TFDS's ArrayRecord files, written and read by C++ with plain
  open(); memory-mapped token caches): a setting that names a bucket keeps its value, and each host
  derives the data into its own disk."""
  if not storage.is_remote(path):
    return os.fspath(path)
  digest = hashlib.sha256(f"{storage.absolute(path)}\n{source}".encode("utf-8")).hexdigest()[:16]
  return os.path.join(cache_root(), kind, digest)


@contextlib.contextmanager
def preparing(directory: str) -> Iterator[None]:
  """Holds `directory`.lock (a local path) while the body prepares `directory`: several processes
  of one job on a host (or on hosts sharing a file system) would otherwise build the same TFDS
  data side by side, and the second to finish fails to rename its copy into place. The others
  wait, then find it prepared."""
  os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
  with open(f"{directory}.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
    yield
