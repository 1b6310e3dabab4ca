"""Configs checked before anything is built: each impossible value is a ConfigError naming its
setting; a run inherits the model of the run it starts from; PPO's input runs must exist and agree."""
import json
import os
import subprocess
import sys

import pytest
from test_faults import ENV

from rlhf_jax.errors import ConfigError
from rlhf_jax.model.config import get_preset
from rlhf_jax.trainers import config_checks, train_pm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import dpo as dpo_config  # noqa: E402
from configs import lm as lm_config
from configs import pm as pm_config
from configs import ppo as ppo_config


def _fake_run(path, **model_changes):
  """A finished run directory as far as the checks look: config.json and a saved step."""
  model = dict(get_preset("tiny").to_dict(), **model_changes)
  os.makedirs(os.path.join(path, "checkpoints", "3"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model": model, "train": {"steps": 3}}, f)
  return str(path)


def _ppo(tmp_path, **pm_changes):
  c = ppo_config.get_config("tiny")
  c.policy_from, c.pm_dir = _fake_run(tmp_path / "lm"), _fake_run(tmp_path / "pm", **pm_changes)
  return c


def _dpo(tmp_path):
  c = dpo_config.get_config("tiny")
  c.policy_from, c.pm_dir = _fake_run(tmp_path / "lm"), _fake_run(tmp_path / "pm")
  return c


def _rloo(tmp_path):
  c = _ppo(tmp_path)
  c.algorithm, c.ppo.samples_per_prompt = "rloo", 4
  return c


def test_the_shipped_configs_pass(tmp_path):
  config_checks.validate(lm_config.get_config("tiny"), "lm")
  config_checks.validate(pm_config.get_config("tiny"), "pm")
  config_checks.validate(_ppo(tmp_path), "ppo")
  config_checks.validate(_rloo(tmp_path / "rloo"), "ppo")
  for algorithm in ("dr_grpo", "gspo", "dapo"):
    c = _rloo(tmp_path / algorithm)
    c.algorithm, c.ppo.clip_eps_high, c.ppo.overlong_buffer = algorithm, 0.28, 4
    config_checks.validate(c, "ppo")
  config_checks.validate(_dpo(tmp_path / "dpo"), "dpo")


@pytest.mark.parametrize("kind, field, value", [
    ("lm", "train.steps", -3), ("lm", "train.steps", 0), ("pm", "train.batch_size", 0),
    ("lm", "train.seq_len", -1), ("pm", "train.checkpoint_every", 0), ("lm", "train.log_every", 0),
    ("pm", "train.eval_every", 0), ("lm", "train.keep_checkpoints", 0),
    ("lm", "train.max_nonfinite_skips", -1), ("pm", "data.eval_fraction", 1.0),
    ("lm", "data.eval_fraction", 0.0), ("lm", "data.eval_fraction", 1.5), ("lm", "optimizer.learning_rate", 0.0),
    ("pm", "optimizer.learning_rate", float("inf")), ("lm", "objective", "rlhf"),
    ("lm", "train.seq_len", 4096),  # beyond model.max_seq_len (2048 in the tiny preset)
    ("ppo", "ppo.rollout_batch", 0), ("ppo", "ppo.num_minibatches", 3), ("ppo", "ppo.epochs", 0),
    ("ppo", "sampling.prompt_len", 0), ("ppo", "sampling.max_new_tokens", -2), ("ppo", "sampling.max_new_tokens", 2040),
    ("ppo", "value_from", "policy"), ("ppo", "data.eval_fraction", 2.0),
    ("lm", "train.grad_accum", 0), ("pm", "train.grad_accum", 3),  # 16 comparisons do not split in 3
    ("ppo", "algorithm", "reinforce"), ("rloo", "ppo.samples_per_prompt", 1),  # no group to compare within
    ("rloo", "ppo.samples_per_prompt", 3),  # 16 sequences do not split into groups of 3
    ("rloo", "ppo.samples_per_prompt", 0), ("dpo", "dpo.beta", 0.0), ("dpo", "dpo.beta", float("nan")),
    ("dpo", "dpo.loss", "kto"), ("dpo", "train.seq_len", 4096), ("dpo", "sampling.max_new_tokens", 0),
    ("dpo", "train.batch_size", 0),
    ("rloo", "ppo.clip_eps_high", 0.1),  # DAPO's upper epsilon below the lower 0.2
    ("rloo", "ppo.clip_eps_high", -0.3), ("ppo", "ppo.clip_eps", 0.0),
    ("rloo", "ppo.overlong_buffer", -1), ("rloo", "ppo.overlong_buffer", 17),  # beyond max_new_tokens = 16
    ("ppo", "ppo.tis_cap", 0.0), ("rloo", "ppo.tis_cap", -2.0),
])
def test_each_impossible_setting_is_named(kind, field, value, tmp_path):
  makers = {"lm": lambda _: lm_config.get_config("tiny"), "pm": lambda _: pm_config.get_config("tiny"),
            "ppo": _ppo, "rloo": _rloo, "dpo": _dpo}
  config = makers[kind](tmp_path)
  kind = "ppo" if kind == "rloo" else kind
  section, key = field.rsplit(".", 1) if "." in field else ("", field)
  (config[section] if section else config)[key] = value
  with pytest.raises(ConfigError, match=field.split(".")[-1]):
    config_checks.validate(config, kind)


def test_eval_fraction_is_free_when_a_separate_eval_split_is_used():
  config = lm_config.get_config("tiny")
  config.data.eval_split, config.data.eval_fraction = "test", 0.0
  config_checks.validate(config, "lm")


def test_ppo_runs_must_exist_and_share_a_vocabulary(tmp_path):
  config = _ppo(tmp_path)
  config.pm_dir = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match=r"pm_dir=.*nowhere: no config.json"):
    config_checks.validate(config, "ppo")
  config = _ppo(tmp_path / "other", vocab_size=512)
  with pytest.raises(ConfigError, match="share one vocabulary"):
    config_checks.validate(config, "ppo")
  config = _ppo(tmp_path / "third")
  config.eval.pm_dirs = (str(tmp_path / "third" / "lm" / "checkpoints"),)  # not a run directory
  with pytest.raises(ConfigError, match=r"eval.pm_dirs\[0\]"):
    config_checks.validate(config, "ppo")
  unsaved = _ppo(tmp_path / "fourth")
  os.rmdir(os.path.join(unsaved.policy_from, "checkpoints", "3"))
  with pytest.raises(ConfigError, match="policy_from=.*no checkpoint"):
    config_checks.validate(unsaved, "ppo")


def test_model_is_inherited_from_init_from(tmp_path):
  config = pm_config.get_config("tiny")
  config.init_from = _fake_run(tmp_path / "lm_small", d_model=32, mlp_dim=64)
  inherited = config_checks.inherit_model_config(config)
  assert (inherited.model.d_model, inherited.model.mlp_dim) == (32, 64)
  assert config.model.d_model == get_preset("tiny").d_model  # the caller's config is left alone
  config.model.d_model = 32  # an explicit override that agrees is fine
  assert config_checks.inherit_model_config(config).model.mlp_dim == 64
  config.model.d_model = 96  # one that contradicts is named, with both values
  with pytest.raises(ConfigError, match=r"model.d_model=96 but 32 there"):
    config_checks.inherit_model_config(config)


def test_train_pm_from_a_run_of_another_shape_fails_before_any_restore(tmp_path):
  config = pm_config.get_config("tiny")
  config.init_from = _fake_run(tmp_path / "lm_small", d_model=32, mlp_dim=64)
  config.model.num_layers = 3  # explicit, and the fake run has the preset's 2
  with pytest.raises(ConfigError, match="model.num_layers=3 but 2 there"):
    train_pm.train(config, str(tmp_path / "pm"))
  assert not os.path.exists(tmp_path / "pm" / "checkpoints")


def test_batch_larger_than_the_data():
  config_checks.check_batch_fits(40, 40, "train.batch_size", "training comparisons")
  with pytest.raises(ConfigError, match="train.batch_size=64 is larger than the 40 training comparisons"):
    config_checks.check_batch_fits(40, 64, "train.batch_size", "training comparisons")


def test_negative_steps_on_the_command_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "rlhf_jax", "train_lm", "--config=configs/lm.py:tiny",
                        f"--workdir={tmp_path}", "--config.train.steps=-3"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == "error: train.steps=-3: must be a positive integer"
  assert "Traceback" not in out.stderr
