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
from rlhf_jax.trainers.ppo_steps import pm_score
from rlhf_jax.training import sharding as shd


def analytic_kl(n: int) -> float:
  return math.log(n) - (n - 1) / n


def best_of_n(policy, pm, extra_pms: dict, prompts: dict, ns: Sequence[int], rng: jax.Array, *,
              max_new_tokens: int, temperature: float, eos_id: int, pad_id: int, eoc_id: int,
              first=None) -> list[dict]:
  """policy / pm / extra_pms: objects with .model, .params (and .normalisation for PMs), e.g.
  rlhf_jax.training.saved_runs.FrozenModel. prompts: {'tokens', 'attention_mask'} [num_prompts, P].

  max(ns) samples are drawn per prompt once; best-of-n uses the first n of them, so the curve
  over n is nested (less noisy than independent draws per n) and costs one generation. first
  (a Generation, one sample per prompt) is each prompt's sample 0: given the RL evaluation's own
  samples of the initial policy, best-of-1 is the RL curves' KL = 0 point exactly."""
  n_max = max(ns)
  scores = sample_scores(policy, {"_selector": pm, **extra_pms}, prompts, n_max, rng, max_new_tokens=max_new_tokens,
                         temperature=temperature, eos_id=eos_id, pad_id=pad_id, eoc_id=eoc_id, first=first)
  norm = lambda name, frozen: (scores[name] - frozen.normalisation["mean"]) / frozen.normalisation["std"]
  return select_best(norm("_selector", pm), {name: norm(name, f) for name, f in extra_pms.items()}, ns)


def sample_scores(policy, pms: dict, prompts: dict, n: int, rng: jax.Array, *, max_new_tokens: int,
                  temperature: float, eos_id: int, pad_id: int, eoc_id: int, first=None) -> dict[str, np.ndarray]:
  """n samples per prompt from policy, scored by every PM: {name: raw scores [num_prompts, n]}
  (float64, gathered to every host). first: a Generation of one sample per prompt to use as
  sample 0 (n - 1 more are drawn)."""
  drawn = n - (first is not None)
  gens = [] if first is None else [first]
  if drawn:
    tokens = jnp.repeat(prompts["tokens"], drawn, axis=0)  # [num_prompts * drawn, P], prompt-major
    mask = jnp.repeat(prompts["attention_mask"], drawn, axis=0)
    gens.append(generate(policy.params, tokens, mask, rng, model=policy.model, max_new_tokens=max_new_tokens,
                         temperature=temperature, eos_id=eos_id, pad_id=pad_id))
  out = {}
  for name, frozen in pms.items():
    parts = [shd.to_host(pm_score(frozen.model, frozen.params, g.prompt_tokens, g.prompt_mask, g.tokens, g.mask,
                                  eoc_id)).astype(np.float64).reshape(prompts["tokens"].shape[0], -1) for g in gens]
    out[name] = np.concatenate(parts, axis=1)
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

