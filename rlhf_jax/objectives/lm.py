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

import jax
import jax.numpy as jnp

from rlhf_jax.model.transformer import Transformer


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


