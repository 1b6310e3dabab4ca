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
RL_METHODS = ("ppo", "rloo", "grpo", "dr_grpo", "gspo", "dapo", "dpo", "ipo", "slic")

# Direct alignment: train_dpo with its loss of that name, one run per beta in config.dpo.betas.
DIRECT_METHODS = ("dpo", "ipo", "slic")


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


def seeds(config) -> tuple[int, ...]:
  """config.seeds: the sweep's seeds (default (0,)). Each seed reruns the stages whose randomness
  matters (proxy PM init and data order, RL / DPO sampling and order, best-of-N's samples) with
  that offset on their seeds; the LMs, SFT, gold PM and labels are shared by every seed."""
  chosen = config.get("seeds", (0,))
  chosen = (chosen,) if isinstance(chosen, int) and not isinstance(chosen, bool) else tuple(chosen)
  if not chosen or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in chosen):
    raise ConfigError(f"seeds={chosen}: expected a non-empty list of non-negative integers")
  if len(set(chosen)) != len(chosen):
    raise ConfigError(f"seeds={chosen}: a seed is repeated (each seed is one run of every seeded stage)")
  return chosen


def seeded(stage: str, seed: int) -> str:
  """A seeded stage's name: seed 0 keeps the name a sweep without seeds used, so its stages stay cached."""
  return stage if seed == 0 else f"{stage}_seed{seed}"


def pm_config(config, workdir: str, name: str, seed: int = 0):
  """A size's proxy PM (seeded), or the gold PM (name == GOLD; one for every seed)."""
  from configs import pm
  c = _stage_config(pm, config, workdir, name, "pm", *(("gold_pm",) if name == GOLD else ()))
  c.init_from = storage.join(workdir, f"lm_{name}")
  c.train.seed += seed
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


def ppo_config(config, workdir: str, name: str, algorithm: str = "ppo", seed: int = 0):
  """train_ppo's config for one size and seed (against that seed's proxy PM); a critic-free
  algorithm ("rloo", "grpo", ...) adds config[algorithm] over rl."""
  from configs import ppo
  extra = (algorithm,) if algorithm != "ppo" and algorithm in config else ()
  c = _stage_config(ppo, config, workdir, name, "rl", *extra)
  c.algorithm = algorithm
  c.policy_from = policy_dir(config, workdir, name)
  c.pm_dir = storage.join(workdir, seeded(f"pm_{name}", seed))
  c.train.seed += seed
  c.eval.pm_dirs = (storage.join(workdir, f"pm_{GOLD}"),)
  return c


def dpo_config(config, workdir: str, name: str, beta: float, seed: int = 0, method: str = "dpo"):
  """train_dpo's config: the proxy PM's comparisons, evaluated exactly as the RL runs are. Method
  "dpo" takes its loss from config.dpo.loss (default "dpo"); "ipo" and "slic" are that loss."""
  from configs import dpo
  rl = ppo_config(config, workdir, name, seed=seed)
  c = dpo.get_config(config.base_preset)
  c.data, c.eval, c.mesh = rl.data, rl.eval, rl.mesh
  c.policy_from, c.pm_dir = rl.policy_from, rl.pm_dir
  c.sampling = rl.sampling  # the same evaluation samples
  c.preferences = pm_config(config, workdir, name).data  # what the proxy PM is trained on
  section = dict(config.dpo)
  for key in ("train", "optimizer"):
    override(c[key], section.get(key, {}), f"dpo.{key}")
  c.dpo.loss, c.dpo.beta = section.get("loss", "dpo") if method == "dpo" else method, float(beta)
  c.train.seed += seed
  c.progress_bar = config.progress_bar
  return c


def dpo_stage_name(name: str, beta: float, seed: int = 0, method: str = "dpo") -> str:
  return seeded(f"{method}_{name}_beta{float(beta):g}", seed)
