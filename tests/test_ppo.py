"""PPO maths against float64 numpy loop references."""
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import ppo

B, T = 5, 9


def _data(seed):
  rng = np.random.default_rng(seed)
  lengths = np.array([9, 4, 1, 6, 0])  # a full row, short rows and an empty response
  mask = np.arange(T)[None, :] < lengths[:, None]
  return rng, mask, lengths


def test_kl_penalized_rewards_match_loop():
  rng, mask, lengths = _data(0)
  logp, ref = rng.normal(size=(B, T)), rng.normal(size=(B, T))
  score, coef = rng.normal(size=B), 0.1
  expected = np.zeros((B, T))
  for b in range(B):
    for t in range(lengths[b]):
      expected[b, t] = -coef * (logp[b, t] - ref[b, t])
    if lengths[b]:
      expected[b, lengths[b] - 1] += score[b]
  got = ppo.kl_penalized_rewards(jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(score), mask, coef)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
  kl = ppo.sequence_kl(jnp.asarray(logp), jnp.asarray(ref), mask)
  np.testing.assert_allclose(np.asarray(kl), [(logp[b, :n] - ref[b, :n]).sum() for b, n in enumerate(lengths)],
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_matches_reverse_loop(gamma, lam):
  rng, mask, lengths = _data(1)
  rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
  rewards, values = rewards * mask, values  # values at padding are junk on purpose
  adv_ref = np.zeros((B, T))
  for b in range(B):
    next_adv, next_value = 0.0, 0.0
    for t in reversed(range(lengths[b])):
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      next_adv = delta + gamma * lam * next_adv
      next_value = values[b, t]
      adv_ref[b, t] = next_adv
  adv, ret = ppo.gae_advantages(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                                mask, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), adv_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), (adv_ref + values) * mask, rtol=1e-5, atol=1e-5)


def test_whiten_uses_only_real_tokens():
  rng, mask, _ = _data(2)
  x = rng.normal(size=(B, T)) + 3.0
  junk = np.where(mask, x, 1e6)
  w = np.asarray(ppo.whiten(jnp.asarray(junk, jnp.float32), mask))
  real = x[mask]
  np.testing.assert_allclose(w[mask], (real - real.mean()) / real.std(ddof=1), rtol=1e-4, atol=1e-5)
  assert np.all(w[~mask] == 0)


def test_policy_loss_hand_computed():
  # Two tokens, eps = 0.2: ratio 1.5 with A = +1 is clipped to 1.2; ratio 0.5 with A = +2 is not
  # clipped (min of 0.5 * 2 and 0.8 * 2 is 1.0); a third, masked token must not count.
  logp = jnp.log(jnp.array([[1.5, 0.5, 3.0]]))
  old = jnp.zeros((1, 3))
  adv = jnp.array([[1.0, 2.0, 5.0]])
  mask = jnp.array([[True, True, False]])
  loss, m = ppo.policy_loss(logp, old, adv, mask, 0.2)
  np.testing.assert_allclose(float(loss), -(1.2 + 1.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(float(m["clip_fraction"]), 0.5)
  # Negative advantage: ratio 0.5 clipped up to 0.8 (pessimistic bound), ratio 1.5 unclipped.
  loss, m = ppo.policy_loss(logp, old, -adv, mask, 0.2)
  np.testing.assert_allclose(float(loss), (1.5 * 1.0 + 0.8 * 2.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(float(m["clip_fraction"]), 0.5)
  approx = ((1.5 - 1 - np.log(1.5)) + (0.5 - 1 - np.log(0.5))) / 2
  np.testing.assert_allclose(float(m["approx_kl"]), approx, rtol=1e-5)


def test_value_loss_hand_computed():
  values = jnp.array([[1.0, 0.0, 9.0]])
  old = jnp.array([[0.5, 0.0, 0.0]])
  returns = jnp.array([[2.0, -1.0, 0.0]])
  mask = jnp.array([[True, True, False]])
  # Token 0: v=1.0 moved 0.5 from old, clipped to 0.7 (eps 0.2): max((1-2)^2, (0.7-2)^2) = 1.69.
  # Token 1: v = old = 0: (0 - -1)^2 = 1. Mean 1.345, times 0.5.
  loss, m = ppo.value_loss(values, old, returns, mask, 0.2)
  np.testing.assert_allclose(float(loss), 0.5 * (1.69 + 1.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(float(m["value_clip_fraction"]), 0.5)


def test_value_clip_fraction_ignores_rounding_ties():
  """A value within clip_eps of its old value is not clipped, whatever rounding does to
  old + (v - old): the case an independent check found counted as clipped."""
  values, old, returns = jnp.array([[0.03777]]), jnp.array([[0.14084]]), jnp.array([[-0.00184]])
  mask = jnp.array([[True]])
  _, m = ppo.value_loss(values, old, returns, mask, 0.2)
  assert float(m["value_clip_fraction"]) == 0.0
  # Against float64 numpy over random tokens: clipped iff |v - old| > eps and the clipped value
  # is farther from the return.
  rng = np.random.default_rng(0)
  v, o, r = (rng.normal(0, 0.3, (4, 50_000)).astype(np.float32) for _ in range(3))
  _, m = ppo.value_loss(jnp.asarray(v), jnp.asarray(o), jnp.asarray(r), jnp.ones(v.shape, bool), 0.2)
  v64, o64, r64 = (x.astype(np.float64) for x in (v, o, r))
  clipped = o64 + np.clip(v64 - o64, -0.2, 0.2)
  want = np.mean((np.abs(v64 - o64) > 0.2) & ((clipped - r64) ** 2 > (v64 - r64) ** 2))
  # float32 and float64 may disagree on tokens within rounding of |v - old| = eps: a handful in 200k.
  assert abs(float(m["value_clip_fraction"]) - want) <= 10 / v.size


def test_entropy_matches_numpy():
  rng, mask, _ = _data(3)
  logits = rng.normal(size=(B, T, 7)) * 2
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ent = -(p * np.log(p)).sum(-1)
  np.testing.assert_allclose(float(ppo.entropy(jnp.asarray(logits, jnp.float32), mask)), ent[mask].mean(),
                             rtol=1e-5)


def test_adaptive_kl_controller():
  # KL at twice the target: the error is clipped to +0.2, so coef grows by 0.2 * n / horizon.
  # float32 against float64: ~7 roundings (constants 0.1, 0.2 included) of <= 2^-24 each, < 1e-6.
  np.testing.assert_allclose(float(ppo.adaptive_kl_coef(0.1, 12.0, 256, 6.0, 10000)), 0.1 * (1 + 0.2 * 0.0256),
                             rtol=1e-6)
  np.testing.assert_allclose(float(ppo.adaptive_kl_coef(0.1, 5.4, 100, 6.0, 1000)), 0.1 * (1 - 0.1 * 0.1),
                             rtol=1e-6)
