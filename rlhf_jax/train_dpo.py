"""Direct preference optimisation (DPO, or IPO) of a policy on comparisons, with no reward model.

  python -m rlhf_jax.train_dpo --config=configs/dpo.py:tiny --config.policy_from=runs/sft_tiny \\
      --config.pm_dir=runs/pm_tiny --config.preferences.path=comparisons.jsonl --config.dpo.beta=0.1

The policy starts from policy_from, which is also the frozen reference of the loss
(rlhf_jax.dpo). Logged per step: the loss, the implicit rewards and their accuracy; every
eval.every steps, the same evaluation PPO runs get (rlhf_jax.train_ppo.policy_evaluator: one
sample per held-out prompt, KL against the initial policy, every PM's score), so DPO lands on
the same reward-against-sqrt(KL) axes, plus the implicit-reward accuracy on held-out comparisons.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import cli, config_checks, dpo, loop
from rlhf_jax import sharding as shd
from rlhf_jax.batching import Encoded
from rlhf_jax.checkpointing import Checkpointer
from rlhf_jax.hf import runs as hf_runs
from rlhf_jax.model import init_params
from rlhf_jax.optimizer import make_optimizer
from rlhf_jax.pm_data import PMBatcher
from rlhf_jax.sampling import generate
from rlhf_jax.train_pm import comparison_records
from rlhf_jax.train_ppo import (FrozenModel, PromptBatcher, eval_pms, policy_evaluator, prompt_texts,
                                same_tokenizer)
from rlhf_jax.train_state import create_train_state, state_shardings


def _comparisons(config, tok, workdir: str) -> tuple[PMBatcher, PMBatcher, int]:
  view = config.copy_and_resolve_references()
  view.data = config.preferences  # the comparisons; config.data holds the evaluation prompts
  train_recs, eval_recs, skipped = comparison_records(view, workdir)
  t = config.train
  config_checks.check_batch_fits(len(train_recs), t.batch_size, "train.batch_size",
                                 f"training comparisons of {config.preferences.get('path') or config.preferences.subset}")
  make = lambda recs: PMBatcher([dpo.encode_pair(tok, r) for r in recs], batch_size=t.batch_size,
                                seq_len=t.seq_len, seed=t.seed, pad_id=tok.pad_id)
  return make(train_recs), make(eval_recs), skipped


def train(config, workdir: str) -> dict[str, Any]:
  config_checks.validate(config, "dpo")
  config = hf_runs.resolve(config, workdir, ("policy_from",))  # hf:DIR -> its imported run directory
  os.makedirs(workdir, exist_ok=True)
  mesh = shd.make_mesh(config.mesh.shape)
  policy0 = FrozenModel(config.policy_from, mesh)
  pms = eval_pms(config, mesh)
  tok = same_tokenizer(config.policy_from, config.pm_dir, *config.eval.pm_dirs)
  train_data, eval_data, skipped = _comparisons(config, tok, workdir)
  _, eval_texts = prompt_texts(config, workdir)
  eval_prompts = PromptBatcher([Encoded(tok.encode(t), []) for t in eval_texts[:config.eval.num_prompts]],
                               batch_size=config.eval.num_prompts, seq_len=config.ppo.prompt_len,
                               seed=config.train.seed, pad_id=tok.pad_id).in_order()[0]

  init_fn = lambda rng: {"policy": init_params(policy0.model.cfg, rng)}
  tx = make_optimizer(config.optimizer, config.train.steps)
  abstract, shardings = state_shardings(init_fn, tx, mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints,
                      async_save=config.train.async_checkpointing)
  s = loop.Setup(mesh, policy0.model, tx, abstract, shardings, ckpt)

  def fresh():
    state, _ = create_train_state(init_fn, tx, mesh, jax.random.PRNGKey(config.train.seed))
    return state.replace(params={"policy": jax.tree.map(jnp.copy, policy0.params)})

  state = loop.resume_or(s, fresh)
  beta = jnp.float32(config.dpo.beta)
  train_step = dpo.jit_dpo_train_step(policy0.model, tx, mesh, shardings, policy0.shardings.params,
                                      loss=config.dpo.loss)
  eval_step = dpo.jit_dpo_eval_step(policy0.model, mesh, policy0.shardings.params)
  c = config.ppo
  sample = functools.partial(generate, model=policy0.model, max_new_tokens=c.max_new_tokens,
                             temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, eos_id=tok.eos_id,
                             pad_id=tok.pad_id)
  evaluate_policy = policy_evaluator(policy0, pms, eval_prompts, sample, tok, config.eval.seed)

  def evaluate(params):
    pairs = []
    for batch in eval_data.in_order():  # held-out comparisons: does the implicit reward rank them?
      n = int(batch.pop("num_valid"))
      logp, ref = eval_step(params["policy"], policy0.params, shd.shard_batch(batch, mesh))
      pairs.append(np.asarray(logp - ref, np.float64)[:n])
    h = np.concatenate(pairs)
    return {**evaluate_policy(params["policy"]), "eval_implicit_accuracy": float(np.mean(h[:, 0] > h[:, 1]))}

  step = lambda state, position: train_step(state, policy0.params,
                                            shd.shard_batch(train_data.batch_at(position), mesh), beta)
  return loop.run_steps(config, workdir, s, state, step=step, evaluate=evaluate, desc=f"train_{config.dpo.loss}",
                        run_info=dict(num_train_comparisons=len(train_data), num_eval_comparisons=len(eval_data),
                                      malformed_skipped=skipped))


if __name__ == "__main__":
  cli.run(loop.config_main(train, "configs/dpo.py:tiny"))
