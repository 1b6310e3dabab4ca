"""The LM entry point: command-line config overrides, learning, and kill/resume equivalence."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rlhf_jax import sharding as shd
from rlhf_jax.checkpointing import Checkpointer
from rlhf_jax.metrics import read_metrics
from rlhf_jax.model import init_params
from rlhf_jax.model_config import ModelConfig
from rlhf_jax.optimizer import make_optimizer
from rlhf_jax.train import train
from rlhf_jax.train_state import state_shardings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import lm as lm_config  # noqa: E402

# A 1-device CPU environment for the subprocesses (the test session itself has 8 fake devices).
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")


def _cli(workdir, *overrides):
  return [sys.executable, "-m", "rlhf_jax.train", "--config=configs/lm.py:tiny", f"--workdir={workdir}",
          "--config.progress_bar=False", *overrides]


def _small(config, steps):
  config.train.steps = steps
  config.train.batch_size = 8
  config.train.seq_len = 16
  config.train.log_every = 1
  config.train.eval_every = steps
  config.train.eval_batches = 1
  config.mesh.shape = (1, 1, 1)
  return config


def _final_params(workdir, config):
  cfg = ModelConfig.from_dict(config.model)
  mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
  abstract, _ = state_shardings(lambda r: init_params(cfg, r),
                                make_optimizer(config.optimizer, config.train.steps), mesh)
  with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    state, _ = ckpt.restore(abstract)
  return state


def test_command_line_overrides_reach_the_run(tmp_path):
  out = subprocess.run(_cli(tmp_path, "--config.model.num_layers=3", "--config.train.steps=2",
                            "--config.train.batch_size=4", "--config.train.seq_len=8",
                            "--config.mesh.shape=(1,1,1)"),
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["num_layers"] == 3 and saved["train"]["steps"] == 2
  config = _small(lm_config.get_config("tiny"), 2)
  config.model.num_layers = 3
  state = _final_params(tmp_path, config)
  assert int(state.step) == 2 and "layer_2" in state.params and "layer_3" not in state.params


def test_unknown_config_key_is_a_clear_error(tmp_path):
  out = subprocess.run(_cli(tmp_path, "--config.model.num_layerz=3"), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "num_layerz" in out.stderr
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_loss_goes_down_on_tiny(tmp_path):
  config = lm_config.get_config("tiny")  # batch 16 x 64 tokens
  config.train.steps = 40
  config.train.log_every = 1
  config.train.eval_every = 40
  config.train.eval_batches = 1
  config.train.checkpoint_every = 1000
  config.mesh.shape = (1, -1, 1)  # in-process: all 8 fake devices, FSDP
  config.progress_bar = False
  last = train(config, str(tmp_path))
  losses = [r["loss"] for r in read_metrics(str(tmp_path))]
  assert len(losses) == 40
  # Uniform guessing over 1024 tokens costs ln(1024) = 6.93 nats; learning must beat it clearly.
  assert np.mean(losses[:3]) > 6.5
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5
  assert last["eval_loss"] < np.mean(losses[:3]) - 0.5  # held-out examples too


def test_killed_run_resumes_bitwise(tmp_path):
  """SIGKILL mid-run, rerun the same command: final params equal an uninterrupted run's."""
  steps = 8
  overrides = [f"--config.train.steps={steps}", "--config.train.batch_size=8", "--config.train.seq_len=16",
               "--config.train.checkpoint_every=1", "--config.train.async_checkpointing=False",
               "--config.train.log_every=1", "--config.train.eval_every=100", "--config.mesh.shape=(1,1,1)"]
  reference = tmp_path / "reference"
  subprocess.run(_cli(reference, *overrides), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)

  resumed = tmp_path / "resumed"
  proc = subprocess.Popen(_cli(resumed, *overrides), cwd=ROOT, env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = resumed / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if ckpt_dir.exists() and any(p.name.isdigit() and int(p.name) >= 3 for p in ckpt_dir.iterdir()):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  out = subprocess.run(_cli(resumed, *overrides), cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step" in out.stdout

  config = _small(lm_config.get_config("tiny"), steps)
  a, b = _final_params(reference, config), _final_params(resumed, config)
  assert int(a.step) == int(b.step) == steps
  jax.tree.map(np.testing.assert_array_equal, a, b)
