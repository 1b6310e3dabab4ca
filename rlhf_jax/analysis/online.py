"""Iterated online against static RLHF: gold reward per round and per label, Elo per round.

Reads <workdir>/online.jsonl (rlhf_jax.experiments.online) and writes <workdir>/analysis/: online.md (per arm,
size and round: mean and spread over seeds), gold_vs_round.png and elo_vs_round.png.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from rlhf_jax import storage
from rlhf_jax.errors import DataError

METRICS = ("labels_so_far", "sqrt_kl", "proxy", "gold", "pm_acc_on_policy", "pm_acc_on_initial", "agreement", "elo")


def load_rows(workdir: str) -> list[dict]:
  path = storage.join(workdir, "online.jsonl")
  try:
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f"{path}: cannot read the online results ({e})") from None


def summarise(rows: Sequence[dict]) -> list[dict]:
  """Per (size, arm, round): mean and standard deviation over seeds of every metric."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["size"], r["arm"], r["round"]), []).append(r)
  size_order = {s: i for i, s in enumerate(dict.fromkeys(r["size"] for r in rows))}  # as configured
  out = []
  for (size, arm, rnd), rs in sorted(groups.items(), key=lambda kv: (size_order[kv[0][0]], *kv[0][1:])):
    row = {"size": size, "arm": arm, "round": rnd, "seeds": len(rs)}
    for m in METRICS:
      vals = np.array([r[m] for r in rs], np.float64)
      row[m], row[f"{m}_sd"] = float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    out.append(row)
  return out


def table(summary: Sequence[dict]) -> str:
  lines = ["| size | arm | round | labels | sqrt KL | proxy | gold | PM acc on policy | PM acc on initial | "
           "agreement | Elo |", "|---" * 11 + "|"]
  for s in summary:
    cell = lambda m, f="{:.3f}": f.format(s[m]) + (" ± " + f.replace("+", "").format(s[m + "_sd"]) if s["seeds"] > 1 else "")
    lines.append(f"| {s['size']} | {s['arm']} | {s['round']} | {s['labels_so_far']:.0f} | {cell('sqrt_kl')} | "
                 f"{cell('proxy')} | {cell('gold')} | {cell('pm_acc_on_policy')} | {cell('pm_acc_on_initial')} | "
                 f"{cell('agreement')} | {cell('elo', '{:+.0f}')} |")
  seeds = max((s["seeds"] for s in summary), default=0)
  return "\n".join(lines) + f"\n\nMeans over {seeds} seed(s), ± one standard deviation across seeds.\n"


def _series(summary, size, arm):
  return sorted((s for s in summary if s["size"] == size and s["arm"] == arm), key=lambda s: s["round"])


def gold_figure(summary: Sequence[dict]) -> Figure:
  """Gold reward against round (left) and against labels so far (right), per size and arm."""
  fig = Figure(figsize=(10, 4))
  axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
  sizes = list(dict.fromkeys(s["size"] for s in summary))
  for i, size in enumerate(sizes):
    for arm, style in (("online", "o-"), ("static", "s--")):
      ss = _series(summary, size, arm)
      if not ss:
        continue
      for ax, x in zip(axes, ("round", "labels_so_far")):
        ax.errorbar([s[x] for s in ss], [s["gold"] for s in ss], yerr=[s["gold_sd"] for s in ss], fmt=style,
                    color=f"C{i}", capsize=3, label=f"{size} {arm}")
  axes[0].set_xticks(sorted({s["round"] for s in summary}))
  for ax, label in zip(axes, ("round", "comparisons labelled so far")):
    ax.set_xlabel(label)
    ax.set_ylabel("gold PM reward (held-out prompts)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def elo_figure(summary: Sequence[dict]) -> Figure:
  fig = Figure(figsize=(5.5, 4))
  ax = fig.add_subplot()
  for i, size in enumerate(dict.fromkeys(s["size"] for s in summary)):
    for arm, style in (("online", "o-"), ("static", "s--")):
      ss = _series(summary, size, arm)
      if ss:
        ax.errorbar([s["round"] for s in ss], [s["elo"] for s in ss], yerr=[s["elo_sd"] for s in ss], fmt=style,
                    color=f"C{i}", capsize=3, label=f"{size} {arm}")
  ax.set_xticks(sorted({s["round"] for s in summary}))
  ax.set_xlabel("round")
  ax.set_ylabel("Elo judged by the gold PM (per size and seed, mean 0)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def analyse(workdir: str) -> dict[str, str]:
  summary = summarise(load_rows(workdir))
  out_dir = storage.join(workdir, "analysis")
  storage.makedirs(out_dir)
  paths = {"table": storage.join(out_dir, "online.md"), "gold_plot": storage.join(out_dir, "gold_vs_round.png"),
           "elo_plot": storage.join(out_dir, "elo_vs_round.png")}
  storage.write_atomic(paths["table"], table(summary))
  storage.save_figure(gold_figure(summary), paths["gold_plot"], dpi=120)
  storage.save_figure(elo_figure(summary), paths["elo_plot"], dpi=120)
  return paths
