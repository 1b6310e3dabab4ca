"""The fits as a Markdown table (scaling.md) and as fits.json.
"""
from __future__ import annotations

import json
import math
from typing import Sequence

from rlhf_jax import storage
from rlhf_jax.analysis.intervals import Interval, format_interval, seeds_note

_TABLE_COLUMNS = (("size", "size"), ("params", "params"), ("method", "method"),
                  ("proxy_slope", "proxy slope"), ("proxy_intercept", "proxy intercept"),
                  ("proxy_r2", "proxy R^2"), ("gold_slope", "gold slope"),
                  ("gold_intercept", "gold intercept"), ("gold_r2", "gold R^2"),
                  ("gao_alpha", "Gao alpha"), ("gao_beta", "Gao beta"), ("gao_r2", "Gao R^2"),
                  ("seeds", "seeds"), ("n", "n points"), ("note", "note"))


def number_cell(v) -> str:
  """A Markdown table cell: floats to 4 significant digits."""
  if isinstance(v, float):
    return "nan" if math.isnan(v) else f"{v:.4g}"
  return str(v)


def fit_cell(fit: dict, key: str) -> str:
  """A fit_all value, with its interval over seeds where it has one."""
  if f"{key}_lo" not in fit:
    return number_cell(fit.get(key, "-"))
  iv = Interval(fit[key], fit[f"{key}_lo"], fit[f"{key}_hi"], fit.get("seeds", 1))
  return format_interval(iv, lambda v: number_cell(float(v)))


def format_table(fits: Sequence[dict]) -> str:
  """Markdown table of fit_all's output."""
  lines = ["| " + " | ".join(title for _, title in _TABLE_COLUMNS) + " |",
           "|" + "---|" * len(_TABLE_COLUMNS)]
  lines += ["| " + " | ".join(fit_cell(fit, key) for key, _ in _TABLE_COLUMNS) + " |" for fit in fits]
  lines.append("\nLinear fits (Bai et al. 2022): reward = slope * sqrt(KL) + intercept. Gao et al. 2022 "
               "fits of the gold gain over d = 0: bon d (alpha - beta d), RL methods d (alpha - beta log d), "
               "through the origin; their R^2 is about the mean gain and can be negative. Each seed is "
               "fitted on its own. " + seeds_note([fit.get("seeds", 1) for fit in fits]))
  return "\n".join(lines)


def write_table(fits: Sequence[dict], path: str) -> tuple[str, str]:
  """Writes the Markdown table to path and the fits to fits.json beside it; returns both paths."""
  storage.write_atomic(path, format_table(fits) + "\n")
  json_path = storage.join(storage.dirname(path), "fits.json")
  # JSON has no NaN: an undefined R^2 is written as null.
  clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in fit.items()} for fit in fits]
  storage.write_atomic(json_path, json.dumps(clean, indent=1, allow_nan=False))
  return path, json_path
