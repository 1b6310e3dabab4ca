"""RLHF with PPO against a frozen preference model, with a per-token KL penalty to the initial policy.

  python -m rlhf_jax.train_ppo --config=configs/ppo.py:tiny \\
      --config.policy_from=runs/lm_tiny --config.pm_dir=runs/pm_tiny [--config.algorithm=rloo]

config.algorithm "rloo" or "grpo" trains without a value model: ppo.samples_per_prompt samples
of each prompt form a group, and each sample's advantage is its KL-penalised return relative to
the others of its group (rlhf_jax.critic_free); everything else is the PPO loop below.

Each iteration: sample prompts, generate with the KV-cache sampler, score (policy/reference
log-probs, values, normalised PM reward, KL-penalised rewards, GAE), then epochs x minibatches of
clipped PPO updates. Logged per iteration: PM reward (raw and normalised), KL(policy || initial)
per sequence by the k1 estimator (see rlhf_jax.ppo) and its square root, entropy, losses, clip
fractions, approximate KL between iterations, response length and lambda_KL. Every
eval.every iterations, fixed held-out prompts with fixed sampling seeds are scored by the
training PM and by every PM in eval.pm_dirs (e.g. a held-out "test PM").
"""
from __future__ import annotations

import filecmp
import functools
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import cli, config_checks, loop, ppo
from rlhf_jax.hf import runs as hf_runs
from rlhf_jax import sharding as shd
from rlhf_jax.batching import Batcher, Encoded
from rlhf_jax.calibration import load_normalisation
from rlhf_jax.checkpointing import Checkpointer
from rlhf_jax.dialogue import human_turns_prompt
from rlhf_jax.errors import ConfigError
from rlhf_jax.hh_rlhf.records import read_prompts
from rlhf_jax.lm_data import train_eval_records
from rlhf_jax.model import Transformer, init_params
from rlhf_jax.model_config import ModelConfig
from rlhf_jax.optimizer import make_optimizer
from rlhf_jax.pm_evaluation import load_run_config
from rlhf_jax.ppo_steps import Models, PPOHyper, jit_ppo_steps, pm_score
from rlhf_jax.sampling import generate
from rlhf_jax.tokenizer import MODEL_FILE, Tokenizer
from rlhf_jax.train_state import create_train_state, state_shardings


class PromptBatcher(Batcher):
  """Prompts truncated from the left and left-padded: [batch, prompt_len] tokens and mask."""

  def _fit(self, example: Encoded) -> Encoded:
    return Encoded(example.tokens[-self.seq_len:], example.loss_mask[-self.seq_len:])

  def _filler(self):
    return self.examples[0]

  def _collate(self, rows):
    tokens = np.full((len(rows), self.seq_len), self.pad_id, np.int32)
    mask = np.zeros((len(rows), self.seq_len), bool)
    for i, ex in enumerate(rows):
      n = len(ex.tokens)
      tokens[i, self.seq_len - n:], mask[i, self.seq_len - n:] = ex.tokens, True
    return {"tokens": tokens, "attention_mask": mask}


class FrozenModel:
  """A trained run's model and params (policy at initialisation, or a PM with its normalisation)."""

  def __init__(self, run_dir: str, mesh, with_normalisation: bool = False):
    config = load_run_config(run_dir)
    cfg = ModelConfig.from_dict(config.model)
    self.run_dir, self.model = run_dir, Transformer(cfg)
    tx = make_optimizer(config.optimizer, config.train.steps)
    self.abstract, self.shardings = state_shardings(lambda r: init_params(cfg, r), tx, mesh)
    self.params = loop.restore_params(run_dir, self.abstract)
    self.normalisation = load_normalisation(run_dir) if with_normalisation else None


class Policy(NamedTuple):
  model: Transformer
  params: Any
  step: int  # the checkpoint's step
  tokenizer_dir: str  # the run whose tokenizer.model the policy reads


def load_policy(run_dir: str, mesh, step: Optional[int] = None) -> Policy:
  """The policy of any run: an LM / SFT run's params, or a PPO run's policy (its model is that of
  its policy_from). step: a saved checkpoint (default: the last)."""
  source = load_run_config(run_dir).get("policy_from") or run_dir
  base = FrozenModel(source, mesh)  # the model, and for an LM run its last params
  with Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
    last = ckpt.latest_step()
    step = last if step is None else step
    if step not in ckpt.all_steps():
      raise ConfigError(f"{run_dir}: no checkpoint at step {step} (saved: {ckpt.all_steps()})")
    if source == run_dir:
      params = base.params if step == last else ckpt.restore_params(base.abstract.params, step)
    else:
      params = ckpt.restore_params({"policy": base.abstract.params}, step)["policy"]
  return Policy(base.model, params, int(step), source)


def same_tokenizer(*run_dirs: str) -> Tokenizer:
  paths = [os.path.join(d, MODEL_FILE) for d in run_dirs]
  for p in paths[1:]:
    if not filecmp.cmp(paths[0], p, shallow=False):
      raise ConfigError(f"{p} differs from {paths[0]}: the policy and PMs must share one tokenizer")
  return Tokenizer(paths[0])


def prompt_texts(config, workdir: str) -> tuple[list[str], list[str]]:
  """(train, held-out) prompts: those of data.prompts_path if set (a seeded data.eval_fraction
  held out), else the first Human turn of each hh-rlhf dialogue of the configured data."""
  d = config.data
  if d.get("prompts_path"):
    prompts, report = read_prompts(d.prompts_path, skip_malformed=d.skip_malformed)
    if report.num_skipped:
      print(report.summary())
    order = np.random.default_rng(d.seed).permutation(len(prompts))
    n_eval = max(1, int(round(len(prompts) * d.eval_fraction)))
    return [prompts[i] for i in sorted(order[n_eval:])], [prompts[i] for i in sorted(order[:n_eval])]
  train_recs, eval_recs, _ = train_eval_records(config, workdir)
  first_turn = lambda recs: [human_turns_prompt(r["chosen"]) for r in recs]
  return first_turn(train_recs), first_turn(eval_recs)


def prompts_per_iteration(config) -> int:
  """Distinct prompts in a rollout: ppo.rollout_batch sequences, ppo.samples_per_prompt each."""
  return config.ppo.rollout_batch // config.ppo.get("samples_per_prompt", 1)


def prompt_batchers(config, tok: Tokenizer, workdir: str) -> tuple[PromptBatcher, PromptBatcher]:
  train_texts, eval_texts = prompt_texts(config, workdir)
  make = lambda texts, n: PromptBatcher([Encoded(tok.encode(t), []) for t in texts], batch_size=n,
                                        seq_len=config.ppo.prompt_len, seed=config.train.seed,
                                        pad_id=tok.pad_id)
  return make(train_texts, prompts_per_iteration(config)), make(eval_texts[:config.eval.num_prompts],
                                                                config.eval.num_prompts)


def _hyper(config) -> PPOHyper:
  c = config.ppo
  return PPOHyper(gamma=c.gamma, lam=c.lam, clip_eps=c.clip_eps, value_clip_eps=c.value_clip_eps,
                  vf_coef=c.vf_coef, entropy_coef=c.entropy_coef, epochs=c.epochs,
                  num_minibatches=c.num_minibatches, whiten_advantages=c.whiten_advantages,
                  algorithm=config.get("algorithm", "ppo"), samples_per_prompt=c.get("samples_per_prompt", 1))


def policy_evaluator(policy0: FrozenModel, eval_pms: dict[str, FrozenModel], prompts: dict, sample: Callable,
                     tok: Tokenizer, seed: int) -> Callable[[Any], dict]:
  """evaluate(policy_params) -> {eval_kl, eval_sqrt_kl, eval_<pm>_reward[_raw], ...}: one sample
  per held-out prompt with fixed seeds, KL against policy0 by the k1 estimator summed over the
  sampled tokens (rlhf_jax.ppo.sequence_kl), and every PM's normalised score. Every method of the
  sweep (PPO, RLOO, GRPO, DPO) is measured by this one function."""

  def evaluate(params):
    gen = sample(params, prompts["tokens"], prompts["attention_mask"], jax.random.PRNGKey(seed))
    tokens = jnp.concatenate([gen.prompt_tokens, gen.tokens], axis=1)
    mask = jnp.concatenate([gen.prompt_mask, gen.mask], axis=1)
    p = gen.prompt_tokens.shape[1]

    def logp(model_params):
      logits = policy0.model.apply({"params": model_params}, tokens, attention_mask=mask).logits
      lp = jax.nn.log_softmax(logits[:, p - 1:-1], axis=-1)
      return jnp.take_along_axis(lp, gen.tokens[..., None], axis=-1)[..., 0]

    kl = float(ppo.sequence_kl(logp(params), logp(policy0.params), gen.mask).mean())
    out = {"eval_kl": kl, "eval_sqrt_kl": float(np.sqrt(max(kl, 0.0))),
           "eval_response_length": float(gen.mask.sum(axis=1).mean())}
    for name, frozen in eval_pms.items():
      raw = pm_score(frozen.model, frozen.params, gen.prompt_tokens, gen.prompt_mask, gen.tokens, gen.mask,
                     tok.eoc_id)
      n = frozen.normalisation
      out[f"eval_{name}_reward"] = float(((raw - n["mean"]) / n["std"]).mean())
      out[f"eval_{name}_reward_raw"] = float(raw.mean())
    return out

  return evaluate


def eval_pms(config, mesh) -> dict[str, FrozenModel]:
  """The training / proxy PM as "pm", and every PM of eval.pm_dirs by its directory's name."""
  pm = FrozenModel(config.pm_dir, mesh, with_normalisation=True)
  return {"pm": pm} | {os.path.basename(os.path.normpath(d)): FrozenModel(d, mesh, True)
                       for d in config.eval.pm_dirs}


def train(config, workdir: str) -> dict[str, Any]:
  config_checks.validate(config, "ppo")
  config = hf_runs.resolve(config, workdir, ("policy_from", "init_policy_from"))  # hf:DIR: imported
  os.makedirs(workdir, exist_ok=True)
  mesh = shd.make_mesh(config.mesh.shape)
  c = config.ppo
  policy0 = FrozenModel(config.policy_from, mesh)
  pms = eval_pms(config, mesh)
  pm = pms["pm"]
  tok = same_tokenizer(config.policy_from, config.pm_dir, *config.eval.pm_dirs)
  train_prompts, eval_prompts = prompt_batchers(config, tok, workdir)
  n_prompts = prompts_per_iteration(config)
  config_checks.check_batch_fits(len(train_prompts), n_prompts, "ppo.rollout_batch / ppo.samples_per_prompt",
                                 "training prompts")
  hyper = _hyper(config)
  # A critic-free algorithm trains the policy alone; PPO's value model is the PM's copy or the trunk.
  shared = config.value_from == "shared" or hyper.algorithm != "ppo"
  models = Models(policy0.model, policy0.model if shared else pm.model, pm.model)

  def init_fn(rng):
    r1, r2 = jax.random.split(rng)
    params = {"policy": init_params(policy0.model.cfg, r1)}
    if not shared:
      params["value"] = init_params(pm.model.cfg, r2)
    return params

  total_updates = config.train.steps * c.epochs * c.num_minibatches
  tx = make_optimizer(config.optimizer, total_updates)
  extra = {"kl_coef": jnp.float32(config.kl.coef)}
  abstract, shardings = state_shardings(init_fn, tx, mesh, extra)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints,
                      async_save=config.train.async_checkpointing)
  s = loop.Setup(mesh, policy0.model, tx, abstract, shardings, ckpt)

  def fresh():
    state, _ = create_train_state(init_fn, tx, mesh, jax.random.PRNGKey(config.train.seed), extra)
    # init_policy_from (optional): start from another run's policy, e.g. the previous round's PPO
    # policy in iterated online RLHF; the KL reference stays policy_from.
    start = load_policy(config.init_policy_from, mesh).params if config.get("init_policy_from") else policy0.params
    params = {"policy": jax.tree.map(jnp.copy, start)}
    if not shared:
      params["value"] = jax.tree.map(jnp.copy, pm.params)  # value model initialised from the PM
    return state.replace(params=params)

  state = loop.resume_or(s, fresh)
  sample = functools.partial(generate, model=policy0.model, max_new_tokens=c.max_new_tokens,
                             temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, eos_id=tok.eos_id,
                             pad_id=tok.pad_id)
  score, update = jit_ppo_steps(models, hyper, tx, mesh, shardings, policy0.shardings.params,
                                pm.shardings.params, eoc_id=tok.eoc_id)
  norm = pm.normalisation

  def step(state, position):
    batch = train_prompts.batch_at(position)
    gen_rng, update_rng, next_rng = jax.random.split(state.rng, 3)
    k = hyper.samples_per_prompt  # rows i*k .. i*k+k-1: prompt i (the critic-free groups)
    gen = sample(state.params["policy"], np.repeat(batch["tokens"], k, axis=0),
                 np.repeat(batch["attention_mask"], k, axis=0), gen_rng)
    gen = jax.device_put(gen, shd.batch_sharding(mesh))  # the layout the jitted steps expect
    rollout, metrics = score(state.params, policy0.params, pm.params, gen, state.extra["kl_coef"],
                             norm["mean"], norm["std"])
    state, update_metrics = update(state, rollout, update_rng)  # donates the old state's buffers
    kl_coef = state.extra["kl_coef"]
    if config.kl.adaptive:
      adapted = ppo.adaptive_kl_coef(kl_coef, metrics["kl"], c.rollout_batch, config.kl.target,
                                     config.kl.horizon)
      kl_coef = jnp.where(jnp.isfinite(adapted), adapted, kl_coef)  # a NaN KL must not stick
    state = state.replace(step=state.step + 1, rng=next_rng, extra={"kl_coef": kl_coef},
                          data_position=state.data_position + n_prompts)
    return state, {**metrics, **update_metrics, "loss": update_metrics["policy_loss"]}

  evaluate = policy_evaluator(policy0, pms, eval_prompts.in_order()[0], sample, tok, config.eval.seed)
  run_steps_evaluate = lambda params: evaluate(params["policy"])

  return loop.run_steps(config, workdir, s, state, step=step, evaluate=run_steps_evaluate,
                        desc=f"train_{hyper.algorithm}",
                        run_info={"num_train_prompts": len(train_prompts)})


if __name__ == "__main__":
  cli.run(loop.config_main(train, "configs/ppo.py:tiny"))
