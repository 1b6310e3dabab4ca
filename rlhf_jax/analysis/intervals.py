"""Percentile-bootstrap intervals over seeds, and whether a difference is significant.

A sweep has a handful of seeds per cell, so the bootstrap distribution is computed exactly where
that is cheap: every one of the n^n equally likely resamples of n values (n <= 6), and for a
difference every pair of resamples (up to a million pairs). Beyond that it is sampled with a fixed
generator, so the same values always give the same interval. The interval's ends are the
inverted-CDF quantiles (the smallest resampled mean whose cumulative weight reaches alpha/2, and
1 - alpha/2) of the distribution of the mean. With 3 seeds the percentile bootstrap covers less
than its nominal level; it is still the honest statement of how far the seeds disagree, and a
difference whose interval excludes 0 is reported as significant.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np

LEVEL = 0.95
_EXACT_RESAMPLES = 50_000  # n^n up to this is enumerated (n <= 6)
_EXACT_PAIRS = 1_000_000
_SAMPLED = 20_000  # resamples drawn when enumeration would be larger
_SEED = 0


@dataclasses.dataclass(frozen=True)
class Interval:
  """The mean of n values and its bootstrap interval [lo, hi]; lo = hi = nan for fewer than two."""
  mean: float
  lo: float
  hi: float
  n: int

  @property
  def significant(self) -> bool:
    """True when the interval excludes 0 (never with fewer than two values)."""
    return self.n >= 2 and (self.lo > 0 or self.hi < 0)


def _values(values) -> np.ndarray:
  v = np.asarray(values, np.float64).ravel()
  if v.size == 0:
    raise ValueError("no values to bootstrap")
  return v


def resampled_means(values) -> np.ndarray:
  """The bootstrap distribution of the mean: every resample's mean (exact, equally weighted) for
  small n, else _SAMPLED sampled ones."""
  v = _values(values)
  n = v.size
  if n ** n <= _EXACT_RESAMPLES:
    picks = np.array(list(itertools.product(range(n), repeat=n)), np.int64).reshape(-1, n)
  else:
    picks = np.random.default_rng(_SEED).integers(0, n, size=(_SAMPLED, n))
  return v[picks].mean(axis=1)


def _ends(distribution: np.ndarray, level: float) -> tuple[float, float]:
  alpha = 1.0 - level
  lo, hi = np.quantile(distribution, [alpha / 2, 1.0 - alpha / 2], method="inverted_cdf")
  return float(lo), float(hi)


def bootstrap_mean(values, level: float = LEVEL) -> Interval:
  """Mean of the values with its percentile-bootstrap interval."""
  v = _values(values)
  if v.size < 2 or not np.all(np.isfinite(v)):
    return Interval(float(v.mean()), math.nan, math.nan, int(v.size))
  return Interval(float(v.mean()), *_ends(resampled_means(v), level), int(v.size))


def bootstrap_difference(a, b, level: float = LEVEL) -> Interval:
  """mean(a) - mean(b), the two groups resampled independently (seeds of different runs are not
  paired); n is the smaller group's size."""
  a, b = _values(a), _values(b)
  n = min(a.size, b.size)
  diff = float(a.mean() - b.mean())
  if n < 2 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    return Interval(diff, math.nan, math.nan, int(n))
  exact = a.size ** a.size <= _EXACT_RESAMPLES and b.size ** b.size <= _EXACT_RESAMPLES
  if exact and (a.size ** a.size) * (b.size ** b.size) <= _EXACT_PAIRS:
    distribution = (resampled_means(a)[:, None] - resampled_means(b)[None, :]).ravel()
  else:
    rng = np.random.default_rng(_SEED)
    distribution = (a[rng.integers(0, a.size, (_SAMPLED, a.size))].mean(1)
                    - b[rng.integers(0, b.size, (_SAMPLED, b.size))].mean(1))
  return Interval(diff, *_ends(distribution, level), int(n))


def format_interval(iv: Interval, fmt=lambda v: f"{v:.4g}") -> str:
  """'mean [lo, hi]', or the mean alone when there is no interval (one seed)."""
  if math.isnan(iv.mean):
    return "nan"
  if math.isnan(iv.lo):
    return fmt(iv.mean)
  return f"{fmt(iv.mean)} [{fmt(iv.lo)}, {fmt(iv.hi)}]"


def seeds_note(seed_counts: Sequence[int]) -> str:
  """The sentence a table ends with: how many seeds its intervals are over, or that there are none."""
  counts = sorted(set(int(c) for c in seed_counts))
  if not counts or counts == [1]:
    return ("One seed per cell: no intervals, and no difference can be called significant. Run "
            "more seeds (config.seeds, e.g. (0, 1, 2)) for 95% bootstrap intervals.")
  over = counts[0] if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
  return (f"Means over {over} seeds, with 95% percentile-bootstrap intervals over seeds in brackets "
          f"(with few seeds such intervals are too narrow rather than too wide).")
