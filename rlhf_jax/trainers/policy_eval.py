"""What every policy trainer shares to sample and to be measured: the sampler built from a run's
`sampling` settings, the PMs that score it, and the one evaluation every method of the sweep
(PPO, RLOO, GRPO, DPO) is measured by.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import storage
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.model.sampling import generate
from rlhf_jax.model.transformer import Transformer
from rlhf_jax.objectives import ppo
from rlhf_jax.trainers.ppo_steps import pm_score
from rlhf_jax.training.saved_runs import FrozenModel


def make_sampler(sampling, model: Transformer, tok: Tokenizer) -> Callable:
  """sample(params, prompt_tokens, prompt_mask, rng) -> Generation, by config.sampling."""
  return functools.partial(generate, model=model, max_new_tokens=sampling.max_new_tokens,
                           temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                           eos_id=tok.eos_id, pad_id=tok.pad_id)


@functools.partial(jax.jit, static_argnames=("policy_model", "pm_models", "eoc_id"))
def _measure(params, ref_params, pm_params: dict, pm_normalisation: dict, gen, *, policy_model: Transformer,
             pm_models: tuple, eoc_id: int) -> dict:
  """Every figure of one evaluation as device scalars, in one program per shape that every stage of
  a size shares (op by op, the first evaluation of each size compiled about 150 small programs)."""
  tokens = jnp.concatenate([gen.prompt_tokens, gen.tokens], axis=1)
  mask = jnp.concatenate([gen.prompt_mask, gen.mask], axis=1)
  p = gen.prompt_tokens.shape[1]

  def logp(model_params):
    logits = policy_model.apply({"params": model_params}, tokens, attention_mask=mask).logits[:, p - 1:-1]
    lp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(lp, gen.tokens[..., None], axis=-1)[..., 0], logits

  (policy_logp, logits), (ref_logp, _) = logp(params), logp(ref_params)
  out = {"kl": ppo.sequence_kl(policy_logp, ref_logp, gen.mask).mean(),
         "length": gen.mask.sum(axis=1).mean(), "entropy": ppo.entropy(logits, gen.mask)}
  for name, pm_model in pm_models:
    raw = pm_score(pm_model, pm_params[name], gen.prompt_tokens, gen.prompt_mask, gen.tokens, gen.mask, eoc_id)
    n = pm_normalisation[name]
    out[name] = (((raw - n["mean"]) / n["std"]).mean(), raw.mean())
  return out


def policy_evaluator(policy0: FrozenModel, eval_pms: dict[str, FrozenModel], prompts: dict, sample: Callable,
                     tok: Tokenizer, seed: int) -> Callable[[Any], dict]:
  """evaluate(policy_params) -> {eval_kl, eval_sqrt_kl, eval_<pm>_reward[_raw], eval_gap_<pm>,
  eval_entropy, eval_response_length}: one sample per held-out prompt with fixed seeds, KL against
  policy0 by the k1 estimator summed over the sampled tokens (rlhf_jax.objectives.ppo.sequence_kl),
  every PM's normalised score and its gap below the training PM's ("pm", first in eval_pms), and
  the policy's mean per-token entropy over its samples. Every method of the
  sweep (PPO, RLOO, GRPO, DPO) is measured by this one function."""

  pm_models = tuple((name, pm.model) for name, pm in eval_pms.items())
  pm_params = {name: pm.params for name, pm in eval_pms.items()}
  pm_normalisation = {name: {k: pm.normalisation[k] for k in ("mean", "std")} for name, pm in eval_pms.items()}

  def evaluate(params):
    gen = sample(params, prompts["tokens"], prompts["attention_mask"], jax.random.PRNGKey(seed))
    m = jax.device_get(_measure(params, policy0.params, pm_params, pm_normalisation, gen,
                                policy_model=policy0.model, pm_models=pm_models, eoc_id=tok.eoc_id))
    kl = float(m["kl"])
    out = {"eval_kl": kl, "eval_sqrt_kl": float(np.sqrt(max(kl, 0.0))),
           "eval_response_length": float(m["length"]), "eval_entropy": float(m["entropy"])}
    for name in eval_pms:
      out[f"eval_{name}_reward"], out[f"eval_{name}_reward_raw"] = float(m[name][0]), float(m[name][1])
      if name != "pm" and "eval_pm_reward" in out:  # proxy minus this PM: over-optimisation shows as a gap that widens
        out[f"eval_gap_{name}"] = out["eval_pm_reward"] - out[f"eval_{name}_reward"]
    return out

  return evaluate


def eval_pms(config, mesh, bases: Optional[dict] = None) -> dict[str, FrozenModel]:
  """The training / proxy PM as "pm", and every PM of eval.pm_dirs by its directory's name
  (LoRA PMs on one base share it through `bases`, see FrozenModel)."""
  pm = FrozenModel(config.pm_dir, mesh, with_normalisation=True, bases=bases)
  return {"pm": pm} | {storage.basename(d): FrozenModel(d, mesh, True, bases=bases)
                       for d in config.eval.pm_dirs}
