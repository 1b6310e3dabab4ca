"""The DPO entry point on tiny runs: what it logs, that it starts at the reference (loss log 2),
and a preempted-then-resumed run equal to an uninterrupted one."""
import math
import os
import sys

import jax
import numpy as np
import pytest
from test_train_ppo import _raw_state, _StopAfter

from rlhf_jax.trainers import train_dpo
from rlhf_jax.training import loop
from rlhf_jax.training.metrics import read_metrics, without_timings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import dpo as dpo_config  # noqa: E402


def _dpo_config(runs, steps):
  c = dpo_config.get_config("tiny")
  c.policy_from, c.pm_dir = runs
  c.preferences.max_examples = 120
  c.data.max_examples = 120
  c.eval.num_prompts = 8
  c.sampling.max_new_tokens, c.sampling.prompt_len = 6, 16
  c.train.steps, c.train.eval_every, c.train.log_every = steps, 2, 1
  c.train.batch_size, c.train.seq_len = 8, 64
  c.train.checkpoint_every, c.train.async_checkpointing = 100, False
  c.mesh.shape = (1, -1, 1)
  c.progress_bar = False
  return c


def test_dpo_run_starts_at_the_reference_and_resumes_bitwise(tiny_runs, tmp_path, monkeypatch):
  steps = 3
  straight = tmp_path / "straight"
  train_dpo.train(_dpo_config(tiny_runs, steps), str(straight))
  start, *rows = read_metrics(str(straight))
  assert start["step"] == 0 and start["eval_kl"] == 0.0 and 0.0 <= start["eval_implicit_accuracy"] <= 1.0
  # Step 1's loss is computed with the policy equal to its reference: h = 0, loss log 2, implicit
  # rewards 0 (up to float32 differences between the two compiled forward passes).
  assert rows[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
  assert abs(rows[0]["implicit_reward_chosen"]) < 1e-5 and abs(rows[0]["implicit_margin"]) < 1e-5
  assert rows[-1]["implicit_margin"] != 0.0 and rows[-1]["eval_kl"] != 0.0  # it learned something
  for key in ("eval_pm_reward", "eval_sqrt_kl", "grad_norm", "implicit_accuracy"):
    assert np.isfinite(rows[-1][key]), key

  resumed = tmp_path / "resumed"
  _StopAfter.polls = 0
  monkeypatch.setattr(loop, "Preemption", lambda: _StopAfter(2))
  train_dpo.train(_dpo_config(tiny_runs, steps), str(resumed))
  monkeypatch.undo()
  assert [r["step"] for r in read_metrics(str(resumed))] == [0, 1, 2]
  train_dpo.train(_dpo_config(tiny_runs, steps), str(resumed))
  a, b = (_raw_state(d, steps) for d in (straight, resumed))
  assert set(a["params"]) == {"policy"}  # read by load_policy like a PPO run
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert int(a["data_position"]) == steps * 8
  last_a, last_b = read_metrics(str(straight))[-1], read_metrics(str(resumed))[-1]
  assert without_timings(last_a) == without_timings(last_b)
