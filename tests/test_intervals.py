"""Bootstrap intervals over seeds, the fits' means and intervals, and the significance of differences."""
import itertools
import math

import numpy as np
import pytest

from rlhf_jax.analysis import fits as scaling_fits
from rlhf_jax.analysis import methods as mf
from rlhf_jax.analysis import significance
from rlhf_jax.analysis.intervals import bootstrap_difference, bootstrap_mean, resampled_means


def test_bootstrap_of_two_values_by_hand():
  # Resamples of [0, 1]: means 0, 0.5, 1 with weights 1/4, 1/2, 1/4.
  iv = bootstrap_mean([0.0, 1.0])
  assert (iv.mean, iv.lo, iv.hi, iv.n) == (0.5, 0.0, 1.0, 2)
  # At level 0.5 the ends are the 25% and 75% quantiles: F(0) = 1/4 reaches 0.25, F(0.5) = 3/4 reaches 0.75.
  iv = bootstrap_mean([0.0, 1.0], level=0.5)
  assert (iv.lo, iv.hi) == (0.0, 0.5)
  assert not iv.significant


def test_bootstrap_of_three_values_by_hand():
  # Resamples of [0, 0, 3]: the mean is the number k of draws of 3, k ~ Binomial(3, 1/3):
  # P(k = 0, 1, 2, 3) = 8, 12, 6, 1 (/ 27). F(0) = 8/27 >= 0.05; F(2) = 26/27 = 0.963 reaches 0.95
  # but not 0.975, so the 90% interval ends at 2 and the 95% one at 3.
  assert (bootstrap_mean([0.0, 0.0, 3.0], level=0.9).lo, bootstrap_mean([0.0, 0.0, 3.0], level=0.9).hi) == (0.0, 2.0)
  assert bootstrap_mean([0.0, 0.0, 3.0]).hi == 3.0
  # With three seeds every 95% interval is the seeds' range: each end has weight 1/27 > 2.5%.
  v = np.array([0.3, -1.2, 2.5])
  iv = bootstrap_mean(v)
  assert (iv.lo, iv.hi) == (v.min(), v.max()) and iv.mean == pytest.approx(v.mean(), abs=1e-15)
  assert bootstrap_mean([1.0, 2.0, 3.0]).significant and not bootstrap_mean([-1.0, 2.0, 3.0]).significant


def test_one_value_has_no_interval_and_is_never_significant():
  iv = bootstrap_mean([4.0])
  assert iv.mean == 4.0 and math.isnan(iv.lo) and math.isnan(iv.hi) and not iv.significant
  assert not bootstrap_difference([5.0], [1.0, 2.0]).significant
  with pytest.raises(ValueError, match="no values"):
    bootstrap_mean([])


def test_sampled_bootstrap_matches_the_exact_distribution():
  # 7 values: 7^7 resamples is past the enumeration limit, so the module samples 20000 of them.
  # The exact ends, by brute-force enumeration here: the 2.5% / 97.5% quantiles of 823543 means.
  v = np.array([0.1, -0.4, 1.3, 0.8, -1.1, 0.2, 0.5])
  picks = np.array(list(itertools.product(range(7), repeat=7)), np.int8)
  exact = np.sort(v[picks].mean(axis=1))
  lo, hi = exact[math.ceil(0.025 * exact.size) - 1], exact[math.ceil(0.975 * exact.size) - 1]
  iv = bootstrap_mean(v)
  # The sampled 2.5% quantile of 20000 draws has a standard error of about 0.01 here (the mean's
  # spread is 0.28): 0.05 is five of them.
  assert iv.lo == pytest.approx(lo, abs=0.05) and iv.hi == pytest.approx(hi, abs=0.05)
  assert resampled_means(v).size == 20_000


def test_difference_by_hand():
  # mean([0, 1]) resampled minus the same, independently: -1, -.5, 0, .5, 1 with weights 1, 4, 6, 4, 1 (/16).
  iv = bootstrap_difference([0.0, 1.0], [0.0, 1.0])
  assert (iv.mean, iv.lo, iv.hi) == (0.0, -1.0, 1.0) and not iv.significant
  iv = bootstrap_difference([0.0, 1.0], [0.0, 1.0], level=0.8)  # F(-1) = 1/16 < 0.1 <= F(-0.5) = 5/16
  assert (iv.lo, iv.hi) == (-0.5, 0.5)
  iv = bootstrap_difference([5.0, 6.0], [0.0, 1.0])
  assert (iv.mean, iv.lo, iv.hi) == (5.0, 4.0, 6.0) and iv.significant


def _row(method, step, kl, gold, seed, size="s", params=100, proxy=None):
  return {"size": size, "params": params, "method": method, "step": step, "kl": kl, "sqrt_kl": math.sqrt(kl),
          "proxy_reward": gold if proxy is None else proxy, "gold_reward": gold, "seed": seed}


def _lines(slopes, method="ppo", size="s", params=100, offset=0.0):
  """Per seed, gold = offset + slope * sqrt(KL) exactly at KL = 0, 1, 4."""
  return [_row(method, step, kl, offset + slope * math.sqrt(kl), seed, size, params)
          for seed, slope in enumerate(slopes) for step, kl in enumerate((0.0, 1.0, 4.0))]


def test_fits_are_per_seed_with_their_mean_and_interval():
  (fit,) = scaling_fits.fit_all(_lines([1.0, 2.0, 4.0]))
  assert fit["seeds"] == 3 and fit["n"] == 9
  assert fit["gold_slope"] == pytest.approx(7 / 3, rel=1e-12)
  assert (fit["gold_slope_lo"], fit["gold_slope_hi"]) == pytest.approx((1.0, 4.0), rel=1e-12)  # 3 seeds: the range
  assert fit["gold_r2"] == pytest.approx(1.0)
  (one,) = scaling_fits.fit_all(_lines([2.0]))
  assert one["seeds"] == 1 and one["gold_slope"] == pytest.approx(2.0) and math.isnan(one["gold_slope_lo"])


def test_methods_and_sizes_are_called_significant_only_when_the_seeds_agree():
  rows = (_lines([1.0, 1.1, 0.9]) + _lines([2.0, 2.1, 1.9], method="rloo")  # clearly better than PPO
          + _lines([0.0, 2.5, 0.5], method="grpo")  # straddles PPO
          + _lines([3.0, 3.2, 2.9], size="l", params=1000) + _lines([3.0, 0.5, 2.0], size="l", params=1000,
                                                                    method="rloo"))
  by = {(d["size"], d["method"]): d for d in significance.method_differences(rows)}
  # Common KL is 4 (every seed reached it); gold there is 2 * slope.
  rloo = by[("s", "rloo")]
  assert rloo["kl"] == 4.0 and rloo["difference"].mean == pytest.approx(2.0)
  assert rloo["difference"].significant
  assert not by[("s", "grpo")]["difference"].significant
  sizes = {(d["method"], d["larger"]): d for d in significance.size_differences(rows)}
  assert sizes[("ppo", "l")]["smaller"] == "s" and sizes[("ppo", "l")]["difference"].mean == pytest.approx(2.0 + 0.1 / 3)
  assert sizes[("ppo", "l")]["difference"].significant and not sizes[("rloo", "l")]["difference"].significant
  text = significance.format_differences(rows)
  assert "| s | rloo | 4 |" in text and "significant, higher" in text and "not significant" in text
  assert "Means over 3 seeds" in text
  # Per-seed gold at the common KL, as the methods table gives it: mean [min, max] over 3 seeds.
  table = mf.format_table(rows, scaling_fits.fit_all(rows), ks=(1.0,))
  assert "| s | rloo | 3 | 4 | 4 [3.8, 4.2] |" in table
  assert len(mf.frontier_figure(rows).axes[0].collections) == 3  # one band per method


def test_one_seed_says_it_cannot_tell():
  rows = _lines([1.0]) + _lines([2.0], method="rloo")
  text = significance.format_differences(rows)
  assert "one seed: cannot tell" in text and "One seed per cell: no intervals" in text
  assert len(mf.frontier_figure(rows).axes[0].collections) == 0
