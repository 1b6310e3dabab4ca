"""Seconds per PPO iteration, split into generation, rollout scoring and the PPO updates.

  python benchmarks/bench_ppo.py --preset=tiny --rollout_batch=16 --prompt_len=32 --new_tokens=16

Policy, value model (separate, PM-shaped) and PM are randomly initialised at the preset's shape:
the timing depends on shapes, not on weights. Medians over timed iterations after compilation;
each phase ends in block_until_ready.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from report import report  # benchmarks/report.py (scripts run from this folder's path)

from rlhf_jax.model.config import get_preset
from rlhf_jax.model.sampling import generate
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.trainers.ppo_steps import Models, PPOHyper, ppo_update, score_rollout
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.optimizer import make_optimizer
from rlhf_jax.training.train_state import create_train_state


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--dtype", default=None)
  p.add_argument("--rollout_batch", type=int, default=16)
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=16)
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--num_minibatches", type=int, default=2)
  p.add_argument("--iterations", type=int, default=3)
  p.add_argument("--json", default=None)
  args = p.parse_args()

  cfg = get_preset(args.preset)
  if args.dtype:
    cfg = dataclasses.replace(cfg, dtype=args.dtype)
  model = Transformer(cfg)
  mesh = shd.make_mesh((1, -1, 1))
  opt = ml_collections.ConfigDict(dict(learning_rate=1e-5, warmup_steps=0, final_lr_fraction=1.0, b1=0.9,
                                       b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0))
  tx = make_optimizer(opt, 10 ** 6)
  init = lambda r: {"policy": init_params(cfg, r), "value": init_params(cfg, jax.random.fold_in(r, 1))}
  state, _ = create_train_state(init, tx, mesh, jax.random.PRNGKey(0), {"kl_coef": jnp.float32(0.001)})
  ref = jax.tree.map(jnp.copy, state.params["policy"])
  pm = jax.jit(lambda r: nn.meta.unbox(init_params(cfg, r)))(jax.random.PRNGKey(2))
  hyper = PPOHyper(1.0, 0.95, 0.2, 0.2, 0.5, 0.0, args.epochs, args.num_minibatches, True)
  models = Models(model, model, model)
  sample = functools.partial(generate, model=model, max_new_tokens=args.new_tokens, temperature=1.0,
                             eos_id=None)
  score = jax.jit(functools.partial(score_rollout, models=models, hyper=hyper, eoc_id=3))
  update = jax.jit(functools.partial(ppo_update, models=models, hyper=hyper, tx=tx), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  prompts = jnp.asarray(rng.integers(4, cfg.vocab_size, (args.rollout_batch, args.prompt_len)), jnp.int32)
  prompt_mask = jnp.ones_like(prompts, bool)

  times = {"generate_s": [], "score_s": [], "update_s": []}
  for it in range(args.iterations + 1):  # the first iteration compiles and is not counted
    t0 = time.perf_counter()
    gen = jax.block_until_ready(sample(state.params["policy"], prompts, prompt_mask, jax.random.PRNGKey(it)))
    t1 = time.perf_counter()
    rollout, _ = jax.block_until_ready(score(state.params, ref, pm, gen, state.extra["kl_coef"], 0.0, 1.0))
    t2 = time.perf_counter()
    state, metrics = jax.block_until_ready(update(state, rollout, jax.random.PRNGKey(100 + it)))
    t3 = time.perf_counter()
    if it:
      for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
        times[k].append(v)
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "preset": args.preset,
            "dtype": cfg.dtype, "rollout_batch": args.rollout_batch, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "epochs": args.epochs, "num_minibatches": args.num_minibatches,
            **{k: float(np.median(v)) for k, v in times.items()}}
  result["iteration_s"] = result["generate_s"] + result["score_s"] + result["update_s"]
  report(result, args.json)


if __name__ == "__main__":
  main()
