"""Which differences between methods and between sizes the seeds support (differences.md).

Methods: each method against PPO at the size's common KL (the largest KL every method and seed of
that size reached), in gold reward. Sizes: each size against the next smaller one, per method, in
the slope of gold reward against sqrt(KL) (Bai et al.'s scaling claim is that it grows with size).
A difference is the difference of the seed means, with a 95% bootstrap interval that resamples
each side's seeds independently; it is called significant when that interval excludes 0.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from rlhf_jax import storage
from rlhf_jax.analysis import fits as scaling_fits
from rlhf_jax.analysis import methods as method_frontier
from rlhf_jax.analysis.intervals import Interval, bootstrap_difference, format_interval, seeds_note
from rlhf_jax.analysis.tables import number_cell

BASELINE = "ppo"


def method_differences(rows: Sequence[dict]) -> list[dict]:
  """Per size and method other than PPO: gold reward at the common KL minus PPO's."""
  common = method_frontier.common_kl(rows)
  at = method_frontier.seed_gold_at_kl(rows, sorted(set(common.values())))
  out = []
  for (size, method), values in at.items():
    if method == BASELINE or (size, BASELINE) not in at:
      continue
    k = common[size]
    out.append({"size": size, "method": method, "kl": k,
                "difference": bootstrap_difference(values[k], at[(size, BASELINE)][k])})
  return out


def size_differences(rows: Sequence[dict]) -> list[dict]:
  """Per method, each size against the next smaller one: the difference in gold slope."""
  per_seed = scaling_fits.seed_fits(rows)
  params = {row["size"]: row["params"] for row in rows}
  out = []
  for method in dict.fromkeys(m for _, m in per_seed):
    sizes = sorted((s for s, m in per_seed if m == method), key=lambda s: (params[s], s))
    for small, large in zip(sizes, sizes[1:]):
      slopes = lambda s: np.array([f["gold_slope"] for f in per_seed[(s, method)].values()])
      out.append({"method": method, "larger": large, "smaller": small,
                  "difference": bootstrap_difference(slopes(large), slopes(small))})
  return out


def _verdict(iv: Interval) -> str:
  if math.isnan(iv.mean):
    return "no value"
  if iv.n < 2:
    return "one seed: cannot tell"
  if iv.significant:
    return "significant, " + ("higher" if iv.mean > 0 else "lower")
  return "not significant (interval includes 0)"


def format_differences(rows: Sequence[dict]) -> str:
  fmt = lambda iv: format_interval(iv, lambda v: number_cell(float(v)))
  methods, sizes = method_differences(rows), size_differences(rows)
  lines = ["## Methods against PPO: gold reward at the size's common KL", "",
           "| size | method | common KL | gold difference (method - PPO) | verdict |", "|---|---|---|---|---|"]
  lines += [f"| {d['size']} | {d['method']} | {number_cell(d['kl'])} | {fmt(d['difference'])} | "
            f"{_verdict(d['difference'])} |" for d in methods]
  lines += ["", "## Sizes: slope of gold reward against sqrt(KL), each size against the next smaller", "",
            "| method | sizes | gold slope difference (larger - smaller) | verdict |", "|---|---|---|---|"]
  lines += [f"| {d['method']} | {d['larger']} - {d['smaller']} | {fmt(d['difference'])} | "
            f"{_verdict(d['difference'])} |" for d in sizes]
  counts = [d["difference"].n for d in (*methods, *sizes)]
  lines += ["", "Differences of seed means; the interval resamples each side's seeds independently, and a "
            "difference is significant when its 95% interval excludes 0. " + seeds_note(counts or [1])]
  return "\n".join(lines)


def write(rows: Sequence[dict], out_dir: str) -> dict[str, str]:
  path = storage.join(out_dir, "differences.md")
  storage.write_atomic(path, format_differences(rows) + "\n")
  return {"differences": path}
