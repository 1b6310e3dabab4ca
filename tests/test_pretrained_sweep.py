"""experiments/pretrained_sweep.py planned against stand-ins of its five Qwen2.5 checkpoints: each a
directory with the real config.json fields (benchmarks/scale_plan.py's PRETRAINED) and one shared
tokenizer, no weights. The shapes are checked against the parameter counts the Qwen2.5 model cards
publish, and both variants plan the sweep the study needs."""
import json
import os
import shutil
import sys

import pytest

from rlhf_jax.experiments import stage_configs, sweep
from rlhf_jax.experiments.config_files import load_module
from rlhf_jax.model.config import param_counts

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import scale_plan  # noqa: E402

TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "hf", "qwen2", "tokenizer.json")
# (total, non-embedding) parameters in billions, as the Qwen2.5 model cards give them.
MODEL_CARDS = {"qwen2.5-0.5b": (0.49, 0.36), "qwen2.5-1.5b": (1.54, 1.31), "qwen2.5-3b": (3.09, 2.77),
               "qwen2.5-7b": (7.61, 6.53), "qwen2.5-14b": (14.7, 13.1)}


def _experiment():
  return load_module(os.path.join(ROOT, "experiments", "pretrained_sweep.py"))


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
  experiment = _experiment()
  for hub in [h for _, h in experiment.FAMILY] + [experiment.GOLD]:
    d = tmp_path / hub
    d.mkdir()
    (d / "config.json").write_text(json.dumps(scale_plan.PRETRAINED[hub.lower()]))
    shutil.copyfile(TOKENIZER, d / "tokenizer.json")
  monkeypatch.setenv("RLHF_JAX_CHECKPOINTS", str(tmp_path))
  return experiment


@pytest.mark.parametrize("name", sorted(MODEL_CARDS))
def test_pretrained_shapes_have_the_model_cards_parameter_counts(name):
  counts = param_counts(scale_plan.model_of(name))
  total, non_embedding = MODEL_CARDS[name]
  # The cards give 2-3 significant figures, not always rounded (14B: 14.77 B weights, card 14.7B;
  # 13.21 B non-embedding, card 13.1B): within 1%, where a wrong width or depth is off by 5% or more.
  assert counts["total"] / 1e9 == pytest.approx(total, rel=0.01)
  assert counts["non_embedding"] / 1e9 == pytest.approx(non_embedding, rel=0.01)


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_the_pretrained_sweep_plans_from_its_checkpoints(checkpoints, tmp_path, tuning):
  c = checkpoints.get_config(tuning)
  w = str(tmp_path / "run")
  stages = {s.name: s for s in sweep.plan(c, w)}
  assert "tokenizer" not in stages and all(f"lm_{n}" in stages for n in (*c.sizes, "gold"))
  for size, hub in [*checkpoints.FAMILY, ("gold", checkpoints.GOLD)]:
    model = stages[f"lm_{size}"].settings["model"]
    assert stages[f"lm_{size}"].settings["source"] == f"hf:{tmp_path / hub}"
    assert (model["dtype"], model["scan_layers"], model["remat"]) == ("bfloat16", True, "full")
    assert param_counts(stage_configs.model_config(c, size)) == param_counts(scale_plan.model_of(hub.lower()))
  pm, rl = stage_configs.pm_config(c, w, "7b"), stage_configs.ppo_config(c, w, "7b")
  gold = stage_configs.pm_config(c, w, "gold")
  assert pm.init_from == os.path.join(w, "lm_7b") and gold.init_from == os.path.join(w, "lm_gold")
  assert rl.policy_from == os.path.join(w, "sft_7b")
  lora_on = tuning == "lora"
  assert pm.lora.enabled == gold.lora.enabled == rl.lora.enabled == lora_on
  if lora_on:
    assert (rl.lora.rank, rl.lora.base_dtype) == (64, "bfloat16")
    assert not any(n.startswith(("dpo_", "rloo_", "grpo_")) for n in stages)
  else:
    assert {"ppo_7b", "rloo_7b", "grpo_7b", "dpo_7b_beta0.1", "bon_7b", "evals_7b"} <= set(stages)


def test_an_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="expected full or lora"):
    _experiment().get_config("qlora")
