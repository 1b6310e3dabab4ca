"""Direct preference optimisation: the policy trained on comparisons with no reward model.

DPO (Rafailov et al. 2023): with h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)],
the loss is -log sigmoid(beta h); the policy's implicit reward of a response is
beta (log pi(y|x) - log pi_ref(y|x)). IPO (Azar et al. 2023) regresses h to 1 / (2 beta) instead:
(h - 1 / (2 beta))^2, which keeps a finite optimum on deterministic preferences. log pi(y|x) is
summed over the response's tokens (its EOS included), the same sum whose difference with the
reference gives KL(pi || pi_ref) on the sweep's axis.

Batches are the PM's ([batch, 2, seq], chosen first, rlhf_jax.pm_data.PMBatcher) with loss_mask
on the final response only (`encode_pair`); the reference is the frozen initial policy. Trainable
params are {"policy": ...}, as in a PPO run, so every reader of PPO checkpoints (load_policy,
the evaluations, Elo of snapshots) reads a DPO run as it is.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import sharding as shd
from rlhf_jax.batching import Encoded, encode_dialogue
from rlhf_jax.lm import target_weights, token_log_probs
from rlhf_jax.model import Transformer
from rlhf_jax.tokenizer import Tokenizer
from rlhf_jax.train_state import TrainState, keep_if_finite

LOSSES = ("dpo", "ipo")


def encode_pair(tok: Tokenizer, record: dict) -> list[Encoded]:
  """[chosen, rejected] dialogues of an hh-rlhf record with the loss mask on the final response
  (its text and EOS): the shared prompt's tokens are the same prefix in both, encoded turn by
  turn, so nothing but the responses enters the log-probability sums."""
  prompt = encode_dialogue(tok, record["prompt"], assistant_only=True).tokens[:-1]  # without its EOS
  out = []
  for response in (record["chosen_response"], record["rejected_response"]):
    ex = encode_dialogue(tok, record["prompt"] + response, assistant_only=True)
    out.append(Encoded(ex.tokens, [False] * len(prompt) + [True] * (len(ex.tokens) - len(prompt))))
  return out


def sequence_log_probs(params, model: Transformer, batch: dict[str, jax.Array]) -> jax.Array:
  """sum over loss_mask of log p(token | earlier tokens): [batch, K] for [batch, K, seq] inputs."""
  b, k, t = batch["tokens"].shape
  flat = lambda x: x.reshape(b * k, t)
  logits = model.apply({"params": params}, flat(batch["tokens"]), attention_mask=flat(batch["attention_mask"])).logits
  weights = target_weights(flat(batch["loss_mask"]), flat(batch["attention_mask"]))
  return (token_log_probs(logits, flat(batch["tokens"])) * weights).sum(axis=1).reshape(b, k)


def preference_loss(policy_logp: jax.Array, ref_logp: jax.Array, beta, loss: str = "dpo") -> tuple[jax.Array, dict]:
  """Mean DPO / IPO loss over comparisons; logps [batch, 2] (chosen, rejected) summed over each
  response. Metrics: the implicit rewards of both responses, their margin and how often the
  chosen one's is higher."""
  if loss not in LOSSES:
    raise ValueError(f"loss={loss!r}: expected one of {LOSSES}")
  implicit = beta * (policy_logp - ref_logp)  # [batch, 2]
  h = (policy_logp[:, 0] - ref_logp[:, 0]) - (policy_logp[:, 1] - ref_logp[:, 1])
  per_pair = jax.nn.softplus(-beta * h) if loss == "dpo" else (h - 1.0 / (2.0 * beta)) ** 2
  value = per_pair.mean()
  return value, {"loss": value, "implicit_reward_chosen": implicit[:, 0].mean(),
                 "implicit_reward_rejected": implicit[:, 1].mean(),
                 "implicit_margin": (implicit[:, 0] - implicit[:, 1]).mean(),
                 "implicit_accuracy": jnp.mean(h > 0)}


def dpo_train_step(state: TrainState, ref_params, batch: dict[str, jax.Array], beta, *, model: Transformer,
                   tx: optax.GradientTransformation, loss: str):
  """One update of the policy (state.params["policy"]) on a batch of comparisons; ref_params frozen."""
  ref_logp = jax.lax.stop_gradient(sequence_log_probs(ref_params, model, batch))
  loss_fn = lambda p: preference_loss(sequence_log_probs(p["policy"], model, batch), ref_logp, beta, loss)
  (value, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  grad_norm = optax.tree.norm(grads)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state, data_position=state.data_position + batch["tokens"].shape[0])
  new_state, skipped = keep_if_finite(new_state, state, value, grad_norm)
  return new_state, dict(metrics, grad_norm=grad_norm, nonfinite=skipped)


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
