"""The stage runner the experiments share (rlhf_jax.experiments.sweep, rlhf_jax.experiments.online): cached, resumable
stages that refuse changed settings.

A stage is (name, settings, run): `run(stage_dir)` does the work in <workdir>/<name>/ and returns a
JSON-able summary. A finished stage leaves stage_done.json with the settings it ran with and is
skipped on a rerun; an interrupted trainer resumes from its last checkpoint when run again; a
finished stage whose settings changed is an error naming the differences. Paths inside the
workdir are stored relative to it, so a moved or copied experiment directory still resumes.

A stage also names its inputs, the earlier stages whose outputs it reads. Its stage_done.json records
a fingerprint of each (the sha256 of the input's stage_done.json, which holds a fresh run id per
completion). Before anything runs, a finished stage is stale when an input runs this time (unfinished,
deleted or itself stale) or finished again since (a fingerprint differs); staleness passes on
downstream, transitively. Stale stages are moved whole to <workdir>/stale_stages/ (a trainer would
otherwise resume from checkpoints made from the old inputs), named in one line, and rerun; a partly
run stage whose input runs again goes the same way. Records without fingerprints (written before
there were any) are not stale by themselves: old experiment directories keep resuming.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from typing import Callable, NamedTuple, Optional

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from rlhf_jax import hosts, storage
from rlhf_jax.errors import ConfigError
from rlhf_jax.training import cli
from rlhf_jax.training.checkpointing import Checkpointer
from rlhf_jax.training.compile_clock import CompileClock

STAGE_DONE = "stage_done.json"
STALE_DIR = "stale_stages"  # <workdir>/stale_stages/<stage>-<time>: invalidated stages, moved aside, not deleted
# Settings added after stages may have finished without them, with the value that reproduces the
# old behaviour: a finished stage whose record lacks one is not stale while it keeps that value.
ADDED_WITH_NEUTRAL_DEFAULT = {"train.grad_accum": 1, "algorithm": "ppo", "ppo.samples_per_prompt": 1,
                              "ppo.clip_eps_high": 0.0, "ppo.overlong_buffer": 0,  # clip-higher, DAPO's penalty
                              "ppo.tis": False, "ppo.tis_cap": 2.0,  # truncated importance sampling
                              # lm-evaluation-harness tasks in the evals stage (suite "harness")
                              "harness.tasks": "", "harness.include_path": "", "harness.limit": 0,
                              "harness.num_fewshot": 0,
                              # model variants for imported checkpoints (rlhf_jax.hf): Llama's
                              "model.mlp_activation": "silu", "model.scale_embeddings": False,
                              "model.norm_offset": 0.0, "model.qkv_bias": False, "model.qk_norm": False,
                              "model.rope_scaling": "none", "model.rope_factor": 1.0,
                              "model.rope_low_freq_factor": 1.0, "model.rope_high_freq_factor": 4.0,
                              "model.rope_original_max_len": 8192, "data.chat_template": False,
                              # pretraining on a corpus (rlhf_jax.data.corpus): "" reads the dialogues; in
                              # data and in DPO's preferences (a copy of the PM's data section)
                              "corpus": "", "corpus_field": "text", "corpus_eval_rows": 128, "corpus_cache_dir": "",
                              "corpus_tokenizer_chars": 20_000_000,
                              # LoRA (rlhf_jax.model.lora): off unless enabled
                              "lora.enabled": False, "lora.rank": 8, "lora.alpha": 16.0, "lora.dropout": 0.0,
                              "lora.targets": "wq,wk,wv,wo,w_gate,w_up,w_down", "lora.base_dtype": ""}
# Settings that moved to another section: a finished stage's record is read with them in their new
# place, so sweeps cached before the move still resume (the sampling of PPO and DPO runs, once
# ppo.* and DPO's reduced copy of it, is one `sampling` section).
MOVED_SETTINGS = {f"ppo.{key}": f"sampling.{key}"
                  for key in ("prompt_len", "max_new_tokens", "temperature", "top_k", "top_p")}


class StageInterrupted(RuntimeError):
  """A stage stopped before its last step (preemption); running the same command again resumes it."""


class Stage(NamedTuple):
  name: str  # also its subdirectory
  settings: dict  # everything its output depends on; a rerun with other settings is an error
  run: Callable[[str], dict]  # stage directory -> JSON-able summary
  inputs: tuple[str, ...] = ()  # earlier stages whose outputs it reads: when one reruns, so does this one


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
  with Checkpointer(storage.join(run_dir, "checkpoints")) as ckpt:
    last = ckpt.latest_step()
  if last != steps:
    raise StageInterrupted(f"stage {name} stopped at step {last} of {steps}; run the same command "
                           f"again to resume it")


def trainer_stage(name: str, train: Callable, cfg, inputs: tuple[str, ...] = ()) -> Stage:
  """A stage that runs a trainer (train_lm / train_pm / train_ppo .train) to its last step."""
  def run(d):
    last = train(cfg, d)
    check_finished(d, cfg.train.steps, name)
    return {"last": last}
  return Stage(name, cfg.to_dict(), run, tuple(inputs))


def config_inputs(cfg, workdir: str) -> tuple[str, ...]:
  """The stages a config reads: the first directory under `workdir` of each path in it (init_from,
  policy_from, pm_dir, eval.pm_dirs, data.path, tokenizer.path, ...). The shared data cache
  (data.tfds_dir) is written by whichever stage comes first, not read from one."""
  root, found = storage.join(workdir, ""), []

  def walk(value, key):
    if isinstance(value, dict):
      for k, v in value.items():
        walk(v, k)
    elif isinstance(value, (list, tuple)):
      for v in value:
        walk(v, key)
    elif isinstance(value, str) and value.startswith(root) and key != "tfds_dir":
      name = value[len(root):].replace(os.sep, "/").split("/")[0]
      if name not in found:
        found.append(name)
  walk(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg, "")
  return tuple(found)


def portable(settings: dict, workdir: str) -> dict:
  """Settings as JSON, with paths inside the workdir written relative to it."""
  text = json.dumps(settings, default=lambda v: list(v) if isinstance(v, tuple) else str(v), sort_keys=True)
  return json.loads(text.replace(json.dumps(storage.join(workdir, ""))[1:-1], "<workdir>/"))


def write_jsonl(path: str, rows: list[dict]) -> None:
  storage.write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))  # never half a file


def read_jsonl(path: str) -> list[dict]:
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


barrier = hosts.barrier  # other hosts read what process 0 just wrote


def _differences(a, b, prefix: str = "") -> dict[str, tuple]:
  if a is None and isinstance(b, dict) or b is None and isinstance(a, dict):  # a section added or dropped:
    a, b = a or {}, b or {}  # compared key by key, so that each may have a neutral default
  if isinstance(a, dict) and isinstance(b, dict):
    out = {}
    for key in sorted(set(a) | set(b)):
      out.update(_differences(a.get(key), b.get(key), f"{prefix}{key}."))
    return out
  return {} if a == b else {prefix[:-1]: (a, b)}


def migrated(settings: dict) -> dict:
  """A recorded stage's settings with MOVED_SETTINGS in their new place (a section left empty by
  the move is dropped)."""
  out = json.loads(json.dumps(settings))
  for old, new in MOVED_SETTINGS.items():
    (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
    section = out.get(old_section)
    if isinstance(section, dict) and old_key in section:
      out.setdefault(new_section, {})[new_key] = section.pop(old_key)
      if not section:
        del out[old_section]
  return out


def done_record(stage_dir: str, stage: Stage, workdir: str) -> Optional[dict]:
  """The stage's stage_done.json, None if it has not finished; an error if it finished with other settings."""
  path = storage.join(stage_dir, STAGE_DONE)
  try:
    done = json.loads(storage.read_text(path))
  except FileNotFoundError:
    return None
  now = portable(stage.settings, workdir)
  neutral = lambda key, old, new: old is None and any(
      (key == k or key.endswith("." + k)) and new == v for k, v in ADDED_WITH_NEUTRAL_DEFAULT.items())
  changed = {k: ab for k, ab in _differences(migrated(done["settings"]), now).items() if not neutral(k, *ab)}
  if changed:
    diff = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
    raise ConfigError(f"{path}: stage {stage.name} finished with other settings: {diff}; use another "
                      f"workdir, or delete {stage_dir} to rerun it")
  return done


def fingerprint(stage_dir: str) -> Optional[str]:
  """The sha256 of a stage's stage_done.json, None while it has not finished. Each completion
  writes a new run id, so a rerun changes it even when the settings and summary are the same."""
  try:
    return hashlib.sha256(storage.read_bytes(storage.join(stage_dir, STAGE_DONE))).hexdigest()
  except FileNotFoundError:
    return None


def _check_inputs(stages: list[Stage]) -> None:
  earlier = set()
  for stage in stages:
    unknown = [name for name in stage.inputs if name not in earlier]
    if unknown:
      raise ConfigError(f"stage {stage.name} reads {unknown}, which are not earlier stages")
    earlier.add(stage.name)


def stale_stages(stages: list[Stage], workdir: str) -> tuple[dict[str, Optional[dict]], list[str]]:
  """({stage: its done record, None if it runs this time}, [stale stages]), in one pass in stage order.

  A stage is stale when an input runs this time, or its recorded fingerprint of an input differs
  from that input's now; stale stages run, so their dependents are stale in turn (each named once).
  A stage without a record of some input (an old stage_done.json) is not stale through it. Partly
  run stages with an input that runs are stale too: resuming them would continue the old inputs' work."""
  records, runs, stale = {}, set(), []
  for stage in stages:
    stage_dir = storage.join(workdir, stage.name)
    done = done_record(stage_dir, stage, workdir)
    recorded = (done or {}).get("inputs", {})
    changed = any(name in runs or (name in recorded and recorded[name] != fingerprint(storage.join(workdir, name)))
                  for name in stage.inputs)
    if changed and (done is not None or (storage.isdir(stage_dir) and storage.listdir(stage_dir))):
      stale.append(stage.name)
      done = None
    if done is None:
      runs.add(stage.name)
    records[stage.name] = done
  return records, stale


def _move_aside(workdir: str, names: list[str]) -> None:
  barrier("stages planned")  # every host has read the records before any directory moves
  if hosts.is_lead():
    storage.makedirs(storage.join(workdir, STALE_DIR))
    for name in names:
      target = storage.join(workdir, STALE_DIR, f"{name}-{time.strftime('%Y%m%dT%H%M%S')}")
      while storage.exists(target):
        target += "_"
      storage.move(storage.join(workdir, name), target)
  barrier("stale stages moved aside")


def _run_one(stage: Stage, workdir: str) -> tuple[float, dict]:
  """Runs the stage, then writes its stage_done.json (last, so a killed run never looks finished).
  Returns its seconds and what went to compiling (CompileClock.record)."""
  stage_dir = storage.join(workdir, stage.name)
  storage.makedirs(stage_dir)
  t0, clock = time.perf_counter(), CompileClock()
  with clock.measuring():
    summary = stage.run(stage_dir)
  seconds, compiled = time.perf_counter() - t0, clock.record()
  if hosts.is_lead():
    record = {"settings": portable(stage.settings, workdir), "summary": portable(summary, workdir),
              "seconds": seconds, "compile": compiled, "run_id": uuid.uuid4().hex,
              "inputs": {name: fingerprint(storage.join(workdir, name)) for name in stage.inputs}}
    storage.write_atomic(storage.join(stage_dir, STAGE_DONE), json.dumps(record, indent=2))
  barrier(stage.name)
  return seconds, compiled


def run_stages(stages: list[Stage], workdir: str, *, stop_after: str = "") -> dict[str, float]:
  """Runs (or skips) every stage in order; returns {stage: seconds}. Stops after `stop_after`.

  Every stage's record is checked first: changed settings are an error before anything runs, and
  stale stages (see stale_stages) are moved aside, even those after `stop_after`."""
  if stop_after and stop_after not in {s.name for s in stages}:
    raise ConfigError(f"stop_after={stop_after!r} is not a stage; stages: {[s.name for s in stages]}")
  _check_inputs(stages)
  storage.makedirs(workdir)
  records, stale = stale_stages(stages, workdir)
  if stale:
    print(f"invalidated (inputs changed): {', '.join(stale)}", flush=True)
    _move_aside(workdir, stale)
  timings = {}
  for i, stage in enumerate(stages, 1):
    done = records[stage.name]
    if done is not None:
      print(f"[{i}/{len(stages)}] {stage.name}: done earlier ({done['seconds']:.0f} s), skipped", flush=True)
      timings[stage.name] = done["seconds"]
    else:
      print(f"[{i}/{len(stages)}] {stage.name} ...", flush=True)
      timings[stage.name], compiled = _run_one(stage, workdir)
      print(f"[{i}/{len(stages)}] {stage.name}: {timings[stage.name]:.0f} s (compiling "
            f"{compiled['compile_seconds']:.0f} s, {compiled['programs']} programs)", flush=True)
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


def experiment_main(run: Callable[..., dict], example: str) -> Callable:
  """The absl main of an experiment made of stages (the sweep, online RLHF): `run(config, workdir,
  stop_after=...)` returns {"timings", and when it finished "results" and "analysis"}."""
  config_flag = config_flags.DEFINE_config_file("config", None, f"Experiment config, e.g. {example}.",
                                                lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", None, "Experiment directory (default: config.workdir).")
  cache_flag = flags.DEFINE_string("compilation_cache", "", "A directory for XLA's persistent compilation "
                                   "cache, shared by later runs ('' = off).")
  stop_flag = flags.DEFINE_string("stop_after", "", "Stop after this stage (e.g. lm_gold).")
  join_processes = cli.define_distributed_flags()

  def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    join_processes()
    if config_flag.value is None:
      cli.fail(f"--config is required, e.g. --config={example}")
    workdir = workdir_flag.value or config_flag.value.workdir
    if hosts.is_lead():
      storage.check_writable(workdir)  # a missing bucket or refused credentials: one line, before any work
    use_compilation_cache(cache_flag.value)
    out = exit_75_if_interrupted(run, config_flag.value, workdir, stop_after=stop_flag.value)
    if "analysis" in out:
      print(storage.read_text(out["analysis"]["table"]))
      if "differences" in out["analysis"]:
        print(storage.read_text(out["analysis"]["differences"]))
      for key, path in {"results": out["results"], **out["analysis"]}.items():
        print(f"{key}: {path}")
    print(f"stage seconds: {json.dumps({k: round(v) for k, v in out['timings'].items()})}")

  return main
