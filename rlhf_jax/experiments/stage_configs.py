"""Each stage's trainer config, derived from a sweep config: the sizes' models, the LM, SFT, PM,
PPO / RLOO / GRPO and DPO sections, and the names of the run directories that connect them.
"""
from __future__ import annotations

import ml_collections

from rlhf_jax import storage
from rlhf_jax.data.tokenizer import MODEL_FILE
from rlhf_jax.errors import ConfigError
from rlhf_jax.experiments import checkpoint_sizes
from rlhf_jax.experiments.stages import override
from rlhf_jax.model.config import ModelConfig, get_preset

GOLD = "gold"


# train_ppo's algorithms, then DPO; best-of-N ("bon") runs for every size as well.
RL_METHODS = ("ppo", "rloo", "grpo", "dr_grpo", "gspo", "dapo", "dpo")


def model_config(config, name: str) -> ModelConfig:
  """config.models[name]: ModelConfig fields over a preset (its own "preset" key, or base_preset), or
  the model of the checkpoint it names (experiments.checkpoint_sizes)."""
  if checkpoint_sizes.source(config, name):
    return checkpoint_sizes.model_config(config, name)
  spec = dict(config.models[name])
  base = get_preset(spec.pop("preset", config.base_preset))
  return ModelConfig.from_dict({**base.to_dict(), **spec})


def _stage_config(module, config, workdir: str, name: str, *sections: str) -> ml_collections.ConfigDict:
  c = module.get_config(config.base_preset)
  override(c.data, config.data, "data")
  c.data.tfds_dir = storage.join(workdir, "tfds")  # prepared once for every stage
  for section in sections:
    override(c, config[section], section)
  if "model" in c:
    c.model = ml_collections.ConfigDict(model_config(config, name).to_dict())
  c.progress_bar = config.progress_bar
  return c


def lm_config(config, workdir: str, name: str):
  from configs import lm
  c = _stage_config(lm, config, workdir, name, "lm")
  # A checkpoint size's runs inherit the checkpoint's tokenizer through init_from.
  c.tokenizer.path = "" if checkpoint_sizes.source(config, name) else storage.join(workdir, "tokenizer", MODEL_FILE)
  return c


def sft_config(config, workdir: str, name: str):
  """The initial policy's stage: SFT or context distillation from the pretrained LM."""
  c = lm_config(config, workdir, name)
  override(c, config.sft, "sft")
  c.init_from = storage.join(workdir, f"lm_{name}")
  return c


def policy_dir(config, workdir: str, name: str) -> str:
  """The initial policy of size `name`: its SFT / distilled LM if config.sft.objective, else the LM."""
  return storage.join(workdir, f"sft_{name}" if config.sft.objective else f"lm_{name}")


def pm_config(config, workdir: str, name: str):
  from configs import pm
  c = _stage_config(pm, config, workdir, name, "pm", *(("gold_pm",) if name == GOLD else ()))
  c.init_from = storage.join(workdir, f"lm_{name}")
  if config.setup == "halves":
    c.data.half = "b" if name == GOLD else "a"
  elif name != GOLD:
    c.data.path = storage.join(workdir, f"labels_{name}", "labels.jsonl")
  return c


def methods(config) -> tuple[str, ...]:
  chosen = tuple(config.get("methods", ("ppo",)))
  unknown = [m for m in chosen if m not in RL_METHODS]
  if unknown or "ppo" not in chosen:  # PPO's run is what best-of-N and the evaluations compare with
    raise ConfigError(f"methods={chosen}: expected 'ppo' and any of {RL_METHODS[1:]}")
  return chosen


def ppo_config(config, workdir: str, name: str, algorithm: str = "ppo"):
  """train_ppo's config for one size; a critic-free algorithm ("rloo", "grpo", ...) adds
  config[algorithm] over rl."""
  from configs import ppo
  extra = (algorithm,) if algorithm != "ppo" and algorithm in config else ()
  c = _stage_config(ppo, config, workdir, name, "rl", *extra)
  c.algorithm = algorithm
  c.policy_from = policy_dir(config, workdir, name)
  c.pm_dir = storage.join(workdir, f"pm_{name}")
  c.eval.pm_dirs = (storage.join(workdir, f"pm_{GOLD}"),)
  return c


def dpo_config(config, workdir: str, name: str, beta: float):
  """train_dpo's config: the proxy PM's comparisons, evaluated exactly as the RL runs are."""
  from configs import dpo
  rl = ppo_config(config, workdir, name)
  c = dpo.get_config(config.base_preset)
  c.data, c.eval, c.mesh = rl.data, rl.eval, rl.mesh
  c.policy_from, c.pm_dir = rl.policy_from, rl.pm_dir
  c.sampling = rl.sampling  # the same evaluation samples
  c.preferences = pm_config(config, workdir, name).data  # what the proxy PM is trained on
  section = dict(config.dpo)
  for key in ("train", "optimizer"):
    override(c[key], section.get(key, {}), f"dpo.{key}")
  c.dpo.loss, c.dpo.beta = section.get("loss", "dpo"), float(beta)
  c.progress_bar = config.progress_bar
  return c


def dpo_stage_name(name: str, beta: float) -> str:
  return f"dpo_{name}_beta{float(beta):g}"
