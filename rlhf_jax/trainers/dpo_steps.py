"""DPO / IPO (rlhf_jax.objectives.dpo) as jitted, sharded train and eval steps.
"""
from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import Mesh

from rlhf_jax.model.transformer import Transformer
from rlhf_jax.objectives.dpo import preference_loss, sequence_log_probs
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.train_state import TrainState, apply_update


def dpo_train_step(state: TrainState, ref_params, batch: dict[str, jax.Array], beta, *, model: Transformer,
                   tx: optax.GradientTransformation, loss: str):
  """One update of the policy (state.params["policy"]) on a batch of comparisons; ref_params frozen."""
  ref_logp = jax.lax.stop_gradient(sequence_log_probs(ref_params, model, batch))
  loss_fn = lambda p: preference_loss(sequence_log_probs(p["policy"], model, batch), ref_logp, beta, loss)
  (value, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, guard = apply_update(state, grads, tx, value, batch["tokens"].shape[0])
  return new_state, dict(metrics, **guard)


def jit_dpo_train_step(model: Transformer, tx: optax.GradientTransformation, mesh: Mesh, state_shardings: Any,
                       ref_shardings: Any, *, loss: str = "dpo"):
  """step(state, ref_params, batch, beta) -> (state, metrics); beta is an argument, not a
  constant, so one compiled program serves every beta of a sweep."""
  step = lambda state, ref, batch, beta: dpo_train_step(state, ref, batch, beta, model=model, tx=tx, loss=loss)
  rep = shd.replicated(mesh)
  return shd.under_mesh(jax.jit(step, in_shardings=(state_shardings, ref_shardings, shd.batch_sharding(mesh), rep),
                                out_shardings=(state_shardings, rep), donate_argnums=(0,)), mesh)


def jit_dpo_eval_step(model: Transformer, mesh: Mesh, param_shardings: Any):
  """(params, ref_params, batch) -> (policy, reference) log-prob sums [batch, 2], replicated."""
  step = lambda params, ref, batch: (sequence_log_probs(params, model, batch), sequence_log_probs(ref, model, batch))
  return shd.under_mesh(jax.jit(step, in_shardings=(param_shardings, param_shardings, shd.batch_sharding(mesh)),
                                out_shardings=shd.replicated(mesh)), mesh)
