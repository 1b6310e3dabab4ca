"""The PPO entry point end to end on tiny runs: metrics, evaluation with an extra PM, and a
preempted-then-resumed run equal to an uninterrupted one."""
import os
import sys

import jax
import numpy as np
import pytest

from rlhf_jax.data import prompts as prompt_data
from rlhf_jax.trainers import train_ppo
from rlhf_jax.training import loop
from rlhf_jax.training.metrics import read_metrics, without_timings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import ppo as ppo_config  # noqa: E402


@pytest.fixture(scope="module")
def runs(tiny_runs):
  return tiny_runs  # (policy_from, pm_dir): conftest trains them once per session


def _ppo_config(runs, steps):
  config = ppo_config.get_config("tiny")
  config.policy_from, config.pm_dir = runs
  config.eval.pm_dirs = (runs[1],)  # scored again as an "extra" PM: must agree with "pm"
  config.eval.num_prompts = 8
  config.ppo.rollout_batch = 8
  config.sampling.max_new_tokens = 6
  config.sampling.prompt_len = 16
  config.train.steps = steps
  config.train.eval_every = 2
  config.train.checkpoint_every = 100
  config.train.async_checkpointing = False
  config.data.max_examples = 120
  config.mesh.shape = (1, -1, 1)
  config.progress_bar = False
  return config


class _StopAfter(loop.Preemption):
  """Behaves as if SIGTERM arrived during the k-th step."""
  polls = 0

  def __init__(self, k):
    super().__init__()
    self._k = k

  @property
  def requested(self):
    _StopAfter.polls += 1
    return _StopAfter.polls >= self._k

  @requested.setter
  def requested(self, value):
    pass


def test_ppo_run_metrics_and_bitwise_resume(runs, tmp_path, monkeypatch):
  steps = 3
  straight = tmp_path / "straight"
  train_ppo.train(_ppo_config(runs, steps), str(straight))
  start, *rows = read_metrics(str(straight))
  # train.eval_at_start: the initial policy evaluated at step 0 (KL exactly 0, as the curves need)
  assert start["step"] == 0 and start["eval_kl"] == 0.0 and "loss" not in start
  assert start["eval_pm_reward_raw"] == pytest.approx(start["eval_" + os.path.basename(runs[1]) + "_reward_raw"])
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert rows[0]["kl"] == 0.0  # the first rollout comes from the initial policy itself
  for key in ("pm_reward", "pm_reward_raw", "kl", "sqrt_kl", "entropy", "policy_loss", "value_loss",
              "clip_fraction", "approx_kl", "response_length", "kl_coef"):
    assert key in rows[0] and np.isfinite(rows[0][key]), key
  assert rows[0]["kl_coef"] == pytest.approx(0.001)
  # The compiling first iteration is timed on its own; the rate counts the iterations after it.
  assert rows[0]["first_step_seconds"] > 0 and "steps_per_second" not in rows[0]
  assert all(r["steps_per_second"] > 0 and "first_step_seconds" not in r for r in rows[1:])
  evaluated = rows[1]  # eval_every = 2
  extra = "eval_" + os.path.basename(runs[1]) + "_reward_raw"  # the same PM, scored again
  assert evaluated["eval_pm_reward_raw"] == pytest.approx(evaluated[extra])

  resumed = tmp_path / "resumed"
  _StopAfter.polls = 0
  monkeypatch.setattr(loop, "Preemption", lambda: _StopAfter(2))
  train_ppo.train(_ppo_config(runs, steps), str(resumed))
  monkeypatch.undo()
  assert [r["step"] for r in read_metrics(str(resumed))] == [0, 1, 2]  # stopped early, checkpointed
  train_ppo.train(_ppo_config(runs, steps), str(resumed))
  assert [r["step"] for r in read_metrics(str(resumed))] == [0, 1, 2, 3]  # no second step-0 evaluation

  a, b = (_raw_state(d, steps) for d in (straight, resumed))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)  # params, optimizer, RNG, kl_coef, position
  assert int(a["data_position"]) == steps * 8
  # ... and what was logged at the last step (losses, rewards, KL) is identical too.
  last_a, last_b = read_metrics(str(straight))[-1], read_metrics(str(resumed))[-1]
  assert without_timings(last_a) == without_timings(last_b)


def _raw_state(run_dir, step):
  """The saved state as host arrays, without knowing its structure in advance."""
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(str(run_dir / "checkpoints"), item_names=("state", "meta"))
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore())).state
  manager.close()
  return jax.tree.map(np.asarray, state)


def test_prompt_file_is_split_into_disjoint_train_and_held_out_prompts(tmp_path):
  import json
  path = tmp_path / "prompts.jsonl"
  texts = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(20)]
  path.write_text("\n".join(json.dumps({"prompt": t}) for t in texts))
  config = ppo_config.get_config("tiny")
  config.data.prompts_path = str(path)
  config.data.eval_fraction = 0.25
  train, held_out = prompt_data.prompt_texts(config, str(tmp_path))
  assert len(held_out) == 5 and len(train) == 15
  assert sorted(train + held_out) == sorted(texts)
  assert train == [t for t in texts if t in train]  # file order kept


@pytest.mark.parametrize("algorithm", ["grpo", "dapo"])
def test_critic_free_run_trains_the_policy_alone_on_groups_of_samples(runs, tmp_path, algorithm):
  config = _ppo_config(runs, 2)
  config.algorithm, config.ppo.samples_per_prompt = algorithm, 4  # 2 prompts x 4 samples per iteration
  if algorithm == "dapo":  # clip-higher, and a penalty on all but the first response token
    config.ppo.clip_eps_high, config.ppo.overlong_buffer = 0.28, config.sampling.max_new_tokens - 1
  train_ppo.train(config, str(tmp_path / algorithm))
  start, *rows = read_metrics(str(tmp_path / algorithm))
  assert start["eval_kl"] == 0.0 and [r["step"] for r in rows] == [1, 2]
  assert "value_loss" not in rows[0] and np.isfinite(rows[0]["policy_loss"])
  if algorithm == "dapo":
    assert all(0 <= r["live_fraction"] <= 1 for r in rows)
    # Responses of >= 2 tokens are penalised: -1/(N-1) per token beyond the first, down to -1.
    assert all(-1 <= r["overlong_penalty"] < 0 for r in rows), [r["overlong_penalty"] for r in rows]
  state = _raw_state(tmp_path / algorithm, 2)
  assert set(state["params"]) == {"policy"}  # no value model, whatever value_from says
  assert int(state["data_position"]) == 2 * 2  # prompts consumed: rollout_batch / samples_per_prompt
  assert rows[-1]["eval_kl"] != 0.0  # the updates moved the policy away from the initial one
