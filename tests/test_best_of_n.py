"""Best-of-N against its analytic KL and a rule-based PM whose optimum is known."""
import dataclasses
import math
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.model.config import PRESETS
from rlhf_jax.model.transformer import ModelOutput, Transformer, init_params
from rlhf_jax.trainers.best_of_n import analytic_kl, best_of_n, measured_kl, select_best

MARKER = 7


class CountPM(nn.Module):
  """scalar[b, t] = sign * number of MARKER tokens among the valid tokens up to t."""
  sign: float = 1.0

  @nn.compact
  def __call__(self, tokens, attention_mask=None, lm_head=False, **_):
    hits = ((tokens == MARKER) & attention_mask).astype(jnp.float32)
    scalar = self.sign * jnp.cumsum(hits, axis=1)
    return ModelOutput(None, scalar, scalar[..., None], None)


def test_analytic_kl():
  assert analytic_kl(1) == 0.0
  np.testing.assert_allclose(analytic_kl(2), math.log(2) - 0.5)
  np.testing.assert_allclose(analytic_kl(16), math.log(16) - 15 / 16)


def test_best_of_n_selects_the_pm_maximum():
  cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=16)
  policy = SimpleNamespace(model=Transformer(cfg), params=nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(0))))
  unit = {"mean": 0.0, "std": 1.0}
  pm = SimpleNamespace(model=CountPM(), params={}, normalisation=unit)
  extra = {"same": pm, "negated": SimpleNamespace(model=CountPM(-1.0), params={}, normalisation=unit),
           "shifted": SimpleNamespace(model=CountPM(), params={}, normalisation={"mean": 1.0, "std": 2.0})}
  rng = np.random.default_rng(0)
  prompts = {"tokens": jnp.asarray(rng.integers(8, 16, (24, 4)), jnp.int32), "attention_mask": jnp.ones((24, 4), bool)}
  rows = best_of_n(policy, pm, extra, prompts, [1, 8], jax.random.PRNGKey(1), max_new_tokens=6,
                   temperature=1.0, eos_id=None, pad_id=0, eoc_id=3)
  one, eight = rows
  assert one["n"] == 1 and one["kl"] == 0.0
  np.testing.assert_allclose(one["proxy_reward"], one["proxy_reward_mean_of_n"])
  # Prompts hold no marker, so a response's reward is its marker count: about 6/16 per sample.
  assert 0.1 < eight["proxy_reward_mean_of_n"] < 1.0
  assert eight["proxy_reward"] > eight["proxy_reward_mean_of_n"] + 0.5  # selection really selects
  for row in rows:
    assert row["same_reward"] == row["proxy_reward"]
    np.testing.assert_allclose(row["negated_reward"], -row["proxy_reward"], atol=1e-6)
    np.testing.assert_allclose(row["shifted_reward"], (row["proxy_reward"] - 1.0) / 2.0, atol=1e-6)
  np.testing.assert_allclose(eight["sqrt_kl"], math.sqrt(analytic_kl(8)))


def test_a_given_first_sample_is_each_prompts_sample_zero():
  # Responses made of markers score 6 each (CountPM over 6 response tokens); the model's own
  # 6-token samples over 16 token ids score about 6/16: best-of-1 is exactly the given samples'
  # reward, and every n picks them, while drawn samples fill n = 2..8.
  cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=16)
  policy = SimpleNamespace(model=Transformer(cfg), params=nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(0))))
  pm = SimpleNamespace(model=CountPM(), params={}, normalisation={"mean": 0.0, "std": 1.0})
  rng = np.random.default_rng(0)
  prompts = {"tokens": jnp.asarray(rng.integers(8, 16, (24, 4)), jnp.int32), "attention_mask": jnp.ones((24, 4), bool)}
  marked = jnp.full((24, 6), MARKER, jnp.int32)
  first = SimpleNamespace(prompt_tokens=prompts["tokens"], prompt_mask=prompts["attention_mask"], tokens=marked,
                          mask=jnp.ones((24, 6), bool))
  one, eight = best_of_n(policy, pm, {}, prompts, [1, 8], jax.random.PRNGKey(1), max_new_tokens=6, temperature=1.0,
                         eos_id=None, pad_id=0, eoc_id=3, first=first)
  assert one["proxy_reward"] == 6.0 and eight["proxy_reward"] == 6.0
  # The mean of 8 is the given sample and 7 drawn ones, each far below 6 (at most half markers here).
  assert 6.0 / 8 < eight["proxy_reward_mean_of_n"] < 6.0 / 8 + 7 * 6.0 / 8 * 0.5


def test_select_best_matches_a_brute_force_loop():
  rng = np.random.default_rng(3)
  proxy, gold = rng.normal(size=(7, 8)), rng.normal(size=(7, 8))
  rows = select_best(proxy, {"gold": gold}, [1, 3, 8])
  for row in rows:
    n = row["n"]
    want_proxy, want_gold = [], []
    for p in range(7):  # first n samples of prompt p; the proxy's favourite
      i = max(range(n), key=lambda j: proxy[p, j])
      want_proxy.append(proxy[p, i])
      want_gold.append(gold[p, i])
    np.testing.assert_allclose(row["proxy_reward"], np.mean(want_proxy), rtol=1e-12)
    np.testing.assert_allclose(row["gold_reward"], np.mean(want_gold), rtol=1e-12)
    np.testing.assert_allclose(row["proxy_reward_mean_of_n"], proxy[:, :n].mean(), rtol=1e-12)
  assert rows[0]["gold_reward"] == gold[:, 0].mean()
  with pytest.raises(ValueError, match="n=9 outside 1..8"):
    select_best(proxy, {}, [9])


def _exact_discrete_kl(q, n):
  """KL(best-of-n || base) of a categorical base q whose outcomes are ranked by index."""
  f = np.cumsum(q)
  pn = f ** n - (f - q) ** n
  return float((pn * np.log(pn / q)).sum())


@pytest.mark.parametrize("n", [2, 4, 16, 32])
def test_measured_kl_matches_the_exact_kl_of_a_discrete_base(n):
  # Four outputs of probability 0.4 / 0.3 / 0.2 / 0.1, rewards in that order: best-of-n's KL is
  # known exactly, and lies well below the bound log n - (n - 1) / n for n >= 4.
  q = np.array([0.4, 0.3, 0.2, 0.1])
  rng = np.random.default_rng(n)
  prompts, m = 4000, 32
  drawn, reference = rng.choice(4, (prompts, m), p=q), rng.choice(4, (prompts, m), p=q)
  # An output's reward is its index: the same output, the same reward (the ties of discrete outputs).
  got = measured_kl(drawn.astype(np.float64), np.log(q[drawn]), reference.astype(np.float64), n)
  exact = _exact_discrete_kl(q, n)
  # Monte Carlo: each prompt's log w is bounded by log n (w <= n); its spread over 4000 prompts
  # gives a standard error below 0.02; 0.05 leaves room for the reference's own noise.
  assert abs(got - exact) < 0.05, (got, exact)
  if n >= 4:
    assert analytic_kl(n) - exact > 0.04  # the test tells the estimate from the bound


def test_measured_kl_of_a_continuous_base_is_the_bound():
  # Every output distinct and of negligible probability: w = n F^(n-1), whose mean log is the bound.
  rng = np.random.default_rng(0)
  proxy, reference = rng.normal(size=(4000, 32)), rng.normal(size=(4000, 256))
  logp = np.full((4000, 32), -60.0)
  for n in (2, 8, 32):
    assert abs(measured_kl(proxy, logp, reference, n) - analytic_kl(n)) < 0.05
  assert measured_kl(proxy, logp, reference, 1) == 0.0
  assert measured_kl(np.zeros((3, 4)), np.zeros((3, 4)), np.zeros((3, 8)), 4) == pytest.approx(0.0)  # one output: KL 0
