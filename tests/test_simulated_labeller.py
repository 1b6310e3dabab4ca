"""The noisy labeller: gold ranking as tau -> 0, agreement as the sigmoid formula says, tau found."""
import math

import numpy as np
import pytest

from rlhf_jax.experiments.simulated_labeller import expected_agreement, noisy_preferences, tau_for_agreement


def test_tau_to_zero_gives_the_gold_ranking():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=500), rng.normal(size=500)
  assert np.array_equal(noisy_preferences(a, b, 0.0, rng), a > b)
  assert np.array_equal(noisy_preferences(a, b, 1e-9, rng), a > b)  # |a - b| >> 1e-9 for all pairs here


def test_agreement_on_a_large_sample_matches_the_sigmoid_formula():
  rng = np.random.default_rng(1)
  n = 20000
  a, b = rng.normal(size=n), rng.normal(size=n)
  tau = 0.8
  agree = (noisy_preferences(a, b, tau, rng) == (a > b)).mean()
  expected = np.mean(1 / (1 + np.exp(-np.abs(a - b) / tau)))  # independent of the module's sigmoid
  se = math.sqrt(expected * (1 - expected) / n)
  assert agree == pytest.approx(expected, abs=4 * se)
  assert expected_agreement(a - b, tau) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("target", [0.63, 0.7, 0.73, 0.9])
def test_tau_for_agreement_hits_the_target(target):
  margins = np.abs(np.random.default_rng(2).normal(size=300))
  tau = tau_for_agreement(margins, target)
  assert expected_agreement(margins, tau) == pytest.approx(target, abs=1e-9)
  assert tau_for_agreement(margins, 1.0) == 0.0  # noise-free labels are the most agreement there is
  with pytest.raises(ValueError, match=r"online.agreement=0.4: expected a value in \(0.5, 1\]"):
    tau_for_agreement(margins, 0.4)
