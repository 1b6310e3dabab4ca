"""Elo of policies judged by a PM (Bai et al. 2022, sections 2.4 and 4.1).

Every policy answers the same held-out prompts; the judge PM scores each answer. A game is one
prompt between two policies. By default a game is "soft": policy i wins sigmoid(r_i - r_j) of
it, the judge's own preference probability (the equation behind `elo.ELO_PER_NAT`), so a policy
that the judge scores d nats higher on every prompt is d * 174 Elo stronger. "hard" games count a
win for the higher score, half each for a tie. Ratings come from `elo.fit_elo`; their intervals
from a seeded bootstrap over prompts.

A policy is anything `best_of_n.sample_scores` can sample from (.model, .params): an LM, an SFT
model, a PPO snapshot; best-of-n entries sample n answers and keep the one their selector PM
scores highest.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import numpy as np

from rlhf_jax.objectives.elo import fit_elo
from rlhf_jax.trainers.best_of_n import sample_scores


class Contestant(NamedTuple):
  name: str
  policy: object  # .model, .params
  n: int = 1  # best-of-n when > 1
  selector: Optional[object] = None  # the PM that picks the best of n (.model, .params)


def win_matrix(scores: np.ndarray, soft: bool = True) -> np.ndarray:
  """scores [players, prompts] (the judge's raw scores) -> wins [players, players]."""
  s = np.asarray(scores, np.float64)
  diff = s[:, None, :] - s[None, :, :]  # [i, j, prompt]
  if soft:
    wins = 0.5 * (1.0 + np.tanh(0.5 * diff))  # sigmoid, exact at large |diff|
  else:
    wins = (diff > 0) + 0.5 * (diff == 0)
  wins = wins.sum(axis=2)
  np.fill_diagonal(wins, 0.0)
  return wins


def elo_ratings(scores: np.ndarray, names: list[str], soft: bool = True, bootstrap: int = 200,
                seed: int = 0) -> dict:
  """Elo (mean 0) of each player from its scores [players, prompts], with 95% bootstrap
  intervals over prompts; hard-game resamples where some player never wins or never loses have
  no finite ratings and are left out (counted)."""
  elo = fit_elo(win_matrix(scores, soft))
  rng = np.random.default_rng(seed)
  reps, failed = [], 0
  for _ in range(bootstrap):
    idx = rng.integers(0, scores.shape[1], scores.shape[1])
    try:
      reps.append(fit_elo(win_matrix(scores[:, idx], soft)))
    except ValueError:
      failed += 1
  lo, hi = np.percentile(np.array(reps), [2.5, 97.5], axis=0) if reps else (elo * np.nan, elo * np.nan)
  return {"elo": {n: float(e) for n, e in zip(names, elo)},
          "elo_ci": {n: [float(a), float(b)] for n, a, b in zip(names, lo, hi)},
          "mean_judge_score": {n: float(s) for n, s in zip(names, np.mean(scores, axis=1))},
          "games": "soft" if soft else "hard", "num_prompts": int(scores.shape[1]),
          "bootstrap_failed": failed}


def contestant_scores(contestants: list[Contestant], judge, prompts: dict, rng: jax.Array, *,
                      max_new_tokens: int, temperature: float, eos_id: int, pad_id: int,
                      eoc_id: int) -> np.ndarray:
  """The judge's raw score of each contestant's answer to each prompt -> [contestants, prompts].
  Every contestant samples with the same key, so equal policies give equal answers."""
  rows = []
  for c in contestants:
    pms = {"judge": judge} | ({"selector": c.selector} if c.n > 1 else {})
    s = sample_scores(c.policy, pms, prompts, c.n, rng, max_new_tokens=max_new_tokens, temperature=temperature,
                      eos_id=eos_id, pad_id=pad_id, eoc_id=eoc_id)
    pick = s["selector"].argmax(axis=1) if c.n > 1 else np.zeros(s["judge"].shape[0], int)
    rows.append(s["judge"][np.arange(len(pick)), pick])
  return np.stack(rows)


def evaluate(contestants: list[Contestant], judge, prompts: dict, rng: jax.Array, *, soft: bool = True,
             bootstrap: int = 200, **sampling) -> dict:
  """Elo of the contestants judged by `judge` on prompts {'tokens', 'attention_mask'}."""
  if len(contestants) < 2:
    raise ValueError("Elo needs at least two contestants")
  scores = contestant_scores(contestants, judge, prompts, rng, **sampling)
  return elo_ratings(scores, [c.name for c in contestants], soft=soft, bootstrap=bootstrap)
