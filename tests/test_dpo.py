"""DPO / IPO against float64 hand computations: the losses (large margins included), the implicit
rewards, response log-probabilities against a per-position loop over a real model, the loss at
initialisation, the masks of encode_pair on real tokens, and one training step."""
import dataclasses
import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.data import pm_data
from rlhf_jax.data.hh_rlhf import catalog, read_comparisons
from rlhf_jax.data.tokenizer import PAD_ID, train_tokenizer
from rlhf_jax.model.config import PRESETS
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.objectives import dpo
from rlhf_jax.trainers import dpo_steps
from rlhf_jax.training.train_state import TrainState

CFG = dataclasses.replace(PRESETS["tiny"], vocab_size=64, d_model=32, num_layers=1, mlp_dim=64)
MODEL = Transformer(CFG)
B, S = 3, 12
EPS32 = float(np.finfo(np.float32).eps)


def _neg_log_sigmoid(x: float) -> float:
  """-log sigmoid(x) = log(1 + e^-x), written so that neither branch overflows."""
  return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def _h64(policy, ref):
  p, r = np.asarray(policy, np.float64), np.asarray(ref, np.float64)
  return (p[:, 0] - r[:, 0]) - (p[:, 1] - r[:, 1])


# ---------------------------------------------------------------------------------------------
# 1. The losses and metrics on given log-probabilities.


def test_dpo_loss_matches_hand_computation_including_large_margins():
  beta = 0.5
  # Dyadic values with short mantissas: h is exact in float32, so the only error left is the
  # softplus's own (a few ulps, relative). beta * h = 0, 1.625, -3.75, 80, -100, -200.
  policy = np.array([[-10.5, -12.0], [-4.25, -9.5], [-20.0, -3.0], [-1.0, -160.0], [-150.0, -2.0],
                     [-301.0, -1.0]], np.float32)
  ref = np.array([[-10.5, -12.0], [-5.0, -7.0], [-17.0, -7.5], [-6.0, -5.0], [-2.0, -54.0],
                  [-1.0, -101.0]], np.float32)
  h = _h64(policy, ref)
  np.testing.assert_array_equal(beta * h, [0.0, 1.625, -3.75, 80.0, -100.0, -200.0])
  per_pair = jax.vmap(lambda p, r: dpo.preference_loss(p[None], r[None], beta, "dpo")[0])(policy, ref)
  got = np.asarray(per_pair, np.float64)
  want = np.array([_neg_log_sigmoid(beta * x) for x in h])
  assert np.all(np.isfinite(got))
  # Relative accuracy at both ends: ~e^-80 = 1.8e-35 (a naive -log(sigmoid) rounds sigmoid(80) to 1
  # and returns 0) and 200 (a naive one overflows e^200 and returns inf).
  np.testing.assert_allclose(got, want, rtol=8 * EPS32, atol=0)
  assert got[0] == np.float32(math.log(2.0))
  mean, metrics = dpo.preference_loss(jnp.asarray(policy), jnp.asarray(ref), beta, "dpo")
  np.testing.assert_allclose(float(mean), want.mean(), rtol=8 * EPS32)
  assert float(metrics["loss"]) == float(mean)


def _random_logps(seed, n=64):
  rng = np.random.default_rng(seed)
  policy = rng.normal(-30.0, 10.0, (n, 2)).astype(np.float32)
  ref = (policy + rng.normal(0.0, 3.0, (n, 2))).astype(np.float32)
  ref[0] = policy[0]  # an exact tie, h = 0: not a correct ranking
  return policy, ref


def _h_tolerance(policy, ref):
  # h is three float32 subtractions of values up to M: each rounds by <= eps/2 of a result <= 2M.
  return 3 * EPS32 * np.abs(np.concatenate([policy, ref], axis=1)).max()


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpo_and_ipo_losses_on_random_pairs(beta):
  policy, ref = _random_logps(1)
  h = _h64(policy, ref)
  dh = _h_tolerance(policy, ref)
  dpo_loss, _ = dpo.preference_loss(jnp.asarray(policy), jnp.asarray(ref), beta, "dpo")
  want = np.mean([_neg_log_sigmoid(beta * x) for x in h])
  # d loss / d h = -beta * sigmoid(-beta h), at most beta in size; plus the mean's own rounding.
  np.testing.assert_allclose(float(dpo_loss), want, rtol=4 * EPS32 * len(h), atol=beta * dh)
  ipo_loss, _ = dpo.preference_loss(jnp.asarray(policy), jnp.asarray(ref), beta, "ipo")
  want_ipo = ((h - 1.0 / (2.0 * beta)) ** 2)
  slope = 2 * np.abs(h - 1.0 / (2.0 * beta)).max()
  np.testing.assert_allclose(float(ipo_loss), want_ipo.mean(), rtol=4 * EPS32 * len(h), atol=slope * dh)
  # The two objectives really differ here: a swapped branch would show.
  assert abs(want - want_ipo.mean()) > 1.0


@pytest.mark.parametrize("beta", [0.3, 0.7])  # h spreads over about +-8: both sides of 1 / beta
def test_slic_hinge_on_random_pairs_and_no_gradient_past_the_margin(beta):
  policy, ref = _random_logps(3)
  h = _h64(policy, ref)
  loss, _ = dpo.preference_loss(jnp.asarray(policy), jnp.asarray(ref), beta, "slic")
  want = np.maximum(0.0, 1.0 - beta * h)
  # The hinge's slope is beta or 0; plus the mean's own rounding.
  np.testing.assert_allclose(float(loss), want.mean(), rtol=4 * EPS32 * len(h), atol=beta * _h_tolerance(policy, ref))
  # d loss / d log pi(chosen) is -beta / n for a pair inside the margin (beta h < 1) and exactly 0 past it.
  grad = jax.grad(lambda p: dpo.preference_loss(p, jnp.asarray(ref), beta, "slic")[0])(jnp.asarray(policy))
  inside = beta * h < 1.0
  clear = np.abs(beta * h - 1.0) > beta * _h_tolerance(policy, ref)  # margins whose side float32 decides
  assert inside[clear].any() and (~inside[clear]).any()
  np.testing.assert_allclose(np.asarray(grad[:, 0])[clear], np.where(inside, -beta / len(h), 0.0)[clear],
                             rtol=1e-6, atol=0)


def test_implicit_rewards_and_accuracy_metrics():
  beta = 0.3
  policy, ref = _random_logps(2)
  _, m = dpo.preference_loss(jnp.asarray(policy), jnp.asarray(ref), beta, "dpo")
  p, r = policy.astype(np.float64), ref.astype(np.float64)
  chosen, rejected = beta * (p[:, 0] - r[:, 0]), beta * (p[:, 1] - r[:, 1])
  tol = beta * _h_tolerance(policy, ref)
  np.testing.assert_allclose(float(m["implicit_reward_chosen"]), chosen.mean(), atol=tol, rtol=0)
  np.testing.assert_allclose(float(m["implicit_reward_rejected"]), rejected.mean(), atol=tol, rtol=0)
  np.testing.assert_allclose(float(m["implicit_margin"]), (chosen - rejected).mean(), atol=tol, rtol=0)
  h = _h64(policy, ref)
  assert h[0] == 0.0
  # Every other h is far from 0 compared with its float32 rounding, so its sign is decided.
  assert np.abs(h[1:]).min() > _h_tolerance(policy, ref)
  assert float(m["implicit_accuracy"]) == pytest.approx(np.mean(h > 0), abs=1e-7)
  assert 0.2 < np.mean(h > 0) < 0.8  # a test that can tell > from >= and from its complement


def test_unknown_loss_is_an_error():
  with pytest.raises(ValueError, match="hinge"):
    dpo.preference_loss(jnp.zeros((2, 2)), jnp.zeros((2, 2)), 0.1, "hinge")


# ---------------------------------------------------------------------------------------------
# 2. Log-probabilities of responses from a real model.


@pytest.fixture(scope="module")
def params():
  # Jitted (eager init compiles every op on its own) from an "rbg" key (a third of threefry's
  # compile time).
  return jax.jit(lambda rng: nn.meta.unbox(init_params(CFG, rng)))(jax.random.key(0, impl="rbg"))


def _pair_batch(seed):
  """[B, 2, S]: random tokens, a prompt shared by both responses, responses of different lengths,
  right padding. loss_mask runs from the prompt's end to the end of the row, padding included:
  only the attention mask may keep pads out of the sums."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, CFG.vocab_size, (B, 2, S)).astype(np.int32)
  lengths = np.array([[S, 9], [9, S], [S, S - 1]])
  prompt_len = np.array([4, 5, 3])
  tokens[:, 1, :] = np.where(np.arange(S) < prompt_len[:, None], tokens[:, 0, :], tokens[:, 1, :])
  attention = np.arange(S) < lengths[..., None]
  tokens = np.where(attention, tokens, PAD_ID).astype(np.int32)
  loss_mask = (np.arange(S) >= prompt_len[:, None, None]) * np.ones((B, 2, 1))
  return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask.astype(np.float32)}, lengths, prompt_len


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sequence_log_probs_match_per_position_loop(params):
  batch, lengths, prompt_len = _pair_batch(0)
  got = np.asarray(jax.jit(functools.partial(dpo.sequence_log_probs, model=MODEL))(params, batch=batch))
  assert got.shape == (B, 2)
  single = jax.jit(lambda p, t: MODEL.apply({"params": p}, t[None]).logits[0])
  for b in range(B):
    for k in range(2):
      n = lengths[b, k]
      logp = _log_softmax64(single(params, batch["tokens"][b, k, :n]))  # the sequence alone, no pads
      terms = [logp[t - 1, batch["tokens"][b, k, t]] for t in range(max(prompt_len[b], 1), n)]
      # A float32 forward pass (batched with padding here, alone there) gives each log-prob to a
      # few ulps of the logits' scale (|logit| < 10): 1e-5 relative to the sum of magnitudes.
      tol = 1e-5 * sum(abs(x) for x in terms) + 1e-6
      assert abs(got[b, k] - sum(terms)) <= tol, (b, k, got[b, k], sum(terms))
  # The pads, whose loss_mask is 1, would have added log-probs of the PAD token (~ -4 each).
  assert lengths.min() < S


def _train_state(params, tx):
  """A fresh state whose trainable params are {"policy": ...}, as train_dpo builds it."""
  params = {"policy": params}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.PRNGKey(1), data_position=jnp.zeros((), jnp.int32))


def test_loss_at_initialisation_is_log_2(params):
  batch, _, _ = _pair_batch(1)
  logps = jax.jit(functools.partial(dpo.sequence_log_probs, model=MODEL))
  ref_params = jax.tree.map(jnp.array, params)  # equal values in other buffers
  policy, ref = logps(params, batch=batch), logps(ref_params, batch=batch)
  assert np.all(np.asarray(policy) < -10.0)  # real, non-trivial log-probs
  value, metrics = dpo.preference_loss(policy, ref, 0.1, "dpo")
  # One compiled program on equal inputs: equal outputs, h = 0 exactly, loss = softplus(0).
  assert float(value) == np.float32(math.log(2.0))
  assert float(metrics["implicit_reward_chosen"]) == 0.0 and float(metrics["implicit_reward_rejected"]) == 0.0
  assert float(metrics["implicit_accuracy"]) == 0.0  # ties are not correct rankings


def test_one_training_step_lowers_loss_and_raises_margin(params):
  batch, _, _ = _pair_batch(2)
  beta = 0.1
  tx = optax.adam(1e-2)
  step = jax.jit(functools.partial(dpo_steps.dpo_train_step, model=MODEL, tx=tx, loss="dpo"))
  state = _train_state(params, tx)
  state, before = step(state, params, batch, beta)  # metrics of the pre-update parameters
  state, after = step(state, params, batch, beta)
  # Policy == reference when the first metrics are taken; in one fused program the two log-prob
  # sums may round differently, by ~1e-6 of |logp| ~ 40, hence |h| <= ~1e-4 and
  # |loss - log 2| <= beta |h| / 2.
  assert abs(float(before["loss"]) - math.log(2.0)) < 1e-5
  assert abs(float(before["implicit_margin"])) < 1e-5
  assert float(before["nonfinite"]) == 0.0 and float(before["grad_norm"]) > 0.0
  # Measured: loss 0.693 -> 0.078, margin 0 -> 2.6 (Adam's first step moves every weight by lr).
  assert float(after["loss"]) < 0.5 * float(before["loss"])
  assert float(after["implicit_margin"]) > 0.5
  assert float(after["implicit_accuracy"]) == 1.0
  assert int(state.step) == 2 and int(state.data_position) == 2 * B


# ---------------------------------------------------------------------------------------------
# 3. encode_pair on real tokens.


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  records = read_comparisons(os.path.join(catalog.SAMPLE_DIR, "harmless-base", "test.jsonl.gz"))[0]
  return train_tokenizer([r["chosen"] for r in records[:100]], 512, str(tmp_path_factory.mktemp("tok")))


def test_encode_pair_masks_exactly_the_responses(tok):
  record = {"prompt": "\n\nHuman: hi there\n\nAssistant:", "chosen_response": " hello friend",
            "rejected_response": " go away"}
  chosen, rejected = pm_data.encode_pair(tok, record)
  for ex, response in ((chosen, record["chosen_response"]), (rejected, record["rejected_response"])):
    assert len(ex.tokens) == len(ex.loss_mask)
    n = ex.loss_mask.index(True)
    assert not any(ex.loss_mask[:n]) and all(ex.loss_mask[n:])  # one contiguous suffix
    assert tok.decode(ex.tokens[:n]) == record["prompt"]
    assert ex.tokens[-1] == tok.eos_id and tok.eos_id not in ex.tokens[:-1]
    assert ex.tokens[n:-1] == tok.encode(response)  # the response's own tokens, then EOS
    assert tok.decode([t for t, m in zip(ex.tokens, ex.loss_mask) if m]) == response
  n = chosen.loss_mask.index(True)
  assert n == rejected.loss_mask.index(True) and chosen.tokens[:n] == rejected.tokens[:n]
  assert chosen.tokens[n:] != rejected.tokens[n:]
