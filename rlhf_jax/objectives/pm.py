"""Preference-model objective (Bai et al. 2022, section 3): scores read at the end-of-context
token, loss -log sigmoid(r_chosen - r_rejected), and its jitted, sharded train/eval steps.

A PM batch holds K >= 2 responses per comparison, best first:
  tokens [batch, K, seq] int32, attention_mask [batch, K, seq] bool, eoc_index [batch, K] int32
(the position of the end-of-context token that closes each sequence), and loss_mask
[batch, K, seq] for the optional LM loss on the preferred (k = 0) sequence.
With K = 2 the ranked loss is the paper's pairwise loss; with K > 2 it averages the pairwise
loss over every ordered pair (i better than j), as for ranked data in Ziegler et al. 2019.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.model.transformer import Transformer, read_at
from rlhf_jax.objectives.lm import target_weights, token_log_probs


def preference_loss(r_better: jax.Array, r_worse: jax.Array) -> jax.Array:
  """-log sigmoid(r_better - r_worse), elementwise, computed stably as softplus(-(difference))."""
  return jax.nn.softplus(r_worse - r_better)


def ranked_loss(scores: jax.Array) -> jax.Array:
  """scores [batch, K] in preference order -> mean pairwise loss over pairs i < j, per row."""
  k = scores.shape[1]
  i, j = jnp.triu_indices(k, 1)
  return preference_loss(scores[:, i], scores[:, j]).mean(axis=1)


def pm_scores(params, model: Transformer, batch: dict[str, jax.Array], *, lm_head: bool = False, rngs=None):
  """Scores [batch, K] at the end-of-context tokens (and the model output, for the LM loss)."""
  b, k, t = batch["tokens"].shape
  out = model.apply({"params": params}, batch["tokens"].reshape(b * k, t),
                    attention_mask=batch["attention_mask"].reshape(b * k, t), lm_head=lm_head, rngs=rngs)
  scores = read_at(out.scalar, batch["eoc_index"].reshape(b * k)).reshape(b, k)
  return scores, out


def pm_loss(params, model: Transformer, batch: dict[str, jax.Array], *,
            lm_weight: float = 0.0, rngs=None) -> tuple[jax.Array, dict]:
  scores, out = pm_scores(params, model, batch, lm_head=lm_weight > 0, rngs=rngs)
  pref = ranked_loss(scores).mean()
  metrics = pm_metrics(scores)
  loss = pref
  if lm_weight > 0:
    b, k, t = batch["tokens"].shape
    logits = out.logits.reshape(b, k, t, -1)[:, 0]  # the preferred sequence only
    tokens = batch["tokens"][:, 0]
    weights = target_weights(batch["loss_mask"][:, 0], batch["attention_mask"][:, 0])
    lm = -(token_log_probs(logits, tokens) * weights).sum() / jnp.maximum(weights.sum(), 1.0)
    loss = pref + lm_weight * lm
    metrics["lm_loss"] = lm
  metrics.update(loss=loss, preference_loss=pref)
  return loss, metrics


def pm_metrics(scores: jax.Array) -> dict[str, jax.Array]:
  """Pairwise accuracy (best beats second: r_0 > r_1; ties count as wrong), mean score, margin."""
  margin = scores[:, 0] - scores[:, 1]
  return {"accuracy": jnp.mean(margin > 0), "mean_score": scores.mean(), "margin": margin.mean()}


