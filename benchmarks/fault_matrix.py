"""Faults tried on the real entry points, and what came of each: the table "fault tried -> outcome"
of benchmarks/RESULTS.md.

  .venv/bin/python benchmarks/fault_matrix.py [--kills=3] [--out=/tmp/fault_matrix]

Every case runs the trainers as a user does (subprocesses, one CPU device, tiny models). "Data
lost" compares what survives with an uninterrupted reference run: the final checkpoint bitwise,
the saved checkpoints' finiteness, or the records a reader returned against those in the file.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from rlhf_jax.training.metrics import read_metrics, without_timings  # noqa: F401

ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",
           JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "rlhf_jax_bench_compilation_cache"),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
STEPS = {"lm": 8, "pm": 8, "ppo": 6}
COMMON = ["--config.mesh.shape=(1,1,1)", "--config.progress_bar=False", "--config.train.log_every=1",
          "--config.train.checkpoint_every=2"]
SMALL = ["--config.train.batch_size=8", "--config.train.seq_len=64", "--config.data.max_examples=200",
         "--config.train.eval_every=100"]
GOOD = {"chosen": "\n\nHuman: hi there\n\nAssistant: hello, how can I help?",
        "rejected": "\n\nHuman: hi there\n\nAssistant: go away"}


def command(kind, workdir, runs, *extra):
  """The trainer's command line; runs: {"lm": dir, "pm": dir} the PM starts from and PPO uses."""
  cmd = [sys.executable, "-m", "rlhf_jax", f"train_{kind}", f"--config=configs/{kind}.py:tiny",
         f"--workdir={workdir}", f"--config.train.steps={STEPS[kind]}", *COMMON]
  if kind == "pm" and runs.get("lm"):
    cmd.append(f"--config.init_from={runs['lm']}")
  if kind == "ppo":
    cmd += [f"--config.policy_from={runs['lm']}", f"--config.pm_dir={runs['pm']}",
            "--config.ppo.rollout_batch=8", "--config.sampling.max_new_tokens=6", "--config.sampling.prompt_len=16",
            "--config.eval.num_prompts=8", "--config.train.eval_every=3", "--config.data.max_examples=120"]
  else:
    cmd += SMALL
  return cmd + list(extra)


def run(cmd):
  return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


def final_state(run_dir):
  """(step, state as host arrays) of the newest checkpoint, read without knowing its structure."""
  manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"), item_names=("state", "meta"))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore())).state
  manager.close()
  return step, jax.tree.map(np.asarray, state)


def same_as(reference, run_dir) -> bool:
  """The newest checkpoints are bitwise equal, and so are the last logged metrics."""
  (sa, a), (sb, b) = final_state(reference), final_state(run_dir)
  last = lambda d: without_timings(read_metrics(d)[-1])
  return (sa == sb and jax.tree.structure(a) == jax.tree.structure(b) and last(reference) == last(run_dir)
          and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def all_checkpoints_finite(run_dir) -> tuple[int, bool]:
  manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"), item_names=("state", "meta"))
  finite = True
  for step in manager.all_steps():
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore())).state
    finite &= all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)
                  if np.issubdtype(np.asarray(x).dtype, np.floating))
  n = len(manager.all_steps())
  manager.close()
  return n, finite


def kill_at(cmd, workdir, step, sig=signal.SIGKILL):
  """Runs cmd and sends sig once it has logged `step` (wherever it then is: mid-step, mid-save);
  returns the exit status."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and any(r["step"] >= step and "loss" in r for r in read_metrics(metrics)):
      proc.send_signal(sig)
      break
    time.sleep(0.01)
  proc.communicate(timeout=600)
  return proc.returncode


def truncate_largest_array_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
           if os.sep + "d" + os.sep in os.path.join(d, f)]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 3)


class Table:
  def __init__(self):
    self.rows = []

  def add(self, fault, cases, exits, lost, note=""):
    row = {"fault": fault, "cases": cases, "exit": ", ".join(sorted({str(e) for e in exits})), "data_lost": lost,
           "note": note}
    self.rows.append(row)
    print(json.dumps(row), flush=True)

  def markdown(self):
    lines = ["| fault tried | cases | exit status | data lost | outcome |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['fault']} | {r['cases']} | {r['exit']} | {r['data_lost']} | {r['note']} |" for r in self.rows]
    return "\n".join(lines)


def interruptions(out, runs, refs, kills, table, rng):
  for kind in ("lm", "pm", "ppo"):
    exits, lost = [], 0
    for i in range(kills):
      wd = os.path.join(out, f"kill_{kind}_{i}")
      code = kill_at(command(kind, wd, runs), wd, int(rng.integers(1, STEPS[kind])))
      rerun = run(command(kind, wd, runs))
      exits.append(f"{code}→{rerun.returncode}")
      lost += not (rerun.returncode == 0 and same_as(refs[kind], wd))
    table.add(f"SIGKILL at a random step, {kind}, then rerun", kills, exits,
              "none" if lost == 0 else f"{lost} runs differ", "rerun equals the uninterrupted run bitwise")
    wd = os.path.join(out, f"term_{kind}")
    code = kill_at(command(kind, wd, runs), wd, STEPS[kind] // 2, signal.SIGTERM)
    rerun = run(command(kind, wd, runs))
    table.add(f"SIGTERM (preemption), {kind}, then rerun", 1, [f"{code}→{rerun.returncode}"],
              "none" if same_as(refs[kind], wd) else "differs", "checkpoint at the step boundary, clean exit")


def checkpoint_damage(out, runs, refs, table):
  for kind in ("lm", "pm", "ppo"):
    wd = os.path.join(out, f"damaged_{kind}")
    shutil.copytree(refs[kind], wd)
    truncate_largest_array_file(os.path.join(wd, "checkpoints", str(STEPS[kind])))
    rerun = run(command(kind, wd, runs))
    kept = len(os.listdir(os.path.join(wd, "checkpoints_corrupt")))
    table.add(f"newest checkpoint truncated, {kind}", 1, [rerun.returncode],
              "none" if same_as(refs[kind], wd) else "differs",
              f"reported, moved aside ({kept} kept), resumed from the one before")
  wd = os.path.join(out, "all_damaged")
  shutil.copytree(refs["pm"], wd)
  steps = [p for p in os.listdir(os.path.join(wd, "checkpoints")) if p.isdigit()]
  for s in steps:
    truncate_largest_array_file(os.path.join(wd, "checkpoints", s))
  rerun = run(command("pm", wd, runs))
  kept = len(os.listdir(os.path.join(wd, "checkpoints_corrupt")))
  table.add("every checkpoint truncated", 1, [rerun.returncode], f"none ({kept}/{len(steps)} moved aside)",
            first_error(rerun))


def first_error(proc) -> str:
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  return (lines[0][:140] + ("..." if len(lines[0]) > 140 else "")).replace("|", "/") if lines else "(no error line)"


def non_finite(out, runs, table):
  for kind in ("lm", "pm", "ppo"):
    wd = os.path.join(out, f"nonfinite_{kind}")
    proc = run(command(kind, wd, runs, "--config.optimizer.learning_rate=1e30", "--config.optimizer.grad_clip=0",
                       "--config.optimizer.warmup_steps=0", "--config.train.checkpoint_every=1"))
    n, finite = all_checkpoints_finite(wd)
    table.add(f"learning rate 1e30, no clipping, {kind}", 1, [proc.returncode],
              f"none ({n} good checkpoints kept, all finite)" if finite else "NON-FINITE CHECKPOINT",
              first_error(proc))


def bad_inputs(out, runs, table):
  """A PM started from the reference LM (its tokenizer too) on a user's comparison file."""
  def pm_on(path, *extra):
    return run([sys.executable, "-m", "rlhf_jax", "train_pm", "--config=configs/pm.py:tiny",
                f"--workdir={tempfile.mkdtemp(dir=out)}", f"--config.data.path={path}",
                f"--config.init_from={runs['lm']}",
                "--config.progress_bar=False", "--config.mesh.shape=(1,1,1)", "--config.train.steps=2",
                "--config.train.batch_size=4", "--config.train.seq_len=64", *extra])

  empty = os.path.join(out, "empty.jsonl.gz")
  with gzip.open(empty, "wt"):
    pass
  good_lines = [json.dumps(GOOD)] * 40
  full = os.path.join(out, "full.jsonl.gz")
  with gzip.open(full, "wt") as f:
    f.write("\n".join(good_lines) + "\n")
  truncated = os.path.join(out, "truncated.jsonl.gz")
  with open(full, "rb") as f:
    data = f.read()
  with open(truncated, "wb") as f:
    f.write(data[:len(data) - 20])
  malformed = os.path.join(out, "malformed.jsonl")
  with open(malformed, "w") as f:
    f.write("\n".join(good_lines[:20] + ['{"chosen": 3}', "not json"] + good_lines[20:]) + "\n")
  ties = os.path.join(out, "ties.jsonl")
  with open(ties, "w") as f:
    f.write("\n".join(good_lines + [json.dumps({"chosen": GOOD["chosen"], "rejected": GOOD["chosen"]})] * 3) + "\n")

  for name, path, extra, reported in [
      ("empty comparison file", empty, [], None),
      ("truncated gzip", truncated, [], None),
      ("2 malformed records", malformed, [], None),
      ("2 malformed records, skip_malformed", malformed, ["--config.data.skip_malformed=True"],
       "2 malformed skipped"),
      ("3 ties (chosen == rejected)", ties, [], "3 ties (chosen == rejected) left out")]:
    proc = pm_on(path, *extra)
    lost = "n/a" if reported is None else (f"none ({reported}, reported)" if reported in proc.stdout
                                           else "NOT REPORTED")
    table.add(name, 1, [proc.returncode], lost, first_error(proc) if proc.returncode else "trained")

  for name, overrides in [
      ("train.steps=-3", ["--config.train.steps=-3"]),
      ("data.eval_fraction=1.5", ["--config.data.eval_fraction=1.5"]),
      ("train.batch_size larger than the data", ["--config.train.batch_size=4096"]),
      ("unknown setting train.stepz", ["--config.train.stepz=3"])]:
    proc = pm_on(full, *overrides)
    table.add(f"config: {name}", 1, [proc.returncode], "n/a", first_error(proc))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=3, help="SIGKILL cases per trainer")
  parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "fault_matrix"))
  parser.add_argument("--seed", type=int, default=None, help="kill steps' seed (default: fresh)")
  args = parser.parse_args()
  shutil.rmtree(args.out, ignore_errors=True)
  os.makedirs(args.out)
  rng = np.random.default_rng(args.seed)
  table, refs, runs = Table(), {}, {}
  for kind in ("lm", "pm", "ppo"):  # references; the LM and PM also serve PPO as policy and PM
    refs[kind] = os.path.join(args.out, f"reference_{kind}")
    proc = run(command(kind, refs[kind], runs))
    if proc.returncode:
      raise SystemExit(f"reference {kind} failed:\n{proc.stderr[-3000:]}")
    runs[kind] = refs[kind]
  interruptions(args.out, runs, refs, args.kills, table, rng)
  checkpoint_damage(args.out, runs, refs, table)
  non_finite(args.out, runs, table)
  bad_inputs(args.out, runs, table)
  print(table.markdown())


if __name__ == "__main__":
  main()
