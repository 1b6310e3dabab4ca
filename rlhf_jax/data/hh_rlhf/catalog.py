"""Where hh-rlhf lives upstream, which local copy is used (rlhf_jax.data.locations), and whether
a local copy is the file upstream published (sizes and SHA-256 in checksums.tsv)."""
from __future__ import annotations

import functools
import hashlib
import os
import warnings
from typing import NamedTuple, Optional

from rlhf_jax import storage
from rlhf_jax.data import locations
from rlhf_jax.errors import DataError

# Anthropic's repository stores the files with Git LFS; GitHub's /raw/ URL redirects to the
# LFS object. The Hugging Face mirror holds the same files.
UPSTREAM = "https://github.com/anthropics/hh-rlhf/raw/master"
MIRROR = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"

COMPARISON_SUBSETS = ("helpful-base", "harmless-base", "helpful-online", "helpful-rejection-sampled")
RED_TEAM = "red-team-attempts"
SUBSETS = COMPARISON_SUBSETS + (RED_TEAM,)


def split_files(subset: str) -> dict[str, str]:
  """{split: path relative to the repository root} for a subset."""
  if subset == RED_TEAM:
    return {"train": f"{RED_TEAM}/red_team_attempts.jsonl.gz"}
  if subset not in COMPARISON_SUBSETS:
    raise ValueError(f"unknown hh-rlhf subset {subset!r}; choose one of {SUBSETS}")
  return {split: f"{subset}/{split}.jsonl.gz" for split in ("train", "test")}


def url(relative_path: str, mirror: bool = False) -> str:
  return f"{MIRROR if mirror else UPSTREAM}/{relative_path}"


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
SAMPLE_DIR = os.path.join(_PACKAGE_DIR, "sample")  # bundled: first 400 harmless-base test records


class SampleFallbackWarning(UserWarning):
  """$RLHF_JAX_DATA_DIR is set but lacks a split that the bundled sample has: the sample is used."""


def local_source_dir(subset: str = "harmless-base", split: str = "test") -> Optional[str]:
  """The local copy holding subset/split: $RLHF_JAX_DATA_DIR/hh-rlhf (rlhf_jax.data.locations),
  else the bundled sample; None if neither has it (load_split then downloads it)."""
  relative = split_files(subset)[split]
  configured = locations.local_copy(locations.HH_RLHF)
  if configured and os.path.exists(os.path.join(configured, relative)):
    return configured
  if not os.path.exists(os.path.join(SAMPLE_DIR, relative)):
    return None
  root = locations.data_dir()
  if root is not None:  # the user asked for the full data: a 400-record stand-in must not pass unnoticed
    warnings.warn(f"${locations.ENV}={root} has no {locations.HH_RLHF}/{relative}; using the 400-record "
                  f"sample bundled in {SAMPLE_DIR}", SampleFallbackWarning, stacklevel=2)
  return SAMPLE_DIR


# --- checksums ------------------------------------------------------------------------------------

_CHECKSUMS = os.path.join(_PACKAGE_DIR, "checksums.tsv")  # TFDS's format: url, size, sha256, filename
_SAMPLE_CHECKSUMS = os.path.join(SAMPLE_DIR, "checksums.tsv")  # path, size, sha256


class Checksum(NamedTuple):
  size: int
  sha256: str


class UnverifiedFileWarning(UserWarning):
  """A local hh-rlhf file whose checksum is not known (not listed in checksums.tsv)."""


def _rows(path: str) -> list[list[str]]:
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n").split("\t") for line in f if line.strip() and not line.startswith("#")]


@functools.cache
def _tables() -> tuple[dict[str, Checksum], dict[str, Checksum]]:
  """({relative path: checksum} of the upstream files, the same for the bundled sample)."""
  prefix = UPSTREAM + "/"
  upstream = {u[len(prefix):]: Checksum(int(size), sha) for u, size, sha, *_ in _rows(_CHECKSUMS)
              if u.startswith(prefix)}
  sample = {rel: Checksum(int(size), sha) for rel, size, sha in _rows(_SAMPLE_CHECKSUMS)}
  return upstream, sample


def known_checksum(relative_path: str, *, sample: bool = False) -> Optional[Checksum]:
  """The size and SHA-256 of upstream's file (or of the bundled sample's, a 400-record prefix whose
  checksum is its own); None where not known."""
  return _tables()[1 if sample else 0].get(relative_path)


def _is_sample(path: str, relative_path: str) -> bool:
  if storage.is_remote(path):
    return False
  return os.path.realpath(path) == os.path.realpath(os.path.join(SAMPLE_DIR, relative_path))


def checksum_of(path: str) -> Checksum:
  digest, size = hashlib.sha256(), 0
  with storage.open_file(path, "rb") as f:  # a local copy, or one in a bucket
    while block := f.read(1 << 20):
      digest.update(block)
      size += len(block)
  return Checksum(size, digest.hexdigest())


def verify_file(path: str, relative_path: str) -> None:
  """Raises DataError if path, a local copy of hh-rlhf's relative_path, is not the file whose
  checksum is known; an unknown checksum is accepted, with a warning naming the file."""
  path = os.fspath(path)
  sample = _is_sample(path, relative_path)
  expected = known_checksum(relative_path, sample=sample)
  if expected is None:
    warnings.warn(f"{path}: no known checksum for hh-rlhf {relative_path}; using it unverified",
                  UnverifiedFileWarning, stacklevel=2)
    return
  actual = checksum_of(path)
  if actual != expected:
    known = "the bundled sample's" if sample else "upstream's"
    raise DataError(f"{path}: not {known} hh-rlhf {relative_path} (a partial or edited copy?): "
                    f"expected sha256 {expected.sha256} ({expected.size} bytes), got sha256 "
                    f"{actual.sha256} ({actual.size} bytes)")
