"""Direct preference optimisation (DPO, or IPO) of a policy on comparisons, with no reward model.

  python -m rlhf_jax train_dpo --config=configs/dpo.py:tiny --config.policy_from=runs/sft_tiny \\
      --config.pm_dir=runs/pm_tiny --config.preferences.path=comparisons.jsonl --config.dpo.beta=0.1

The policy starts from policy_from, which is also the frozen reference of the loss
(rlhf_jax.objectives.dpo). Logged per step: the loss, the implicit rewards and their accuracy; every
eval.every steps, the same evaluation PPO runs get (rlhf_jax.trainers.policy_eval.policy_evaluator: one
sample per held-out prompt, KL against the initial policy, every PM's score), so DPO lands on
the same reward-against-sqrt(KL) axes, plus the implicit-reward accuracy on held-out comparisons.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import storage
from rlhf_jax.data.inputs import trainer_data
from rlhf_jax.hf import runs as hf_runs
from rlhf_jax.model.transformer import init_params
from rlhf_jax.trainers import config_checks, dpo_steps
from rlhf_jax.trainers.policy_eval import eval_pms, make_sampler, policy_evaluator
from rlhf_jax.training import loop
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.saved_runs import FrozenModel
from rlhf_jax.training.train_state import create_train_state


def train(config, workdir: str) -> dict[str, Any]:
  config_checks.validate(config, "dpo")
  config = hf_runs.resolve(config, workdir, ("policy_from",))  # hf:DIR -> its imported run directory
  storage.makedirs(workdir)
  mesh = shd.make_mesh(config.mesh.shape)
  policy0 = FrozenModel(config.policy_from, mesh)
  pms = eval_pms(config, mesh)
  tok, train_data, eval_data, skipped, eval_prompts = trainer_data(config, workdir, "dpo")
  source = config.preferences.get("path") or config.preferences.subset
  config_checks.check_batch_fits(len(train_data), config.train.batch_size, "train.batch_size",
                                 f"training comparisons of {source}")

  init_fn = lambda rng: {"policy": init_params(policy0.model.cfg, rng)}
  s = loop.params_setup(config, workdir, mesh, policy0.model, init_fn, config.train.steps)
  tx, shardings = s.tx, s.shardings

  def fresh():
    state, _ = create_train_state(init_fn, tx, mesh, jax.random.PRNGKey(config.train.seed))
    return state.replace(params={"policy": jax.tree.map(jnp.copy, policy0.params)})

  state = loop.resume_or(s, fresh)
  beta = jnp.float32(config.dpo.beta)
  train_step = dpo_steps.jit_dpo_train_step(policy0.model, tx, mesh, shardings, policy0.shardings.params,
                                      loss=config.dpo.loss)
  eval_step = dpo_steps.jit_dpo_eval_step(policy0.model, mesh, policy0.shardings.params)
  sample = make_sampler(config.sampling, policy0.model, tok)
  evaluate_policy = policy_evaluator(policy0, pms, eval_prompts.in_order()[0], sample, tok, config.eval.seed)

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


def main_factory():
  return loop.config_main(train, "configs/dpo.py:tiny")
