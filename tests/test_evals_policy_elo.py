"""Elo of policies from judge scores: a simulated ladder with known strengths is recovered."""
import math

import numpy as np
import pytest

from rlhf_jax.evals import policy_elo
from rlhf_jax.objectives.elo import ELO_PER_NAT, elo_win_probability

TRUE_ELO = np.array([-150.0, -50.0, 0.0, 80.0, 120.0])  # mean 0


def test_soft_games_with_constant_score_gaps_recover_elo_exactly():
  # Judge scores differ by the same d_ij on every prompt: soft wins are sigmoid(d_ij) per game,
  # exactly the Bradley-Terry probabilities of Elo d_ij * 400 / ln 10.
  scores = np.repeat((TRUE_ELO / ELO_PER_NAT)[:, None], 30, axis=1)
  r = policy_elo.elo_ratings(scores, list("abcde"), soft=True, bootstrap=20)
  np.testing.assert_allclose(list(r["elo"].values()), TRUE_ELO, atol=1e-6)


def test_hard_games_on_a_simulated_ladder_recover_elo_within_the_interval():
  # Score = strength + Gumbel noise: the difference of two Gumbels is logistic, so
  # P(i's answer scores higher) = sigmoid(s_i - s_j), the Elo win probability.
  rng = np.random.default_rng(0)
  prompts = 3000
  scores = (TRUE_ELO / ELO_PER_NAT)[:, None] + rng.gumbel(size=(len(TRUE_ELO), prompts))
  r = policy_elo.elo_ratings(scores, list("abcde"), soft=False, bootstrap=200, seed=1)
  inside = [lo <= t <= hi for t, (lo, hi) in zip(TRUE_ELO, r["elo_ci"].values())]
  # Five 95% intervals: all five contain the truth with probability ~0.77 even if exact; allow one miss.
  assert sum(inside) >= 4, (r["elo"], r["elo_ci"])
  half_widths = [(hi - lo) / 2 for lo, hi in r["elo_ci"].values()]
  assert max(half_widths) < 40  # ~3000 games per pair pin Elo to a few tens of points
  assert r["bootstrap_failed"] == 0


def test_win_matrix_counts_ties_as_half_and_soft_wins_are_the_sigmoid():
  s = np.array([[1.0, 0.0, 2.0], [1.0, 1.0, 0.0]])
  hard = policy_elo.win_matrix(s, soft=False)
  assert hard.tolist() == [[0.0, 1.5], [1.5, 0.0]]
  soft = policy_elo.win_matrix(s, soft=True)
  sig = lambda x: 1 / (1 + math.exp(-x))
  assert soft[0, 1] == pytest.approx(sig(0.0) + sig(-1.0) + sig(2.0), abs=1e-12)
  assert soft[0, 1] + soft[1, 0] == pytest.approx(3.0, abs=1e-12)


def test_elo_win_probability_of_recovered_ratings_matches_simulated_rates():
  rng = np.random.default_rng(3)
  scores = (TRUE_ELO / ELO_PER_NAT)[:, None] + rng.gumbel(size=(len(TRUE_ELO), 4000))
  elo = np.array(list(policy_elo.elo_ratings(scores, list("abcde"), soft=False, bootstrap=0)["elo"].values()))
  observed = (scores[4] > scores[0]).mean()
  # 4000 games: the rate's standard error is ~0.006; 0.03 is five of them.
  assert elo_win_probability(elo[4], elo[0]) == pytest.approx(observed, abs=0.03)
