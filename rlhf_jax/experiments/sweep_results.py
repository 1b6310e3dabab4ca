"""A finished sweep's stages read back as results.jsonl rows: one per evaluated point and seed.

RL and direct-alignment rows are the evaluations their runs logged (step = iteration or update,
0 = the initial policy) with the monitors logged beside them (rlhf_jax.analysis.monitors):
the evaluation samples' entropy and response length, and for RL methods the advantages' spread of
the training batch of that iteration. Best-of-N rows have step = N.
"""
from __future__ import annotations

import math

from rlhf_jax import storage
from rlhf_jax.errors import ConfigError
from rlhf_jax.experiments import checkpoint_sizes
from rlhf_jax.experiments.stage_configs import (
  DIRECT_METHODS,
  GOLD,
  dpo_stage_name,
  methods,
  model_config,
  seeded,
  seeds,
)
from rlhf_jax.experiments.stages import read_jsonl
from rlhf_jax.model.config import param_counts
from rlhf_jax.training.metrics import read_metrics

# results.jsonl field <- the metrics.jsonl key logged with an evaluation
_MONITORS = {"entropy": "eval_entropy", "response_length": "eval_response_length", "advantage_std": "advantage_std"}


def evaluated_points(run_dir: str, base: dict, gold_key: str) -> list[dict]:
  """The evaluations a train_ppo / train_dpo run logged (step 0 = the initial policy), as rows."""
  by_step = {}  # a resumed run may log a step twice: its last record wins
  for m in read_metrics(run_dir):
    if "eval_kl" in m:
      by_step[m["step"]] = m
  rows = []
  for step, m in sorted(by_step.items()):
    kl = float(m["eval_kl"])
    rows.append({**base, "step": int(step), "kl": kl, "sqrt_kl": math.sqrt(max(kl, 0.0)),
                 "proxy_reward": float(m["eval_pm_reward"]), "gold_reward": float(m[f"eval_{gold_key}"]),
                 **{field: float(m[key]) for field, key in _MONITORS.items() if key in m}})
  return rows


def collect_results(config, workdir: str) -> list[dict]:
  """One row per evaluated point and seed: each RL and direct-alignment method's evaluations
  (direct-alignment rows carry their beta) and best-of-N (step = N), with the proxy PM's and the
  gold PM's normalised rewards."""
  gold_key = f"pm_{GOLD}_reward"
  rows = []
  for name, seed in ((n, s) for n in config.sizes for s in seeds(config)):
    base = {"size": name, "params": param_counts(model_config(config, name))["non_embedding"], "seed": seed,
            **checkpoint_sizes.provenance(config, workdir, name)}
    for method in methods(config):
      if method in DIRECT_METHODS:
        for b in config.dpo.betas:
          rows += evaluated_points(storage.join(workdir, dpo_stage_name(name, b, seed, method)),
                                   {**base, "method": method, "beta": float(b)}, gold_key)
      else:
        rows += evaluated_points(storage.join(workdir, seeded(f"{method}_{name}", seed)),
                                 {**base, "method": method}, gold_key)
    for b in read_jsonl(storage.join(workdir, seeded(f"bon_{name}", seed), "best_of_n.jsonl")):
      rows.append({**base, "method": "bon", "step": int(b["n"]), **_bon_kl(config, b),
                   "proxy_reward": float(b["proxy_reward"]), "gold_reward": float(b[gold_key])})
  return rows


def _bon_kl(config, b: dict) -> dict:
  """Best-of-N's KL on the axis: the measured one where the stage measured it (bon.kl_reference
  > 0), unless config.bon.kl = "analytic"; the bound log N - (N - 1) / N is kept as kl_bound."""
  if "kl_measured" not in b:
    return {"kl": float(b["kl"]), "sqrt_kl": float(b["sqrt_kl"])}
  choice = config.bon.get("kl", "measured")
  if choice not in ("measured", "analytic"):
    raise ConfigError(f"bon.kl={choice!r}: expected 'measured' or 'analytic'")
  kl = float(b["kl_measured"]) if choice == "measured" else float(b["kl"])
  return {"kl": kl, "sqrt_kl": math.sqrt(max(kl, 0.0)), "kl_bound": float(b["kl"]),
          "kl_measured": float(b["kl_measured"])}
