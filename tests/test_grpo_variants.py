"""Dr. GRPO, GSPO and DAPO against float64 numpy written from their papers' formulas: advantages
on ragged shuffled groups, DAPO's dynamic sampling and overlong penalty, the clip-higher and
constant-normaliser token loss, GSPO's sequence-level loss, truncated importance sampling, and
the dispatch of ppo_steps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import critic_free, ppo
from rlhf_jax.trainers.ppo_steps import PPOHyper, _policy_loss

# float32 against float64: sums of a few dozen terms of magnitude <= ~10.
RTOL, ATOL = 1e-5, 1e-5


def _groups(seed: int, num_groups: int = 6):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, 6, num_groups)  # ragged, including lone samples
  group = rng.permutation(np.repeat(np.arange(num_groups), sizes))
  return rng.normal(size=group.size).astype(np.float32), group.astype(np.int32), num_groups


@pytest.mark.parametrize("seed", range(3))
def test_dr_grpo_advantage_is_the_return_minus_its_group_mean(seed):
  returns, group, n = _groups(seed)
  got = np.asarray(critic_free.dr_grpo_advantages(jnp.asarray(returns), jnp.asarray(group), n))
  want = np.zeros(len(returns))
  for g in range(n):
    rows = np.flatnonzero(group == g)
    if len(rows) > 1:  # a lone sample has nothing to compare with
      want[rows] = returns[rows].astype(np.float64) - returns[rows].astype(np.float64).mean()
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  grpo = np.asarray(critic_free.grpo_advantages(jnp.asarray(returns), jnp.asarray(group), n))
  assert not np.allclose(got, grpo)  # not GRPO's: no division by the group's std


def test_dapo_dynamic_sampling_keeps_groups_whose_rewards_differ():
  scores = np.array([1.0, 1.0, 1.0, 0.0, 2.0, 0.5, 0.5, 3.0], np.float32)
  group = np.array([0, 0, 0, 1, 1, 2, 2, 3], np.int32)  # group 0 all equal, group 3 alone
  got = np.asarray(critic_free.live_groups(jnp.asarray(scores), jnp.asarray(group), 4))
  np.testing.assert_array_equal(got, [False, False, False, True, True, False, False, False])


def test_overlong_penalty_is_zero_then_linear_to_minus_one():
  lengths = jnp.arange(0, 12)
  got = np.asarray(critic_free.overlong_penalty(lengths, max_len=10, buffer=4))
  want = [0, 0, 0, 0, 0, 0, 0, -0.25, -0.5, -0.75, -1.0, -1.0]  # 10 - 4 = 6 tokens are free
  np.testing.assert_allclose(got, want, atol=1e-7)
  assert not np.any(np.asarray(critic_free.overlong_penalty(lengths, 10, 0)))


def _token_case(seed: int, batch: int = 16, t: int = 8):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, t + 1, batch)  # an empty response too, with seed 0
  lengths[0] = 0
  mask = np.arange(t) < lengths[:, None]
  logp = rng.normal(-2.0, 0.5, (batch, t)).astype(np.float32)
  old = (logp + rng.normal(0, 0.3, (batch, t))).astype(np.float32)  # ratios ~ e^{+-0.3}: some clip
  adv = rng.normal(size=batch).astype(np.float32)
  return logp, old, np.where(mask, adv[:, None], 0.0).astype(np.float32), mask, adv


def _numpy_token_loss(logp, old, adv, mask, low, high, normaliser=None):
  ratio = np.exp((logp - old).astype(np.float64))
  surrogate = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - low, 1 + high))
  total = surrogate[mask].sum()
  return total / (normaliser if normaliser is not None else mask.sum())


@pytest.mark.parametrize("seed", range(3))
def test_clip_higher_and_constant_normaliser_token_loss(seed):
  logp, old, adv, mask, _ = _token_case(seed)
  for high, normaliser in ((None, None), (0.28, None), (None, float(mask.size))):
    got, m = ppo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), 0.2,
                             high, normaliser)
    want = _numpy_token_loss(logp, old, adv, mask, 0.2, 0.2 if high is None else high, normaliser)
    np.testing.assert_allclose(float(got), want, rtol=RTOL, atol=ATOL)
  ratio = np.exp(logp - old)[mask]
  assert np.any((ratio > 1.2) & (ratio < 1.28)), "the case must hold ratios clip-higher treats differently"


@pytest.mark.parametrize("seed", range(3))
def test_gspo_sequence_loss(seed):
  logp, old, _, mask, adv = _token_case(seed)
  low, high = 0.05, 0.08
  got, m = critic_free.sequence_policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
                                            jnp.asarray(mask), low, high)
  lengths = mask.sum(axis=1)
  rows = lengths > 0
  s = np.exp(np.where(mask, logp - old, 0.0).astype(np.float64).sum(axis=1)[rows] / lengths[rows])
  a = adv[rows].astype(np.float64)
  terms = np.maximum(-a * s, -a * np.clip(s, 1 - low, 1 + high))
  np.testing.assert_allclose(float(got), terms.mean(), rtol=RTOL, atol=ATOL)
  clipped = -a * np.clip(s, 1 - low, 1 + high) > -a * s
  np.testing.assert_allclose(float(m["clip_fraction"]), clipped.mean(), atol=1e-6)
  assert 0 < clipped.mean() < 1 or seed != 0  # the case exercises both branches


def _hyper(algorithm: str, **kw) -> PPOHyper:
  return PPOHyper(gamma=1.0, lam=1.0, clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.0, entropy_coef=0.0,
                  epochs=1, num_minibatches=1, whiten_advantages=False, algorithm=algorithm,
                  samples_per_prompt=2, **kw)


def test_each_algorithm_takes_its_own_loss():
  logp, old, adv, mask, seq_adv = _token_case(1)
  mb = {"old_logp": jnp.asarray(old), "advantages": jnp.asarray(adv), "response_mask": jnp.asarray(mask)}
  loss = lambda algorithm, **kw: float(_policy_loss(jnp.asarray(logp), mb, _hyper(algorithm, **kw))[0])
  np.testing.assert_allclose(loss("grpo"), _numpy_token_loss(logp, old, adv, mask, 0.2, 0.2), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(loss("dapo", clip_eps_high=0.28), _numpy_token_loss(logp, old, adv, mask, 0.2, 0.28),
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(loss("dr_grpo"), _numpy_token_loss(logp, old, adv, mask, 0.2, 0.2, mask.size),
                             rtol=RTOL, atol=ATOL)
  gspo = critic_free.sequence_policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(seq_adv * mask.any(1)),
                                          jnp.asarray(mask), 0.2, 0.2)[0]
  np.testing.assert_allclose(loss("gspo"), float(gspo), rtol=RTOL, atol=ATOL)
  # DAPO's dynamic sampling: rows outside the loss mask do not count, in the sum or the average.
  live = (np.arange(len(mask)) % 4 < 2)[:, None] & mask
  got = float(_policy_loss(jnp.asarray(logp), {**mb, "loss_mask": jnp.asarray(live)}, _hyper("dapo"))[0])
  np.testing.assert_allclose(got, _numpy_token_loss(logp, old, adv, live, 0.2, 0.2), rtol=RTOL, atol=ATOL)


def test_the_losses_are_jittable_with_the_hyper_static():
  logp, old, adv, mask, _ = _token_case(2)
  mb = {"old_logp": jnp.asarray(old), "advantages": jnp.asarray(adv), "response_mask": jnp.asarray(mask)}
  for algorithm in ("dr_grpo", "gspo", "dapo"):
    eager = _policy_loss(jnp.asarray(logp), mb, _hyper(algorithm))[0]
    jitted = jax.jit(lambda lp, m, a=algorithm: _policy_loss(lp, m, _hyper(a))[0])(jnp.asarray(logp), mb)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6, atol=1e-7)


def test_truncated_importance_weights_and_the_weighted_losses():
  logp, old, adv, mask, seq_adv = _token_case(4)
  sampler = (logp + np.random.default_rng(9).normal(0, 0.6, logp.shape)).astype(np.float32)  # another program
  cap = 1.5
  got = np.asarray(ppo.tis_weights(jnp.asarray(logp), jnp.asarray(sampler), jnp.asarray(mask), cap))
  want = np.where(mask, np.minimum(np.exp(logp.astype(np.float64) - sampler), cap), 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert 0 < (want[mask] == cap).mean() < 1
  loss, _ = ppo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), 0.2,
                            weights=jnp.asarray(got))
  ratio = np.exp((logp - old).astype(np.float64))
  terms = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)) * want
  np.testing.assert_allclose(float(loss), terms[mask].mean(), rtol=RTOL, atol=ATOL)
  # The weights are constants of the update: the gradient is the weighted one, not d(weight).
  grad = jax.grad(lambda lp: ppo.policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), 0.2,
                                             weights=ppo.tis_weights(lp, jnp.asarray(sampler), jnp.asarray(mask),
                                                                     cap))[0])(jnp.asarray(logp))
  # Where the unclipped term is the max, d/dlogp (-A r) = -A r; where the clipped one is, 0.
  unclipped = -adv * ratio >= -adv * np.clip(ratio, 0.8, 1.2)
  want_grad = np.where(mask & unclipped, -adv * ratio * want, 0.0) / mask.sum()
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-6)
  seq_w = np.array([0.5, 1.0, 2.0, 1.0] * 4, np.float32)
  got_seq, _ = critic_free.sequence_policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(seq_adv),
                                                jnp.asarray(mask), 0.05, 0.08, jnp.asarray(seq_w))
  rows = mask.any(axis=1)
  s = np.exp(np.where(mask, logp - old, 0.0).astype(np.float64).sum(axis=1)[rows] / mask.sum(axis=1)[rows])
  a = seq_adv[rows].astype(np.float64)
  np.testing.assert_allclose(float(got_seq), (np.maximum(-a * s, -a * np.clip(s, 0.95, 1.08)) * seq_w[rows]).mean(),
                             rtol=RTOL, atol=ATOL)
