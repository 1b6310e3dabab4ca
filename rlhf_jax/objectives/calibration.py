"""PM evaluation statistics: accuracy with a confidence interval, calibration and ECE, score
normalisation. Plain numpy on host arrays of scores.

Calibration (Bai et al. 2022, figure 9): the PM predicts P(a preferred over b) = sigmoid(r_a - r_b).
Each comparison is counted in both orders, as (p, chosen-first: 1) and (1 - p, rejected-first: 0),
so that the predicted probabilities cover [0, 1] and a reliability diagram means something.
"""
from __future__ import annotations

import json
import math
from typing import NamedTuple

import numpy as np

from rlhf_jax import storage


def sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))  # no overflow for large |x|


class Accuracy(NamedTuple):
  accuracy: float
  low: float  # 95% Wilson score interval
  high: float
  n: int


Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
  """95% Wilson score interval of a proportion k / n (nan for n = 0)."""
  if n == 0:
    return math.nan, math.nan
  p = k / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return centre - half, centre + half


def accuracy_interval(r_chosen, r_rejected, z: float = Z95) -> Accuracy:
  """Fraction of comparisons with r_chosen > r_rejected (ties count as wrong), Wilson interval."""
  correct = np.asarray(r_chosen) > np.asarray(r_rejected)
  return Accuracy(float(correct.mean()), *wilson_interval(int(correct.sum()), correct.size, z), correct.size)


class Calibration(NamedTuple):
  bin_edges: np.ndarray  # [num_bins + 1]
  mean_predicted: np.ndarray  # [num_bins] mean predicted probability in the bin (nan if empty)
  frequency: np.ndarray  # [num_bins] empirical frequency of the first response being preferred
  counts: np.ndarray  # [num_bins]
  ece: float  # expected calibration error: sum_b (n_b / N) |frequency_b - mean_predicted_b|


def calibration(r_chosen, r_rejected, num_bins: int = 10) -> Calibration:
  p = sigmoid(np.asarray(r_chosen, np.float64) - np.asarray(r_rejected, np.float64))
  predicted = np.concatenate([p, 1.0 - p])
  outcome = np.concatenate([np.ones_like(p), np.zeros_like(p)])
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  which = np.clip(np.digitize(predicted, edges[1:-1], right=True), 0, num_bins - 1)
  counts = np.bincount(which, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_pred = np.bincount(which, predicted, num_bins) / counts
    freq = np.bincount(which, outcome, num_bins) / counts
  filled = counts > 0
  ece = float(np.sum(counts[filled] / predicted.size * np.abs(freq[filled] - mean_pred[filled])))
  return Calibration(edges, mean_pred, freq, counts, ece)


def calibration_table(cal: Calibration) -> str:
  """Markdown table of the reliability diagram."""
  rows = ["| predicted P(a > b) | mean predicted | empirical frequency | count |", "|---|---|---|---|"]
  for lo, hi, mp, fr, n in zip(cal.bin_edges[:-1], cal.bin_edges[1:], cal.mean_predicted, cal.frequency,
                               cal.counts):
    rows.append(f"| {lo:.1f}-{hi:.1f} | {mp:.3f} | {fr:.3f} | {n} |" if n else f"| {lo:.1f}-{hi:.1f} | - | - | 0 |")
  rows.append(f"\nExpected calibration error: {cal.ece:.4f}")
  return "\n".join(rows)


def reliability_plot(cal: Calibration, path: str, title: str = "PM calibration") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
  filled = cal.counts > 0
  ax.plot(cal.mean_predicted[filled], cal.frequency[filled], "o-", label=f"PM (ECE {cal.ece:.3f})")
  ax.set_xlabel("predicted P(a preferred)")
  ax.set_ylabel("empirical frequency")
  ax.set_title(title)
  ax.legend(loc="upper left")
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=120)  # rendered in memory: `path` may be in a bucket
  plt.close(fig)


NORMALISATION_FILE = "score_normalisation.json"


def score_normalisation(scores) -> dict[str, float]:
  """Mean and standard deviation of PM scores on a reference set, so that rewards given to PPO
  are (r - mean) / std whatever the PM's arbitrary offset and scale."""
  s = np.asarray(scores, np.float64).ravel()
  return {"mean": float(s.mean()), "std": float(max(s.std(), 1e-8)), "n": int(s.size)}


def save_normalisation(stats: dict, directory: str) -> str:
  path = storage.join(directory, NORMALISATION_FILE)
  storage.write_atomic(path, json.dumps(stats, indent=2))
  return path


def load_normalisation(directory: str) -> dict:
  path = storage.join(directory, NORMALISATION_FILE)
  if not storage.exists(path):
    raise FileNotFoundError(f"{path} not found: run rlhf_jax.trainers.eval_pm on this PM first")
  return json.loads(storage.read_text(path))
