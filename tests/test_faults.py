"""Fault injection on the three trainers as a user runs them (subprocesses, one CPU device), with
the harness of benchmarks/fault_matrix.py (which runs more cases and writes the RESULTS table):

- SIGKILL at a random step, then the same command again: the final checkpoint and the last logged
  metrics equal an uninterrupted run's, bitwise (same machine, same program);
- the newest checkpoint damaged (an array file truncated): the rerun reports it, moves it aside
  and resumes from the one before, again ending bitwise equal; with every checkpoint damaged the
  run stops with one line and exit status 2.

The kill steps are drawn afresh in every test session (named on failure), as in a real crash.
"""
import os
import shutil
import signal

import numpy as np
import pytest

from benchmarks.fault_matrix import ENV, STEPS, command, kill_at, run, same_as, truncate_largest_array_file

__all__ = ["ENV"]  # test_cli and test_nonfinite run their subprocesses the same way
SEEDS_PER_TRAINER = 2


@pytest.fixture(scope="module", params=["lm", "pm", "ppo"])
def reference(request, tiny_runs, tmp_path_factory):
  kind, runs = request.param, dict(zip(("lm", "pm"), tiny_runs))
  workdir = str(tmp_path_factory.mktemp(f"reference_{kind}"))
  out = run(command(kind, workdir, runs))
  assert out.returncode == 0, out.stderr[-3000:]
  return kind, workdir, runs


def test_sigkill_at_random_steps_then_rerun_equals_uninterrupted_run(reference, tmp_path):
  kind, expected, runs = reference
  for attempt in range(SEEDS_PER_TRAINER):
    step = int(np.random.default_rng().integers(1, STEPS[kind]))
    context = f"{kind} killed after step {step} (attempt {attempt})"
    workdir = str(tmp_path / f"killed_{attempt}")
    assert kill_at(command(kind, workdir, runs), workdir, step) == -signal.SIGKILL, f"{context}: ended first"
    rerun = run(command(kind, workdir, runs))
    assert rerun.returncode == 0, f"{context}: {rerun.stderr[-3000:]}"
    assert same_as(expected, workdir), context


def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(reference, tmp_path):
  kind, expected, runs = reference
  workdir = str(tmp_path / "damaged")
  shutil.copytree(expected, workdir)
  steps = sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())
  assert steps[-1] == STEPS[kind] and len(steps) >= 2
  truncate_largest_array_file(os.path.join(workdir, "checkpoints", str(steps[-1])))

  rerun = run(command(kind, workdir, runs))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"checkpoint step {steps[-1]} does not restore" in rerun.stdout
  assert f"resumed from step {steps[-2]}" in rerun.stdout
  assert "Event loop is closed" not in rerun.stderr and "Traceback" not in rerun.stderr, rerun.stderr[-3000:]
  moved = os.listdir(os.path.join(workdir, "checkpoints_corrupt"))
  assert len(moved) == 1 and moved[0].startswith(f"{steps[-1]}-")  # kept, not deleted
  assert same_as(expected, workdir), f"{kind}: resumed from step {steps[-2]}"


def test_every_checkpoint_damaged_is_one_clear_error(reference, tmp_path):
  kind, expected, runs = reference
  if kind != "pm":
    pytest.skip("the fallback is the trainers' shared code: one trainer shows the final error")
  workdir = str(tmp_path / "all_damaged")
  shutil.copytree(expected, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = [p for p in os.listdir(ckpt_dir) if p.isdigit()]
  for step in steps:
    truncate_largest_array_file(os.path.join(ckpt_dir, step))
  rerun = run(command(kind, workdir, runs))
  assert rerun.returncode == 2, rerun.stderr[-3000:]
  errors = [line for line in rerun.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "no checkpoint restores cleanly" in errors[0], rerun.stderr[-3000:]
  assert "Traceback" not in rerun.stderr, rerun.stderr[-5000:]
  assert len(os.listdir(os.path.join(workdir, "checkpoints_corrupt"))) == len(steps)  # all kept
