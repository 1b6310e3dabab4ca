"""Language-model objectives and their jitted steps: next-token cross-entropy (pretraining, SFT)
and context distillation.

A batch is {'tokens': [batch, seq] int32, 'loss_mask': [batch, seq] float/bool,
'attention_mask': [batch, seq] bool}. loss_mask[b, t] weights the prediction *of* token t
(from the prefix before it), so SFT puts ones on Assistant tokens only.

Context distillation (Askell et al. 2021): the teacher is the frozen initial model reading a
helpful-honest-harmless prompt followed by the dialogue; the student reads the dialogue alone and
is trained to match the teacher's next-token distributions, KL(teacher || student) per token.
A distillation batch adds 'teacher_tokens' / 'teacher_attention_mask' [batch, prefix + seq]: the
same prompt prefix on every row, then the student's tokens.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import sharding as shd
from rlhf_jax.grad_accumulation import accumulated_value_and_grad
from rlhf_jax.model import Transformer
from rlhf_jax.train_state import TrainState, keep_if_finite


def token_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log p(tokens[:, t] | tokens[:, <t]) for t >= 1 -> [batch, seq - 1] float32."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def target_weights(loss_mask: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Weights [batch, seq - 1] of the predictions of tokens 1..seq-1: loss mask times validity."""
  return loss_mask[:, 1:].astype(jnp.float32) * attention_mask[:, 1:]


def lm_loss(params, model: Transformer, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
  """Token-mean negative log-likelihood over loss_mask; returns (loss, metrics)."""
  out = model.apply({"params": params}, batch["tokens"], attention_mask=batch["attention_mask"])
  nll = -token_log_probs(out.logits, batch["tokens"])  # [batch, seq-1]
  weights = target_weights(batch["loss_mask"], batch["attention_mask"])
  num_tokens = jnp.maximum(weights.sum(), 1.0)
  loss = (nll * weights).sum() / num_tokens
  return loss, {"loss": loss, "num_tokens": weights.sum(), "perplexity": jnp.exp(loss)}


def distill_loss(params, teacher_params, model: Transformer,
                 batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
  """Token-mean KL(teacher || student) over loss_mask, in float32."""
  prefix = batch["teacher_tokens"].shape[1] - batch["tokens"].shape[1]
  teacher = model.apply({"params": teacher_params}, batch["teacher_tokens"],
                        attention_mask=batch["teacher_attention_mask"])
  student = model.apply({"params": params}, batch["tokens"], attention_mask=batch["attention_mask"])
  # Teacher position prefix + t and student position t both predict student token t + 1.
  t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher.logits[:, prefix:-1]), axis=-1)
  s_logp = jax.nn.log_softmax(student.logits[:, :-1], axis=-1)
  kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)  # [batch, seq-1]
  weights = target_weights(batch["loss_mask"], batch["attention_mask"])
  loss = (kl * weights).sum() / jnp.maximum(weights.sum(), 1.0)
  nll = -(token_log_probs(student.logits, batch["tokens"]) * weights).sum() / jnp.maximum(weights.sum(), 1.0)
  return loss, {"loss": loss, "kl": loss, "student_nll": nll, "num_tokens": weights.sum()}


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
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            data_position=state.data_position + batch["tokens"].shape[0])
  new_state, skipped = keep_if_finite(new_state, state, metrics["loss"], grad_norm)
  return new_state, dict(metrics, grad_norm=grad_norm, nonfinite=skipped)


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
