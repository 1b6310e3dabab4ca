"""The preference-model objective (rlhf_jax.objectives.pm) as jitted, sharded train and score steps.
"""
from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import Mesh

from rlhf_jax.model import lora
from rlhf_jax.model.transformer import Transformer
from rlhf_jax.objectives.pm import pm_loss, pm_scores
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.grad_accumulation import accumulated_value_and_grad
from rlhf_jax.training.train_state import TrainState, apply_update


def pm_train_step(state: TrainState, batch: dict[str, jax.Array], frozen: Any = None, *, model: Transformer,
                  tx: optax.GradientTransformation, lm_weight: float = 0.0, grad_accum: int = 1):
  """One update; with grad_accum > 1 over that many equal micro-batches of comparisons (exact for
  the preference loss; the optional LM term becomes a mean of micro-batch token means). With LoRA,
  state.params are the adapters and heads over the `frozen` base (rlhf_jax.model.lora), and LoRA
  dropout draws from the state's RNG folded with the step."""
  rngs = None
  if model.lora is not None and model.lora.dropout > 0:
    rngs = {"dropout": jax.random.fold_in(state.rng, state.step)}
  loss_fn = lambda p, b: pm_loss(lora.join(frozen, p), model, b, lm_weight=lm_weight, rngs=rngs)
  (_, metrics), grads = accumulated_value_and_grad(loss_fn, state.params, batch, grad_accum)
  new_state, guard = apply_update(state, grads, tx, metrics["loss"], batch["tokens"].shape[0])
  return new_state, dict(metrics, **guard)


def jit_pm_train_step(model: Transformer, tx: optax.GradientTransformation, mesh: Mesh,
                      state_shardings: Any, *, lm_weight: float = 0.0, grad_accum: int = 1,
                      frozen_shardings: Any = None):
  """step(state, batch[, frozen]) jitted; `frozen` (a LoRA run's base) is an argument, not a
  constant of the program, and is not donated."""
  step = lambda state, batch, frozen: pm_train_step(state, batch, frozen, model=model, tx=tx,
                                                    lm_weight=lm_weight, grad_accum=grad_accum)
  jitted = shd.under_mesh(jax.jit(step, in_shardings=(state_shardings, shd.batch_sharding(mesh), frozen_shardings),
                                  out_shardings=(state_shardings, shd.replicated(mesh)),
                                  donate_argnums=(0,)), mesh)
  return lambda state, batch, frozen=None: jitted(state, batch, frozen)


def jit_pm_score_step(model: Transformer, mesh: Mesh, param_shardings: Any):
  """params, batch -> scores [batch, K] (replicated), for evaluation and reward computation."""
  step = lambda params, batch: pm_scores(params, model, batch)[0]
  return shd.under_mesh(jax.jit(step, in_shardings=(param_shardings, shd.batch_sharding(mesh)),
                                out_shardings=shd.replicated(mesh)), mesh)
