"""A noisy simulated labeller over a gold PM: the crowdworker stand-in of iterated online RLHF.

Response a is preferred to b with probability sigmoid((g_a - g_b) / tau), g the gold PM's scores
(a Bradley-Terry labeller whose temperature tau sets how often it disagrees with the gold
ranking). Bai et al. 2022 report crowdworkers agreeing with each other and with the authors on
about 63-73% of comparisons; tau is chosen so that the expected agreement with the gold ranking,
mean over pairs of sigmoid(|g_a - g_b| / tau), equals a target. As tau -> 0 the labels are the gold
ranking.
"""
from __future__ import annotations

import numpy as np

from rlhf_jax.errors import ConfigError
from rlhf_jax.objectives.calibration import sigmoid


def expected_agreement(margins: np.ndarray, tau: float) -> float:
  """Mean over pairs of P(label agrees with the gold ranking) = sigmoid(|margin| / tau)."""
  m = np.abs(np.asarray(margins, np.float64))
  if tau <= 0:
    return float(np.mean(np.where(m > 0, 1.0, 0.5)))
  return float(np.mean(sigmoid(m / tau)))


def tau_for_agreement(margins: np.ndarray, target: float, iterations: int = 200) -> float:
  """The tau whose expected agreement on these margins is `target` (bisection in log tau: the
  agreement falls monotonically from the tau -> 0 value to 1/2 as tau grows)."""
  ceiling = expected_agreement(margins, 0.0)
  if not 0.5 < target <= 1.0:
    raise ConfigError(f"online.agreement={target}: expected a value in (0.5, 1]")
  if target >= ceiling:
    return 0.0  # even noise-free labels agree no more than this (tied margins are coin flips)
  lo, hi = -30.0, 30.0  # log tau
  for _ in range(iterations):
    mid = 0.5 * (lo + hi)
    if expected_agreement(margins, float(np.exp(mid))) > target:
      lo = mid
    else:
      hi = mid
  return float(np.exp(0.5 * (lo + hi)))


def noisy_preferences(gold_a: np.ndarray, gold_b: np.ndarray, tau: float, rng: np.random.Generator) -> np.ndarray:
  """True where the labeller prefers a: a Bernoulli(sigmoid((g_a - g_b) / tau)) draw per pair
  (tau = 0: the gold ranking, ties broken by a fair coin)."""
  d = np.asarray(gold_a, np.float64) - np.asarray(gold_b, np.float64)
  u = rng.random(d.shape)
  if tau <= 0:
    return np.where(d != 0, d > 0, u < 0.5)
  return u < sigmoid(d / tau)
