"""The stage runner the experiments share (rlhf_jax.sweep, rlhf_jax.online): cached, resumable
stages that refuse changed settings.

A stage is (name, settings, run): `run(stage_dir)` does the work in <workdir>/<name>/ and returns a
JSON-able summary. A finished stage leaves stage_done.json with the settings it ran with and is
skipped on a rerun; an interrupted trainer resumes from its last checkpoint when run again; a
finished stage whose settings changed is an error naming the differences. Paths inside the
workdir are stored relative to it, so a moved or copied experiment directory still resumes.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, NamedTuple, Optional

import jax
import ml_collections

from rlhf_jax.checkpointing import Checkpointer
from rlhf_jax.errors import ConfigError

STAGE_DONE = "stage_done.json"
# Settings added after stages may have finished without them, with the value that reproduces the
# old behaviour: a finished stage whose record lacks one is not stale while it keeps that value.
ADDED_WITH_NEUTRAL_DEFAULT = {"train.grad_accum": 1, "algorithm": "ppo", "ppo.samples_per_prompt": 1,
                              # model variants for imported checkpoints (rlhf_jax.hf): Llama's
                              "model.mlp_activation": "silu", "model.scale_embeddings": False,
                              "model.norm_offset": 0.0}


class StageInterrupted(RuntimeError):
  """A stage stopped before its last step (preemption); running the same command again resumes it."""


class Stage(NamedTuple):
  name: str  # also its subdirectory
  settings: dict  # everything its output depends on; a rerun with other settings is an error
  run: Callable[[str], dict]  # stage directory -> JSON-able summary


def override(config: ml_collections.ConfigDict, overrides, where: str) -> None:
  """Sets config[k] = v for every (nested) key of overrides; a key config lacks is an error
  naming it, not a silently ignored typo."""
  for key, value in dict(overrides).items():
    if key not in config:
      raise ConfigError(f"{where}.{key}: no such setting; known: {sorted(config.keys())}")
    if isinstance(config[key], ml_collections.ConfigDict) and not isinstance(value, (str, int, float)):
      override(config[key], value, f"{where}.{key}")
    else:
      config[key] = value


def check_finished(run_dir: str, steps: int, name: str) -> None:
  with Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
    last = ckpt.latest_step()
  if last != steps:
    raise StageInterrupted(f"stage {name} stopped at step {last} of {steps}; run the same command "
                           f"again to resume it")


def trainer_stage(name: str, train: Callable, cfg) -> Stage:
  """A stage that runs a trainer (train_lm / train_pm / train_ppo .train) to its last step."""
  def run(d):
    last = train(cfg, d)
    check_finished(d, cfg.train.steps, name)
    return {"last": last}
  return Stage(name, cfg.to_dict(), run)


def portable(settings: dict, workdir: str) -> dict:
  """Settings as JSON, with paths inside the workdir written relative to it."""
  text = json.dumps(settings, default=lambda v: list(v) if isinstance(v, tuple) else str(v), sort_keys=True)
  return json.loads(text.replace(json.dumps(os.path.join(workdir, ""))[1:-1], "<workdir>/"))


def write_jsonl(path: str, rows: list[dict]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)  # a killed write never leaves a half file behind


def barrier(name: str) -> None:
  if jax.process_count() > 1:  # other hosts read what process 0 just wrote
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _differences(a, b, prefix: str = "") -> dict[str, tuple]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = {}
    for key in sorted(set(a) | set(b)):
      out.update(_differences(a.get(key), b.get(key), f"{prefix}{key}."))
    return out
  return {} if a == b else {prefix[:-1]: (a, b)}


def done_record(stage_dir: str, stage: Stage, workdir: str) -> Optional[dict]:
  """The stage's stage_done.json, None if it has not finished; an error if it finished with other settings."""
  path = os.path.join(stage_dir, STAGE_DONE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    done = json.load(f)
  now = portable(stage.settings, workdir)
  neutral = lambda key, old, new: old is None and any(
      (key == k or key.endswith("." + k)) and new == v for k, v in ADDED_WITH_NEUTRAL_DEFAULT.items())
  changed = {k: ab for k, ab in _differences(done["settings"], now).items() if not neutral(k, *ab)}
  if changed:
    diff = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
    raise ConfigError(f"{path}: stage {stage.name} finished with other settings: {diff}; use another "
                      f"workdir, or delete {stage_dir} to rerun it")
  return done


def run_stages(stages: list[Stage], workdir: str, *, stop_after: str = "") -> dict[str, float]:
  """Runs (or skips) every stage in order; returns {stage: seconds}. Stops after `stop_after`."""
  if stop_after and stop_after not in {s.name for s in stages}:
    raise ConfigError(f"stop_after={stop_after!r} is not a stage; stages: {[s.name for s in stages]}")
  os.makedirs(workdir, exist_ok=True)
  timings = {}
  for i, stage in enumerate(stages, 1):
    stage_dir = os.path.join(workdir, stage.name)
    done = done_record(stage_dir, stage, workdir)
    if done is not None:
      print(f"[{i}/{len(stages)}] {stage.name}: done earlier ({done['seconds']:.0f} s), skipped", flush=True)
      timings[stage.name] = done["seconds"]
    else:
      print(f"[{i}/{len(stages)}] {stage.name} ...", flush=True)
      os.makedirs(stage_dir, exist_ok=True)
      t0 = time.perf_counter()
      summary = stage.run(stage_dir)
      timings[stage.name] = time.perf_counter() - t0
      if jax.process_index() == 0:
        tmp = os.path.join(stage_dir, STAGE_DONE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
          json.dump({"settings": portable(stage.settings, workdir), "summary": portable(summary, workdir),
                     "seconds": timings[stage.name]}, f, indent=2)
        os.replace(tmp, os.path.join(stage_dir, STAGE_DONE))
      barrier(stage.name)
      print(f"[{i}/{len(stages)}] {stage.name}: {timings[stage.name]:.0f} s", flush=True)
    if stage.name == stop_after:
      break
  return timings


def use_compilation_cache(directory: str) -> None:
  """XLA's persistent compilation cache in `directory` ("" = off; $JAX_COMPILATION_CACHE_DIR wins).

  Entries are keyed by the program, the jax version and the machine, so a later compile of the
  same program (another seed's sweep, a rerun in a new directory) is a load; an entry the backend
  rejects (e.g. written on another CPU) is compiled afresh, never run. Off by default: on a fresh
  tiny sweep, writing the entries costs what the few in-run hits save (benchmarks/RESULTS.md).
  """
  if not directory or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # tiny models: most compiles < 1 s


def exit_75_if_interrupted(fn: Callable, *args, **kwargs):
  """fn(*args, **kwargs) for an entry point; a preempted stage is one line and exit status 75
  (EX_TEMPFAIL: schedulers may requeue the job, and the rerun resumes)."""
  try:
    return fn(*args, **kwargs)
  except StageInterrupted as e:
    print(f"interrupted: {e}")
    raise SystemExit(75) from None
