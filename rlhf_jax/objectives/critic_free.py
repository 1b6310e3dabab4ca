"""Critic-free policy gradients over groups of samples of one prompt: RLOO, GRPO and the variants
in use since (Dr. GRPO, GSPO, DAPO): their advantages, GSPO's sequence-level loss and DAPO's
dynamic sampling and overlong penalty.

Every estimator takes one return per sequence, R_i = PM score - kl_coef * sum_t (log pi - log pi_0): the same
KL-penalised reward PPO sums over tokens (rlhf_jax.objectives.ppo.kl_penalized_rewards), so every method
optimises the same objective and is measured on the same KL axis. `group[i]` names the prompt
sequence i was sampled for; groups may be ragged (any sizes, any order). The advantage of a
sequence is given to each of its tokens by the caller.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _group_sums(x: jax.Array, group: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
  """(sum of x, count) of each sequence's group, gathered back to [batch]."""
  total = jax.ops.segment_sum(x, group, num_segments=num_groups)
  count = jax.ops.segment_sum(jnp.ones_like(x), group, num_segments=num_groups)
  return total[group], count[group]


def rloo_advantages(returns: jax.Array, group: jax.Array, num_groups: int) -> jax.Array:
  """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): A_i = R_i - the mean
  return of the other samples of the same prompt. A sample alone in its group has no baseline
  and gets advantage 0 (it carries no comparison)."""
  total, count = _group_sums(returns, group, num_groups)
  others = jnp.maximum(count - 1.0, 1.0)
  return jnp.where(count > 1, returns - (total - returns) / others, 0.0)


def grpo_advantages(returns: jax.Array, group: jax.Array, num_groups: int, eps: float = 1e-6) -> jax.Array:
  """Group-relative advantages (Shao et al. 2024, outcome supervision): A_i = (R_i - mean_g) /
  (std_g + eps), std with Bessel's correction as in their reference code. A group whose returns
  are all equal (std below eps: float rounding of the mean leaves ~1e-9, not 0) or a sample
  alone gets 0, not rounding noise blown up by 1 / eps."""
  total, count = _group_sums(returns, group, num_groups)
  mean = total / count
  sq, _ = _group_sums((returns - mean) ** 2, group, num_groups)
  std = jnp.sqrt(sq / jnp.maximum(count - 1.0, 1.0))
  return jnp.where((count > 1) & (std > eps), (returns - mean) / (std + eps), 0.0)


def dr_grpo_advantages(returns: jax.Array, group: jax.Array, num_groups: int) -> jax.Array:
  """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = R_i - mean_g, no
  division by the group's std (which up-weights prompts whose samples barely differ). A sample
  alone gets 0. Its loss drops the per-sequence length normalisation as well (policy_loss with
  a constant normaliser)."""
  total, count = _group_sums(returns, group, num_groups)
  return jnp.where(count > 1, returns - total / count, 0.0)


def live_groups(scores: jax.Array, group: jax.Array, num_groups: int, eps: float = 1e-6) -> jax.Array:
  """DAPO's dynamic sampling (Yu et al. 2025): True for sequences whose group's rewards are not
  all equal (max - min > eps). A group of equal rewards has zero advantage everywhere and only
  dilutes the token average; DAPO samples more prompts to refill the batch, here its tokens
  leave the loss (and the batch is that much smaller)."""
  high = jax.ops.segment_max(scores, group, num_segments=num_groups)
  low = jax.ops.segment_min(scores, group, num_segments=num_groups)
  return (high - low)[group] > eps


def overlong_penalty(lengths: jax.Array, max_len: int, buffer: int) -> jax.Array:
  """DAPO's soft overlong punishment: 0 up to max_len - buffer tokens, then falling linearly to
  -1 at max_len (and -1 beyond). buffer 0: no penalty."""
  if buffer <= 0:
    return jnp.zeros(lengths.shape, jnp.float32)
  over = lengths.astype(jnp.float32) - (max_len - buffer)
  return -jnp.clip(over / buffer, 0.0, 1.0)


def sequence_policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                         clip_low: float, clip_high: float,
                         weights: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """GSPO (Zheng et al. 2025): one importance ratio per sequence, the geometric mean of its
  tokens' ratios s_i = exp(mean_t (log pi - log pi_old)), clipped to [1 - clip_low, 1 + clip_high];
  loss = mean over sequences of max(-A_i s_i, -A_i clip(s_i)). advantages: [batch] (one per
  sequence). Sequences without tokens are left out. `weights` [batch]: a truncated importance
  weight per sequence (its tokens' geometric mean, as the ratio)."""
  has_tokens = mask.any(axis=1)
  length = jnp.maximum(mask.sum(axis=1), 1)
  log_ratio = jnp.where(mask, logp - old_logp, 0.0).sum(axis=1) / length
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  weight = has_tokens.astype(jnp.float32)
  mean = lambda x: (x * weight).sum() / jnp.maximum(weight.sum(), 1.0)
  surrogate = jnp.maximum(unclipped, clipped)
  if weights is not None:
    surrogate = surrogate * jax.lax.stop_gradient(weights)
  loss = mean(surrogate)
  return loss, {"policy_loss": loss, "clip_fraction": mean((clipped > unclipped).astype(jnp.float32)),
                "approx_kl": mean((ratio - 1.0) - log_ratio)}


ADVANTAGES = {"rloo": rloo_advantages, "grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages,
              "gspo": grpo_advantages, "dapo": grpo_advantages}
