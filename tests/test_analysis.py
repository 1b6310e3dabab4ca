"""Tests for rlhf_jax/analysis/ (results, fits, tables, figures, report): fits against known coefficients and independent
least-squares computations, results validation, and the files analyse() writes."""
import json
import math
import os
import re

import numpy as np
import pytest

from rlhf_jax.analysis import figures as scaling_figures
from rlhf_jax.analysis import fits as scaling_fits
from rlhf_jax.analysis import report as sa
from rlhf_jax.analysis import results as sweep_results

# Synthetic sweep: per size, proxy linear in d (Bai et al.), gold of Gao et al.'s form.
_SIZES = {"s1": (10_000, 0.5, 0.8, 0.30), "s2": (200_000, -0.2, 1.1, 0.20), "s3": (3_000_000, 0.1, 1.4, 0.12)}
_RL_STEPS = range(0, 13)
_BON_NS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _true_gain(method, alpha, beta, d):
  # Written out here rather than through GaoFit.predict, so the tests do not check the code against itself.
  d = np.asarray(d, np.float64)
  if method == "bon":
    return alpha * d - beta * d ** 2
  return alpha * d - beta * np.array([x * math.log(x) if x > 0 else 0.0 for x in d])


def _synthetic_rows(noise=0.0, seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for size, (params, offset, alpha, beta) in _SIZES.items():
    for method, steps in (("ppo", _RL_STEPS), ("bon", _BON_NS)):
      for step in steps:
        kl = 0.09 * step ** 2 if method == "ppo" else math.log(step) - (step - 1) / step
        d = math.sqrt(kl)
        gold = offset + _true_gain(method, alpha, beta, [d])[0] + noise * rng.normal()
        proxy = offset + 1.5 * alpha * d + noise * rng.normal()
        rows.append({"size": size, "params": params, "method": method, "step": step, "kl": kl, "sqrt_kl": d,
                     "proxy_reward": proxy, "gold_reward": gold})
  return rows


def _write_results(run_dir, rows, extra_lines=()):
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, "results.jsonl")
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
    for line in extra_lines:
      f.write(line + "\n")
  return path


def _ols_standard_errors(x, sigma):
  return sigma * np.sqrt(np.diag(np.linalg.inv(x.T @ x)))


def _r2(y, pred):
  return 1.0 - np.sum((y - pred) ** 2) / np.sum((y - np.mean(y)) ** 2)


# --- fits on arrays


def test_fit_linear_recovers_exact_coefficients():
  d = np.random.default_rng(1).uniform(0.0, 5.0, size=30)
  fit = scaling_fits.fit_linear(d, 0.7 * d - 1.3)
  assert fit.slope == pytest.approx(0.7, abs=1e-10)
  assert fit.intercept == pytest.approx(-1.3, abs=1e-10)
  assert fit.r2 == pytest.approx(1.0, abs=1e-12)
  assert fit.n == 30


def test_fit_linear_noisy_within_standard_errors_and_r2_is_pearson_squared():
  rng = np.random.default_rng(2)
  d = rng.uniform(0.0, 5.0, size=200)
  sigma = 0.2
  r = 0.7 * d - 1.3 + sigma * rng.normal(size=d.size)
  fit = scaling_fits.fit_linear(d, r)
  se_slope, se_intercept = _ols_standard_errors(np.stack([d, np.ones_like(d)], 1), sigma)
  # 4 standard errors: a wrong estimator is far outside, a right one inside with p ~ 1e-4.
  assert abs(fit.slope - 0.7) < 4 * se_slope
  assert abs(fit.intercept + 1.3) < 4 * se_intercept
  assert fit.r2 == pytest.approx(np.corrcoef(d, r)[0, 1] ** 2, abs=1e-12)
  slope, intercept = np.polyfit(d, r, 1)
  assert (fit.slope, fit.intercept) == pytest.approx((slope, intercept), abs=1e-10)


@pytest.mark.parametrize("method,fit_fn", [("bon", scaling_fits.fit_gao_bon), ("rl", scaling_fits.fit_gao_rl)])
def test_fit_gao_recovers_exact_coefficients(method, fit_fn):
  d = np.concatenate([[0.0, 0.0], np.random.default_rng(3).uniform(0.05, 4.0, size=25)])
  fit = fit_fn(d, _true_gain(method, 1.2, 0.25, d))
  assert fit.form == method
  assert (fit.alpha, fit.beta) == pytest.approx((1.2, 0.25), abs=1e-10)
  assert fit.r2 == pytest.approx(1.0, abs=1e-12)
  assert fit.n == 27
  np.testing.assert_allclose(fit.predict(d), _true_gain(method, 1.2, 0.25, d), atol=1e-10)
  assert fit.predict(np.array([0.0]))[0] == 0.0  # d log d continued by 0, no NaN


@pytest.mark.parametrize("method,fit_fn", [("bon", scaling_fits.fit_gao_bon), ("rl", scaling_fits.fit_gao_rl)])
def test_fit_gao_noisy_matches_normal_equations(method, fit_fn):
  rng = np.random.default_rng(4)
  d = rng.uniform(0.0, 4.0, size=300)
  sigma = 0.05
  gain = _true_gain(method, 1.2, 0.25, d) + sigma * rng.normal(size=d.size)
  fit = fit_fn(d, gain)
  # Independent solution: normal equations with the design built from the formula.
  second = d ** 2 if method == "bon" else np.where(d > 0, d * np.log(np.maximum(d, 1e-300)), 0.0)
  x = np.stack([d, -second], axis=1)
  alpha, beta = np.linalg.solve(x.T @ x, x.T @ gain)
  assert (fit.alpha, fit.beta) == pytest.approx((alpha, beta), rel=1e-9)
  assert fit.r2 == pytest.approx(_r2(gain, _true_gain(method, alpha, beta, d)), abs=1e-9)
  se_alpha, se_beta = _ols_standard_errors(x, sigma)
  assert abs(fit.alpha - 1.2) < 4 * se_alpha and abs(fit.beta - 0.25) < 4 * se_beta


def test_fit_gao_r2_is_about_the_mean_so_can_be_negative():
  # A constant gain is badly described by any curve through the origin: worse than its mean.
  d = np.linspace(0.5, 3.0, 20)
  fit = scaling_fits.fit_gao_bon(d, 2.0 + 0.01 * np.sin(7 * d))
  assert fit.r2 < 0


@pytest.mark.parametrize("fit_fn", [scaling_fits.fit_linear, scaling_fits.fit_gao_bon, scaling_fits.fit_gao_rl])
@pytest.mark.parametrize("d,r,match", [
    ([0.0, 1.0, 2.0], [0.0, 1.0], "equal length"),
    ([0.0, 1.0, np.nan], [0.0, 1.0, 2.0], "finite"),
    ([0.0, 1.0, 2.0], [0.0, np.inf, 2.0], "finite"),
    ([[0.0, 1.0], [2.0, 3.0]], [[0.0, 1.0], [2.0, 3.0]], "1-D"),
    ([1.0, 1.0, 1.0], [0.0, 1.0, 2.0], "at least 2 distinct"),
])
def test_fit_errors(fit_fn, d, r, match):
  with pytest.raises(ValueError, match=match):
    fit_fn(d, r)


@pytest.mark.parametrize("fit_fn", [scaling_fits.fit_gao_bon, scaling_fits.fit_gao_rl])
def test_fit_gao_errors_need_two_positive_d_and_no_negative_d(fit_fn):
  with pytest.raises(ValueError, match=r"2 distinct d > 0 to fit a curve, got 1"):
    fit_fn([0.0, 0.0, 1.0], [0.0, 0.1, 1.0])
  with pytest.raises(ValueError, match=">= 0"):
    fit_fn([-1.0, 1.0, 2.0], [0.0, 1.0, 2.0])
  scaling_fits.fit_linear([0.0, 1.0], [0.0, 1.0])  # the linear fit only needs two distinct d


# --- results file


def test_load_results_round_trip(tmp_path):
  rows = _synthetic_rows()
  _write_results(tmp_path, rows, extra_lines=[""])
  assert sweep_results.load_results(str(tmp_path)) == rows
  assert sweep_results.load_results(str(tmp_path / "results.jsonl")) == rows
  checkpoint = [{**row, "source": "hf:models/smollm2", "source_hash": "ab12"} for row in rows]
  _write_results(tmp_path, checkpoint)  # a size that is a checkpoint: its rows carry two more keys
  assert sweep_results.load_results(str(tmp_path)) == checkpoint


_GOOD = {"size": "s1", "params": 10, "method": "ppo", "step": 3, "kl": 4.0, "sqrt_kl": 2.0,
         "proxy_reward": 0.1, "gold_reward": -0.2}


@pytest.mark.parametrize("change,field", [
    ({"size": None}, "size"),
    ({"params": 1.5}, "params"),
    ({"method": "reinforce"}, "method"),
    ({"step": True}, "step"),
    ({"step": -1}, "step"),
    ({"kl": "4.0"}, "kl"),
    ({"gold_reward": None}, "gold_reward"),
    ({"proxy_reward": float("nan")}, "proxy_reward"),
    ({"sqrt_kl": 4.0}, "sqrt_kl"),  # not sqrt(kl)
    ({"source": ""}, "source"),  # a checkpoint size's provenance, when a row has it
    ({"source_hash": 12}, "source_hash"),
])
def test_load_results_bad_row_names_file_line_and_field(tmp_path, change, field):
  bad = {**_GOOD, **change}
  path = _write_results(tmp_path, [_GOOD, _GOOD, bad])
  with pytest.raises(ValueError, match=rf"^{re.escape(path)}:3: field '{field}'"):
    sweep_results.load_results(str(tmp_path))


def test_load_results_missing_field_and_bad_json(tmp_path):
  missing = {k: v for k, v in _GOOD.items() if k != "proxy_reward"}
  path = _write_results(tmp_path, [_GOOD, missing])
  with pytest.raises(ValueError, match=rf"^{re.escape(path)}:2: field 'proxy_reward' missing"):
    sweep_results.load_results(path)
  path = _write_results(tmp_path, [_GOOD], extra_lines=["", "{not json"])
  with pytest.raises(ValueError, match=rf"^{re.escape(path)}:3: not valid JSON"):
    sweep_results.load_results(path)
  _write_results(tmp_path, [])
  with pytest.raises(ValueError, match="no results"):
    sweep_results.load_results(path)


# --- fit_all


def test_fit_all_recovers_every_series_in_size_order():
  fits = scaling_fits.fit_all(list(reversed(_synthetic_rows())))
  assert [(f["size"], f["method"]) for f in fits] == [(s, m) for s in ("s1", "s2", "s3") for m in ("ppo", "bon")]
  for fit in fits:
    params, offset, alpha, beta = _SIZES[fit["size"]]
    assert fit["params"] == params
    assert fit["n"] == (len(_RL_STEPS) if fit["method"] == "ppo" else len(_BON_NS))
    assert fit["gao_form"] == ("bon" if fit["method"] == "bon" else "rl")
    assert (fit["gao_alpha"], fit["gao_beta"]) == pytest.approx((alpha, beta), abs=1e-10)
    assert (fit["proxy_slope"], fit["proxy_intercept"]) == pytest.approx((1.5 * alpha, offset), abs=1e-10)
    assert fit["proxy_r2"] == pytest.approx(1.0, abs=1e-12)
    assert fit["gold_at_zero"] == pytest.approx(offset, abs=1e-12)


def test_fit_all_gain_is_over_the_mean_gold_at_zero_kl():
  rows = [r for r in _synthetic_rows() if r["size"] == "s2"]
  # Three initial-policy evaluations (e.g. seeds) with gold = offset + {-0.3, 0, +0.3}: the mean
  # is the offset, so the fit is exact only if that mean is subtracted (a point at d = 0 itself has
  # no say in alpha, beta: the model is 0 there whatever they are).
  i = next(i for i, r in enumerate(rows) if r["method"] == "ppo" and r["step"] == 0)
  zero = rows[i]
  rows[i] = {**zero, "gold_reward": zero["gold_reward"] + 0.3}  # first, min and max are all != mean
  rows += [{**zero, "gold_reward": zero["gold_reward"] - 0.3}, zero]
  _, offset, alpha, beta = _SIZES["s2"]
  rows = [{**r, "gold_reward": r["gold_reward"] + (5.0 if r["method"] == "ppo" else 0.0)} for r in rows]
  rl = next(f for f in scaling_fits.fit_all(rows) if f["method"] == "ppo")
  assert rl["gold_at_zero"] == pytest.approx(offset + 5.0, abs=1e-12)
  assert (rl["gao_alpha"], rl["gao_beta"]) == pytest.approx((alpha, beta), abs=1e-10)
  rl_rows = [r for r in rows if r["method"] == "ppo"]
  d = np.array([r["sqrt_kl"] for r in rl_rows])
  gain = np.array([r["gold_reward"] for r in rl_rows]) - (offset + 5.0)
  direct = scaling_fits.fit_gao_rl(d, gain)
  assert (rl["gao_alpha"], rl["gao_beta"], rl["gao_r2"]) == pytest.approx((direct.alpha, direct.beta, direct.r2),
                                                                          abs=1e-12)
  assert rl["gao_r2"] < 1.0  # the spread at d = 0 is left in the residuals


def test_fit_all_errors():
  rows = [r for r in _synthetic_rows() if not (r["size"] == "s2" and r["method"] == "bon" and r["step"] == 1)]
  with pytest.raises(ValueError, match="size 's2', method 'bon': no point at kl == 0"):
    scaling_fits.fit_all(rows)
  rows = _synthetic_rows()
  rows[3] = {**rows[3], "params": 7}
  with pytest.raises(ValueError, match="size 's1' has two parameter counts"):
    scaling_fits.fit_all(rows)
  rows = _synthetic_rows()
  rows[3] = {**rows[3], "method": "ppo2"}
  with pytest.raises(ValueError, match=r"unknown method\(s\) \['ppo2'\]; known methods: \[.*'ppo'"):
    scaling_fits.fit_all(rows)


def test_mean_curves_average_rows_sharing_a_step():
  rows = _synthetic_rows()
  extra = {**rows[5], "gold_reward": rows[5]["gold_reward"] + 1.0}
  curves = sweep_results.mean_curves(rows + [extra])
  rl = curves[("s1", "ppo")]
  np.testing.assert_array_equal(rl["step"], np.arange(13))
  assert rl["gold_reward"][5] == pytest.approx(rows[5]["gold_reward"] + 0.5)


# --- outputs


def _parse_table(path):
  with open(path) as f:  # the first table (scaling.md goes on with the monitors' section)
    lines = [line for line in f.read().split("\n\n")[0].splitlines(keepends=True) if line.startswith("| ")]
  header = [c.strip() for c in lines[0].strip("|\n").split("|")]
  return header, [[c.strip() for c in line.strip("|\n").split("|")] for line in lines[1:]]


def test_analyse_writes_table_json_and_plots_matching_fit_all(tmp_path):
  rows = _synthetic_rows(noise=0.05, seed=5)
  _write_results(tmp_path, rows)
  paths = sa.analyse(str(tmp_path))
  assert set(paths) == {"table", "fits", "reward_vs_sqrt_kl", "proxy_vs_gold", "slope_vs_size",
                        "methods_table", "methods_frontier", "differences", "monitors"}
  for name in ("reward_vs_sqrt_kl", "proxy_vs_gold", "slope_vs_size"):
    assert paths[name] == str(tmp_path / "analysis" / f"{name}.png")
    with open(paths[name], "rb") as f:
      data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
  fits = scaling_fits.fit_all(rows)
  with open(paths["fits"]) as f:  # one seed: no intervals, written as null
    assert json.load(f) == [{k: None if k.endswith(("_lo", "_hi")) else v for k, v in fit.items()} for fit in fits]
  header, table = _parse_table(paths["table"])
  assert len(table) == len(fits) == 6
  numeric = {"proxy slope": "proxy_slope", "proxy intercept": "proxy_intercept", "proxy R^2": "proxy_r2",
             "gold slope": "gold_slope", "gold intercept": "gold_intercept", "gold R^2": "gold_r2",
             "Gao alpha": "gao_alpha", "Gao beta": "gao_beta", "Gao R^2": "gao_r2"}
  for cells, fit in zip(table, fits):
    row = dict(zip(header, cells))
    assert (row["size"], int(row["params"]), row["method"], int(row["n points"])) == (
        fit["size"], fit["params"], fit["method"], fit["n"])
    for title, key in numeric.items():  # 4 significant figures in the table
      assert float(row[title]) == pytest.approx(fit[key], rel=1e-3, abs=1e-12), title


def test_reward_plot_draws_each_series_and_its_gao_curve():
  rows = _synthetic_rows()
  fits = scaling_fits.fit_all(rows)
  fig = scaling_figures.reward_vs_sqrt_kl_figure(rows, fits)
  ax_proxy, ax_gold = fig.axes
  assert len(ax_proxy.lines) == 6 and len(ax_gold.lines) == 12
  dotted = [line for line in ax_gold.lines if line.get_linestyle() == ":"]
  assert len(dotted) == 6
  for line, fit in zip(dotted, fits):
    x, y = line.get_data()
    np.testing.assert_allclose(y, scaling_fits.gao_curve(fit, x), atol=1e-12)
    np.testing.assert_allclose(y - fit["gold_at_zero"], _true_gain(fit["method"], *_SIZES[fit["size"]][2:], x),
                               atol=1e-9)


def test_cli_prints_table_and_paths(tmp_path, capsys):
  _write_results(tmp_path, _synthetic_rows())
  sa.main(["scaling_analysis", str(tmp_path)])
  out = capsys.readouterr().out
  assert "| size | params | method |" in out
  assert f"slope_vs_size: {tmp_path / 'analysis' / 'slope_vs_size.png'}" in out


def test_fit_all_reports_a_degenerate_series_instead_of_failing():
  # A policy that never moved: its RL points all sit at one KL. The other series still fit.
  rows = [r for r in _synthetic_rows() if not (r["size"] == "s1" and r["method"] == "ppo" and r["step"] > 1)]
  fits = {(f["size"], f["method"]): f for f in scaling_fits.fit_all(rows)}
  bad = fits[("s1", "ppo")]
  assert bad["n"] == 2 and "Gao fit: need at least 2 distinct d > 0" in bad["note"]
  assert math.isnan(bad["gao_alpha"]) and math.isnan(bad["gao_r2"])
  assert bad["proxy_slope"] == pytest.approx(scaling_fits.fit_linear([r["sqrt_kl"] for r in rows[:2]],
                                                           [r["proxy_reward"] for r in rows[:2]]).slope)
  good = fits[("s1", "bon")]
  assert good["note"] == "" and np.isfinite(good["gao_alpha"])


def test_gain_baseline_is_the_kl_zero_point_not_a_negative_kl_estimate():
  rows = [r for r in _synthetic_rows() if r["size"] == "s1" and r["method"] == "ppo"]
  baseline = rows[0]["gold_reward"]
  # A later iteration whose k1 estimate came out negative: sqrt_kl is 0 but it is not the start.
  rows.append({**rows[1], "step": 99, "kl": -0.01, "sqrt_kl": 0.0, "gold_reward": baseline + 5.0})
  (fit,) = scaling_fits.fit_all(rows)
  assert fit["gold_at_zero"] == baseline


def test_results_written_before_the_methods_had_names_load_as_ppo(tmp_path):
  rows = _synthetic_rows()
  old = [{**r, "method": "rl"} if r["method"] == "ppo" else r for r in rows]
  _write_results(tmp_path, old)
  assert sweep_results.load_results(str(tmp_path)) == rows
