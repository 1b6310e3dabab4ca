"""Reward-hacking monitors over a sweep's evaluated points, per size, method and seed (DPO per beta):
the step where gold reward peaks, the step from which the proxy-gold gap widens, how fast KL grows,
and what the policy's entropy, its response length and the advantages' spread did along the run.

The gap is proxy minus gold reward, both normalised by their own PM's statistics, so only its
change along a run means anything: it "widens from" the step where it is smallest, after which
every evaluation has it larger. Best-of-N has no training steps and is left out.
"""
from __future__ import annotations

import json
import math
from typing import Sequence

import numpy as np

from rlhf_jax import storage

# Optional per-row monitor fields the sweep collects with each evaluation (results.py checks them).
TRACKED = ("entropy", "response_length", "advantage_std")


def _runs(rows: Sequence[dict]) -> dict[tuple, list[dict]]:
  runs = {}
  for row in rows:
    if row["method"] != "bon":
      key = (row["size"], row["method"], row.get("beta"), row.get("seed", 0))
      runs.setdefault(key, []).append(row)
  return {key: sorted(rs, key=lambda r: r["step"]) for key, rs in runs.items()}


def run_monitors(run: Sequence[dict]) -> dict:
  """One run's monitors from its evaluated points (steps increasing)."""
  steps = np.array([r["step"] for r in run])
  gold = np.array([r["gold_reward"] for r in run], np.float64)
  gap = np.array([r["proxy_reward"] - r["gold_reward"] for r in run], np.float64)
  kl = np.array([r["kl"] for r in run], np.float64)
  peak, low = int(np.argmax(gold)), int(np.argmin(gap))  # the first of equal values: a flat run has no peak
  out = {"points": len(run), "last_step": int(steps[-1]),
         "gold_peak_step": int(steps[peak]), "gold_peaks_inside": bool(gold[-1] < gold[peak]),
         "gold_at_peak": float(gold[peak]), "gold_at_last": float(gold[-1]),
         "gap_widens_from": int(steps[low]) if gap[-1] > gap[low] else None,
         "gap_first": float(gap[0]), "gap_last": float(gap[-1])}
  if len(run) >= 2:  # KL per step between consecutive evaluations: growth that speeds up is a warning
    rates = np.diff(kl) / np.maximum(np.diff(steps), 1)
    out |= {"kl_rate_first": float(rates[0]), "kl_rate_last": float(rates[-1])}
  for field in TRACKED:
    values = [r[field] for r in run if field in r]
    if values:
      out |= {f"{field}_first": float(values[0]), f"{field}_last": float(values[-1])}
  return out


def all_monitors(rows: Sequence[dict]) -> list[dict]:
  """run_monitors of every run, with its size, method, beta (DPO) and seed."""
  out = []
  for (size, method, beta, seed), run in _runs(rows).items():
    head = {"size": size, "method": method, "seed": seed} | ({} if beta is None else {"beta": beta})
    out.append(head | run_monitors(run))
  return out


def _num(v) -> str:
  return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _pair(m: dict, field: str) -> str:
  return f"{_num(m.get(field + '_first'))} -> {_num(m.get(field + '_last'))}"


def _run_name(m: dict) -> str:
  return f"{m['size']} {m['method']}" + (f" beta={m['beta']:g}" if "beta" in m else "")


def _peaks_by_run(monitors: Sequence[dict]) -> dict[str, tuple[int, int, float]]:
  """run name -> (seeds peaking inside, seeds, mean fall from peak to last over those seeds), for
  the runs where some seed peaks inside."""
  seeds = {}
  for m in monitors:
    seeds.setdefault(_run_name(m), []).append(m)
  out = {}
  for name, ms in seeds.items():
    falls = [m["gold_at_peak"] - m["gold_at_last"] for m in ms if m["gold_peaks_inside"]]
    if falls:
      out[name] = (len(falls), len(ms), float(np.mean(falls)))
  return out


def format_monitors(monitors: Sequence[dict]) -> str:
  """The Markdown section scaling.md ends with: a table per run and the peaks stated in words."""
  lines = ["## Reward-hacking monitors", "",
           "| size | method | seed | gold peaks at step (of) | gap widens from step | KL rate per step, first -> last "
           "| entropy | response length | advantage std |", "|" + "---|" * 9]
  for m in monitors:
    method = _run_name(m).split(" ", 1)[1]
    widen = "-" if m["gap_widens_from"] is None else str(m["gap_widens_from"])
    lines.append(f"| {m['size']} | {method} | {m['seed']} | {m['gold_peak_step']} ({m['last_step']}) | {widen} "
                 f"| {_pair(m, 'kl_rate')} | {_pair(m, 'entropy')} | {_pair(m, 'response_length')} "
                 f"| {_pair(m, 'advantage_std')} |")
  inside = [m for m in monitors if m["gold_peaks_inside"]]
  lines.append("")
  if not monitors:
    lines.append("No trained runs to monitor.")
  elif inside:
    lines.append("Gold reward peaks inside the run, then falls, for: " + "; ".join(
        f"{_run_name(m)} seed {m['seed']} "
        f"(step {m['gold_peak_step']} of {m['last_step']}: {m['gold_at_peak']:.4g} -> {m['gold_at_last']:.4g})"
        for m in inside) + ".")
    lines.append("Seeds whose gold reward peaks inside the run: " + "; ".join(
        f"{name} {k} of {n} (mean fall {fall:.3g})" for name, (k, n, fall) in _peaks_by_run(monitors).items()) + ".")
  else:
    lines.append("Gold reward peaks inside no run: every run has it highest at its last evaluation.")
  lines.append("Gap: proxy minus gold normalised reward; it widens from the step where it is smallest "
               "('-': smallest at the last evaluation). Entropy (nats per token) and response length are "
               "of the held-out evaluation samples; advantage std is over the last training batch "
               "before each evaluation (RL methods only).")
  return "\n".join(lines)


def write(rows: Sequence[dict], out_dir: str) -> dict[str, str]:
  """Appends the monitors section to <out_dir>/scaling.md and writes monitors.json."""
  monitors = all_monitors(rows)
  table = storage.join(out_dir, "scaling.md")
  storage.write_atomic(table, storage.read_text(table) + "\n" + format_monitors(monitors) + "\n")
  path = storage.join(out_dir, "monitors.json")
  storage.write_atomic(path, json.dumps(monitors, indent=1, allow_nan=False))
  return {"monitors": path}
