"""The LM entry point on real hh-rlhf dialogues: config overrides, learning, preemption and
kill/resume equivalence."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from rlhf_jax.model.config import ModelConfig
from rlhf_jax.model.transformer import init_params
from rlhf_jax.trainers.train_lm import train
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.checkpointing import Checkpointer
from rlhf_jax.training.metrics import read_metrics
from rlhf_jax.training.optimizer import make_optimizer
from rlhf_jax.training.train_state import state_shardings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import lm as lm_config  # noqa: E402

# Subprocesses run on 1 CPU device (this test session itself has 8 fake devices). They inherit the
# session's compilation cache (tests/conftest.py): the reference, interrupted and resumed runs
# compile the same steps.
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
SMALL = ["--config.train.batch_size=8", "--config.train.seq_len=64", "--config.data.max_examples=300",
         "--config.mesh.shape=(1,1,1)", "--config.progress_bar=False"]


def _cli(workdir, *overrides):
  return [sys.executable, "-m", "rlhf_jax", "train_lm", "--config=configs/lm.py:tiny", f"--workdir={workdir}",
          *SMALL, *overrides]


def _restore(workdir, num_layers=2, steps=10):
  config = lm_config.get_config("tiny")
  config.model.num_layers = num_layers
  cfg = ModelConfig.from_dict(config.model)
  mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
  abstract, _ = state_shardings(lambda r: init_params(cfg, r), make_optimizer(config.optimizer, steps), mesh)
  with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    return ckpt.restore(abstract)[0]


def test_command_line_overrides_reach_the_run(tmp_path):
  out = subprocess.run(_cli(tmp_path, "--config.model.num_layers=3", "--config.train.steps=2"),
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["num_layers"] == 3 and saved["train"]["steps"] == 2
  state = _restore(tmp_path, num_layers=3, steps=2)
  assert int(state.step) == 2 and "layer_2" in state.params and "layer_3" not in state.params


def test_loss_goes_down_on_real_dialogues(tmp_path):
  config = lm_config.get_config("tiny")  # batch 16 x 128 tokens, vocab 1024
  config.train.steps = 40
  config.train.log_every = 1
  config.train.eval_every = 40
  config.train.checkpoint_every = 1000
  config.data.max_examples = 600
  config.mesh.shape = (1, -1, 1)  # in-process: all 8 fake devices, FSDP
  config.progress_bar = False
  last = train(config, str(tmp_path))
  losses = [r["loss"] for r in read_metrics(str(tmp_path))]
  assert len(losses) == 40
  # Uniform guessing over 1024 tokens costs ln(1024) = 6.93 nats; learning must beat it clearly.
  assert np.mean(losses[:3]) > 6.5
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.8
  assert last["eval_loss"] < np.mean(losses[:3]) - 0.8  # held-out dialogues too


def _run_until(workdir, overrides, min_step, sig):
  """Starts a run and sends `sig` once a checkpoint of step >= min_step exists."""
  proc = subprocess.Popen(_cli(workdir, *overrides), cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  ckpt_dir = workdir / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if ckpt_dir.exists() and any(p.name.isdigit() and int(p.name) >= min_step for p in ckpt_dir.iterdir()):
      proc.send_signal(sig)
      break
    time.sleep(0.02)
  out, _ = proc.communicate(timeout=240)
  return proc.returncode, out


def test_preempted_run_resumes_bitwise(tmp_path):
  """SIGTERM mid-run, then rerun the same command: the final state equals an uninterrupted run's,
  bitwise (params, optimizer state, RNG, data position). SIGKILL: tests/test_faults.py."""
  steps = 10
  overrides = [f"--config.train.steps={steps}", "--config.train.checkpoint_every=2",
               "--config.train.async_checkpointing=False", "--config.train.log_every=1",
               "--config.train.eval_every=100"]
  reference = tmp_path / "reference"
  subprocess.run(_cli(reference, *overrides), cwd=ROOT, env=ENV, check=True, capture_output=True,
                 timeout=300)
  expected = _restore(reference, steps=steps)
  assert int(expected.step) == steps

  stop_at = int(np.random.default_rng().integers(2, steps - 2))  # a random point, as in a real preemption
  workdir = tmp_path / "preempted"
  code, out = _run_until(workdir, overrides, stop_at, signal.SIGTERM)
  assert code == 75, out[-2000:]  # preemption is a clean exit with EX_TEMPFAIL (requeue me)...
  assert "interrupted at step" in out
  assert Checkpointer(str(workdir / "checkpoints")).latest_step() < steps  # ...that stopped early
  rerun = subprocess.run(_cli(workdir, *overrides), cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resumed from step" in rerun.stdout
  jax.tree.map(np.testing.assert_array_equal, expected, _restore(workdir, steps=steps))


def test_context_distillation_pulls_the_student_towards_the_prompted_teacher(tmp_path):
  """Teacher = the initial model reading the HHH prompt first; the student (same weights, no
  prompt) starts away from it and the KL must fall."""
  config = lm_config.get_config("tiny")
  config.objective = "distill"
  config.train.steps = 25
  config.train.batch_size = 8
  config.train.seq_len = 64
  config.train.log_every = 1
  config.train.eval_every = 25
  config.train.checkpoint_every = 1000
  config.data.max_examples = 200
  config.mesh.shape = (1, -1, 1)
  config.progress_bar = False
  train(config, str(tmp_path))
  kl = [r["kl"] for r in read_metrics(str(tmp_path))]
  assert kl[0] > 1e-3  # the prompt changes the teacher's predictions
  assert np.mean(kl[-3:]) < 0.7 * kl[0]
