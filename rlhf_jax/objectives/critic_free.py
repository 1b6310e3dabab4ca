"""Critic-free advantage estimators over groups of samples of one prompt (RLOO, GRPO).

Both take one return per sequence, R_i = PM score - kl_coef * sum_t (log pi - log pi_0): the same
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


ADVANTAGES = {"rloo": rloo_advantages, "grpo": grpo_advantages}
