"""LoRA runs on disk: a run whose `lora.enabled` is set trains adapters (rlhf_jax.model.lora) over a
frozen base run, and its checkpoints hold only the adapters and heads. Beside them, lora_base.json
names the base (its run directory and checkpoint step) and a sha256 of that checkpoint's files, so a
base edited or retrained since is refused instead of silently pairing adapters with other weights.

A base is any dense run (an LM, an imported checkpoint). A LoRA run that starts from another LoRA
run (a PM finetuned after its PMP stage, a value model started from a LoRA PM) shares that run's
base and starts from its adapters.
"""
from __future__ import annotations

import collections
import hashlib
import json
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax import hosts, storage
from rlhf_jax.errors import ConfigError
from rlhf_jax.model import lora
from rlhf_jax.training.checkpointing import Checkpointer

BASE_FILE = "lora_base.json"


class Base(NamedTuple):
  run_dir: str  # absolute
  step: int
  sha256: str


def spec_of(config, model_cfg=None) -> Optional[lora.LoraSpec]:
  return lora.spec_from_config(config.get("lora"), model_cfg)


def checkpoint_hash(run_dir: str, step: int) -> str:
  """sha256 over the name, size and sha256 of each file of run_dir's checkpoint at `step` (local
  or in a bucket)."""
  root = storage.join(run_dir, "checkpoints", str(step))
  # The order of the first version (os.walk's directories sorted, then each one's files), so that
  # the hashes already recorded in lora_base.json files still match.
  by_dir = collections.defaultdict(list)
  for rel in storage.walk_files(root):
    by_dir[rel.rpartition("/")[0]].append(rel)
  entries = []
  for directory in sorted(by_dir):
    for rel in sorted(by_dir[directory]):
      digest, size = hashlib.sha256(), 0
      with storage.open_file(storage.join(root, rel), "rb") as f:  # in blocks: files of a large model
        for block in iter(lambda: f.read(1 << 24), b""):
          digest.update(block)
          size += len(block)
      entries.append((rel, size, digest.hexdigest()))
  return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def is_lora_run(run_dir: str) -> bool:
  return storage.isfile(storage.join(run_dir, BASE_FILE))


def base_of(run_dir: str) -> Base:
  """The base a LoRA run (or, for a dense run, the run itself) sits on: read from lora_base.json
  and checked against the base's files now."""
  path = storage.join(run_dir, BASE_FILE)
  if not storage.isfile(path):
    with Checkpointer(storage.join(run_dir, "checkpoints")) as ckpt:
      step = ckpt.latest_step()
    if step is None:
      raise ConfigError(f"{run_dir}: no checkpoint to use as a LoRA base")
    return Base(storage.absolute(run_dir), int(step), "")
  record = json.loads(storage.read_text(path))
  base = Base(record["run_dir"], int(record["step"]), record["sha256"])
  now = checkpoint_hash(base.run_dir, base.step) if storage.isdir(base.run_dir) else "missing"
  if now != base.sha256:
    raise ConfigError(f"{run_dir}: its LoRA base {base.run_dir} (step {base.step}) has changed since the "
                      f"adapters were trained (sha256 {base.sha256[:12]}, now {now[:12]}); retrain the "
                      f"adapters or restore that base")
  return base


def record_base(workdir: str, start_from: str) -> Base:
  """Writes workdir's lora_base.json for a run starting from `start_from` (a dense run: the base
  itself; a LoRA run: its base). Returns the base. Kept as is on resume."""
  path = storage.join(workdir, BASE_FILE)
  if storage.isfile(path):
    return base_of(workdir)
  base = base_of(start_from)
  if not base.sha256:
    base = base._replace(sha256=checkpoint_hash(base.run_dir, base.step))
  if hosts.is_lead():
    storage.makedirs(workdir)
    storage.write_atomic(path, json.dumps(base._asdict(), indent=1))
  return base


def cast_base(params: Any, dtype: str) -> Any:
  """The frozen base in `dtype` ("" keeps it): a bf16 base halves its memory; adapters stay float32."""
  if not dtype:
    return params
  return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), p))(params)
