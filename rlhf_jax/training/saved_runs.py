"""Finished runs read back: a run's config, its frozen model and params, a policy at any saved
step, and the tokenizer several runs must share.
"""
from __future__ import annotations

import json
from typing import Any, NamedTuple, Optional

import ml_collections

from rlhf_jax import storage
from rlhf_jax.errors import ConfigError
from rlhf_jax.model import lora
from rlhf_jax.model.config import ModelConfig
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.objectives.calibration import load_normalisation
from rlhf_jax.training import adapters, loop
from rlhf_jax.training.checkpointing import Checkpointer
from rlhf_jax.training.optimizer import make_optimizer
from rlhf_jax.training.train_state import state_shardings


class FrozenModel:
  """A trained run's model and params (policy at initialisation, or a PM with its normalisation).

  For a LoRA run (rlhf_jax.training.adapters) `params` is its base's params joined with its
  adapters (no copy of the base), `base` and `adapters` the two halves and `spec` its LoraSpec;
  for a dense run `base` is `params`, `adapters` None. `bases` (a dict shared by the caller) holds
  the dense runs already loaded, by directory: several LoRA runs on one base read it once.
  """

  def __init__(self, run_dir: str, mesh, with_normalisation: bool = False, bases: Optional[dict] = None):
    config = load_run_config(run_dir)
    cfg = ModelConfig.from_dict(config.model)
    self.run_dir, self.spec = run_dir, adapters.spec_of(config)
    self.model = Transformer(cfg, self.spec)
    tx = make_optimizer(config.optimizer, config.train.steps)
    self.normalisation = load_normalisation(run_dir) if with_normalisation else None
    bases = {} if bases is None else bases
    if self.spec is None:
      self.abstract, self.shardings = state_shardings(lambda r: init_params(cfg, r), tx, mesh)
      key = storage.absolute(run_dir)
      if key not in bases:
        bases[key] = loop.restore_params(run_dir, self.abstract), self.shardings.params
      self.params, _ = bases[key]
      self.base, self.adapters = self.params, None
      return
    base = adapters.base_of(run_dir)
    if base.run_dir not in bases:
      FrozenModel(base.run_dir, mesh, bases=bases)
    self.base, base_shardings = bases[base.run_dir]
    self.abstract, self.shardings = state_shardings(adapter_init(cfg, self.spec), tx, mesh)
    self.adapters = loop.restore_params(run_dir, self.abstract)
    self.params = lora.join(self.base, self.adapters)
    self.shardings = self.shardings.replace(params=lora.join(base_shardings, self.shardings.params))


def adapter_init(cfg: ModelConfig, spec: lora.LoraSpec) -> Any:
  """rng -> the boxed trainable params (adapters and heads) of a LoRA model."""
  return lambda r: lora.trainable(init_params(cfg, r, lora=spec))


class Policy(NamedTuple):
  model: Transformer
  params: Any
  step: int  # the checkpoint's step
  tokenizer_dir: str  # the run whose tokenizer.model the policy reads


def load_policy(run_dir: str, mesh, step: Optional[int] = None) -> Policy:
  """The policy of any run: an LM / SFT run's params, or a PPO run's policy (its model is that of
  its policy_from). step: a saved checkpoint (default: the last)."""
  config = load_run_config(run_dir)
  source = config.get("policy_from") or run_dir
  base = FrozenModel(source, mesh)  # the model, and for an LM run its last params
  spec = adapters.spec_of(config) if source != run_dir else None
  with Checkpointer(storage.join(run_dir, "checkpoints")) as ckpt:
    last = ckpt.latest_step()
    step = last if step is None else step
    if step not in ckpt.all_steps():
      raise ConfigError(f"{run_dir}: no checkpoint at step {step} (saved: {ckpt.all_steps()})")
    if source == run_dir:
      params = base.params if step == last else ckpt.restore_params(base.abstract.params, step)
    elif spec is not None:  # a LoRA policy: its adapters over policy_from's weights
      adapters.base_of(run_dir)  # refuses a policy_from changed since
      abstract, _ = state_shardings(adapter_init(base.model.cfg, spec), make_optimizer(config.optimizer, 1), mesh)
      trained = ckpt.restore_params({"policy": abstract.params}, step)["policy"]
      return Policy(Transformer(base.model.cfg, spec), lora.join(base.params, trained), int(step), source)
    else:
      params = ckpt.restore_params({"policy": base.abstract.params}, step)["policy"]
  return Policy(base.model, params, int(step), source)


def load_run_config(run_dir: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(storage.read_text(storage.join(run_dir, "config.json"))))
