"""PM evaluation statistics against hand computations: Wilson interval, reliability bins and ECE,
the table and plot, score normalisation files."""
import math
import os

import numpy as np
import pytest

from rlhf_jax.objectives import calibration as cal


def _wilson(k, n, z):
  """The Wilson score interval, written out from its formula."""
  p = k / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return centre - half, centre + half


def _sig(x):
  return 1.0 / (1.0 + math.exp(-x))


# --- accuracy_interval ----------------------------------------------------------------------------

def test_wilson_interval_eight_of_ten():
  chosen = np.array([1.0] * 8 + [0.0] * 2)
  rejected = np.zeros(10)  # 8 correct, 2 ties (wrong)
  acc = cal.accuracy_interval(chosen, rejected, z=1.96)
  low, high = _wilson(8, 10, 1.96)
  assert acc.n == 10 and acc.accuracy == pytest.approx(0.8)
  assert acc.low == pytest.approx(low, abs=1e-12) and acc.high == pytest.approx(high, abs=1e-12)
  # The published 95% Wilson interval for 8/10 (e.g. Newcombe 1998, Brown et al. 2001).
  default = cal.accuracy_interval(chosen, rejected)
  assert (round(default.low, 3), round(default.high, 3)) == (0.490, 0.943)


def test_ties_count_as_wrong():
  # 8 strictly better, 1 tie, 1 worse: 8/10, not 8/9.
  chosen = np.array([2.0] * 8 + [0.5, -1.0])
  rejected = np.array([1.0] * 8 + [0.5, 0.0])
  acc = cal.accuracy_interval(chosen, rejected, z=1.96)
  assert acc.accuracy == pytest.approx(0.8)
  assert (acc.low, acc.high) == pytest.approx(_wilson(8, 10, 1.96))


def test_wilson_interval_all_correct():
  # p = 1: the upper bound is exactly 1 and the lower bound is n / (n + z^2), not 1 as Wald gives.
  acc = cal.accuracy_interval(np.ones(20), np.zeros(20), z=1.96)
  assert acc.accuracy == 1.0
  assert acc.high == pytest.approx(1.0, abs=1e-12)
  assert acc.low == pytest.approx(20 / (20 + 1.96 ** 2), abs=1e-12)


# --- calibration ----------------------------------------------------------------------------------

# Score differences r_chosen - r_rejected; each comparison enters as (sigmoid(d), 1) and
# (1 - sigmoid(d), 0). Bins are tenths of [0, 1], assigned here by hand.
DIFFS = [2.0, 2.1, 0.5, -0.6, -1.0, 3.0]
HAND = [  # (predicted, outcome, bin)
    (_sig(2.0), 1, 8), (1 - _sig(2.0), 0, 1),  # 0.8808, 0.1192
    (_sig(2.1), 1, 8), (1 - _sig(2.1), 0, 1),  # 0.8909, 0.1091
    (_sig(0.5), 1, 6), (1 - _sig(0.5), 0, 3),  # 0.6225, 0.3775
    (_sig(-0.6), 1, 3), (1 - _sig(-0.6), 0, 6),  # 0.3543, 0.6457
    (_sig(-1.0), 1, 2), (1 - _sig(-1.0), 0, 7),  # 0.2689, 0.7311
    (_sig(3.0), 1, 9), (1 - _sig(3.0), 0, 0),  # 0.9526, 0.0474
]


def _hand_calibration():
  mean_pred, freq, counts = np.full(10, np.nan), np.full(10, np.nan), np.zeros(10, int)
  for b in range(10):
    members = [(p, o) for p, o, bb in HAND if bb == b]
    counts[b] = len(members)
    if members:
      mean_pred[b] = sum(p for p, _ in members) / len(members)
      freq[b] = sum(o for _, o in members) / len(members)
  filled = counts > 0
  ece = sum(counts[b] / len(HAND) * abs(freq[b] - mean_pred[b]) for b in np.flatnonzero(filled))
  return mean_pred, freq, counts, ece


def test_calibration_matches_hand_computation():
  rejected = np.array([0.3, -1.0, 5.0, 0.0, 2.5, -4.0])  # arbitrary offsets: only differences matter
  result = cal.calibration(rejected + np.array(DIFFS), rejected, num_bins=10)
  mean_pred, freq, counts, ece = _hand_calibration()
  np.testing.assert_allclose(result.bin_edges, np.arange(11) / 10)
  np.testing.assert_array_equal(result.counts, counts)
  assert list(counts) == [1, 2, 1, 2, 0, 0, 2, 1, 2, 1]
  np.testing.assert_allclose(result.mean_predicted, mean_pred, rtol=1e-12, equal_nan=True)
  np.testing.assert_allclose(result.frequency, freq, rtol=1e-12, equal_nan=True)
  # Mixed bins: (0.3775, 0) and (0.3543, 1) share bin 3, their mirrors bin 6.
  assert result.frequency[3] == 0.5 and result.frequency[6] == 0.5
  assert result.ece == pytest.approx(ece, rel=1e-12)
  assert ece == pytest.approx(0.2125, abs=1e-4)  # six comparisons cannot be well calibrated


def test_calibration_is_symmetric_in_the_two_orders():
  # Every comparison counted both ways: bin b and bin 9 - b mirror each other.
  rng = np.random.default_rng(1)
  result = cal.calibration(rng.normal(size=500), rng.normal(size=500))
  np.testing.assert_array_equal(result.counts, result.counts[::-1])
  filled = result.counts > 0
  np.testing.assert_allclose(result.mean_predicted[filled], 1 - result.mean_predicted[::-1][filled])
  np.testing.assert_allclose(result.frequency[filled], 1 - result.frequency[::-1][filled])
  assert result.counts.sum() == 1000


def _synthetic_pm(n, seed):
  """Scores of a perfectly calibrated PM: the first response of a pair is preferred with
  probability p, and the PM's score difference is exactly logit(p)."""
  rng = np.random.default_rng(seed)
  p = rng.uniform(0.01, 0.99, n)
  first_wins = rng.random(n) < p
  d = np.log(p / (1 - p))
  r_second = rng.normal(size=n)  # an arbitrary offset per pair: only differences matter
  r_first = r_second + d
  return np.where(first_wins, r_first, r_second), np.where(first_wins, r_second, r_first)


def test_calibrated_pm_has_small_ece_and_overconfident_one_large():
  chosen, rejected = _synthetic_pm(20000, seed=0)
  good = cal.calibration(chosen, rejected)
  assert good.ece < 0.02  # sampling noise only: about 0.005 with 20k comparisons
  filled = good.counts > 0
  assert np.max(np.abs(good.frequency[filled] - good.mean_predicted[filled])) < 0.05
  over = cal.calibration(5 * chosen, 5 * rejected)  # same ranking, five times too confident
  under = cal.calibration(chosen / 5, rejected / 5)
  assert over.ece > 0.15 and under.ece > 0.15  # about 0.18 each
  # Scaling never changes which response wins, so accuracy is the same: ECE sees what accuracy can't.
  assert cal.accuracy_interval(5 * chosen, 5 * rejected) == cal.accuracy_interval(chosen, rejected)


def test_calibration_handles_huge_score_differences():
  result = cal.calibration(np.array([1000.0, -1000.0]), np.zeros(2))  # sigmoid must not overflow
  assert np.all(np.isfinite(result.mean_predicted[result.counts > 0]))
  assert result.counts[0] == 2 and result.counts[9] == 2
  assert result.ece == pytest.approx(0.5)  # two certain predictions, one right, one wrong


# --- table and plot -------------------------------------------------------------------------------

def test_calibration_table_lists_bins_counts_and_ece():
  rejected = np.zeros(len(DIFFS))
  result = cal.calibration(np.array(DIFFS), rejected)
  mean_pred, freq, counts, ece = _hand_calibration()
  table = cal.calibration_table(result)
  lines = table.splitlines()
  rows = [line for line in lines if line.startswith("| 0.") and "-" in line.split("|")[1]]
  assert len(rows) == 10
  assert rows[8] == f"| 0.8-0.9 | {mean_pred[8]:.3f} | {freq[8]:.3f} | 2 |"
  assert rows[3] == f"| 0.3-0.4 | {mean_pred[3]:.3f} | 0.500 | 2 |"
  assert rows[4] == "| 0.4-0.5 | - | - | 0 |"  # empty bins are shown, not dropped
  assert [int(r.rsplit("|", 2)[1]) for r in rows] == list(counts)
  assert f"Expected calibration error: {ece:.4f}" in table


def test_reliability_plot_writes_a_png(tmp_path):
  path = tmp_path / "reliability.png"
  cal.reliability_plot(cal.calibration(*_synthetic_pm(1000, seed=2)), str(path))
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(data) > 1000


# --- score normalisation --------------------------------------------------------------------------

def test_score_normalisation_round_trip(tmp_path):
  scores = np.array([[1.0, -1.0], [3.0, 0.5], [2.0, 2.5]], np.float32)
  stats = cal.score_normalisation(scores)
  assert stats["n"] == 6
  assert stats["mean"] == pytest.approx(8.0 / 6)
  assert stats["std"] == pytest.approx(np.std(scores.astype(np.float64)))  # population std
  path = cal.save_normalisation(stats, str(tmp_path))
  assert path == str(tmp_path / cal.NORMALISATION_FILE)
  assert os.listdir(tmp_path) == [cal.NORMALISATION_FILE]  # no temporary file left beside it
  assert cal.load_normalisation(str(tmp_path)) == stats


def test_constant_scores_do_not_give_zero_std():
  stats = cal.score_normalisation(np.full(5, 2.0))
  assert stats["mean"] == 2.0 and 0 < stats["std"] <= 1e-8  # (r - mean) / std stays finite


def test_load_normalisation_without_file_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    cal.load_normalisation(str(tmp_path))
  assert str(tmp_path / cal.NORMALISATION_FILE) in str(err.value)
