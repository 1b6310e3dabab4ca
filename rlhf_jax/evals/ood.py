"""Harmful requests detected as out-of-distribution from activations (Bai et al. 2022, section 5.4;
Fort et al. 2021; Ren et al. 2021).

Features: a prompt's activations at one layer, averaged over its tokens (`Scorer.mean_activations`).
Scores, higher = more out-of-distribution; all distances are squared Mahalanobis distances:
- mahalanobis: D_in(x) = (x - mu)^T S^-1 (x - mu), mu and S fitted on in-distribution training
  prompts.
- relative: D_in(x) - D_bg(x), the "simplified relative Mahalanobis distance": the background
  Gaussian is fitted on every prompt the detector holds, labels ignored (the in-distribution
  training prompts and the pool the known outliers are drawn from), so directions in which all
  text varies stop counting as evidence. With an empty pool the background is the in-distribution
  fit itself and the score is 0 everywhere (AUROC 0.5).
- outlier exposure with k known out-of-distribution examples: D_in(x) - D_out(x), D_out the
  distance to the mean of the k outliers under the in-distribution covariance (one or ten
  examples cannot estimate a covariance of their own); k = 0 is plain Mahalanobis.
Covariances get a ridge of ridge_rel * trace / d on the diagonal: with fewer prompts than features
(d_model) the sample covariance is singular. AUROC: the probability that an out-of-distribution
prompt scores higher than an in-distribution one, ties counted half.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from rlhf_jax.errors import ConfigError, DataError


def fit_gaussian(x: np.ndarray, ridge_rel: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=0)
  centred = x - mean
  cov = centred.T @ centred / max(len(x), 1)
  d = cov.shape[0]
  cov += np.eye(d) * ridge_rel * max(np.trace(cov) / d, 1e-12)
  return mean, cov


def mahalanobis(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
  """Squared distances [n] of rows of x from N(mean, cov), by a Cholesky solve."""
  chol = np.linalg.cholesky(cov)
  z = np.linalg.solve(chol, (np.asarray(x, np.float64) - mean).T)  # [d, n]
  return (z * z).sum(axis=0)


def relative_mahalanobis(x, mean, cov, bg_mean, bg_cov) -> np.ndarray:
  return mahalanobis(x, mean, cov) - mahalanobis(x, bg_mean, bg_cov)


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
  """Mann-Whitney U / (n_in n_out) from average ranks (ties share their mean rank)."""
  a, b = np.asarray(scores_in, np.float64), np.asarray(scores_out, np.float64)
  both = np.concatenate([a, b])
  order = np.argsort(both, kind="mergesort")
  ranks = np.empty(len(both))
  sorted_vals = both[order]
  starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
  ends = np.r_[starts[1:], len(both)]
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = (s + e + 1) / 2.0  # mean of 1-based ranks s+1 .. e
  u = ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2.0
  return float(u / (len(a) * len(b)))


def auroc_ci(scores_in, scores_out, reps: int = 1000, seed: int = 0) -> list[float]:
  """95% interval by a seeded bootstrap of each set."""
  rng = np.random.default_rng(seed)
  a, b = np.asarray(scores_in), np.asarray(scores_out)
  vals = [auroc(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))]) for _ in range(reps)]
  return [float(v) for v in np.percentile(vals, [2.5, 97.5])]


def _with_ci(prefix: str, s_in, s_out, seed: int) -> dict:
  return {prefix: auroc(s_in, s_out), f"{prefix}_ci": auroc_ci(s_in, s_out, seed=seed)}


def detect(train_in, test_in, test_out, outliers_pool, ks: Sequence[int] = (0, 1, 10, 100), seed: int = 0,
           ridge_rel: float = 1e-6) -> dict:
  """AUROCs of the three scores; outliers_pool (disjoint from test_out) supplies the k known outliers."""
  mean, cov = fit_gaussian(train_in, ridge_rel)
  pool = np.asarray(outliers_pool, np.float64).reshape(-1, np.shape(train_in)[1])
  bg_mean, bg_cov = fit_gaussian(np.concatenate([np.asarray(train_in, np.float64), pool]), ridge_rel)
  test = lambda f: (f(np.asarray(test_in)), f(np.asarray(test_out)))
  out = _with_ci("auroc_mahalanobis", *test(lambda x: mahalanobis(x, mean, cov)), seed)
  out |= _with_ci("auroc_relative", *test(lambda x: relative_mahalanobis(x, mean, cov, bg_mean, bg_cov)), seed)
  rng = np.random.default_rng(seed)
  exposure = {}
  for k in ks:
    if k > len(outliers_pool):
      exposure[str(k)] = {"skipped": f"only {len(outliers_pool)} known outliers available"}
      continue
    if k == 0:
      s_in, s_out = test(lambda x: mahalanobis(x, mean, cov))
    else:
      known = pool[rng.choice(len(pool), k, replace=False)]
      mu_out = known.mean(axis=0)
      s_in, s_out = test(lambda x: mahalanobis(x, mean, cov) - mahalanobis(x, mu_out, cov))
    exposure[str(k)] = {"auroc": auroc(s_in, s_out), "auroc_ci": auroc_ci(s_in, s_out, seed=seed)}
  out["outlier_exposure"] = exposure
  return out


def _split(n: int, n_first: int, rng) -> tuple[np.ndarray, np.ndarray]:
  order = rng.permutation(n)
  return np.sort(order[:n_first]), np.sort(order[n_first:])


def evaluate(scorer, tok, in_prompts: Sequence[str], out_prompts: Sequence[str], layer: int = -1,
             train_fraction: float = 0.5, ks: Sequence[int] = (0, 1, 10, 100), seed: int = 0) -> dict:
  """in_prompts split (seeded) into the Gaussian's training set and in-distribution test prompts;
  out_prompts into the known-outlier pool (at most max(ks), at most half) and test prompts."""
  rng = np.random.default_rng(seed)
  n_train = int(round(len(in_prompts) * train_fraction))
  n_pool = min(max(ks, default=0), len(out_prompts) // 2)
  if min(n_train, len(in_prompts) - n_train, len(out_prompts) - n_pool) < 2:
    raise ConfigError(f"ood: too few prompts ({len(in_prompts)} in-distribution, {len(out_prompts)} "
                      f"out-of-distribution): each split needs at least 2")
  feats_in = scorer.mean_activations([tok.encode_sequence(p) for p in in_prompts], layer, desc="ood in")
  feats_out = scorer.mean_activations([tok.encode_sequence(p) for p in out_prompts], layer, desc="ood out")
  train, test = _split(len(in_prompts), n_train, rng)
  pool, test_out = _split(len(out_prompts), n_pool, rng)
  result = detect(feats_in[train], feats_in[test], feats_out[test_out], feats_out[pool], ks, seed)
  return result | {"n_train_in": len(train), "n_test_in": len(test), "n_test_out": len(test_out),
                   "n_outlier_pool": len(pool), "layer": layer}


def load_prompt_texts(path: str, max_prompts: int = 0) -> list[str]:
  """Prompts from a JSONL (plain or gzip) of {"prompt": TEXT}, or the first Human turn of each
  hh-rlhf comparison {"chosen", "rejected"}; which one is read from the first record's keys."""
  import gzip
  import json

  from rlhf_jax.data.dialogue import human_turns_prompt
  from rlhf_jax.data.hh_rlhf.records import read_comparisons, read_prompts
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      first = next((line for line in f if line.strip()), "")
  except FileNotFoundError:
    raise
  except (OSError, UnicodeDecodeError, EOFError) as e:
    raise DataError(f"{os.fspath(path)}: cannot read ({e})") from None
  try:
    keys = set(json.loads(first)) if first else set()
  except (json.JSONDecodeError, TypeError):
    keys = set()
  if "prompt" in keys:
    texts, _ = read_prompts(path)
  elif {"chosen", "rejected"} <= keys:
    records, _ = read_comparisons(path)
    texts = [human_turns_prompt(r["chosen"]) for r in records]
  else:
    raise DataError(f"{path}:1: expected {{\"prompt\": ...}} or hh-rlhf {{\"chosen\", \"rejected\"}} records")
  return texts[:max_prompts] if max_prompts else texts
