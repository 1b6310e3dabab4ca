"""Best-of-N (rejection sampling) baseline: sample N responses per prompt, keep the one the PM
scores highest. Its KL from the sampling policy is analytically log N - (N - 1) / N
(Stiennon et al. 2020, appendix; used by Bai et al. 2022 and Gao et al. 2022).

  python -m rlhf_jax best_of_n --policy_dir=runs/lm_tiny --pm_dir=runs/pm_tiny --ns=1,2,4,8,16 \\
      [--eval_pm_dirs=runs/pm_test] [--out=runs/bon_tiny]

Writes one JSON line per N to <out>/best_of_n.jsonl: N, KL, sqrt KL, and the mean normalised
reward of the selected responses under the selecting PM and under every extra PM.
"""
from __future__ import annotations

import json
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from rlhf_jax import hosts, storage
from rlhf_jax.model.sampling import generate
from rlhf_jax.trainers.ppo_steps import pm_score_jitted
from rlhf_jax.training import sharding as shd


def analytic_kl(n: int) -> float:
  """KL(best-of-n || base) for a continuous reward; for discrete outputs an upper bound (Beirami
  et al. 2024)."""
  return math.log(n) - (n - 1) / n


def measured_kl(proxy: np.ndarray, logp: np.ndarray, reference: np.ndarray, n: int) -> float:
  """KL(best-of-n || base) estimated where outputs are discrete. proxy, logp [prompts, >= n]: the
  selecting PM's scores and the base policy's sequence log-probs of the samples best-of-n chooses
  among; reference [prompts, M]: scores of M further samples, independent of those.

  Best-of-n's probability of y over the base's is w(y) = ((F + p)^n - F^n) / p, with p = pi(y)
  (taking distinct outputs to have distinct rewards; identical ones share p) and F = P(r < r(y)).
  F is read as 1 - p - P(r > r(y)), the upper tail from the reference samples: exact for the top
  output, where best-of-n puts its mass (the lower tail estimated from the choosing samples
  themselves is biased by the choice). KL = E over best-of-n of log w, averaged over prompts. For
  outputs of negligible probability, w -> n F^(n-1), whose mean log is the bound."""
  if n == 1:
    return 0.0
  rows = np.arange(proxy.shape[0])
  best = proxy[:, :n].argmax(axis=1)
  r, lp = proxy[rows, best], np.minimum(logp[rows, best].astype(np.float64), 0.0)
  p = np.exp(lp)
  f = np.clip(1.0 - p - (reference > r[:, None]).mean(axis=1), 0.0, None)
  with np.errstate(divide="ignore"):
    log_f = np.log(f)
  u = lp - log_f  # log(p / F); with F = 0 the output is the lowest seen: w = p^(n-1)
  a = n * np.logaddexp(0.0, np.minimum(u, 700.0))  # n log(1 + p / F)
  with np.errstate(divide="ignore", invalid="ignore"):
    log_w = np.where(u < -30.0, math.log(n) + (n - 1) * log_f,  # p << F: the continuous limit
                     n * log_f + a + np.log(-np.expm1(-a)) - lp)
  log_w = np.where(f > 0.0, log_w, (n - 1) * lp)
  return float(log_w.mean())


def best_of_n(policy, pm, extra_pms: dict, prompts: dict, ns: Sequence[int], rng: jax.Array, *,
              max_new_tokens: int, temperature: float, eos_id: int, pad_id: int, eoc_id: int,
              first=None, kl_reference: int = 0) -> list[dict]:
  """policy / pm / extra_pms: objects with .model, .params (and .normalisation for PMs), e.g.
  rlhf_jax.training.saved_runs.FrozenModel. prompts: {'tokens', 'attention_mask'} [num_prompts, P].

  max(ns) samples are drawn per prompt once; best-of-n uses the first n of them, so the curve
  over n is nested (less noisy than independent draws per n) and costs one generation. first
  (a Generation, one sample per prompt) is each prompt's sample 0: given the RL evaluation's own
  samples of the initial policy, best-of-1 is the RL curves' KL = 0 point exactly. kl_reference
  > 0 draws that many more samples per prompt, scored by pm alone, and adds each n's measured KL
  (measured_kl) as kl_measured."""
  n_max = max(ns)
  sample_rng, reference_rng = jax.random.split(rng)
  kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, eos_id=eos_id, pad_id=pad_id, eoc_id=eoc_id)
  scores = sample_scores(policy, {"_selector": pm, **extra_pms}, prompts, n_max,
                         sample_rng if kl_reference else rng, first=first, with_logp=bool(kl_reference), **kw)
  norm = lambda name, frozen: (scores[name] - frozen.normalisation["mean"]) / frozen.normalisation["std"]
  rows = select_best(norm("_selector", pm), {name: norm(name, f) for name, f in extra_pms.items()}, ns)
  if kl_reference:
    reference = sample_scores(policy, {"_selector": pm}, prompts, kl_reference, reference_rng, **kw)["_selector"]
    for row in rows:
      row["kl_measured"] = measured_kl(scores["_selector"], scores["_logp"], reference, row["n"])
  return rows


def sample_scores(policy, pms: dict, prompts: dict, n: int, rng: jax.Array, *, max_new_tokens: int,
                  temperature: float, eos_id: int, pad_id: int, eoc_id: int, first=None,
                  with_logp: bool = False) -> dict[str, np.ndarray]:
  """n samples per prompt from policy, scored by every PM: {name: raw scores [num_prompts, n]}
  (float64, gathered to every host). first: a Generation of one sample per prompt to use as
  sample 0 (n - 1 more are drawn). with_logp adds "_logp": each sample's log-probability under
  the sampling distribution, summed over its tokens."""
  drawn = n - (first is not None)
  gens = [] if first is None else [first]
  if drawn:
    tokens = jnp.repeat(prompts["tokens"], drawn, axis=0)  # [num_prompts * drawn, P], prompt-major
    mask = jnp.repeat(prompts["attention_mask"], drawn, axis=0)
    gens.append(generate(policy.params, tokens, mask, rng, model=policy.model, max_new_tokens=max_new_tokens,
                         temperature=temperature, eos_id=eos_id, pad_id=pad_id))
  out = {}
  for name, frozen in pms.items():
    parts = [shd.to_host(pm_score_jitted(frozen.model, frozen.params, g.prompt_tokens, g.prompt_mask, g.tokens,
                                         g.mask, eoc_id)).astype(np.float64).reshape(prompts["tokens"].shape[0], -1)
             for g in gens]
    out[name] = np.concatenate(parts, axis=1)
  if with_logp:
    out["_logp"] = np.concatenate([shd.to_host((g.log_probs * g.mask).sum(axis=1)).astype(np.float64).reshape(
        prompts["tokens"].shape[0], -1) for g in gens], axis=1)
  return out


def select_best(proxy: np.ndarray, others: dict[str, np.ndarray], ns: Sequence[int]) -> list[dict]:
  """proxy / others: rewards [num_prompts, n_max] of the same samples. For each n, the mean over
  prompts of the rewards of the sample the proxy ranks first among the first n."""
  rows = []
  for n in ns:
    if not 1 <= n <= proxy.shape[1]:
      raise ValueError(f"n={n} outside 1..{proxy.shape[1]}")
    best = proxy[:, :n].argmax(axis=1)
    pick = lambda r: float(r[np.arange(r.shape[0]), best].mean())
    row = {"n": n, "kl": analytic_kl(n), "sqrt_kl": math.sqrt(analytic_kl(n)), "proxy_reward": pick(proxy),
           "proxy_reward_mean_of_n": float(proxy[:, :n].mean())}
    for name, r in others.items():
      row[f"{name}_reward"] = pick(r)
    rows.append(row)
  return rows


def main_factory():
  """Flags are defined only when this module runs as a program: the sweep imports it."""
  policy_flag = flags.DEFINE_string("policy_dir", None, "LM run to sample from.", required=True)
  pm_flag = flags.DEFINE_string("pm_dir", None, "PM run that selects the best sample.", required=True)
  extra_flag = flags.DEFINE_list("eval_pm_dirs", [], "Further PM runs that score the selected samples.")
  ns_flag = flags.DEFINE_list("ns", ["1", "2", "4", "8", "16"], "Values of N.")
  out_flag = flags.DEFINE_string("out", None, "Output directory (default: <pm_dir>/best_of_n).")
  prompts_flag = flags.DEFINE_integer("num_prompts", 32, "Held-out prompts to use.")
  max_new_flag = flags.DEFINE_integer("max_new_tokens", 16, "Response length.")
  seed_flag = flags.DEFINE_integer("seed", 0, "Sampling seed.")


  def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    from rlhf_jax.data.prompts import held_out_prompts
    from rlhf_jax.data.tokenizer import same_tokenizer
    from rlhf_jax.training.saved_runs import FrozenModel, load_run_config

    mesh = shd.make_mesh((1, -1, 1))
    policy, pm = FrozenModel(policy_flag.value, mesh), FrozenModel(pm_flag.value, mesh, with_normalisation=True)
    extra = {storage.basename(d): FrozenModel(d, mesh, True) for d in extra_flag.value}
    tok = same_tokenizer(policy_flag.value, pm_flag.value, *extra_flag.value)
    config = load_run_config(policy_flag.value)
    config.sampling = {"prompt_len": 32}
    config.eval = {"num_prompts": prompts_flag.value}
    out = out_flag.value or storage.join(pm_flag.value, "best_of_n")
    storage.makedirs(out)
    prompts = held_out_prompts(config, tok, out).in_order()[0]
    rows = best_of_n(policy, pm, extra, prompts, [int(n) for n in ns_flag.value], jax.random.PRNGKey(seed_flag.value),
                     max_new_tokens=max_new_flag.value, temperature=1.0, eos_id=tok.eos_id, pad_id=tok.pad_id,
                     eoc_id=tok.eoc_id)
    lines = [json.dumps(row) + "\n" for row in rows]
    if hosts.is_lead():
      storage.write_atomic(storage.join(out, "best_of_n.jsonl"), "".join(lines))
    print("".join(lines), end="")

  return main

