"""Scaling curves from a sweep's results.jsonl: reward against d = sqrt(KL) per model size.

  python -m rlhf_jax.scaling_analysis RUN_DIR

Fits, per (size, method) series:
- Bai et al. 2022: proxy and gold reward linear in d, r = a d + b.
- Gao et al. 2022 (synthetic gold-PM setup): the gold reward's gain over the initial policy,
  R_bon(d) = d (alpha - beta d) for best-of-N and R_RL(d) = d (alpha - beta log d) for RL (every
  other method: PPO, RLOO, GRPO, DPO).
  Both are linear in (alpha, beta), so they are solved by least squares through the origin.

Writes <RUN_DIR>/analysis/: scaling.md (table), fits.json, reward_vs_sqrt_kl.png,
proxy_vs_gold.png, slope_vs_size.png (those three compare PPO with best-of-N, as the papers do),
and the comparison of every method (rlhf_jax.method_frontier): methods.md, methods_frontier.png. Numpy float64 throughout; figures are drawn on their own
Agg canvas (no pyplot), so this works headless and leaves a notebook's backend alone.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

RESULTS_FILE = "results.jsonl"
ANALYSIS_DIR = "analysis"
METHODS = ("ppo", "rloo", "grpo", "dpo", "bon")
LEGACY_METHODS = {"rl": "ppo"}  # results.jsonl written before RLOO / GRPO / DPO existed
PAPER_METHODS = ("ppo", "bon")  # the comparison of the three figures below
_INT_FIELDS = ("params", "step")
_FLOAT_FIELDS = ("kl", "sqrt_kl", "proxy_reward", "gold_reward")


def _check_row(row, where: str) -> dict:
  if not isinstance(row, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")

  def bad(field, problem):
    return ValueError(f"{where}: field {field!r} {problem}")

  if not isinstance(row.get("size"), str) or not row["size"]:
    raise bad("size", "missing or not a non-empty string")
  if row.get("method") in LEGACY_METHODS:
    row = {**row, "method": LEGACY_METHODS[row["method"]]}
  if row.get("method") not in METHODS:
    raise bad("method", f"missing or not one of {METHODS}: {row.get('method')!r}")
  for field in _INT_FIELDS:  # bool is an int subclass; true/false is never a count
    if not isinstance(row.get(field), int) or isinstance(row[field], bool) or row[field] < 0:
      raise bad(field, f"missing or not a non-negative integer: {row.get(field)!r}")
  for field in _FLOAT_FIELDS:
    v = row.get(field)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
      raise bad(field, f"missing or not a finite number: {v!r}")
  if row["sqrt_kl"] < 0:
    raise bad("sqrt_kl", f"is negative: {row['sqrt_kl']!r}")
  # A sampled KL estimate can come out slightly negative; sqrt_kl is then expected to be 0.
  if not math.isclose(row["sqrt_kl"], math.sqrt(max(row["kl"], 0.0)), rel_tol=1e-6, abs_tol=1e-9):
    raise bad("sqrt_kl", f"{row['sqrt_kl']!r} is not sqrt(kl) = sqrt({row['kl']!r})")
  return row


def load_results(run_dir_or_file: str) -> list[dict]:
  """Rows of a sweep's results.jsonl (a run directory or the file itself), each validated.

  A missing or ill-typed field raises ValueError naming the file, line and field."""
  path = run_dir_or_file
  if os.path.isdir(path):
    path = os.path.join(path, RESULTS_FILE)
  rows = []
  with open(path) as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
      rows.append(_check_row(row, where))
  if not rows:
    raise ValueError(f"{path}: no results")
  return rows


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


def group_series(rows: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
  """Rows by (size, method), ordered by params, then size, then method in METHODS order."""
  params, groups = {}, {}
  for row in rows:
    if params.setdefault(row["size"], row["params"]) != row["params"]:
      raise ValueError(f"size {row['size']!r} has two parameter counts: "
                       f"{params[row['size']]} and {row['params']}")
    groups.setdefault((row["size"], row["method"]), []).append(row)
  order = lambda key: (params[key[0]], key[0], METHODS.index(key[1]))
  return {key: groups[key] for key in sorted(groups, key=order)}


def _column(series: Sequence[dict], field: str) -> np.ndarray:
  return np.array([row[field] for row in series], np.float64)


def fit_all(rows: Sequence[dict]) -> list[dict]:
  """One flat dict per (size, method): linear fits of proxy and gold reward against sqrt_kl, and
  the Gao fit (form by method) of the gold gain over the series' mean gold reward at d = 0."""
  fits = []
  for (size, method), series in group_series(rows).items():
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
    fits.append({
        "size": size, "params": series[0]["params"], "method": method, "n": int(d.size),
        "proxy_slope": proxy.slope, "proxy_intercept": proxy.intercept, "proxy_r2": proxy.r2,
        "gold_slope": gold_fit.slope, "gold_intercept": gold_fit.intercept, "gold_r2": gold_fit.r2,
        "gao_form": gao.form, "gao_alpha": gao.alpha, "gao_beta": gao.beta, "gao_r2": gao.r2,
        "gold_at_zero": gold_at_zero, "max_sqrt_kl": float(d.max()), "note": "; ".join(notes),
    })
  return fits


def gao_curve(fit: dict, d) -> np.ndarray:
  """Gold reward predicted by a fit_all entry's Gao fit: gold at d = 0 plus the fitted gain."""
  gao = GaoFit(fit["gao_form"], fit["gao_alpha"], fit["gao_beta"], fit["gao_r2"], fit["n"])
  return fit["gold_at_zero"] + gao.predict(d)


_TABLE_COLUMNS = (("size", "size"), ("params", "params"), ("method", "method"),
                  ("proxy_slope", "proxy slope"), ("proxy_intercept", "proxy intercept"),
                  ("proxy_r2", "proxy R^2"), ("gold_slope", "gold slope"),
                  ("gold_intercept", "gold intercept"), ("gold_r2", "gold R^2"),
                  ("gao_alpha", "Gao alpha"), ("gao_beta", "Gao beta"), ("gao_r2", "Gao R^2"),
                  ("n", "n points"), ("note", "note"))


def _cell(v) -> str:
  if isinstance(v, float):
    return "nan" if math.isnan(v) else f"{v:.4g}"
  return str(v)


def format_table(fits: Sequence[dict]) -> str:
  """Markdown table of fit_all's output."""
  lines = ["| " + " | ".join(title for _, title in _TABLE_COLUMNS) + " |",
           "|" + "---|" * len(_TABLE_COLUMNS)]
  lines += ["| " + " | ".join(_cell(fit[key]) for key, _ in _TABLE_COLUMNS) + " |" for fit in fits]
  lines.append("\nLinear fits (Bai et al. 2022): reward = slope * sqrt(KL) + intercept. Gao et al. 2022 "
               "fits of the gold gain over d = 0: bon d (alpha - beta d), RL methods d (alpha - beta log d), "
               "through the origin; their R^2 is about the mean gain and can be negative.")
  return "\n".join(lines)


def write_table(fits: Sequence[dict], path: str) -> tuple[str, str]:
  """Writes the Markdown table to path and the fits to fits.json beside it; returns both paths."""
  with open(path, "w") as f:
    f.write(format_table(fits) + "\n")
  json_path = os.path.join(os.path.dirname(path), "fits.json")
  # JSON has no NaN: an undefined R^2 is written as null.
  clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in fit.items()} for fit in fits]
  with open(json_path, "w") as f:
    json.dump(clean, f, indent=1, allow_nan=False)
  return path, json_path


def mean_curves(rows: Sequence[dict]) -> dict[tuple[str, str], dict[str, np.ndarray]]:
  """Per (size, method), arrays sorted by (beta, step) of step, sqrt_kl, proxy_reward and
  gold_reward, averaged over rows that share them (e.g. seeds); also 'params'. Only DPO rows have
  a beta (one run per beta); the others' is nan."""
  curves = {}
  for key, series in group_series(rows).items():
    point_of = [(float(row.get("beta", math.nan)), row["step"]) for row in series]
    points = sorted(set(point_of), key=lambda p: (0.0 if math.isnan(p[0]) else p[0], p[1]))
    index = np.array([points.index(p) for p in point_of])
    curve = {"step": np.array([p[1] for p in points]), "beta": np.array([p[0] for p in points]),
             "params": series[0]["params"]}
    for field in ("sqrt_kl", "proxy_reward", "gold_reward"):
      values = _column(series, field)
      curve[field] = np.array([values[index == i].mean() for i in range(len(points))])
    curves[key] = curve
  return curves


def _size_colours(rows_or_fits: Sequence[dict]) -> dict[str, tuple[str, tuple]]:
  """size -> (legend label, colour), small to large along viridis."""
  from matplotlib import colormaps
  sizes = sorted({(r["params"], r["size"]) for r in rows_or_fits})
  positions = np.linspace(0.0, 0.9, len(sizes)) if len(sizes) > 1 else [0.0]
  return {size: (f"{size} ({params:.3g} params)", colormaps["viridis"](float(x)))
          for (params, size), x in zip(sizes, positions)}


def _figure(ncols: int, width: float = 5.0) -> Figure:
  fig = Figure(figsize=(width * ncols, 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _style_legend(ax, colours: dict[str, tuple[str, tuple]], styles: Sequence[tuple[str, str]]) -> None:
  handles = [Line2D([], [], color=c, label=label) for label, c in colours.values()]
  handles += [Line2D([], [], color="grey", linestyle=ls, label=label) for ls, label in styles]
  ax.legend(handles=handles, fontsize="small")


def reward_vs_sqrt_kl_figure(rows: Sequence[dict], fits: Sequence[dict]) -> Figure:
  """Proxy | gold reward against sqrt(KL): PPO solid with markers, bon dashed, Gao fit dotted."""
  rows, fits = _paper(rows), _paper(fits)
  fig = _figure(2)
  ax_proxy, ax_gold = fig.subplots(1, 2, sharex=True)
  colours = _size_colours(rows)
  for (size, method), c in mean_curves(rows).items():
    style = dict(linestyle="-", marker="o", markersize=3) if method == "ppo" else dict(linestyle="--")
    ax_proxy.plot(c["sqrt_kl"], c["proxy_reward"], color=colours[size][1], **style)
    ax_gold.plot(c["sqrt_kl"], c["gold_reward"], color=colours[size][1], **style)
  for fit in fits:
    d = np.linspace(0.0, fit["max_sqrt_kl"], 100)
    ax_gold.plot(d, gao_curve(fit, d), color=colours[fit["size"]][1], linestyle=":")
  for ax, name in ((ax_proxy, "proxy"), (ax_gold, "gold")):
    ax.set_xlabel("sqrt(KL(policy || initial)) [sqrt nats]")
    ax.set_ylabel(f"{name} PM reward (normalised)")
    ax.set_title(f"{name} reward")
    ax.grid(alpha=0.3)
  _style_legend(ax_gold, colours, (("-", "RL (PPO)"), ("--", "best-of-N"), (":", "Gao et al. fit")))
  return fig


def proxy_vs_gold_figure(rows: Sequence[dict]) -> Figure:
  """Gold reward against the proxy reward being optimised. Where gold turns down while proxy keeps
  rising, the proxy is being overoptimised (Gao et al. 2022)."""
  rows = _paper(rows)
  fig = _figure(1, width=5.5)
  ax = fig.subplots()
  colours = _size_colours(rows)
  for (size, method), c in mean_curves(rows).items():
    style = dict(linestyle="-" if method == "ppo" else "--", marker="o" if method == "ppo" else "s", markersize=3)
    ax.plot(c["proxy_reward"], c["gold_reward"], color=colours[size][1], **style)
  ax.set_xlabel("proxy PM reward (normalised)")
  ax.set_ylabel("gold PM reward (normalised)")
  ax.set_title("gold against proxy reward")
  ax.grid(alpha=0.3)
  _style_legend(ax, colours, (("-", "RL (PPO)"), ("--", "best-of-N")))
  return fig


def slope_vs_size_figure(fits: Sequence[dict]) -> Figure:
  """Fitted linear slopes d reward / d sqrt(KL) against non-embedding parameters (log x)."""
  fig = _figure(1, width=5.5)
  ax = fig.subplots()
  for method, ls in (("ppo", "-"), ("bon", "--")):
    series = [fit for fit in fits if fit["method"] == method]
    if not series:
      continue
    params = [fit["params"] for fit in series]
    for name, colour in (("proxy", "tab:blue"), ("gold", "tab:orange")):
      ax.plot(params, [fit[f"{name}_slope"] for fit in series], color=colour, linestyle=ls, marker="o",
              label=f"{name}, {method}")
  ax.set_xscale("log")
  ax.set_xlabel("non-embedding parameters")
  ax.set_ylabel("slope of reward against sqrt(KL)")
  ax.set_title("linear-fit slope against model size")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize="small")
  return fig


def _paper(rows_or_fits: Sequence[dict]) -> list[dict]:
  return [r for r in rows_or_fits if r["method"] in PAPER_METHODS]


def _save(fig: Figure, path: str) -> str:
  fig.savefig(path, dpi=120)
  return path


def plot_reward_vs_sqrt_kl(rows: Sequence[dict], fits: Sequence[dict], path: str) -> str:
  return _save(reward_vs_sqrt_kl_figure(rows, fits), path)


def plot_proxy_vs_gold(rows: Sequence[dict], path: str) -> str:
  return _save(proxy_vs_gold_figure(rows), path)


def plot_slope_vs_size(fits: Sequence[dict], path: str) -> str:
  return _save(slope_vs_size_figure(fits), path)


def analyse(run_dir: str) -> dict[str, str]:
  """Loads <run_dir>/results.jsonl, fits every series, writes the table, fits.json and the three
  plots into <run_dir>/analysis/; returns their paths by name."""
  from rlhf_jax import method_frontier  # it builds on this module's curves and figures
  rows = load_results(os.path.join(run_dir, RESULTS_FILE))
  fits = fit_all(rows)
  out = os.path.join(run_dir, ANALYSIS_DIR)
  os.makedirs(out, exist_ok=True)
  table, fits_json = write_table(fits, os.path.join(out, "scaling.md"))
  return {
      "table": table,
      "fits": fits_json,
      "reward_vs_sqrt_kl": plot_reward_vs_sqrt_kl(rows, fits, os.path.join(out, "reward_vs_sqrt_kl.png")),
      "proxy_vs_gold": plot_proxy_vs_gold(rows, os.path.join(out, "proxy_vs_gold.png")),
      "slope_vs_size": plot_slope_vs_size(fits, os.path.join(out, "slope_vs_size.png")),
      **method_frontier.write(rows, fits, out),
  }


def main(argv: Sequence[str]) -> None:
  from rlhf_jax import cli
  if len(argv) != 2:
    cli.fail("usage: python -m rlhf_jax.scaling_analysis RUN_DIR")
  paths = analyse(argv[1])
  with open(paths["table"]) as f:
    print(f.read())
  for name, path in paths.items():
    print(f"{name}: {path}")


if __name__ == "__main__":
  from rlhf_jax import cli
  cli.run(main)
