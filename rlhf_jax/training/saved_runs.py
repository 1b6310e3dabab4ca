"""Finished runs read back: a run's config, its frozen model and params, a policy at any saved
step, and the tokenizer several runs must share.
"""
from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Optional

import ml_collections

from rlhf_jax.errors import ConfigError
from rlhf_jax.model.config import ModelConfig
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.objectives.calibration import load_normalisation
from rlhf_jax.training import loop
from rlhf_jax.training.checkpointing import Checkpointer
from rlhf_jax.training.optimizer import make_optimizer
from rlhf_jax.training.train_state import state_shardings


class FrozenModel:
  """A trained run's model and params (policy at initialisation, or a PM with its normalisation)."""

  def __init__(self, run_dir: str, mesh, with_normalisation: bool = False):
    config = load_run_config(run_dir)
    cfg = ModelConfig.from_dict(config.model)
    self.run_dir, self.model = run_dir, Transformer(cfg)
    tx = make_optimizer(config.optimizer, config.train.steps)
    self.abstract, self.shardings = state_shardings(lambda r: init_params(cfg, r), tx, mesh)
    self.params = loop.restore_params(run_dir, self.abstract)
    self.normalisation = load_normalisation(run_dir) if with_normalisation else None


class Policy(NamedTuple):
  model: Transformer
  params: Any
  step: int  # the checkpoint's step
  tokenizer_dir: str  # the run whose tokenizer.model the policy reads


def load_policy(run_dir: str, mesh, step: Optional[int] = None) -> Policy:
  """The policy of any run: an LM / SFT run's params, or a PPO run's policy (its model is that of
  its policy_from). step: a saved checkpoint (default: the last)."""
  source = load_run_config(run_dir).get("policy_from") or run_dir
  base = FrozenModel(source, mesh)  # the model, and for an LM run its last params
  with Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
    last = ckpt.latest_step()
    step = last if step is None else step
    if step not in ckpt.all_steps():
      raise ConfigError(f"{run_dir}: no checkpoint at step {step} (saved: {ckpt.all_steps()})")
    if source == run_dir:
      params = base.params if step == last else ckpt.restore_params(base.abstract.params, step)
    else:
      params = ckpt.restore_params({"policy": base.abstract.params}, step)["policy"]
  return Policy(base.model, params, int(step), source)


def load_run_config(run_dir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(run_dir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))
