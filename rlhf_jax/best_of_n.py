"""Best-of-N (rejection sampling) baseline: sample N responses per prompt, keep the one the PM
scores highest. Its KL from the sampling policy is analytically log N - (N - 1) / N
(Stiennon et al. 2020, appendix; used by Bai et al. 2022 and Gao et al. 2022).

  python -m rlhf_jax.best_of_n --policy_dir=runs/lm_tiny --pm_dir=runs/pm_tiny --ns=1,2,4,8,16 \\
      [--eval_pm_dirs=runs/pm_test] [--out=runs/bon_tiny]

Writes one JSON line per N to <out>/best_of_n.jsonl: N, KL, sqrt KL, and the mean normalised
reward of the selected responses under the selecting PM and under every extra PM.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from rlhf_jax import sharding as shd
from rlhf_jax.ppo_steps import pm_score
from rlhf_jax.sampling import generate


def analytic_kl(n: int) -> float:
  return math.log(n) - (n - 1) / n


def best_of_n(policy, pm, extra_pms: dict, prompts: dict, ns: Sequence[int], rng: jax.Array, *,
              max_new_tokens: int, temperature: float, eos_id: int, pad_id: int, eoc_id: int) -> list[dict]:
  """policy / pm / extra_pms: objects with .model, .params (and .normalisation for PMs), e.g.
  rlhf_jax.train_ppo.FrozenModel. prompts: {'tokens', 'attention_mask'} [num_prompts, P]."""
  rows = []
  for n in ns:
    rng, key = jax.random.split(rng)
    tokens = jnp.repeat(prompts["tokens"], n, axis=0)  # [num_prompts * n, P], prompt-major
    mask = jnp.repeat(prompts["attention_mask"], n, axis=0)
    gen = generate(policy.params, tokens, mask, key, model=policy.model, max_new_tokens=max_new_tokens,
                   temperature=temperature, eos_id=eos_id, pad_id=pad_id)

    def rewards(frozen):
      raw = pm_score(frozen.model, frozen.params, gen.prompt_tokens, gen.prompt_mask, gen.tokens,
                     gen.mask, eoc_id)
      norm = frozen.normalisation
      return np.asarray((raw - norm["mean"]) / norm["std"]).reshape(-1, n)

    proxy = rewards(pm)
    best = proxy.argmax(axis=1)
    pick = lambda r: float(r[np.arange(r.shape[0]), best].mean())
    row = {"n": n, "kl": analytic_kl(n), "sqrt_kl": math.sqrt(analytic_kl(n)), "proxy_reward": pick(proxy),
           "proxy_reward_mean_of_n": float(proxy.mean())}
    for name, frozen in extra_pms.items():
      row[f"{name}_reward"] = pick(rewards(frozen))
    rows.append(row)
  return rows


_POLICY = flags.DEFINE_string("policy_dir", None, "LM run to sample from.", required=True)
_PM = flags.DEFINE_string("pm_dir", None, "PM run that selects the best sample.", required=True)
_EXTRA = flags.DEFINE_list("eval_pm_dirs", [], "Further PM runs that score the selected samples.")
_NS = flags.DEFINE_list("ns", ["1", "2", "4", "8", "16"], "Values of N.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <pm_dir>/best_of_n).")
_PROMPTS = flags.DEFINE_integer("num_prompts", 32, "Held-out prompts to use.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Response length.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from rlhf_jax.pm_evaluation import load_run_config
  from rlhf_jax.train_ppo import FrozenModel, _prompts, _same_tokenizer

  mesh = shd.make_mesh((1, -1, 1))
  policy, pm = FrozenModel(_POLICY.value, mesh), FrozenModel(_PM.value, mesh, with_normalisation=True)
  extra = {os.path.basename(os.path.normpath(d)): FrozenModel(d, mesh, True) for d in _EXTRA.value}
  tok = _same_tokenizer(_POLICY.value, _PM.value, *_EXTRA.value)
  config = load_run_config(_POLICY.value)
  config.ppo = {"prompt_len": 32, "rollout_batch": 1}
  config.eval = {"num_prompts": _PROMPTS.value}
  out = _OUT.value or os.path.join(_PM.value, "best_of_n")
  os.makedirs(out, exist_ok=True)
  _, eval_prompts = _prompts(config, tok, out)
  prompts = eval_prompts.in_order()[0]
  rows = best_of_n(policy, pm, extra, prompts, [int(n) for n in _NS.value], jax.random.PRNGKey(_SEED.value),
                   max_new_tokens=_MAX_NEW.value, temperature=1.0, eos_id=tok.eos_id, pad_id=tok.pad_id,
                   eoc_id=tok.eoc_id)
  with open(os.path.join(out, "best_of_n.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
      print(json.dumps(row))


if __name__ == "__main__":
  app.run(main)
