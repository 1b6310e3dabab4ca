"""PPO maths for RLHF as small pure functions on [batch, response_len] arrays (PureJaxRL style).

Conventions: index t runs over response tokens; mask[b, t] is True for real response tokens
(up to and including EOS). All reductions are masked means over real tokens; padding and
positions after EOS never contribute.

Reward (Bai et al. 2022, eq. 4.1; Ziegler et al. 2019): per token
  r_t = -kl_coef * (log pi(a_t|s_t) - log pi_0(a_t|s_t)),
plus the (normalised) preference-model score on the last real token.
The KL that is logged (and read by the scaling experiments) is the per-sequence sum
sum_t (log pi - log pi_0) over response tokens, averaged over sequences: the standard "k1"
Monte-Carlo estimator, unbiased for KL(pi || pi_0) because the responses are sampled from pi.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(x.dtype)
  return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
  """(x - mean) / std over masked entries (std with Bessel's correction, as is usual)."""
  mean = masked_mean(x, mask)
  n = jnp.maximum(mask.sum(), 2.0)
  var = ((x - mean) ** 2 * mask).sum() / (n - 1)
  out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  return jnp.where(mask, out if shift_mean else out + mean, 0.0)


def last_token_index(mask: jax.Array) -> jax.Array:
  """Index of the last True in each row of mask [batch, T] (0 for an empty row)."""
  t = jnp.arange(mask.shape[1])
  return jnp.max(jnp.where(mask, t, 0), axis=1)


def kl_penalized_rewards(logp: jax.Array, ref_logp: jax.Array, score: jax.Array, mask: jax.Array,
                         kl_coef) -> jax.Array:
  """Per-token rewards [batch, T]: -kl_coef * log-ratio, and score [batch] added at the last
  real token of each response."""
  rewards = jnp.where(mask, -kl_coef * (logp - ref_logp), 0.0)
  last = last_token_index(mask)
  has_tokens = mask.any(axis=1)
  return rewards.at[jnp.arange(mask.shape[0]), last].add(jnp.where(has_tokens, score, 0.0))


def sequence_kl(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array) -> jax.Array:
  """k1 estimate of KL(pi || pi_0) per sequence [batch]: sum of log-ratios over real tokens."""
  return jnp.where(mask, logp - ref_logp, 0.0).sum(axis=1)


def gae_advantages(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float,
                   lam: float) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

  The episode ends after the last real token (bootstrap value 0). Returns (advantages, returns)
  [batch, T], zero at masked positions; returns = advantages + values.
  """
  mask = mask.astype(rewards.dtype)

  def backward(carry, xs):
    next_value, next_adv = carry
    r, v, m = xs
    delta = r + gamma * next_value - v
    adv = delta + gamma * lam * next_adv
    # A masked step passes nothing back: values and advantages beyond the end are 0.
    return (v * m, adv * m), adv * m

  xs = (rewards.T, values.T, mask.T)  # scan over time
  init = (jnp.zeros(rewards.shape[0], rewards.dtype), jnp.zeros(rewards.shape[0], rewards.dtype))
  _, adv = jax.lax.scan(backward, init, xs, reverse=True)
  adv = adv.T
  return adv, (adv + values) * mask


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip_eps: float, clip_eps_high: Optional[float] = None,
                normaliser: Optional[float] = None, weights: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """Clipped surrogate (Schulman et al. 2017): mean over tokens of
  max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high)), eps_high = eps unless given (DAPO's
  clip-higher). The mean is over the minibatch's real tokens, every token weighing alike (DAPO's
  token-level average); a `normaliser` instead divides their sum by that constant (Dr. GRPO:
  sequences x the response budget, so a sequence's weight does not fall with its length).
  `weights` [batch, T] multiply each token's term (truncated importance sampling, see tis_weights)."""
  # Masked before the exp: junk log-probs at padding must not overflow into inf * 0 = NaN.
  log_ratio = jnp.where(mask, logp - old_logp, 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  high = clip_eps if clip_eps_high is None else clip_eps_high
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
  surrogate = jnp.maximum(unclipped, clipped)
  if weights is not None:
    surrogate = surrogate * jax.lax.stop_gradient(weights)
  if normaliser is None:
    loss = masked_mean(surrogate, mask)
  else:
    loss = jnp.where(mask, surrogate, 0.0).sum() / normaliser
  metrics = {
      "policy_loss": loss,
      "clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
      # Between the rollout policy and the current one (Schulman's k3, low variance, >= 0).
      "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
  }
  return loss, metrics


def tis_weights(learner_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array, cap: float) -> jax.Array:
  """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings
  you off-policy RL training"): min(p_learner / p_sampler, cap) per token [batch, T], 0 at padding.
  The sampler (another program: a KV-cache decode, another precision or temperature) drew the
  tokens; the learner's log-probs of the same tokens are what the surrogate's ratio starts from,
  so this weight makes its gradient the learner's on-policy one again, its variance bounded by cap."""
  log_w = jnp.where(mask, learner_logp - sampler_logp, 0.0)
  return jnp.where(mask, jnp.minimum(jnp.exp(log_w), cap), 0.0)


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip_eps: float) -> tuple[jax.Array, dict]:
  """Clipped value loss: 0.5 * mean of max((v - R)^2, (v_clipped - R)^2), where v_clipped stays
  within clip_eps of the rollout's value."""
  clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
  loss = 0.5 * masked_mean(jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
  # Clipped: the value moved beyond clip_eps and the clipped term is the one the max takes. Comparing
  # the two squared errors alone counts tokens whose terms differ only by rounding (|v - old| < eps,
  # so `clipped` is v recomputed as old + (v - old)).
  active = (jnp.abs(values - old_values) > clip_eps) & ((clipped - returns) ** 2 > (values - returns) ** 2)
  return loss, {"value_loss": loss, "value_clip_fraction": masked_mean(active.astype(jnp.float32), mask)}


def entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean per-token entropy of the policy's next-token distributions."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return masked_mean(-(jnp.exp(logp) * logp).sum(-1), mask)


def adaptive_kl_coef(kl_coef, observed_kl, num_samples: int, target: float, horizon: float):
  """Ziegler et al. 2019: kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""
  error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
  return kl_coef * (1.0 + error * num_samples / horizon)
