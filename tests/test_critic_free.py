"""RLOO and GRPO advantages against float64 numpy loops on ragged, shuffled groups, and the
identities they must satisfy (leave-one-out sums, unit group variance, k / (k - 1) scaling)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import critic_free

EPS = 1e-6  # grpo_advantages' default
# Returns are O(1) and the group sums run over <= 5 float32 values: each advantage is a handful of
# float32 roundings (~6e-8 relative each) of O(1) quantities. GRPO divides by a std that can be
# ~0.1 for a close group, amplifying the absolute error by ~10.
RTOL, ATOL = 1e-5, 1e-6


def _ragged_groups(seed, sizes=(1, 2, 3, 5), num_groups=7):
  """Group ids of the given sizes, spread over non-consecutive ids below num_groups (so some
  segments are empty), rows shuffled so no group is contiguous."""
  rng = np.random.default_rng(seed)
  ids = rng.choice(num_groups, len(sizes), replace=False)
  group = np.concatenate([np.full(n, g) for g, n in zip(ids, sizes)])
  rng.shuffle(group)
  assert len(set(group)) < num_groups  # an empty segment really exists
  returns = rng.normal(0.3, 1.5, len(group)).astype(np.float32)
  return returns, group.astype(np.int32), num_groups


def _rloo_loop(returns, group):
  r = np.asarray(returns, np.float64)
  out = np.zeros_like(r)
  for i in range(len(r)):
    others = [r[j] for j in range(len(r)) if j != i and group[j] == group[i]]
    out[i] = r[i] - sum(others) / len(others) if others else 0.0
  return out


def _grpo_loop(returns, group, eps=EPS):
  r = np.asarray(returns, np.float64)
  out = np.zeros_like(r)
  for i in range(len(r)):
    members = [r[j] for j in range(len(r)) if group[j] == group[i]]
    n = len(members)
    if n < 2:
      continue
    mean = sum(members) / n
    std = (sum((x - mean) ** 2 for x in members) / (n - 1)) ** 0.5
    out[i] = (r[i] - mean) / (std + eps)
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_matches_loop_on_ragged_shuffled_groups(seed):
  returns, group, num_groups = _ragged_groups(seed)
  got = np.asarray(critic_free.rloo_advantages(jnp.asarray(returns), jnp.asarray(group), num_groups))
  want = _rloo_loop(returns, group)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  singleton = [i for i in range(len(group)) if (group == group[i]).sum() == 1]
  assert len(singleton) == 1 and got[singleton[0]] == 0.0  # no baseline: exactly 0, not R_i
  assert np.all(got[(group != group[singleton[0]])] != 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_matches_loop_on_ragged_shuffled_groups(seed):
  returns, group, num_groups = _ragged_groups(seed)
  got = np.asarray(critic_free.grpo_advantages(jnp.asarray(returns), jnp.asarray(group), num_groups))
  want = _grpo_loop(returns, group)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=10 * ATOL)
  singleton = [i for i in range(len(group)) if (group == group[i]).sum() == 1]
  assert got[singleton[0]] == 0.0
  # A pair's advantages are +-1/sqrt(2) with Bessel's correction (+-1 with the population std),
  # shrunk by eps / std.
  pair = [i for i in range(len(group)) if (group == group[i]).sum() == 2]
  pair_std = abs(float(returns[pair[0]]) - float(returns[pair[1]])) / np.sqrt(2.0)
  np.testing.assert_allclose(np.abs(got[pair]), 1.0 / np.sqrt(2.0), rtol=1e-5 + EPS / pair_std)


def test_grpo_zero_variance_group_gives_exact_zeros():
  # 0.9 three times: round(round(3 * 0.9f) / 3) is 1 ulp below 0.9f (with equal summands every
  # summation order gives round(3x), so this holds on any machine). R - mean is then ~6e-8, not
  # 0, and without the guard 1 / (std + eps) would blow it up to ~0.05.
  x = np.float32(0.9)
  assert np.float32(np.float32(x + x) + x) / np.float32(3) != x
  returns = np.array([0.9, 0.9, 0.9, -1.0, 2.0, 0.5], np.float32)
  group = np.array([2, 2, 2, 0, 0, 0], np.int32)
  for fn in (critic_free.grpo_advantages, jax.jit(critic_free.grpo_advantages, static_argnums=2)):
    got = np.asarray(fn(jnp.asarray(returns), jnp.asarray(group), 3))
    assert np.all(np.isfinite(got))
    assert np.all(got[:3] == 0.0)  # exactly: not rounding noise
    np.testing.assert_allclose(got[3:], _grpo_loop(returns, group)[3:], rtol=RTOL, atol=ATOL)
  # RLOO has no 1 / std to amplify rounding: (total - R_i) / 2 is off 0.9 by the sum's own rounding,
  # at most an ulp or two of 3 * 0.9, and stays that small.
  rloo = np.asarray(critic_free.rloo_advantages(jnp.asarray(returns), jnp.asarray(group), 3))
  assert np.all(np.abs(rloo[:3]) <= 2 * np.spacing(np.float32(3 * 0.9)))


def test_rloo_sums_to_zero_within_each_group():
  # sum_i (R_i - (S - R_i)/(n-1)) = S - (nS - S)/(n-1) = 0 for any returns of a group of n >= 2.
  returns, group, num_groups = _ragged_groups(5, sizes=(2, 3, 5, 4, 1), num_groups=9)
  returns = returns + 10.0  # a large common offset: the sum must still cancel it
  got = np.asarray(critic_free.rloo_advantages(jnp.asarray(returns), jnp.asarray(group), num_groups), np.float64)
  for g in np.unique(group):
    members = got[group == g]
    if len(members) >= 2:
      # Each advantage is a difference of O(10) float32 numbers: ~1e-6 absolute error each.
      assert abs(members.sum()) <= 1e-5 * len(members), (g, members)
      assert np.abs(members).max() > 0.1  # not trivially zero


def test_grpo_group_sample_variance_is_one():
  rng = np.random.default_rng(7)
  sizes = (2, 3, 4, 8)
  group = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
  returns = rng.normal(1.0, 0.5, len(group)).astype(np.float32)
  got = np.asarray(critic_free.grpo_advantages(jnp.asarray(returns), jnp.asarray(group), len(sizes)), np.float64)
  for g in range(len(sizes)):
    a, r = got[group == g], returns[group == g].astype(np.float64)
    assert abs(a.mean()) < 1e-5
    # Var_sample(A) = std^2 / (std + eps)^2 = 1 - 2 eps / std + ...: with std ~ 0.5, eps moves it
    # by ~4e-6 and float32 rounding by ~1e-6.
    std = np.std(r, ddof=1)
    np.testing.assert_allclose(np.var(a, ddof=1), (std / (std + EPS)) ** 2, rtol=1e-5)
    assert abs(np.var(a, ddof=1) - 1.0) < 1e-4


@pytest.mark.parametrize("k", [2, 4])
def test_rloo_is_scaled_centred_return_for_equal_groups(k):
  # R_i - (S - R_i)/(k-1) = (k R_i - S)/(k-1) = k/(k-1) (R_i - S/k).
  rng = np.random.default_rng(k)
  num_groups = 6
  returns = rng.normal(0, 2, num_groups * k).astype(np.float32)
  group = np.repeat(np.arange(num_groups), k).astype(np.int32)
  perm = rng.permutation(len(group))  # order must not matter
  returns, group = returns[perm], group[perm]
  got = np.asarray(critic_free.rloo_advantages(jnp.asarray(returns), jnp.asarray(group), num_groups))
  r = returns.astype(np.float64)
  means = np.array([r[group == g].mean() for g in range(num_groups)])
  np.testing.assert_allclose(got, k / (k - 1) * (r - means[group]), rtol=RTOL, atol=ATOL)


def test_registry_names_every_estimator():
  # GSPO and DAPO take GRPO's group-normalised advantages; they differ in their losses.
  assert critic_free.ADVANTAGES == {"rloo": critic_free.rloo_advantages, "grpo": critic_free.grpo_advantages,
                                    "dr_grpo": critic_free.dr_grpo_advantages, "gspo": critic_free.grpo_advantages,
                                    "dapo": critic_free.grpo_advantages}
