"""Preference-model training: optional preference-model pretraining (PMP), then human comparisons.

  python -m rlhf_jax train_pm --config=configs/pm.py:tiny [--config.init_from=runs/lm_tiny]

With config.pmp.path set, a first stage trains on that comparison file (any file in the hh-rlhf
format: StackExchange/Reddit-style data in the paper) in <workdir>/pmp, and the main stage
finetunes from it. Every stage resumes from its checkpoints. At the end the PM is evaluated
(accuracy with a 95% interval, calibration, ECE) and its score normalisation is saved beside it.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from rlhf_jax import storage
from rlhf_jax.data.inputs import trainer_data
from rlhf_jax.errors import ConfigError
from rlhf_jax.hf import runs as hf_runs
from rlhf_jax.model import lora
from rlhf_jax.trainers import config_checks, pm_steps
from rlhf_jax.trainers.pm_evaluation import evaluate_pm, score_all
from rlhf_jax.training import loop, lora_setup
from rlhf_jax.training import sharding as shd


def _stage(config, workdir: str) -> dict[str, Any]:
  storage.makedirs(workdir)
  _, train_data, eval_data, skipped, _ = trainer_data(config, workdir, "pm")
  config_checks.check_batch_fits(len(train_data), config.train.batch_size, "train.batch_size",
                                 f"training comparisons of {config.data.get('path') or config.data.subset}")
  s, state, frozen = lora_setup.setup_or_dense(config, workdir)
  train_step = pm_steps.jit_pm_train_step(s.model, s.tx, s.mesh, s.shardings, lm_weight=config.lm_weight,
                                          grad_accum=config.train.grad_accum,
                                          frozen_shardings=frozen and frozen.shardings)
  base, base_shardings = (frozen.base, frozen.shardings) if frozen else (None, None)
  score_step = pm_steps.jit_pm_score_step(s.model, s.mesh, lora.join(base_shardings, s.shardings.params))

  def evaluate(params):
    scores = score_all(score_step, lora.join(base, params), eval_data, s.mesh)
    return {"eval_accuracy": float(np.mean(scores[:, 0] > scores[:, 1])),
            "eval_preference_loss": float(np.mean(np.logaddexp(0.0, scores[:, 1] - scores[:, 0])))}

  step = lambda state, position: train_step(state, shd.shard_batch(train_data.batch_at(position), s.mesh), base)
  return loop.run_steps(config, workdir, s, state, step=step, evaluate=evaluate, desc="train_pm",
                        run_info=dict(num_train_comparisons=len(train_data),
                                      num_eval_comparisons=len(eval_data), malformed_skipped=skipped))


def train(config, workdir: str) -> dict[str, Any]:
  config_checks.validate(config, "pm")
  config = hf_runs.resolve(config, workdir, ("init_from",))  # hf:DIR -> its imported run directory
  if config.pmp.path and config.pmp.steps <= 0:
    raise ConfigError(f"pmp.steps={config.pmp.steps}: must be positive when pmp.path is set")
  config = config_checks.inherit_model_config(config)
  if config.pmp.path:
    pmp = config.copy_and_resolve_references()
    with pmp.unlocked():
      pmp.data.path, pmp.train.steps = config.pmp.path, config.pmp.steps
      pmp.data.half, pmp.data.max_examples = "", 0  # those select the human data, not the PMP data
    pmp_dir = storage.join(workdir, "pmp")
    _stage(pmp, pmp_dir)
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.init_from = pmp_dir
  last = _stage(config, workdir)
  report = evaluate_pm(workdir)
  print(json.dumps(report["accuracy"], indent=None))
  return last


def main_factory():
  return loop.config_main(train, "configs/pm.py:tiny")
