"""Language-model objective: masked next-token cross-entropy, and its jitted train/eval steps.

A batch is {'tokens': [batch, seq] int32, 'loss_mask': [batch, seq] float/bool,
'attention_mask': [batch, seq] bool}. loss_mask[b, t] weights the prediction *of* token t
(from the prefix before it), so SFT puts ones on Assistant tokens only.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import sharding as shd
from rlhf_jax.model import Transformer
from rlhf_jax.train_state import TrainState


def token_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log p(tokens[:, t] | tokens[:, <t]) for t >= 1 -> [batch, seq - 1] float32."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def lm_loss(params, model: Transformer, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
  """Token-mean negative log-likelihood over loss_mask; returns (loss, metrics)."""
  out = model.apply({"params": params}, batch["tokens"], attention_mask=batch["attention_mask"])
  nll = -token_log_probs(out.logits, batch["tokens"])  # [batch, seq-1]
  weights = batch["loss_mask"][:, 1:].astype(jnp.float32) * batch["attention_mask"][:, 1:]
  num_tokens = jnp.maximum(weights.sum(), 1.0)
  loss = (nll * weights).sum() / num_tokens
  return loss, {"loss": loss, "num_tokens": weights.sum(), "perplexity": jnp.exp(loss)}


def lm_train_step(state: TrainState, batch: dict[str, jax.Array], *, model: Transformer,
                  tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
  (_, metrics), grads = jax.value_and_grad(lm_loss, has_aux=True)(state.params, model, batch)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            data_position=state.data_position + batch["tokens"].shape[0])
  return new_state, metrics


def lm_eval_step(params, batch: dict[str, jax.Array], *, model: Transformer) -> dict[str, jax.Array]:
  """Summed NLL and token count, so the caller can average over a whole split exactly."""
  out = model.apply({"params": params}, batch["tokens"], attention_mask=batch["attention_mask"])
  nll = -token_log_probs(out.logits, batch["tokens"])
  weights = batch["loss_mask"][:, 1:].astype(jnp.float32) * batch["attention_mask"][:, 1:]
  return {"nll_sum": (nll * weights).sum(), "num_tokens": weights.sum()}


def jit_lm_train_step(model: Transformer, tx: optax.GradientTransformation, mesh: Mesh,
                      state_shardings: Any):
  """The LM step jitted once with explicit shardings; the old state's buffers are donated."""
  step = lambda state, batch: lm_train_step(state, batch, model=model, tx=tx)
  return shd.under_mesh(jax.jit(step, in_shardings=(state_shardings, shd.batch_sharding(mesh)),
                                out_shardings=(state_shardings, shd.replicated(mesh)),
                                donate_argnums=(0,)), mesh)


def jit_lm_eval_step(model: Transformer, mesh: Mesh, param_shardings: Any):
  step = lambda params, batch: lm_eval_step(params, batch, model=model)
  return shd.under_mesh(jax.jit(step, in_shardings=(param_shardings, shd.batch_sharding(mesh)),
                                out_shardings=shd.replicated(mesh)), mesh)
