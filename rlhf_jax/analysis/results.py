"""A sweep's results.jsonl read and checked: one row per (size, method, step) point, grouped
into series and averaged into curves.
"""
from __future__ import annotations

import json
import math
from typing import Sequence

import numpy as np

from rlhf_jax import storage
from rlhf_jax.analysis.intervals import bootstrap_mean

RESULTS_FILE = "results.jsonl"


METHODS = ("ppo", "rloo", "grpo", "dr_grpo", "gspo", "dapo", "dpo", "ipo", "slic", "bon")


LEGACY_METHODS = {"rl": "ppo"}  # results.jsonl written before RLOO / GRPO / DPO existed


_INT_FIELDS = ("params", "step")


_FLOAT_FIELDS = ("kl", "sqrt_kl", "proxy_reward", "gold_reward")


_MONITOR_FIELDS = ("entropy", "response_length", "advantage_std")  # optional: rlhf_jax.analysis.monitors


_BON_KL_FIELDS = ("kl_bound", "kl_measured")  # optional: best-of-N's bound beside its measured KL


_SOURCE_FIELDS = ("source", "source_hash")  # the checkpoint of a size that is one, and its content hash


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
  for field in (*_FLOAT_FIELDS, *(f for f in (*_MONITOR_FIELDS, *_BON_KL_FIELDS) if f in row)):
    v = row.get(field)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
      raise bad(field, f"missing or not a finite number: {v!r}")
  seed = row.get("seed", 0)  # rows written before sweeps had seeds are seed 0
  if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
    raise bad("seed", f"not a non-negative integer: {seed!r}")
  for field in _SOURCE_FIELDS:  # only a size that is a checkpoint has them
    if field in row and (not isinstance(row[field], str) or not row[field]):
      raise bad(field, f"not a non-empty string: {row[field]!r}")
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
  if storage.isdir(path):
    path = storage.join(path, RESULTS_FILE)
  rows = []
  for lineno, line in enumerate(storage.read_text(path).splitlines(), start=1):
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


def group_series(rows: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
  """Rows by (size, method), ordered by params, then size, then method in METHODS order."""
  params, groups = {}, {}
  unknown = sorted({row["method"] for row in rows} - set(METHODS))
  if unknown:
    raise ValueError(f"rows of unknown method(s) {unknown}; known methods: {list(METHODS)}")
  for row in rows:
    if params.setdefault(row["size"], row["params"]) != row["params"]:
      raise ValueError(f"size {row['size']!r} has two parameter counts: "
                       f"{params[row['size']]} and {row['params']}")
    groups.setdefault((row["size"], row["method"]), []).append(row)
  order = lambda key: (params[key[0]], key[0], METHODS.index(key[1]))
  return {key: groups[key] for key in sorted(groups, key=order)}


def _column(series: Sequence[dict], field: str) -> np.ndarray:
  return np.array([row[field] for row in series], np.float64)


def by_seed(series: Sequence[dict]) -> dict[int, list[dict]]:
  """A series' rows by seed, seeds in increasing order."""
  out = {}
  for row in series:
    out.setdefault(row.get("seed", 0), []).append(row)
  return dict(sorted(out.items()))


def mean_curves(rows: Sequence[dict]) -> dict[tuple[str, str], dict[str, np.ndarray]]:
  """Per (size, method), arrays sorted by (beta, step) of step, sqrt_kl, proxy_reward and
  gold_reward, averaged over rows that share them (the seeds); also 'params', 'seeds' (how many
  seeds the series has) and each reward's 95% bootstrap interval over seeds, '<field>_lo' and
  '<field>_hi' (nan with one seed). Only DPO rows have a beta (one run per beta); the others' is nan."""
  curves = {}
  for key, series in group_series(rows).items():
    point_of = [(float(row.get("beta", math.nan)), row["step"]) for row in series]
    points = sorted(set(point_of), key=lambda p: (0.0 if math.isnan(p[0]) else p[0], p[1]))
    index = np.array([points.index(p) for p in point_of])
    curve = {"step": np.array([p[1] for p in points]), "beta": np.array([p[0] for p in points]),
             "params": series[0]["params"], "seeds": len(by_seed(series))}
    for field in ("sqrt_kl", "proxy_reward", "gold_reward"):
      values = _column(series, field)
      intervals = [bootstrap_mean(values[index == i]) for i in range(len(points))]
      curve[field] = np.array([iv.mean for iv in intervals])
      if field != "sqrt_kl":
        curve[f"{field}_lo"] = np.array([iv.lo for iv in intervals])
        curve[f"{field}_hi"] = np.array([iv.hi for iv in intervals])
    curves[key] = curve
  return curves
