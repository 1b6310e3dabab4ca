"""RLHF with PPO: `--config=configs/ppo.py:PRESET` (the preset names the policy's size).

Required: --config.policy_from=RUN (an LM run: SFT or context-distilled) and --config.pm_dir=RUN
(a PM run evaluated by train_pm/eval_pm, so that its score normalisation exists).
"""
import ml_collections

from configs import lm
from configs.lora import lora_config


def sampling_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  """How a policy is sampled, in training and in its evaluation: shared by PPO and DPO runs."""
  tiny = preset == "tiny"
  return ml_collections.ConfigDict({
      "prompt_len": 32 if tiny else 256,  # prompts are truncated from the left to this many tokens
      "max_new_tokens": 16 if tiny else 256,
      "temperature": 1.0, "top_k": 0, "top_p": 1.0,
  })


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  tiny = preset == "tiny"
  c = lm.get_config(preset)
  for key in ("objective", "distill", "init_from", "tokenizer"):
    del c[key]
  del c["model"]  # the policy's architecture is the one of policy_from
  del c.train["grad_accum"]  # PPO splits its rollout batch with ppo.num_minibatches instead
  c.data.prompts_path = ""  # JSONL of {"prompt": ...}; "" = first Human turns of the hh-rlhf data
  c.policy_from = ""
  c.pm_dir = ""
  c.algorithm = "ppo"  # "ppo" (value model + GAE) | "rloo" | "grpo" | "dr_grpo" | "gspo" | "dapo"
  #                      (critic-free: groups of ppo.samples_per_prompt samples per prompt,
  #                      rlhf_jax.objectives.critic_free)
  c.value_from = "pm"  # "pm": a separate value network initialised from the PM; "shared": the
  #                      policy's trunk with its scalar head as the value head
  c.kl = ml_collections.ConfigDict({
      "coef": 0.001,  # lambda_KL of Bai et al. 2022
      "adaptive": False,  # Ziegler et al. 2019 controller towards `target` nats per sequence
      "target": 6.0,
      "horizon": 10000,
  })
  c.ppo = ml_collections.ConfigDict({
      "rollout_batch": 16 if tiny else 512,  # sequences per iteration
      "samples_per_prompt": 1,  # >= 2 for rloo / grpo: rollout_batch / this many prompts each time
      "num_minibatches": 2 if tiny else 8,
      "epochs": 2 if tiny else 4,
      "gamma": 1.0, "lam": 0.95,
      "clip_eps": 0.2, "value_clip_eps": 0.2,
      "clip_eps_high": 0.0,  # the ratio's upper clip; 0: clip_eps (DAPO's clip-higher: 0.28)
      "overlong_buffer": 0,  # DAPO's overlong penalty: -1 .. 0 over the last this many tokens; 0: off
      # Truncated importance sampling of the sampler's tokens: weights min(p_learner / p_sampler,
      # tis_cap) on the surrogate (any algorithm; Yao et al. 2025 use a cap of 2).
      "tis": False, "tis_cap": 2.0,
      "vf_coef": 0.5, "entropy_coef": 0.0,
      "whiten_advantages": True,
  })
  c.sampling = sampling_config(preset)
  c.lora = lora_config()  # adapters on the policy (and value model) over policy_from; the reference is the base
  c.optimizer.learning_rate = 1e-4 if tiny else 1e-6
  c.optimizer.warmup_steps = 0
  c.optimizer.final_lr_fraction = 1.0
  c.optimizer.weight_decay = 0.0
  c.train.steps = 30 if tiny else 1000  # PPO iterations
  c.train.eval_every = 10 if tiny else 50
  c.train.checkpoint_every = 10 if tiny else 50
  c.train.log_every = 1
  c.train.eval_at_start = True  # the initial policy's point (KL = 0) on the reward curves
  c.eval = ml_collections.ConfigDict({"num_prompts": 32 if tiny else 256, "seed": 1234,
                                      "pm_dirs": ()})  # extra PMs to score with, e.g. a test PM
  c.workdir = f"runs/ppo_{preset}"
  return c
