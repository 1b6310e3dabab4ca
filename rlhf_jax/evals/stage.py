"""What the sweep's evals_<size> stage computes for one model size, given its runs.

- Every per-model suite on the initial policy and on the final RLHF policy (the alignment tax or
  bonus is the difference; Bai et al. 2022, section 3.4 and figure 3).
- Elo, judged by the gold PM on the held-out prompts PPO is evaluated on, of the initial policy,
  every saved PPO snapshot and best-of-n of the initial policy (selected by the proxy PM), each
  with its KL from the initial policy: PPO's own evaluation at that step, best-of-n's analytic
  log n - (n - 1) / n.
"""
from __future__ import annotations

import math

import jax

from rlhf_jax import storage
from rlhf_jax.evals import policy_elo, suite
from rlhf_jax.evals.loglik import Scorer
from rlhf_jax.trainers.best_of_n import analytic_kl


def policy_evals(policies: dict, tok, cfg, out_dir: str, mesh, progress: bool = False) -> dict:
  """{tag: suite results} for policies {tag: Policy}; PNGs tagged likewise."""
  suites = suite.parse_suites(cfg.suites)
  out = {}
  for tag, policy in policies.items():
    scorer = Scorer(policy.params, policy.model.cfg, mesh, batch_size=cfg.batch_size, progress=progress)
    out[tag] = suite.run_suites(suites, scorer, tok, cfg, out_dir, tag)
  return out


def snapshot_elo(initial, ppo_dir: str, judge, selector, prompts: dict, kl_by_step: dict[int, float], mesh, *,
                 bon_ns, games: str, seed: int, sampling: dict) -> list[dict]:
  """Elo rows {name, method, step, kl, sqrt_kl, elo, elo_lo, elo_hi} of the initial policy, the
  PPO snapshots saved in ppo_dir and best-of-n."""
  from rlhf_jax.training.checkpointing import Checkpointer
  from rlhf_jax.training.saved_runs import load_policy
  with Checkpointer(storage.join(ppo_dir, "checkpoints")) as ckpt:
    steps = ckpt.all_steps()
  contestants = [policy_elo.Contestant("initial", initial)]
  kls = [0.0]
  for step in steps:
    contestants.append(policy_elo.Contestant(f"ppo@{step}", load_policy(ppo_dir, mesh, step)))
    kls.append(kl_by_step.get(step, math.nan))
  for n in bon_ns:
    contestants.append(policy_elo.Contestant(f"bon@{n}", initial, n=n, selector=selector))
    kls.append(analytic_kl(n))
  result = policy_elo.evaluate(contestants, judge, prompts, jax.random.PRNGKey(seed), soft=games == "soft",
                               **sampling)
  rows = []
  for c, kl in zip(contestants, kls):
    method, _, step = c.name.partition("@")
    lo, hi = result["elo_ci"][c.name]
    rows.append({"name": c.name, "method": "ppo" if method == "initial" else method,
                 "step": int(step or 0), "kl": kl, "sqrt_kl": math.sqrt(max(kl, 0.0)) if kl == kl else math.nan,
                 "elo": result["elo"][c.name], "elo_lo": lo, "elo_hi": hi,
                 "mean_gold_score": result["mean_judge_score"][c.name]})
  return rows
