"""The methods' frontier: gold reward at a KL budget read off measured points, never extrapolated."""
import math

import numpy as np
import pytest

from rlhf_jax.analysis import fits as scaling_fits
from rlhf_jax.analysis import methods as mf
from rlhf_jax.analysis import results as sweep_results


def _row(method, step, kl, gold, size="s", beta=None):
  row = {"size": size, "params": 100, "method": method, "step": step, "kl": kl, "sqrt_kl": math.sqrt(kl),
         "proxy_reward": 2 * gold, "gold_reward": gold}
  return row if beta is None else {**row, "beta": beta}


def test_gold_at_kl_interpolates_between_points_sorted_by_kl_and_never_extrapolates():
  # PPO's KL is not monotone in its steps (step 2 has the larger KL): points are sorted by KL first.
  rows = [_row("ppo", 0, 0.0, 0.0), _row("ppo", 1, 2.0, 1.0), _row("ppo", 2, 1.0, 3.0), _row("ppo", 3, 4.0, 2.0)]
  at = mf.gold_at_kl(rows, ks=(0.5, 1.5, 3.0, 4.0, 5.0))[("s", "ppo")]
  # Independent: by hand, on the segments (0, 0)-(1, 3)-(2, 1)-(4, 2).
  assert at[0.5] == pytest.approx(1.5) and at[1.5] == pytest.approx(2.0) and at[3.0] == pytest.approx(1.5)
  assert at[4.0] == pytest.approx(2.0) and math.isnan(at[5.0])


def test_dpo_runs_of_every_beta_pool_into_one_frontier_and_seeds_average():
  rows = [_row("dpo", 0, 0.0, 0.0, beta=0.1), _row("dpo", 10, 1.0, 1.0, beta=0.1),
          _row("dpo", 0, 0.0, 0.0, beta=1.0), _row("dpo", 10, 3.0, 2.0, beta=1.0),
          _row("rloo", 0, 0.0, 0.0), _row("rloo", 5, 2.0, 4.0), _row("rloo", 5, 2.0, 2.0)]  # two seeds
  at = mf.gold_at_kl(rows, ks=(2.0,))
  assert at[("s", "dpo")][2.0] == pytest.approx(1.5)  # between beta 0.1's end and beta 1's end
  assert at[("s", "rloo")][2.0] == pytest.approx(3.0)  # the seeds' mean
  curve = sweep_results.mean_curves(rows)[("s", "dpo")]  # one point per (beta, step): betas are not averaged
  assert list(zip(curve["beta"], curve["step"])) == [(0.1, 0), (0.1, 10), (1.0, 0), (1.0, 10)]


def test_table_compares_methods_at_the_kl_every_method_reached():
  rows = [_row("ppo", 0, 0.0, 0.0), _row("ppo", 1, 4.0, 4.0),
          _row("grpo", 0, 0.0, 0.0), _row("grpo", 1, 1.0, 2.0),
          _row("bon", 1, 0.0, 0.0), _row("bon", 4, 0.5, 0.5)]
  table = mf.format_table(rows, scaling_fits.fit_all(rows), ks=(0.25, 2.0))
  lines = {line.split(" | ")[1]: line.strip("| ").split(" | ") for line in table.splitlines()[2:5]}
  # Common KL = 0.5 (best-of-N's largest); gold there: ppo 0.5, grpo 1.0, bon 0.5.
  assert [lines[m][2:5] for m in ("ppo", "grpo", "bon")] == [["1", "0.5", "0.5"], ["1", "0.5", "1"], ["1", "0.5", "0.5"]]
  assert lines["ppo"][6] == "2" and lines["grpo"][6] == "-" and lines["bon"][6] == "-"  # KL = 2 reached by PPO only
  assert "One seed per cell: no intervals" in table
  fig = mf.frontier_figure(rows)
  assert [line.get_label() for line in fig.axes[0].get_lines()] == ["ppo", "grpo", "bon"]
  assert np.allclose(fig.axes[0].get_lines()[1].get_xdata(), [0.0, 1.0])
  # Best-of-N with a measured KL: drawn at it, and again at its bound.
  measured = [r if r["method"] != "bon" else {**r, "kl_bound": math.log(r["step"]) - (r["step"] - 1) / r["step"],
                                              "kl_measured": r["kl"]} for r in rows]
  lines = {line.get_label(): line for line in mf.frontier_figure(measured).axes[0].get_lines()}
  assert np.allclose(lines["bon"].get_xdata(), [0.0, math.sqrt(0.5)])
  assert np.allclose(lines["bon at KL bound"].get_xdata(), [0.0, math.sqrt(math.log(4) - 0.75)])


def test_every_method_has_a_value_at_the_common_kl_even_an_ulp_from_its_own_end():
  # The method that ends lowest sets the common KL; read back through sqrt_kl**2, its own last KL
  # is an ulp below its logged kl (0.6073395013809204 here), and must not fall off its curve.
  k = 0.6073395013809204
  assert math.sqrt(k) ** 2 < k
  rows = [_row("ppo", 0, 0.0, 0.0), _row("ppo", 1, 2.0, 2.0), _row("ipo", 0, 0.0, 0.0), _row("ipo", 1, k, 1.0)]
  common = mf.common_kl(rows)["s"]
  at = mf.gold_at_kl(rows, ks=(common,))
  assert at[("s", "ipo")][common] == pytest.approx(1.0) and at[("s", "ppo")][common] == pytest.approx(k, rel=1e-12)
