"""A sweep's evaluations across sizes: the alignment tax or bonus (metric after RLHF minus before,
against model size; Bai et al. 2022, figure 3), bias before and after, and Elo against sqrt(KL).

Reads <workdir>/evals_<size>/evals.json (rlhf_jax.evals.stage) and writes into <workdir>/analysis/:
alignment_tax.md, alignment_tax.png, bias_before_after.png, elo_vs_sqrt_kl.png.
"""
from __future__ import annotations

import json
import math
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from rlhf_jax import storage
from rlhf_jax.errors import DataError
from rlhf_jax.evals.suite import headline

BIAS_METRICS = ("bias_cloze.mean_abs_bias", "winogender.pearson_r", "bbq.bias_ambig", "bbq.bias_disambig")


def load_evals(workdir: str, sizes: Sequence[str]) -> list[dict]:
  """One evals.json per size, in size order."""
  out = []
  for size in sizes:
    path = storage.join(workdir, f"evals_{size}", "evals.json")
    try:
      out.append(json.loads(storage.read_text(path)))
    except (OSError, json.JSONDecodeError) as e:
      raise DataError(f"{path}: cannot read the evaluations of size {size} ({e})") from None
  return out


def tax_rows(evals: Sequence[dict]) -> list[dict]:
  """One row per (size, headline metric): before, after, delta = after - before, and intervals."""
  rows = []
  for e in evals:
    before, after = headline(e["initial"]), headline(e["rlhf"])
    for metric in before:
      if metric in after:
        (b, b_ci), (a, a_ci) = before[metric], after[metric]
        rows.append({"size": e["size"], "params": e["params"], "metric": metric, "before": b, "after": a,
                     "delta": a - b, "before_ci": b_ci, "after_ci": a_ci})
  return rows


def _fmt(v, ci=None) -> str:
  if v is None or not math.isfinite(v):
    return "n/a"
  return f"{v:+.3f}" if ci is None else f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def tax_table(rows: Sequence[dict]) -> str:
  lines = ["| size | params | metric | before RLHF | after RLHF | after - before |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['size']} | {r['params']:.3g} | {r['metric']} | {_fmt(r['before'], r['before_ci'] or [math.nan] * 2)} "
                 f"| {_fmt(r['after'], r['after_ci'] or [math.nan] * 2)} | {_fmt(r['delta'])} |")
  return "\n".join(lines) + "\n"


def _grid(n: int) -> tuple[Figure, list]:
  cols = min(n, 3)
  fig = Figure(figsize=(4.2 * cols, 3.3 * math.ceil(n / cols)))
  return fig, [fig.add_subplot(math.ceil(n / cols), cols, i + 1) for i in range(n)]


def alignment_tax_figure(rows: Sequence[dict]) -> Figure:
  """after - before against non-embedding parameters, one panel per metric."""
  metrics = list(dict.fromkeys(r["metric"] for r in rows))
  fig, axes = _grid(max(len(metrics), 1))
  for ax, metric in zip(axes, metrics):
    rs = sorted((r for r in rows if r["metric"] == metric), key=lambda r: r["params"])
    ax.plot([r["params"] for r in rs], [r["delta"] for r in rs], "o-")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xscale("log")
    ax.set_title(metric, fontsize=9)
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("after RLHF - before")
  fig.tight_layout()
  return fig


def bias_figure(rows: Sequence[dict]) -> Figure:
  """Bias metrics before and after RLHF, per size, with their intervals."""
  metrics = [m for m in BIAS_METRICS if any(r["metric"] == m for r in rows)]
  fig, axes = _grid(max(len(metrics), 1))
  for ax, metric in zip(axes, metrics):
    rs = sorted((r for r in rows if r["metric"] == metric), key=lambda r: r["params"])
    x = np.arange(len(rs))
    for offset, key, label in ((-0.18, "before", "before RLHF"), (0.18, "after", "after RLHF")):
      ci = np.array([r[f"{key}_ci"] or [r[key]] * 2 for r in rs], np.float64).reshape(-1, 2)
      vals = np.array([r[key] for r in rs])
      err = np.abs(np.stack([vals - ci[:, 0], ci[:, 1] - vals]))
      ax.bar(x + offset, vals, width=0.36, yerr=err, capsize=3, label=label)
    ax.set_xticks(x, [r["size"] for r in rs])
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_title(metric, fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


_LEGACY = {"rl": "ppo"}  # evals.json written before the RL methods had names


def elo_figure(evals: Sequence[dict]) -> Figure:
  """Elo (judged by the gold PM) against sqrt(KL): PPO snapshots joined, best-of-n dashed."""
  fig = Figure(figsize=(5.5, 4))
  ax = fig.add_subplot()
  for i, e in enumerate(evals):
    colour = f"C{i}"
    for method, style in (("ppo", "o-"), ("bon", "s--")):
      rs = sorted((r for r in e.get("elo", []) if method in (r["method"], _LEGACY.get(r["method"]))
                   and math.isfinite(r["sqrt_kl"])),
                  key=lambda r: r["sqrt_kl"])
      if method == "bon":  # best-of-n starts from the initial policy too
        rs = [r for r in e.get("elo", []) if r["name"] == "initial"] + rs
      if not rs:
        continue
      err = np.array([[r["elo"] - r["elo_lo"], r["elo_hi"] - r["elo"]] for r in rs]).T
      ax.errorbar([r["sqrt_kl"] for r in rs], [r["elo"] for r in rs], yerr=np.abs(err), fmt=style, color=colour,
                  capsize=2, label=f"{e['size']} {'PPO' if method == 'ppo' else 'best-of-n'}")
  ax.set_xlabel("sqrt(KL(policy || initial))")
  ax.set_ylabel("Elo (gold PM judge; per size, mean 0)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def analyse(workdir: str, sizes: Sequence[str]) -> dict[str, str]:
  evals = load_evals(workdir, sizes)
  rows = tax_rows(evals)
  out_dir = storage.join(workdir, "analysis")
  storage.makedirs(out_dir)
  paths = {"alignment_tax_table": storage.join(out_dir, "alignment_tax.md")}
  storage.write_atomic(paths["alignment_tax_table"], tax_table(rows))
  figures = {"alignment_tax_plot": (alignment_tax_figure(rows), "alignment_tax.png"),
             "bias_plot": (bias_figure(rows), "bias_before_after.png")}
  if any(e.get("elo") for e in evals):
    figures["elo_plot"] = (elo_figure(evals), "elo_vs_sqrt_kl.png")
  for key, (fig, name) in figures.items():
    paths[key] = storage.save_figure(fig, storage.join(out_dir, name), dpi=120)
  return paths
