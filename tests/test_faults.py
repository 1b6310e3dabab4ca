"""Fault injection on the three trainers as a user runs them (subprocesses, one CPU device):

- SIGKILL at a random step, then the same command again: the final checkpoint and the last logged
  metrics equal an uninterrupted run's, bitwise (same machine, same program);
- the newest checkpoint damaged (an array file truncated): the rerun reports it, moves it aside
  and resumes from the one before, again ending bitwise equal; with every checkpoint damaged the
  run stops with one line and exit status 2.

The kill step is drawn afresh in every test session (printed on failure), as in a real crash.
"""
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
import pytest

from rlhf_jax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",
           JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "rlhf_jax_test_compilation_cache"),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
STEPS = {"lm": 8, "pm": 8, "ppo": 6}
COMMON = ["--config.mesh.shape=(1,1,1)", "--config.progress_bar=False", "--config.train.log_every=1",
          "--config.train.checkpoint_every=2", "--config.train.async_checkpointing=True"]
SMALL_DATA = ["--config.train.batch_size=8", "--config.train.seq_len=64", "--config.data.max_examples=200",
              "--config.train.eval_every=100"]
SEEDS_PER_TRAINER = 2


def _command(kind, workdir, runs):
  base = [sys.executable, "-m", f"rlhf_jax.train_{kind}", f"--config=configs/{kind}.py:tiny",
          f"--workdir={workdir}", f"--config.train.steps={STEPS[kind]}", *COMMON]
  if kind != "ppo":
    return base + SMALL_DATA
  lm, pm = runs
  return base + [f"--config.policy_from={lm}", f"--config.pm_dir={pm}", "--config.ppo.rollout_batch=8",
                 "--config.ppo.max_new_tokens=6", "--config.ppo.prompt_len=16", "--config.eval.num_prompts=8",
                 "--config.train.eval_every=3", "--config.data.max_examples=120"]


def _run(kind, workdir, runs):
  return subprocess.run(_command(kind, workdir, runs), cwd=ROOT, env=ENV, capture_output=True, text=True,
                        timeout=600)


def _kill_at(kind, workdir, runs, step):
  """Starts a run and SIGKILLs it once it has logged `step` (wherever it then is: mid-step,
  mid-save)."""
  proc = subprocess.Popen(_command(kind, workdir, runs), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and any(r["step"] >= step and "loss" in r for r in read_metrics(metrics)):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.01)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed at {step}: {out[-2000:]}"


def _final_state(run_dir):
  """The newest saved state as host arrays, read without knowing its structure."""
  manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"), item_names=("state", "meta"))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore())).state
  manager.close()
  return step, jax.tree.map(np.asarray, state)


def _last_metrics(run_dir):
  last = read_metrics(run_dir)[-1]
  last.pop("steps_per_second")
  return last


def _assert_same_run(expected_dir, actual_dir, context):
  (step_a, a), (step_b, b) = _final_state(expected_dir), _final_state(actual_dir)
  assert step_a == step_b, context
  assert jax.tree.structure(a) == jax.tree.structure(b), context
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(y, x, err_msg=context), a, b)
  assert _last_metrics(expected_dir) == _last_metrics(actual_dir), context


@pytest.fixture(scope="module", params=["lm", "pm", "ppo"])
def reference(request, tiny_runs, tmp_path_factory):
  kind = request.param
  workdir = str(tmp_path_factory.mktemp(f"reference_{kind}"))
  out = _run(kind, workdir, tiny_runs)
  assert out.returncode == 0, out.stderr[-3000:]
  return kind, workdir, tiny_runs


def test_sigkill_at_random_steps_then_rerun_equals_uninterrupted_run(reference, tmp_path):
  kind, expected, runs = reference
  for seed in range(SEEDS_PER_TRAINER):
    step = int(np.random.default_rng().integers(1, STEPS[kind]))
    context = f"{kind} killed after step {step} (try {seed})"
    workdir = str(tmp_path / f"killed_{seed}")
    _kill_at(kind, workdir, runs, step)
    rerun = _run(kind, workdir, runs)
    assert rerun.returncode == 0, f"{context}: {rerun.stderr[-3000:]}"
    _assert_same_run(expected, workdir, context)


def _truncate_largest_array_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
           if os.sep + "d" + os.sep in os.path.join(d, f)]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 3)
  return victim


def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(reference, tmp_path):
  kind, expected, runs = reference
  workdir = str(tmp_path / "damaged")
  shutil.copytree(expected, workdir)
  steps = sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())
  assert steps[-1] == STEPS[kind] and len(steps) >= 2
  _truncate_largest_array_file(os.path.join(workdir, "checkpoints", str(steps[-1])))

  rerun = _run(kind, workdir, runs)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"checkpoint step {steps[-1]} does not restore" in rerun.stdout
  assert f"resumed from step {steps[-2]}" in rerun.stdout
  assert "Event loop is closed" not in rerun.stderr and "Traceback" not in rerun.stderr
  moved = os.listdir(os.path.join(workdir, "checkpoints_corrupt"))
  assert len(moved) == 1 and moved[0].startswith(f"{steps[-1]}-")  # kept, not deleted
  _assert_same_run(expected, workdir, f"{kind}: resumed from step {steps[-2]}")


def test_every_checkpoint_damaged_is_one_clear_error(reference, tmp_path):
  kind, expected, runs = reference
  if kind != "pm":
    pytest.skip("the fallback is the trainers' shared code: one trainer shows the final error")
  workdir = str(tmp_path / "all_damaged")
  shutil.copytree(expected, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for step in [p for p in os.listdir(ckpt_dir) if p.isdigit()]:
    _truncate_largest_array_file(os.path.join(ckpt_dir, step))
  rerun = _run(kind, workdir, runs)
  assert rerun.returncode == 2, rerun.stderr[-3000:]
  errors = [line for line in rerun.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "no checkpoint restores cleanly" in errors[0], rerun.stderr[-3000:]
  assert "Traceback" not in rerun.stderr, rerun.stderr[-5000:]
  assert len(os.listdir(os.path.join(workdir, "checkpoints_corrupt"))) == len(
      [p for p in os.listdir(os.path.join(expected, "checkpoints")) if p.isdigit()])
