"""The evaluation entry point on the micro sweep's runs: policies of any run, files written, errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhf_jax.evals import suite
from rlhf_jax.training import sharding as shd

from eval_fakes import write_harness_task

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def _config(**changes):
  sys.path.insert(0, ROOT)
  from configs import evaluate as evaluate_config
  c = evaluate_config.get_config()
  c.progress_bar = False
  c.bias_cloze.occupations = ("nurse", "engineer")
  c.bbq.max_per_category = 2
  for key, value in changes.items():
    c[key] = value
  return c


def test_load_policy_reads_lm_runs_and_ppo_snapshots(micro_sweep_dir):
  from rlhf_jax.training.saved_runs import FrozenModel, load_policy
  mesh = shd.make_mesh((-1, 1, 1))
  sft = os.path.join(micro_sweep_dir, "sft_xs")
  ppo = os.path.join(micro_sweep_dir, "ppo_xs")
  lm = load_policy(sft, mesh)
  frozen = FrozenModel(sft, mesh)
  assert lm.tokenizer_dir == sft and lm.model.cfg == frozen.model.cfg
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                                          lm.params, frozen.params)))
  last, early = load_policy(ppo, mesh), load_policy(ppo, mesh, step=2)
  assert (last.step, early.step, last.tokenizer_dir) == (4, 2, sft)  # a PPO run's model is its policy_from's
  assert jax.tree.structure(last.params) == jax.tree.structure(lm.params)
  moved = lambda a, b: max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert moved(early.params, lm.params) > 0 and moved(last.params, early.params) > 0  # PPO updated them
  with pytest.raises(ValueError, match=r"no checkpoint at step 3 \(saved: \[2, 4\]\)"):
    load_policy(ppo, mesh, step=3)


def test_evaluate_writes_json_markdown_and_plots(micro_sweep_dir, tmp_path):
  from rlhf_jax.evals.evaluate import evaluate
  c = _config(policy_dir=os.path.join(micro_sweep_dir, "ppo_xs"), suites="bias_cloze,mc,harness",
              out_dir=str(tmp_path))
  sample = os.path.join(ROOT, "rlhf_jax", "evals", "data", "mc_sample.jsonl")  # the mc suite's default task
  c.harness.tasks = "mc_sample_harness"
  c.harness.include_path = write_harness_task(tmp_path / "tasks", "mc_sample_harness", sample)
  out = evaluate(c)
  with open(tmp_path / "evals.json") as f:
    written = json.load(f)
  assert written["step"] == 4 and set(written) >= {"bias_cloze", "mc"}
  assert written["bias_cloze"]["per_occupation"].keys() == {"nurse", "engineer"}
  with open(tmp_path / "evals.md") as f:
    table = f.read()
  for metric, (value, _) in suite.headline(written).items():
    assert f"| {metric} | {value:.3f}" in table
  assert (tmp_path / "bias_cloze_policy.png").stat().st_size > 1000
  assert out["results"]["mc"]["acc"] == written["mc"]["acc"]
  # lm-evaluation-harness on the same task through the same model: the mc suite's numbers.
  harness = written["harness"]["mc_sample_harness"]
  assert harness["acc,none"] == pytest.approx(written["mc"]["acc"], abs=1e-12)
  assert harness["acc_norm,none"] == pytest.approx(written["mc"]["acc_norm"], abs=1e-12)


def test_unknown_harness_task_is_one_line_and_exit_2(micro_sweep_dir, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "rlhf_jax", "evaluate", "--config=configs/evaluate.py",
                         f"--config.policy_dir={os.path.join(micro_sweep_dir, 'ppo_xs')}", "--config.suites=harness",
                         "--config.harness.tasks=no_such_task", f"--config.out_dir={tmp_path}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "no_such_task" in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_evaluate_elo_needs_a_judge_and_rates_policies(micro_sweep_dir, tmp_path):
  from rlhf_jax.errors import ConfigError
  from rlhf_jax.evals.evaluate import evaluate
  ppo = os.path.join(micro_sweep_dir, "ppo_xs")
  c = _config(policy_dir=ppo, suites="elo", out_dir=str(tmp_path))
  with pytest.raises(ConfigError, match="elo.judge_dir"):
    evaluate(c)
  c.elo.judge_dir = os.path.join(micro_sweep_dir, "pm_gold")
  c.elo.policies = f"{os.path.join(micro_sweep_dir, 'sft_xs')},{ppo}@2"
  c.elo.num_prompts, c.elo.max_new_tokens = 8, 4
  elo = evaluate(c)["results"]["elo"]
  assert list(elo["elo"]) == [ppo, os.path.join(micro_sweep_dir, "sft_xs"), f"{ppo}@2"]
  assert sum(elo["elo"].values()) == pytest.approx(0.0, abs=1e-6) and elo["num_prompts"] == 8


@pytest.mark.parametrize("args, message", [
    ([], "error: --config.policy_dir is required"),
    (["--config.policy_dir=x", "--config.suites=bias_cloze,typo"], "error: suites: unknown ['typo']"),
])
def test_user_mistakes_are_one_line_and_exit_2(args, message):
  proc = subprocess.run([sys.executable, "-m", "rlhf_jax", "evaluate", "--config=configs/evaluate.py", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
  assert lines[-1].startswith(message), lines
  assert "Traceback" not in proc.stderr
