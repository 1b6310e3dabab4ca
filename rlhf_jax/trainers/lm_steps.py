"""The language-model objectives (rlhf_jax.objectives.lm) as jitted, sharded train and eval steps.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax.model.transformer import Transformer
from rlhf_jax.objectives.lm import distill_loss, lm_loss, target_weights, token_log_probs
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.grad_accumulation import accumulated_value_and_grad
from rlhf_jax.training.train_state import TrainState, apply_update


def lm_train_step(state: TrainState, batch: dict[str, jax.Array], *, model: Transformer,
                  tx: optax.GradientTransformation, teacher_params=None, grad_accum: int = 1
                  ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on the LM loss, or on the distillation loss when teacher_params is given; with
  grad_accum > 1 over that many micro-batches, weighted by their token counts (exact)."""
  if teacher_params is None:
    loss_fn = lambda p, b: lm_loss(p, model, b)
  else:
    loss_fn = lambda p, b: distill_loss(p, teacher_params, model, b)
  num_tokens = lambda b: target_weights(b["loss_mask"], b["attention_mask"]).sum()
  (_, metrics), grads = accumulated_value_and_grad(loss_fn, state.params, batch, grad_accum, num_tokens)
  if grad_accum > 1:  # token-weighted means are right for the losses; the count is a sum
    metrics["num_tokens"] = num_tokens(batch)
    if "perplexity" in metrics:
      metrics["perplexity"] = jnp.exp(metrics["loss"])
  new_state, guard = apply_update(state, grads, tx, metrics["loss"], batch["tokens"].shape[0])
  return new_state, dict(metrics, **guard)


def lm_eval_step(params, batch: dict[str, jax.Array], *, model: Transformer) -> dict[str, jax.Array]:
  """Summed NLL and token count, so the caller can average over a whole split exactly."""
  out = model.apply({"params": params}, batch["tokens"], attention_mask=batch["attention_mask"])
  nll = -token_log_probs(out.logits, batch["tokens"])
  weights = target_weights(batch["loss_mask"], batch["attention_mask"])
  return {"nll_sum": (nll * weights).sum(), "num_tokens": weights.sum()}


def jit_lm_train_step(model: Transformer, tx: optax.GradientTransformation, mesh: Mesh,
                      state_shardings: Any, *, distill: bool = False, grad_accum: int = 1):
  """The step jitted once with explicit shardings; the old state's buffers are donated.

  Returns step(state, batch) for LM training, step(state, batch, teacher_params) when distilling.
  """
  if distill:
    step = lambda state, batch, teacher: lm_train_step(state, batch, model=model, tx=tx,
                                                       teacher_params=teacher, grad_accum=grad_accum)
    in_shardings = (state_shardings, shd.batch_sharding(mesh), state_shardings.params)
  else:
    step = lambda state, batch: lm_train_step(state, batch, model=model, tx=tx, grad_accum=grad_accum)
    in_shardings = (state_shardings, shd.batch_sharding(mesh))
  return shd.under_mesh(jax.jit(step, in_shardings=in_shardings,
                                out_shardings=(state_shardings, shd.replicated(mesh)),
                                donate_argnums=(0,)), mesh)


def jit_lm_eval_step(model: Transformer, mesh: Mesh, param_shardings: Any):
  step = lambda params, batch: lm_eval_step(params, batch, model=model)
  return shd.under_mesh(jax.jit(step, in_shardings=(param_shardings, shd.batch_sharding(mesh)),
                                out_shardings=shd.replicated(mesh)), mesh)
