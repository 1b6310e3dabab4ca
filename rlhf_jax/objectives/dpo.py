"""Direct preference optimisation: the policy trained on comparisons with no reward model.

DPO (Rafailov et al. 2023): with h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)],
the loss is -log sigmoid(beta h); the policy's implicit reward of a response is
beta (log pi(y|x) - log pi_ref(y|x)). IPO (Azar et al. 2023) regresses h to 1 / (2 beta) instead:
(h - 1 / (2 beta))^2, which keeps a finite optimum on deterministic preferences. SLiC (Zhao et al.
2023, in the reference-relative form of Rafailov et al. 2024) is the hinge max(0, 1 - beta h): no
gradient once a pair's margin passes 1 / beta. log pi(y|x) is
summed over the response's tokens (its EOS included), the same sum whose difference with the
reference gives KL(pi || pi_ref) on the sweep's axis.

Batches are the PM's ([batch, 2, seq], chosen first, rlhf_jax.data.pm_data.PMBatcher) with loss_mask
on the final response only (`encode_pair`); the reference is the frozen initial policy. Trainable
params are {"policy": ...}, as in a PPO run, so every reader of PPO checkpoints (load_policy,
the evaluations, Elo of snapshots) reads a DPO run as it is.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.model.transformer import Transformer
from rlhf_jax.objectives.lm import target_weights, token_log_probs

LOSSES = ("dpo", "ipo", "slic")


def sequence_log_probs(params, model: Transformer, batch: dict[str, jax.Array]) -> jax.Array:
  """sum over loss_mask of log p(token | earlier tokens): [batch, K] for [batch, K, seq] inputs."""
  b, k, t = batch["tokens"].shape
  flat = lambda x: x.reshape(b * k, t)
  logits = model.apply({"params": params}, flat(batch["tokens"]), attention_mask=flat(batch["attention_mask"])).logits
  weights = target_weights(flat(batch["loss_mask"]), flat(batch["attention_mask"]))
  return (token_log_probs(logits, flat(batch["tokens"])) * weights).sum(axis=1).reshape(b, k)


def preference_loss(policy_logp: jax.Array, ref_logp: jax.Array, beta, loss: str = "dpo") -> tuple[jax.Array, dict]:
  """Mean DPO / IPO / SLiC loss over comparisons; logps [batch, 2] (chosen, rejected) summed over each
  response. Metrics: the implicit rewards of both responses, their margin and how often the
  chosen one's is higher."""
  if loss not in LOSSES:
    raise ValueError(f"loss={loss!r}: expected one of {LOSSES}")
  implicit = beta * (policy_logp - ref_logp)  # [batch, 2]
  h = (policy_logp[:, 0] - ref_logp[:, 0]) - (policy_logp[:, 1] - ref_logp[:, 1])
  if loss == "dpo":
    per_pair = jax.nn.softplus(-beta * h)
  elif loss == "ipo":
    per_pair = (h - 1.0 / (2.0 * beta)) ** 2
  else:
    per_pair = jax.nn.relu(1.0 - beta * h)
  value = per_pair.mean()
  return value, {"loss": value, "implicit_reward_chosen": implicit[:, 0].mean(),
                 "implicit_reward_rejected": implicit[:, 1].mean(),
                 "implicit_margin": (implicit[:, 0] - implicit[:, 1]).mean(),
                 "implicit_accuracy": jnp.mean(h > 0)}


