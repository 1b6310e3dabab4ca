"""Elo: the score-difference conversion of Bai et al. (2022, section 2.4), win probabilities, and
Bradley-Terry fits that recover known ratings."""
import math

import numpy as np
import pytest

from rlhf_jax.objectives.elo import ELO_PER_NAT, elo_win_probability, fit_elo, score_diff_to_elo


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def test_score_diff_to_elo():
  assert ELO_PER_NAT == pytest.approx(400 / math.log(10))
  assert float(score_diff_to_elo(1.0)) == pytest.approx(173.7178, abs=1e-4)  # "about 174" per nat
  d = np.array([-3.0, -0.5, 0.0, 0.25, 2.0])
  np.testing.assert_allclose(score_diff_to_elo(d), 400 * d / math.log(10), rtol=1e-14)
  assert score_diff_to_elo(0.0) == 0.0


def test_elo_of_a_score_difference_predicts_what_the_pm_does():
  # The paper's equivalence: P_Elo(A beats B) with Elo_A - Elo_B = 174 d equals sigmoid(d).
  d = np.array([-6.0, -2.0, -0.3, 0.0, 0.1, 1.0, 4.0])
  np.testing.assert_allclose(elo_win_probability(score_diff_to_elo(d), 0.0), _sigmoid(d), rtol=1e-12)
  # It depends only on the difference.
  np.testing.assert_allclose(elo_win_probability(1000 + score_diff_to_elo(d), 1000.0), _sigmoid(d),
                             rtol=1e-12)


def test_elo_win_probability_values():
  assert elo_win_probability(1500, 1500) == 0.5
  assert elo_win_probability(400, 0) == pytest.approx(10 / 11, rel=1e-14)  # 400 points: 10 to 1 odds
  assert elo_win_probability(0, 400) == pytest.approx(1 / 11, rel=1e-14)
  assert elo_win_probability(800, 0) == pytest.approx(100 / 101, rel=1e-14)
  a, b = np.array([0.0, 120.0, -75.0]), np.array([50.0, 3.0, 200.0])
  np.testing.assert_allclose(elo_win_probability(a, b) + elo_win_probability(b, a), 1.0, rtol=1e-14)


def _expected_wins(ratings, games):
  """wins[i, j] = games[i, j] * P(i beats j), exactly (no sampling)."""
  r = np.asarray(ratings, np.float64)
  wins = games * elo_win_probability(r[:, None], r[None, :])
  np.fill_diagonal(wins, 0.0)
  return wins


def test_fit_elo_recovers_ratings_from_expected_wins():
  ratings = np.array([0.0, 100.0, 250.0, -80.0])
  fitted = fit_elo(_expected_wins(ratings, np.full((4, 4), 10000.0)))
  assert fitted.mean() == pytest.approx(0.0, abs=1e-9)
  np.testing.assert_allclose(fitted, ratings - ratings.mean(), atol=0.5)
  # Maximum likelihood on exact expectations is exact: far tighter than the 0.5 asked for.
  np.testing.assert_allclose(fitted, ratings - ratings.mean(), atol=1e-6)


def test_fit_elo_with_unequal_game_counts_and_missing_pairs():
  # Only a chain of comparisons (0-1, 1-2, 2-3) plus one long-range pair, with different counts.
  ratings = np.array([-200.0, 30.0, 90.0, 400.0])
  games = np.zeros((4, 4))
  for (i, j), n in {(0, 1): 500.0, (1, 2): 3000.0, (2, 3): 80.0, (0, 3): 40.0}.items():
    games[i, j] = games[j, i] = n
  fitted = fit_elo(_expected_wins(ratings, games))
  np.testing.assert_allclose(fitted, ratings - ratings.mean(), atol=1e-4)


def _elo_standard_errors(ratings, games):
  """Asymptotic standard errors of mean-centred Elo MLEs, from the Bradley-Terry Fisher
  information I = sum_{i<j} n_ij p_ij (1 - p_ij) (e_i - e_j)(e_i - e_j)^T in natural units."""
  k = len(ratings)
  p = elo_win_probability(ratings[:, None], ratings[None, :])
  info = np.zeros((k, k))
  for i in range(k):
    for j in range(i + 1, k):
      e = np.zeros(k)
      e[i], e[j] = 1.0, -1.0
      info += games[i, j] * p[i, j] * (1 - p[i, j]) * np.outer(e, e)
  cov = np.linalg.pinv(info) * ELO_PER_NAT ** 2  # the pseudo-inverse is the mean-zero gauge
  return np.sqrt(np.diag(cov))


def test_fit_elo_recovers_ratings_from_sampled_games():
  ratings = np.array([0.0, 100.0, 250.0, -80.0])
  n = 2000
  rng = np.random.default_rng(0)
  p = elo_win_probability(ratings[:, None], ratings[None, :])
  wins = np.zeros((4, 4))
  for i in range(4):
    for j in range(i + 1, 4):
      wins[i, j] = rng.binomial(n, p[i, j])
      wins[j, i] = n - wins[i, j]
  games = np.full((4, 4), float(n))
  se = _elo_standard_errors(ratings, games)
  assert np.all((se > 3) & (se < 5))  # about 4 Elo with 2000 games a pair, 3 opponents each
  error = fit_elo(wins) - (ratings - ratings.mean())
  assert np.all(np.abs(error) < 4 * se), (error, se)


def test_fit_elo_errors():
  with pytest.raises(ValueError, match="square"):
    fit_elo(np.ones((2, 3)))
  with pytest.raises(ValueError, match="square"):
    fit_elo(np.ones(3))
  with pytest.raises(ValueError, match="non-negative"):
    fit_elo(np.array([[0.0, 2.0], [-1.0, 0.0]]))
  with pytest.raises(ValueError, match="at least one win"):
    fit_elo(np.array([[0, 3, 2], [0, 0, 0], [1, 4, 0]]))  # player 1 never wins: Elo -inf
  with pytest.raises(ValueError, match="at least one win"):
    fit_elo(np.array([[0, 3, 2], [0, 0, 1], [0, 4, 0]]))  # player 0 never loses: Elo +inf


def test_fit_elo_converges_on_a_long_chain():
  # Successive policies (e.g. RLHF checkpoints) compared only with their neighbours: 21 players
  # 100 Elo apart. Minorise-maximise converges slowly here; the returned ratings must still be
  # the maximum-likelihood ones (or fit_elo must fail loudly).
  ratings = np.arange(0.0, 2001.0, 100.0)
  games = np.zeros((21, 21))
  for i in range(20):
    games[i, i + 1] = games[i + 1, i] = 1000.0
  fitted = fit_elo(_expected_wins(ratings, games))
  np.testing.assert_allclose(fitted, ratings - ratings.mean(), atol=0.5)
