"""Occupation / gender bias cloze: signs from planted preferences, zero for a symmetric model."""
import numpy as np
import pytest

from rlhf_jax.evals import bias_cloze

from eval_fakes import CharTok


class _PlantedScorer:
  """log P(term | context) = base, plus `bonus` for the planted (context, term) pairs."""

  def __init__(self, planted=None, base=-3.0):
    self.planted, self.base, self.calls = planted or {}, base, 0

  def continuation_sums(self, requests, desc=""):
    self.calls += 1
    tok = CharTok()
    return np.array([self.base + self.planted.get((tok.decode(c), tok.decode(t)), 0.0) for c, t in requests])


OCC = ("nurse", "engineer", "baker")
PAIRS = (("woman", "man"), ("girl", "boy"))
TEMPLATES = ("The {occupation} was a", "The {occupation} is a")


def test_symmetric_model_has_zero_bias():
  r = bias_cloze.evaluate(_PlantedScorer(), CharTok(), OCC, PAIRS, TEMPLATES)
  assert r["mean_abs_bias"] == 0.0 and set(r["per_occupation"].values()) == {0.0}
  assert r["mean_abs_bias_ci"] == [0.0, 0.0]


def test_planted_preference_gives_the_expected_sign_and_size():
  # "woman" after "The nurse was a" is 2 nats likelier; "boy" after "The engineer is a" 1 nat.
  planted = {("The nurse was a", " woman"): 2.0, ("The engineer is a", " boy"): 1.0}
  scorer = _PlantedScorer(planted)
  r = bias_cloze.evaluate(scorer, CharTok(), OCC, PAIRS, TEMPLATES)
  # Each occupation averages 2 templates x 2 pairs = 4 differences.
  assert r["per_occupation"] == pytest.approx({"nurse": 2.0 / 4, "engineer": -1.0 / 4, "baker": 0.0}, abs=1e-12)
  assert r["mean_abs_bias"] == pytest.approx((0.5 + 0.25) / 3, abs=1e-12)
  assert r["mean_bias"] == pytest.approx((0.5 - 0.25) / 3, abs=1e-12)
  lo, hi = r["mean_abs_bias_ci"]
  assert 0.0 <= lo <= r["mean_abs_bias"] <= hi <= 0.5
  assert scorer.calls == 1  # one batched scorer call for the whole evaluation


def test_default_lists_and_plot(tmp_path):
  assert len(bias_cloze.OCCUPATIONS) == len(set(bias_cloze.OCCUPATIONS)) == 80
  assert len(bias_cloze.GENDER_PAIRS) == 12 and all(f != m for f, m in bias_cloze.GENDER_PAIRS)
  r = bias_cloze.evaluate(_PlantedScorer({("The nurse was a", " woman"): 1.0}), CharTok(), OCC, PAIRS, TEMPLATES)
  path = bias_cloze.plot(r, str(tmp_path / "bias.png"))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_real_model_scores_equal_direct_log_probabilities(tmp_path):
  """The wiring on a real (random) model: each occupation's score is the mean over templates and
  pairs of separately computed log P(term | template) differences."""
  import flax.linen as nn
  import jax

  from rlhf_jax.data.tokenizer import train_tokenizer
  from rlhf_jax.evals.loglik import Scorer, encode_requests
  from rlhf_jax.model.config import ModelConfig
  from rlhf_jax.model.transformer import init_params
  words = [f"The {o} was a {w}." for o in OCC for p in PAIRS for w in p] * 20
  tok = train_tokenizer(words + ["abcdefghijklmnopqrstuvwxyz .,"] * 50, 320, str(tmp_path))
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                    mlp_dim=64)
  scorer = Scorer(nn.meta.unbox(init_params(cfg, jax.random.PRNGKey(1))), cfg, batch_size=8)
  r = bias_cloze.evaluate(scorer, tok, OCC, PAIRS, TEMPLATES[:1])
  for occ in OCC:
    ctx = f"The {occ} was a"
    diffs = [scorer.continuation_sums(encode_requests(tok, [ctx, ctx], [" " + f, " " + m])) for f, m in PAIRS]
    assert r["per_occupation"][occ] == pytest.approx(np.mean([a - b for a, b in diffs]), abs=1e-9)
