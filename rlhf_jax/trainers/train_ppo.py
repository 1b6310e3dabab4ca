"""RLHF with PPO against a frozen preference model, with a per-token KL penalty to the initial policy.

  python -m rlhf_jax train_ppo --config=configs/ppo.py:tiny \\
      --config.policy_from=runs/lm_tiny --config.pm_dir=runs/pm_tiny [--config.algorithm=rloo]

config.algorithm "rloo" or "grpo" trains without a value model: ppo.samples_per_prompt samples
of each prompt form a group, and each sample's advantage is its KL-penalised return relative to
the others of its group (rlhf_jax.objectives.critic_free); everything else is the PPO loop below.

Each iteration: sample prompts, generate with the KV-cache sampler, score (policy/reference
log-probs, values, normalised PM reward, KL-penalised rewards, GAE), then epochs x minibatches of
clipped PPO updates. Logged per iteration: PM reward (raw and normalised), KL(policy || initial)
per sequence by the k1 estimator (see rlhf_jax.objectives.ppo) and its square root, entropy, losses, clip
fractions, approximate KL between iterations, response length, lambda_KL and the advantages'
spread before whitening (a reward-hacking monitor; rlhf_jax.analysis.monitors reads the KL's growth
rate off the evaluations). Every
eval.every iterations, fixed held-out prompts with fixed sampling seeds are scored by the
training PM and by every PM in eval.pm_dirs (e.g. a held-out "test PM").
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import storage
from rlhf_jax.data.inputs import trainer_data
from rlhf_jax.data.prompts import prompts_per_iteration
from rlhf_jax.errors import ConfigError
from rlhf_jax.hf import runs as hf_runs
from rlhf_jax.model import lora
from rlhf_jax.model.transformer import Transformer, init_params
from rlhf_jax.objectives import ppo
from rlhf_jax.trainers import config_checks
from rlhf_jax.trainers.policy_eval import eval_pms, make_sampler, policy_evaluator
from rlhf_jax.trainers.ppo_steps import Models, PPOHyper, jit_ppo_steps
from rlhf_jax.training import adapters, loop, lora_setup
from rlhf_jax.training import sharding as shd
from rlhf_jax.training.saved_runs import FrozenModel, adapter_init, load_policy
from rlhf_jax.training.train_state import create_train_state


def _hyper(config) -> PPOHyper:
  c = config.ppo
  return PPOHyper(gamma=c.gamma, lam=c.lam, clip_eps=c.clip_eps, value_clip_eps=c.value_clip_eps,
                  vf_coef=c.vf_coef, entropy_coef=c.entropy_coef, epochs=c.epochs,
                  num_minibatches=c.num_minibatches, whiten_advantages=c.whiten_advantages,
                  algorithm=config.get("algorithm", "ppo"), samples_per_prompt=c.get("samples_per_prompt", 1),
                  clip_eps_high=c.get("clip_eps_high", 0.0), overlong_buffer=c.get("overlong_buffer", 0),
                  tis_cap=c.tis_cap if c.get("tis", False) else 0.0)


class Trainables(NamedTuple):
  """What PPO trains: init(rng) -> boxed params {"policy"[, "value"]}, the params a fresh run
  starts from, and with LoRA each model's frozen base and its shardings (else None)."""
  init: Callable
  start: dict
  frozen: Optional[dict] = None
  frozen_shardings: Optional[dict] = None


def _dense(config, mesh, policy0: FrozenModel, pm: FrozenModel, shared: bool) -> Trainables:
  def init_fn(rng):
    r1, r2 = jax.random.split(rng)
    params = {"policy": init_params(policy0.model.cfg, r1)}
    if not shared:
      params["value"] = init_params(pm.model.cfg, r2)
    return params
  # init_policy_from (optional): start from another run's policy, e.g. the previous round's PPO
  # policy in iterated online RLHF; the KL reference stays policy_from.
  dense = lambda params, spec: lora.merge(params, spec) if spec is not None else params  # a LoRA run's, merged
  if config.get("init_policy_from"):
    previous = load_policy(config.init_policy_from, mesh)
    start = {"policy": dense(previous.params, previous.model.lora)}
  else:
    start = {"policy": policy0.params}
  if not shared:
    start["value"] = dense(pm.params, pm.spec)  # value model initialised from the PM
  return Trainables(init_fn, start)


def _lora(config, workdir: str, mesh, policy0: FrozenModel, pm: FrozenModel, shared: bool, spec,
          bases: dict) -> tuple[Trainables, Models]:
  """LoRA adapters on the policy (over policy_from, which stays the reference with the adapters
  off: policy0 is given the LoRA model and the base) and on the value model (over the PM's base,
  from the PM's adapters if it is a LoRA PM). Models on one base share its arrays."""
  if spec.dropout:
    raise ConfigError(f"lora.dropout={spec.dropout}: RL trains without dropout (the ratio on the rollout's "
                      f"own tokens would not start at 1); set it to 0")
  if adapters.is_lora_run(config.policy_from) or config.get("init_policy_from"):
    raise ConfigError(f"policy_from={config.policy_from} with lora.enabled: the policy must start from a dense "
                      f"run (merge a LoRA run with hf_export first; init_policy_from is not supported with LoRA)")
  adapters.record_base(workdir, config.policy_from)
  pol = lora_setup.frozen_start(config, config.policy_from, mesh, spec, bases, "policy_from")
  policy0.model, policy0.params = Transformer(policy0.model.cfg, spec), pol.base
  inits = {"policy": adapter_init(policy0.model.cfg, spec)}
  frozen, shardings, start = {"policy": pol.base}, {"policy": pol.shardings}, {"policy": pol.start}
  value_model = policy0.model
  if not shared:
    val = lora_setup.frozen_start(config, config.pm_dir, mesh, pm.spec or spec, bases, "pm_dir")
    value_model = Transformer(pm.model.cfg, val.spec)
    inits["value"] = adapter_init(pm.model.cfg, val.spec)
    frozen["value"], shardings["value"], start["value"] = val.base, val.shardings, val.start

  def init_fn(rng):
    keys = dict(zip(inits, jax.random.split(rng, len(inits))))
    return {k: f(keys[k]) for k, f in inits.items()}
  return Trainables(init_fn, start, frozen, shardings), Models(policy0.model, value_model, pm.model)


def _policy_state(config, workdir: str, mesh, policy0: FrozenModel, trainables: Trainables):
  """The trainer's set-up and its state, fresh or resumed: the policy (and the value model unless
  the trunk is shared) with its optimizer; with LoRA only their adapters and heads."""
  c = config.ppo
  extra = {"kl_coef": jnp.float32(config.kl.coef)}
  s = loop.params_setup(config, workdir, mesh, policy0.model, trainables.init,
                        config.train.steps * c.epochs * c.num_minibatches, extra)

  def fresh():
    state, _ = create_train_state(trainables.init, s.tx, mesh, jax.random.PRNGKey(config.train.seed), extra)
    if trainables.frozen is None:
      return state.replace(params=jax.tree.map(jnp.copy, trainables.start))
    return state.replace(params={k: lora_setup.initial_params(v, trainables.start[k]) for k, v in state.params.items()})

  state = loop.resume_or(s, fresh)
  return s, state


def train(config, workdir: str) -> dict[str, Any]:
  config_checks.validate(config, "ppo")
  config = hf_runs.resolve(config, workdir, ("policy_from", "init_policy_from"))  # hf:DIR: imported
  storage.makedirs(workdir)
  mesh = shd.make_mesh(config.mesh.shape)
  c = config.ppo
  bases = {}  # one copy of each base in memory, whoever reads it (rlhf_jax.training.saved_runs)
  policy0 = FrozenModel(config.policy_from, mesh, bases=bases)
  pms = eval_pms(config, mesh, bases)
  pm = pms["pm"]
  data = trainer_data(config, workdir, "ppo")
  tok, train_prompts, n_prompts = data.tokenizer, data.train, prompts_per_iteration(config)
  config_checks.check_batch_fits(len(train_prompts), n_prompts, "ppo.rollout_batch / ppo.samples_per_prompt",
                                 "training prompts")
  hyper = _hyper(config)
  # A critic-free algorithm trains the policy alone; PPO's value model is the PM's copy or the trunk.
  shared = config.value_from == "shared" or hyper.algorithm != "ppo"
  spec = adapters.spec_of(config, policy0.model.cfg)
  if spec is None:
    trainables = _dense(config, mesh, policy0, pm, shared)
    models = Models(policy0.model, policy0.model if shared else pm.model, pm.model)
  else:
    trainables, models = _lora(config, workdir, mesh, policy0, pm, shared, spec, bases)
  frozen = trainables.frozen
  policy_params = lambda params: lora.join(frozen and frozen["policy"], params["policy"])

  s, state = _policy_state(config, workdir, mesh, policy0, trainables)
  sample = make_sampler(config.sampling, policy0.model, tok)
  score, update = jit_ppo_steps(models, hyper, s.tx, mesh, s.shardings, policy0.shardings.params,
                                pm.shardings.params, eoc_id=tok.eoc_id, frozen_shardings=trainables.frozen_shardings)
  norm = pm.normalisation

  def step(state, position):
    batch = train_prompts.batch_at(position)
    gen_rng, update_rng, next_rng = jax.random.split(state.rng, 3)
    k = hyper.samples_per_prompt  # rows i*k .. i*k+k-1: prompt i (the critic-free groups)
    gen = sample(policy_params(state.params), np.repeat(batch["tokens"], k, axis=0),
                 np.repeat(batch["attention_mask"], k, axis=0), gen_rng)
    gen = jax.device_put(gen, shd.batch_sharding(mesh))  # the layout the jitted steps expect
    rollout, metrics = score(state.params, policy0.params, pm.params, gen, state.extra["kl_coef"],
                             norm["mean"], norm["std"], frozen)
    state, update_metrics = update(state, rollout, update_rng, frozen)  # donates the old state's buffers
    kl_coef = state.extra["kl_coef"]
    if config.kl.adaptive:
      adapted = ppo.adaptive_kl_coef(kl_coef, metrics["kl"], c.rollout_batch, config.kl.target,
                                     config.kl.horizon)
      kl_coef = jnp.where(jnp.isfinite(adapted), adapted, kl_coef)  # a NaN KL must not stick
    state = state.replace(step=state.step + 1, rng=next_rng, extra={"kl_coef": kl_coef},
                          data_position=state.data_position + n_prompts)
    return state, {**metrics, **update_metrics, "loss": update_metrics["policy_loss"]}

  evaluate = policy_evaluator(policy0, pms, data.eval.in_order()[0], sample, tok, config.eval.seed)
  run_steps_evaluate = lambda params: evaluate(policy_params(params))

  return loop.run_steps(config, workdir, s, state, step=step, evaluate=run_steps_evaluate,
                        desc=f"train_{hyper.algorithm}",
                        run_info={"num_train_prompts": len(train_prompts)})


def main_factory():
  return loop.config_main(train, "configs/ppo.py:tiny")
