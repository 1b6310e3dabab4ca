"""The jitted halves of a PPO iteration: scoring a rollout, and the minibatch updates.

Sequences are [prompt (left-padded, P) | response (N)]. The policy's logits at position P-1+t
predict response token t, and the value of the state before token t is the value head there.
The PM scores [prompt | response | EOC] read at the EOC token it was trained with.

Trainable params are {"policy": ..., "value": ...}; with a shared trunk "value" is absent and
the policy's own scalar head is the value head. The critic-free algorithms (hyper.algorithm
"rloo", "grpo", "dr_grpo", "gspo", "dapo"; rlhf_jax.objectives.critic_free) differ in their
advantages (one per sequence, from the group of samples of its prompt), have no value loss, and
differ among themselves only where their papers do: Dr. GRPO's loss normaliser, GSPO's sequence
ratio, DAPO's dynamic sampling. Sampling, scoring, the KL-penalised reward, the clipped surrogate
and the minibatch loop are the same code for every algorithm; clip-higher (clip_eps_high) and the
overlong penalty (overlong_buffer) are options of all of them.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.model import lora
from rlhf_jax.model.transformer import Transformer, read_at
from rlhf_jax.objectives import critic_free, ppo
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.train_state import TrainState, keep_if_finite


class Models(NamedTuple):
  policy: Transformer
  value: Transformer  # the policy itself when the trunk is shared
  pm: Transformer


class PPOHyper(NamedTuple):
  gamma: float
  lam: float
  clip_eps: float
  value_clip_eps: float
  vf_coef: float
  entropy_coef: float
  epochs: int
  num_minibatches: int
  whiten_advantages: bool  # PPO's GAE advantages only; RLOO's and GRPO's are used as they are
  algorithm: str = "ppo"  # "ppo" | one of critic_free.ADVANTAGES
  samples_per_prompt: int = 1  # rollout rows i*k .. i*k+k-1 share one prompt (the groups)
  clip_eps_high: float = 0.0  # the ratio's upper clip (DAPO's clip-higher); 0: clip_eps
  overlong_buffer: int = 0  # DAPO's soft overlong penalty over the last this many tokens; 0: none
  tis_cap: float = 0.0  # truncated importance sampling of the sampler's tokens, weights <= this; 0: off


ALGORITHMS = ("ppo",) + tuple(critic_free.ADVANTAGES)


def _response_outputs(model: Transformer, params, tokens, mask, prompt_len: int, lm_head: bool):
  out = model.apply({"params": params}, tokens, attention_mask=mask, lm_head=lm_head)
  n = tokens.shape[1] - prompt_len
  logits = None if out.logits is None else out.logits[:, prompt_len - 1:prompt_len - 1 + n]
  return logits, out.scalar[:, prompt_len - 1:prompt_len - 1 + n]


def _token_logp(logits, tokens):
  return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[..., None], axis=-1)[..., 0]


def pm_score(pm_model: Transformer, pm_params, prompt, prompt_mask, response, response_mask, eoc_id: int):
  """Raw PM scores [batch] of [prompt | response | EOC]."""
  b, n = response.shape
  tokens = jnp.concatenate([prompt, response, jnp.zeros((b, 1), response.dtype)], axis=1)
  mask = jnp.concatenate([prompt_mask, response_mask, jnp.zeros((b, 1), bool)], axis=1)
  eoc = prompt.shape[1] + response_mask.sum(axis=1)
  tokens = tokens.at[jnp.arange(b), eoc].set(eoc_id)
  mask = mask.at[jnp.arange(b), eoc].set(True)
  out = pm_model.apply({"params": pm_params}, tokens, attention_mask=mask, lm_head=False)
  return read_at(out.scalar, eoc)


# pm_score as one program per PM and shape, for callers outside a jitted step (gold labels,
# best-of-N): op by op, each of its ops compiled on its own.
pm_score_jitted = jax.jit(pm_score, static_argnums=(0, 6))


def joined(params, frozen):
  """The trained models' whole params: with LoRA, each model's adapters and heads over its frozen
  base (frozen = {"policy": ..., "value": ...}); without, params themselves (frozen None)."""
  if frozen is None:
    return params
  return {k: lora.join(frozen[k], v) for k, v in params.items()}


def score_rollout(params, ref_params, pm_params, gen, kl_coef, score_mean, score_std, frozen=None, *, models: Models,
                  hyper: PPOHyper, eoc_id: int) -> dict[str, jax.Array]:
  """Everything the updates need, computed once with the rollout policy: log-probs of policy and
  reference, values, PM score, KL-penalised rewards, advantages and returns. With LoRA the
  reference is the policy's base with its adapters switched off: ref_params are frozen["policy"]."""
  params = joined(params, frozen)
  p = gen.prompt_tokens.shape[1]
  tokens = jnp.concatenate([gen.prompt_tokens, gen.tokens], axis=1)
  mask = jnp.concatenate([gen.prompt_mask, gen.mask], axis=1)
  logits, values = _response_outputs(models.policy, params["policy"], tokens, mask, p, True)
  if "value" in params:
    _, values = _response_outputs(models.value, params["value"], tokens, mask, p, False)
  ref_logits, _ = _response_outputs(models.policy, ref_params, tokens, mask, p, True)
  # Zero at padding, like the sampler's log-probs: nothing there can reach a loss.
  logp = jnp.where(gen.mask, _token_logp(logits, gen.tokens), 0.0)
  ref_logp = jnp.where(gen.mask, _token_logp(ref_logits, gen.tokens), 0.0)
  values = jnp.where(gen.mask, values, 0.0)
  raw = pm_score(models.pm, pm_params, gen.prompt_tokens, gen.prompt_mask, gen.tokens, gen.mask, eoc_id)
  score = (raw - score_mean) / score_std
  extra = {}
  if hyper.overlong_buffer:
    penalty = critic_free.overlong_penalty(gen.mask.sum(axis=1), gen.mask.shape[1], hyper.overlong_buffer)
    score, extra["overlong_penalty"] = score + penalty, penalty.mean()
  rewards = ppo.kl_penalized_rewards(logp, ref_logp, score, gen.mask, kl_coef)
  advantages, returns, spread = _advantages(rewards, values, gen.mask, hyper)
  kl = ppo.sequence_kl(logp, ref_logp, gen.mask)
  metrics = {"pm_reward_raw": raw.mean(), "pm_reward": score.mean(), "kl": kl.mean(),
             "sqrt_kl": jnp.sqrt(jnp.maximum(kl.mean(), 0.0)), "entropy": ppo.entropy(logits, gen.mask),
             "response_length": gen.mask.sum(axis=1).mean(), "kl_coef": jnp.asarray(kl_coef, jnp.float32),
             "total_reward": (rewards * gen.mask).sum(axis=1).mean(), "advantage_std": spread, **extra}
  rollout = {"tokens": tokens, "mask": mask, "response": gen.tokens, "response_mask": gen.mask,
             "old_logp": logp, "old_values": values, "advantages": advantages, "returns": returns}
  metrics.update(_sampler_gap(logp, gen, hyper, rollout))
  if hyper.algorithm == "dapo":  # dynamic sampling: groups of equal rewards leave the loss
    batch = score.shape[0]
    live = critic_free.live_groups(score, jnp.arange(batch) // hyper.samples_per_prompt,
                                   batch // hyper.samples_per_prompt)
    rollout["loss_mask"] = gen.mask & live[:, None]
    metrics["live_fraction"] = live.mean()
  return rollout, metrics


def _sampler_gap(logp, gen, hyper: PPOHyper, rollout: dict) -> dict:
  """|log p_sampler - log p_learner| over response tokens: the sampler (a KV-cache decode, maybe
  at another temperature) and the learner's forward are different programs. With hyper.tis_cap,
  adds the truncated importance weights to the rollout (per token; per sequence for GSPO)."""
  gap = jnp.where(gen.mask, jnp.abs(gen.log_probs - logp), 0.0)
  out = {"sampler_logp_gap_mean": ppo.masked_mean(gap, gen.mask), "sampler_logp_gap_max": gap.max()}
  if hyper.tis_cap:
    if hyper.algorithm == "gspo":  # the geometric mean of its tokens' weights, as GSPO's ratio
      log_w = jnp.where(gen.mask, logp - gen.log_probs, 0.0).sum(axis=1) / jnp.maximum(gen.mask.sum(axis=1), 1)
      weight, real = jnp.minimum(jnp.exp(log_w), hyper.tis_cap), gen.mask.any(axis=1)
    else:
      weight, real = ppo.tis_weights(logp, gen.log_probs, gen.mask, hyper.tis_cap), gen.mask
    rollout["tis_weight"] = weight
    out["tis_weight_mean"] = ppo.masked_mean(weight, real)
    out["tis_truncated_fraction"] = ppo.masked_mean((weight >= hyper.tis_cap).astype(jnp.float32), real)
  return out


def _advantages(rewards, values, mask, hyper: PPOHyper) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(advantages, returns) [batch, T] and their spread (a reward-hacking monitor). PPO: GAE, and
  the std of the advantages over response tokens before whitening. RLOO / GRPO: the sequence's
  group-relative advantage of its KL-penalised return on every one of its tokens (returns unused:
  no critic), and the mean within-group std of those returns, which GRPO's normalised advantages
  would hide (their std is sqrt((k - 1) / k) whatever the rewards)."""
  if hyper.algorithm == "ppo":
    advantages, returns = ppo.gae_advantages(rewards, values, mask, hyper.gamma, hyper.lam)
    spread = jnp.sqrt(ppo.masked_mean((advantages - ppo.masked_mean(advantages, mask)) ** 2, mask))
    return (ppo.whiten(advantages, mask) if hyper.whiten_advantages else advantages), returns, spread
  batch = rewards.shape[0]
  group = jnp.arange(batch) // hyper.samples_per_prompt
  seq_returns = rewards.sum(axis=1)
  seq_adv = critic_free.ADVANTAGES[hyper.algorithm](seq_returns, group, batch // hyper.samples_per_prompt)
  spread = seq_returns.reshape(-1, hyper.samples_per_prompt).std(axis=1).mean()  # rows i*k..i*k+k-1: one group
  return jnp.where(mask, seq_adv[:, None], 0.0), jnp.zeros_like(rewards), spread


def _policy_loss(logp, mb: dict[str, jax.Array], hyper: PPOHyper) -> tuple[jax.Array, dict]:
  high = hyper.clip_eps_high or hyper.clip_eps
  mask = mb.get("loss_mask", mb["response_mask"])
  weights = mb.get("tis_weight")
  if hyper.algorithm == "gspo":  # a sequence's advantage sits on each of its tokens; token 0 is real if any is
    return critic_free.sequence_policy_loss(logp, mb["old_logp"], mb["advantages"][:, 0], mask, hyper.clip_eps, high,
                                            weights)
  # Dr. GRPO: the minibatch's token sum over sequences x the response budget, a constant.
  normaliser = mask.shape[0] * mask.shape[1] if hyper.algorithm == "dr_grpo" else None
  return ppo.policy_loss(logp, mb["old_logp"], mb["advantages"], mask, hyper.clip_eps,
                         None if high == hyper.clip_eps else high, normaliser, weights)


def ppo_loss(params, mb: dict[str, jax.Array], *, models: Models, hyper: PPOHyper, prompt_len: int):
  logits, values = _response_outputs(models.policy, params["policy"], mb["tokens"], mb["mask"],
                                     prompt_len, True)
  if "value" in params:
    _, values = _response_outputs(models.value, params["value"], mb["tokens"], mb["mask"], prompt_len, False)
  m = mb["response_mask"]
  logp = _token_logp(logits, mb["response"])
  pg, pg_metrics = _policy_loss(logp, mb, hyper)
  ent = ppo.entropy(logits, m)
  loss = pg - hyper.entropy_coef * ent
  if hyper.algorithm != "ppo":  # no critic: the policy's scalar head is left untrained
    return loss, {**pg_metrics, "update_entropy": ent}
  vf, vf_metrics = ppo.value_loss(values, mb["old_values"], mb["returns"], m, hyper.value_clip_eps)
  return loss + hyper.vf_coef * vf, {**pg_metrics, **vf_metrics, "update_entropy": ent}


def ppo_update(state: TrainState, rollout: dict[str, jax.Array], rng: jax.Array, frozen=None, *, models: Models,
               hyper: PPOHyper, tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
  """hyper.epochs passes over the rollout in hyper.num_minibatches shuffled minibatches, as one
  lax.scan of optimizer steps; metrics are averaged over the minibatch steps. state.step counts
  PPO iterations and is left to the caller."""
  batch = rollout["tokens"].shape[0]
  prompt_len = rollout["tokens"].shape[1] - rollout["response"].shape[1]
  mb_size = batch // hyper.num_minibatches
  perms = jnp.stack([jax.random.permutation(k, batch) for k in jax.random.split(rng, hyper.epochs)])
  order = perms.reshape(hyper.epochs * hyper.num_minibatches, mb_size)

  def one(state, idx):
    mb = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), rollout)
    loss_fn = lambda p: ppo_loss(joined(p, frozen), mb, models=models, hyper=hyper, prompt_len=prompt_len)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    new = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    new, skipped = keep_if_finite(new, state, loss, grad_norm)
    return new, dict(metrics, grad_norm=grad_norm, nonfinite=skipped)

  state, metrics = jax.lax.scan(one, state, order)
  skipped = metrics.pop("nonfinite").sum()  # minibatch updates skipped (non-finite): 0 normally
  return state, dict(jax.tree.map(jnp.mean, metrics), nonfinite=skipped)


def jit_ppo_steps(models: Models, hyper: PPOHyper, tx: optax.GradientTransformation, mesh,
                  state_shardings: Any, ref_shardings: Any, pm_shardings: Any, *, eoc_id: int,
                  frozen_shardings: Any = None):
  """(score, update) jitted once with explicit shardings, so that the state keeps its layout from
  one iteration to the next (no recompilation, and a resumed run runs the same programs):
  score(params, ref_params, pm_params, gen, kl_coef, mean, std, frozen) and
  update(state, rollout, rng, frozen), frozen None unless LoRA (and never donated)."""
  batch, rep = shd.batch_sharding(mesh), shd.replicated(mesh)
  score = jax.jit(functools.partial(score_rollout, models=models, hyper=hyper, eoc_id=eoc_id),
                  in_shardings=(state_shardings.params, ref_shardings, pm_shardings, batch, rep, rep, rep,
                                frozen_shardings),
                  out_shardings=(batch, rep))
  update = jax.jit(functools.partial(ppo_update, models=models, hyper=hyper, tx=tx),
                   in_shardings=(state_shardings, batch, rep, frozen_shardings), out_shardings=(state_shardings, rep),
                   donate_argnums=(0,))
  return shd.under_mesh(score, mesh), shd.under_mesh(update, mesh)
