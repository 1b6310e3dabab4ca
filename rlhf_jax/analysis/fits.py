"""Fits of reward against d = sqrt(KL): Bai et al.'s line r = a d + b, and Gao et al.'s
R_bon(d) = d (alpha - beta d) and R_RL(d) = d (alpha - beta log d), both by least squares
through the origin. Numpy float64 throughout.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from rlhf_jax.analysis.intervals import bootstrap_mean
from rlhf_jax.analysis.results import METHODS, _column, by_seed, group_series


@dataclasses.dataclass(frozen=True)
class LinearFit:
  """r = slope * d + intercept. r2 = 1 - SS_res / SS_tot (the square of Pearson's r)."""
  slope: float
  intercept: float
  r2: float
  n: int

  def predict(self, d):
    return self.slope * np.asarray(d, np.float64) + self.intercept


@dataclasses.dataclass(frozen=True)
class GaoFit:
  """Gao et al. 2022 gold-reward gain: form 'bon': d (alpha - beta d); 'rl': d (alpha - beta log d).

  r2 = 1 - SS_res / SS_tot with SS_tot about the mean of the gain, as for a fit with intercept.
  The model has no intercept, so r2 can be negative (the fit is worse than the constant mean)."""
  form: str
  alpha: float
  beta: float
  r2: float
  n: int

  def predict(self, d):
    d = np.asarray(d, np.float64)
    if self.form == "bon":
      return d * (self.alpha - self.beta * d)
    return d * self.alpha - self.beta * _d_log_d(d)


def _d_log_d(d: np.ndarray) -> np.ndarray:
  """d log d, continued by its limit 0 at d = 0."""
  return np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)


def _check_xy(d, r, *, min_distinct: int, positive: bool) -> tuple[np.ndarray, np.ndarray]:
  d, r = np.asarray(d, np.float64), np.asarray(r, np.float64)
  if d.ndim != 1 or r.ndim != 1 or d.shape != r.shape:
    raise ValueError(f"d and r must be 1-D of equal length, got shapes {d.shape} and {r.shape}")
  if not (np.all(np.isfinite(d)) and np.all(np.isfinite(r))):
    raise ValueError("d and r must be finite (found NaN or inf)")
  if positive and np.any(d < 0):
    raise ValueError("d = sqrt(KL) must be >= 0")
  distinct = np.unique(d[d > 0] if positive else d)
  if distinct.size < min_distinct:
    kind = "distinct d > 0" if positive else "distinct d"
    raise ValueError(f"need at least {min_distinct} {kind} to fit a curve, got {distinct.size}: {distinct}")
  return d, r


def _least_squares(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
  """Coefficients of y ~ x @ coef and R^2 = 1 - SS_res / SS_tot (NaN when y is constant)."""
  coef, *_ = np.linalg.lstsq(x, y, rcond=None)
  ss_res = float(np.sum((y - x @ coef) ** 2))
  ss_tot = float(np.sum((y - y.mean()) ** 2))
  return coef, (1.0 - ss_res / ss_tot) if ss_tot > 0 else math.nan


def fit_linear(d, r) -> LinearFit:
  """Bai et al. 2022: reward linear in d = sqrt(KL)."""
  d, r = _check_xy(d, r, min_distinct=2, positive=False)
  (slope, intercept), r2 = _least_squares(np.stack([d, np.ones_like(d)], axis=1), r)
  return LinearFit(float(slope), float(intercept), r2, int(d.size))


def fit_gao_bon(d, gain) -> GaoFit:
  """Best-of-N gold gain = d (alpha - beta d), through the origin."""
  d, gain = _check_xy(d, gain, min_distinct=2, positive=True)
  (alpha, beta), r2 = _least_squares(np.stack([d, -d * d], axis=1), gain)
  return GaoFit("bon", float(alpha), float(beta), r2, int(d.size))


def fit_gao_rl(d, gain) -> GaoFit:
  """RL gold gain = d (alpha - beta log d), through the origin (d log d := 0 at d = 0)."""
  d, gain = _check_xy(d, gain, min_distinct=2, positive=True)
  (alpha, beta), r2 = _least_squares(np.stack([d, -_d_log_d(d)], axis=1), gain)
  return GaoFit("rl", float(alpha), float(beta), r2, int(d.size))


_GAO_FITS = {m: fit_gao_bon if m == "bon" else fit_gao_rl for m in METHODS}


# Fit values given as a mean over seeds with a bootstrap interval (fit_all's <key>_lo, <key>_hi).
WITH_INTERVALS = ("proxy_slope", "gold_slope", "gao_alpha", "gao_beta", "gold_at_zero")


def fit_all(rows: Sequence[dict]) -> list[dict]:
  """One flat dict per (size, method): linear fits of proxy and gold reward against sqrt_kl, and
  the Gao fit (form by method) of the gold gain over the series' mean gold reward at d = 0.

  Each seed's points are fitted on their own; a value is the mean over seeds, and the
  WITH_INTERVALS values have a 95% bootstrap interval over seeds (<key>_lo, <key>_hi; nan with
  one seed). 'seeds' counts them, 'n' the points of all seeds together."""
  fits = []
  for (size, method), series in group_series(rows).items():
    per_seed = {seed: _fit_series(size, method, points) for seed, points in by_seed(series).items()}
    first = next(iter(per_seed.values()))
    fit = {"size": size, "params": series[0]["params"], "method": method, "seeds": len(per_seed),
           "n": sum(f["n"] for f in per_seed.values()), "gao_form": first["gao_form"],
           "max_sqrt_kl": max(f["max_sqrt_kl"] for f in per_seed.values())}
    for key in ("proxy_slope", "proxy_intercept", "proxy_r2", "gold_slope", "gold_intercept", "gold_r2",
                "gao_alpha", "gao_beta", "gao_r2", "gold_at_zero"):
      iv = bootstrap_mean([f[key] for f in per_seed.values()])
      fit[key] = iv.mean
      if key in WITH_INTERVALS:
        fit[f"{key}_lo"], fit[f"{key}_hi"] = iv.lo, iv.hi
    notes = [(f"seed {seed}: " if len(per_seed) > 1 else "") + f["note"] for seed, f in per_seed.items() if f["note"]]
    fit["note"] = "; ".join(notes)
    fits.append(fit)
  return fits


def seed_fits(rows: Sequence[dict]) -> dict[tuple[str, str], dict[int, dict]]:
  """(size, method) -> {seed: that seed's fits}: what fit_all's means and intervals are over."""
  return {key: {seed: _fit_series(*key, points) for seed, points in by_seed(series).items()}
          for key, series in group_series(rows).items()}


def _fit_series(size: str, method: str, series: Sequence[dict]) -> dict:
  """The fits of one seed's points."""
  d, gold = _column(series, "sqrt_kl"), _column(series, "gold_reward")
  # The initial policy (RL step 0, bon N = 1) has KL exactly 0. A moved policy whose sampled KL
  # estimate came out negative also has sqrt_kl = 0, but is no baseline.
  at_zero = _column(series, "kl") == 0
  if not at_zero.any():
    raise ValueError(f"size {size!r}, method {method!r}: no point at kl == 0 "
                     "(RL step 0 / bon N = 1), so no baseline for the gold gain")
  gold_at_zero = float(gold[at_zero].mean())
  notes = []

  def attempt(what, fit, fallback, *args):
    try:  # a degenerate series (e.g. a policy that never moved) is reported, not fatal
      return fit(*args)
    except ValueError as e:
      notes.append(f"{what}: {e}")
      return fallback

  nan_linear = LinearFit(math.nan, math.nan, math.nan, int(d.size))
  proxy = attempt("proxy fit", fit_linear, nan_linear, d, _column(series, "proxy_reward"))
  gold_fit = attempt("gold fit", fit_linear, nan_linear, d, gold)
  gao = attempt("Gao fit", _GAO_FITS[method], GaoFit(method, math.nan, math.nan, math.nan, int(d.size)),
                d, gold - gold_at_zero)
  return {"n": int(d.size), "proxy_slope": proxy.slope, "proxy_intercept": proxy.intercept, "proxy_r2": proxy.r2,
          "gold_slope": gold_fit.slope, "gold_intercept": gold_fit.intercept, "gold_r2": gold_fit.r2,
          "gao_form": gao.form, "gao_alpha": gao.alpha, "gao_beta": gao.beta, "gao_r2": gao.r2,
          "gold_at_zero": gold_at_zero, "max_sqrt_kl": float(d.max()), "note": "; ".join(notes)}


def gao_curve(fit: dict, d) -> np.ndarray:
  """Gold reward predicted by a fit_all entry's Gao fit: gold at d = 0 plus the fitted gain."""
  gao = GaoFit(fit["gao_form"], fit["gao_alpha"], fit["gao_beta"], fit["gao_r2"], fit["n"])
  return fit["gold_at_zero"] + gao.predict(d)
