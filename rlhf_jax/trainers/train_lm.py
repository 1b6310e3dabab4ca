"""Language-model training: pretraining, SFT and context distillation on hh-rlhf dialogues.

  python -m rlhf_jax train_lm --config=configs/lm.py:tiny [--config.objective=sft] [--workdir=DIR]

Resumable: rerunning the same command continues from the latest checkpoint in the workdir,
bitwise as if it had not stopped. SIGTERM (preemption) saves a checkpoint and exits cleanly.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from rlhf_jax import storage
from rlhf_jax.data.inputs import TrainerData, trainer_data
from rlhf_jax.hf import runs as hf_runs
from rlhf_jax.trainers import config_checks, lm_steps
from rlhf_jax.training import loop
from rlhf_jax.training import sharding as shd


def _distill_batch(batch: dict[str, np.ndarray], prefix: np.ndarray) -> dict[str, np.ndarray]:
  rows = batch["tokens"].shape[0]
  tiled = np.broadcast_to(prefix, (rows, len(prefix)))
  return dict(batch, teacher_tokens=np.concatenate([tiled, batch["tokens"]], axis=1).astype(np.int32),
              teacher_attention_mask=np.concatenate(
                  [np.ones_like(tiled, bool), batch["attention_mask"]], axis=1))


def evaluate(eval_step, params, data: TrainerData, mesh) -> dict[str, float]:
  """Loss and perplexity over the whole eval set (exact token-weighted mean)."""
  nll, count = 0.0, 0.0
  for batch in data.eval.in_order():
    batch.pop("num_valid")  # filler rows are fully masked, so they add nothing to the sums
    out = eval_step(params, shd.shard_batch(batch, mesh))
    nll, count = nll + float(out["nll_sum"]), count + float(out["num_tokens"])
  loss = nll / max(count, 1.0)
  return {"eval_loss": loss, "eval_perplexity": float(np.exp(loss))}


def train(config, workdir: str) -> dict[str, Any]:
  """Trains to config.train.steps (resuming if a checkpoint exists); returns the last metrics."""
  config_checks.validate(config, "lm")
  config = hf_runs.resolve(config, workdir, ("init_from",))  # hf:DIR -> its imported run directory
  config = config_checks.inherit_model_config(config)
  storage.makedirs(workdir)
  data = trainer_data(config, workdir, "lm")
  config_checks.check_batch_fits(len(data.train), config.train.batch_size, "train.batch_size",
                                 "training examples" + (" (packed rows)" if config.objective == "pretrain" else ""))
  s = loop.setup(config, workdir)
  fresh = None if s.ckpt.latest_step() is not None else loop.initial_state(config, s)
  teacher = None
  if config.objective == "distill":  # the frozen initial model, rebuilt identically on resume
    teacher = (fresh if fresh is not None else loop.initial_state(config, s)).params
    teacher = jax.tree.map(lambda x: x.copy(), teacher)  # the step donates the state's buffers
  state = loop.resume_or(s, lambda: fresh)

  train_step = lm_steps.jit_lm_train_step(s.model, s.tx, s.mesh, s.shardings, distill=teacher is not None,
                                    grad_accum=config.train.grad_accum)
  eval_step = lm_steps.jit_lm_eval_step(s.model, s.mesh, s.shardings.params)
  prefix = np.asarray(data.tokenizer.encode(config.distill.prompt), np.int32)

  def step(state, position):
    batch = data.train.batch_at(position)
    if teacher is not None:
      return train_step(state, shd.shard_batch(_distill_batch(batch, prefix), s.mesh), teacher)
    return train_step(state, shd.shard_batch(batch, s.mesh))

  return loop.run_steps(config, workdir, s, state, step=step,
                        evaluate=lambda params: evaluate(eval_step, params, data, s.mesh),
                        desc=f"train_lm {config.objective}",
                        run_info=dict(num_train_examples=len(data.train), num_eval_examples=len(data.eval),
                                      malformed_skipped=data.skipped))


def main_factory():
  return loop.config_main(train, "configs/lm.py:tiny")
