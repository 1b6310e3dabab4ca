"""Where hh-rlhf lives upstream, and where a copy is found on this machine."""
from __future__ import annotations

import os
from typing import Optional

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
_REPO_SHARED = os.path.join(_PACKAGE_DIR, "..", "..", "..", "shared", "data", "hh-rlhf")


def local_source_dir(subset: str = "harmless-base", split: str = "test") -> Optional[str]:
  """The best local copy holding subset/split: $RLHF_JAX_HH_RLHF_DIR, then ../shared beside the
  checkout, then the bundled sample; None if none has it."""
  relative = split_files(subset)[split]
  for root in (os.environ.get("RLHF_JAX_HH_RLHF_DIR"), _REPO_SHARED, SAMPLE_DIR):
    if root and os.path.exists(os.path.join(root, relative)):
      return os.path.normpath(root)
  return None
