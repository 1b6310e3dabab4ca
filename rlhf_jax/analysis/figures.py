"""Figures of the scaling curves, drawn on their own Agg canvas (no pyplot), so this works
headless and leaves a notebook's backend alone.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from rlhf_jax import storage
from rlhf_jax.analysis.fits import gao_curve
from rlhf_jax.analysis.results import mean_curves

PAPER_METHODS = ("ppo", "bon")  # the comparison of the three figures below


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


def band(ax, c: dict, field: str, colour, pick=None) -> None:
  """The 95% interval over seeds of a mean_curves field around its curve (nothing with one seed)."""
  if c["seeds"] < 2:
    return
  pick = np.ones(len(c["step"]), bool) if pick is None else pick
  x, lo, hi = c["sqrt_kl"][pick], c[f"{field}_lo"][pick], c[f"{field}_hi"][pick]
  order = np.argsort(x, kind="stable")
  ax.fill_between(x[order], lo[order], hi[order], color=colour, alpha=0.15, linewidth=0)


def reward_vs_sqrt_kl_figure(rows: Sequence[dict], fits: Sequence[dict]) -> Figure:
  """Proxy | gold reward against sqrt(KL): PPO solid with markers, bon dashed, Gao fit dotted; with
  several seeds, means over seeds in a band of their 95% bootstrap interval."""
  rows, fits = _paper(rows), _paper(fits)
  fig = _figure(2)
  ax_proxy, ax_gold = fig.subplots(1, 2, sharex=True)
  colours = _size_colours(rows)
  for (size, method), c in mean_curves(rows).items():
    style = dict(linestyle="-", marker="o", markersize=3) if method == "ppo" else dict(linestyle="--")
    ax_proxy.plot(c["sqrt_kl"], c["proxy_reward"], color=colours[size][1], **style)
    ax_gold.plot(c["sqrt_kl"], c["gold_reward"], color=colours[size][1], **style)
    band(ax_proxy, c, "proxy_reward", colours[size][1])
    band(ax_gold, c, "gold_reward", colours[size][1])
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
  return storage.save_figure(fig, path, dpi=120)


def plot_reward_vs_sqrt_kl(rows: Sequence[dict], fits: Sequence[dict], path: str) -> str:
  return _save(reward_vs_sqrt_kl_figure(rows, fits), path)


def plot_proxy_vs_gold(rows: Sequence[dict], path: str) -> str:
  return _save(proxy_vs_gold_figure(rows), path)


def plot_slope_vs_size(fits: Sequence[dict], path: str) -> str:
  return _save(slope_vs_size_figure(fits), path)
