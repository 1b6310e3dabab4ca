"""Which optimiser buys the most gold reward per nat of KL: every method of a sweep on one frontier.

For each size, gold reward against sqrt(KL) for PPO, the critic-free methods (RLOO, GRPO, Dr. GRPO,
GSPO, DAPO), the direct-alignment losses DPO, IPO and SLiC (one trajectory per beta, each
evaluated along its training: the hump of Rafailov et al. 2024 when gold falls) and best-of-N on one panel, and a table of the gold reward at a few KL budgets k: at the size's
"common KL" (the largest KL every method of that size reached, where all can be compared) and at
fixed budgets. The value at k is read off the measured points (averaged over seeds), sorted by
KL and interpolated linearly; a method that never reached KL = k has no value there (no
extrapolation), and the Gao fit of each method (rlhf_jax.analysis.report) is given beside it.
Written by rlhf_jax.analysis.report.analyse into <run_dir>/analysis/: methods.md, methods_frontier.png.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from rlhf_jax import storage
from rlhf_jax.analysis import figures as scaling_figures
from rlhf_jax.analysis import results as sweep_results
from rlhf_jax.analysis import tables as scaling_tables
from rlhf_jax.analysis.intervals import bootstrap_mean, format_interval, seeds_note

KL_BUDGETS = (0.25, 0.5, 1.0, 2.0, 4.0)  # nats; a column is kept if some method reached it
_STYLE = {"ppo": ("tab:blue", "o", "-"), "rloo": ("tab:green", "^", "-"), "grpo": ("tab:red", "v", "-"),
          "dr_grpo": ("tab:orange", "<", "-"), "gspo": ("tab:brown", ">", "-"), "dapo": ("tab:olive", "P", "-"),
          "dpo": ("tab:purple", "D", "-"), "ipo": ("tab:pink", "d", "-"), "slic": ("tab:cyan", "X", "-"),
          "bon": ("tab:grey", "s", "--")}


def seed_gold_at_kl(rows: Sequence[dict], ks: Sequence[float]) -> dict[tuple[str, str], dict[float, np.ndarray]]:
  """(size, method) -> {k: each seed's gold reward at KL = k}, read off that seed's own points
  (nan for a seed whose points end below k)."""
  out, ks = {}, list(dict.fromkeys(float(k) for k in ks))
  for key, series in sweep_results.group_series(rows).items():
    values = {k: [] for k in ks}
    for points in sweep_results.by_seed(series).values():
      (c,) = sweep_results.mean_curves(points).values()
      kl = c["sqrt_kl"] ** 2
      order = np.argsort(kl, kind="stable")
      kl, gold = kl[order], c["gold_reward"][order]
      for k in ks:
        values[k].append(float(np.interp(k, kl, gold)) if kl[0] <= k <= kl[-1] else math.nan)
    out[key] = {k: np.array(v) for k, v in values.items()}
  return out


def gold_at_kl(rows: Sequence[dict], ks: Sequence[float] = KL_BUDGETS) -> dict[tuple[str, str], dict[float, float]]:
  """(size, method) -> {k: gold reward at KL = k, the mean over seeds}, nan where a seed's points end below k."""
  return {key: {k: float(v.mean()) for k, v in at.items()} for key, at in seed_gold_at_kl(rows, ks).items()}


def common_kl(rows: Sequence[dict]) -> dict[str, float]:
  """size -> the largest KL that every method and seed of that size reached."""
  out = {}
  for (size, _), series in sweep_results.group_series(rows).items():
    for points in sweep_results.by_seed(series).values():
      # As seed_gold_at_kl reads KL, sqrt_kl squared: a row's kl itself can be an ulp above it.
      reached = float(np.max([row["sqrt_kl"] for row in points])) ** 2
      out[size] = min(out.get(size, math.inf), reached)
  return out


def format_table(rows: Sequence[dict], fits: Sequence[dict], ks: Sequence[float] = KL_BUDGETS) -> str:
  fit_of = {(f["size"], f["method"]): f for f in fits}
  max_kl = {key: float(np.max(c["sqrt_kl"]) ** 2) for key, c in sweep_results.mean_curves(rows).items()}
  common = common_kl(rows)
  at = seed_gold_at_kl(rows, (*ks, *common.values()))  # one pass: the budgets and every size's common KL
  reached = [k for k in ks if any(not np.isnan(v[k]).all() for v in at.values())]
  head = ["size", "method", "seeds", "common KL", "gold @ common KL", *(f"gold @ KL={k:g}" for k in reached),
          "max KL", "Gao alpha", "Gao beta"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  cell = lambda v: "-" if np.isnan(v).any() else format_interval(bootstrap_mean(v), scaling_tables.number_cell)
  for (size, method), values in at.items():
    f = fit_of.get((size, method), {})
    k = common[size]
    cells = [size, method, str(len(values[k])), scaling_tables.number_cell(k), cell(values[k]),
             *(cell(values[b]) for b in reached), scaling_tables.number_cell(max_kl[(size, method)]),
             scaling_tables.fit_cell(f, "gao_alpha"), scaling_tables.fit_cell(f, "gao_beta")]
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("\nGold reward (normalised gold PM score) at KL(policy || initial) = k nats, interpolated "
               "between each seed's measured points sorted by KL; '-' where a seed never "
               "reached k. Common KL: the largest KL every method and seed of that size reached. DPO pools its "
               "runs of every beta. Gao alpha, beta: the method's fit of the gold "
               "gain, d (alpha - beta log d) (best-of-N: d (alpha - beta d)). "
               + seeds_note([len(v[common[s]]) for (s, _), v in at.items()]))
  return "\n".join(lines)


def _bon_bound(ax, rows: Sequence[dict], size: str) -> None:
  """Where best-of-N's KL was measured, the same points at its analytic bound, for comparison."""
  bound = [r for r in rows if r["size"] == size and r["method"] == "bon" and "kl_bound" in r]
  if bound:
    ns = sorted({r["step"] for r in bound})
    mean = lambda n, f: float(np.mean([r[f] for r in bound if r["step"] == n]))
    ax.plot([math.sqrt(mean(n, "kl_bound")) for n in ns], [mean(n, "gold_reward") for n in ns], color="tab:grey",
            linestyle=":", marker="s", markersize=2, alpha=0.6, label="bon at KL bound")


def frontier_figure(rows: Sequence[dict]):
  """One panel per size: every method's gold reward against sqrt(KL) (with several seeds, their
  means in a band of the 95% interval over seeds)."""
  curves = sweep_results.mean_curves(rows)
  sizes = list(dict.fromkeys(size for size, _ in curves))
  fig = scaling_figures._figure(len(sizes), width=4.5)
  axes = np.atleast_1d(fig.subplots(1, len(sizes), sharey=True))
  for ax, size in zip(axes, sizes):
    for (s, method), c in curves.items():
      if s != size:
        continue
      colour, marker, ls = _STYLE[method]
      run = np.where(np.isnan(c["beta"]), -1.0, c["beta"])  # one trajectory per DPO beta
      for j, r in enumerate(dict.fromkeys(run.tolist())):
        pick = run == r
        ax.plot(c["sqrt_kl"][pick], c["gold_reward"][pick], color=colour, marker=marker, markersize=3,
                linestyle=ls, alpha=1.0 if j == 0 else 0.6, label=method if j == 0 else None)
        scaling_figures.band(ax, c, "gold_reward", colour, pick)
    _bon_bound(ax, rows, size)
    ax.set_title(f"size {size}")
    ax.set_xlabel("sqrt(KL(policy || initial)) [sqrt nats]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  axes[0].set_ylabel("gold PM reward (normalised)")
  return fig


def write(rows: Sequence[dict], fits: Sequence[dict], out_dir: str) -> dict[str, str]:
  table = storage.join(out_dir, "methods.md")
  storage.write_atomic(table, format_table(rows, fits) + "\n")
  return {"methods_table": table,
          "methods_frontier": storage.save_figure(frontier_figure(rows), storage.join(out_dir, "methods_frontier.png"),
                                                  dpi=120)}
