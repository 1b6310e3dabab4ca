"""Elo (Bai et al. 2022, section 2.4): P(A beats B) = 1 / (1 + 10^((Elo_B - Elo_A) / 400)).

A PM's own preference probability is sigmoid(r_A - r_B); equating the two, a score difference d
is an Elo difference of 400 d / ln 10 (about 174 d).
"""
from __future__ import annotations

import math

import numpy as np

ELO_PER_NAT = 400.0 / math.log(10.0)


def score_diff_to_elo(d):
  return ELO_PER_NAT * np.asarray(d, np.float64)


def elo_win_probability(elo_a, elo_b):
  return 1.0 / (1.0 + 10.0 ** ((np.asarray(elo_b, np.float64) - np.asarray(elo_a, np.float64)) / 400.0))


def fit_elo(wins, iterations: int = 100_000, tol: float = 1e-10) -> np.ndarray:
  """Elo ratings (mean 0) from a matrix wins[i, j] = number of games i won against j.

  Maximum likelihood for the Bradley-Terry model in Elo units, by the minorise-maximise updates
  of Hunter (2004), which converge whenever the comparison graph is connected. Ties can be
  entered as half a win each way.
  """
  wins = np.asarray(wins, np.float64)
  n = wins.shape[0]
  if wins.shape != (n, n) or np.any(wins < 0):
    raise ValueError("wins must be a square matrix of non-negative counts")
  games = wins + wins.T
  total_wins = wins.sum(axis=1)
  if np.any(total_wins == 0) or np.any(games.sum(axis=1) - total_wins == 0):
    raise ValueError("every player needs at least one win and one loss for finite ratings")
  strength = np.ones(n)
  for _ in range(iterations):  # slow on long chains of comparisons (e.g. successive checkpoints)
    denom = (games / (strength[:, None] + strength[None, :])).sum(axis=1)
    new = total_wins / denom
    new /= np.exp(np.mean(np.log(new)))
    converged = np.max(np.abs(new - strength)) < tol
    strength = new
    if converged:
      break
  else:
    raise RuntimeError(f"fit_elo did not converge in {iterations} iterations")
  elo = 400.0 * np.log10(strength)
  return elo - elo.mean()
