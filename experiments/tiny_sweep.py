"""The tiny scaling sweep the README's first command runs: three sizes and a gold PM, CPU, offline.

  python -m rlhf_jax sweep --config=experiments/tiny_sweep.py [--config.setup=halves]

Sizes are ModelConfig fields over the `tiny` preset (vocabulary 1024, one shared tokenizer). The
sections lm / sft / pm / gold_pm / rl override configs/lm.py, configs/pm.py and configs/ppo.py.
"""
import ml_collections


def _size(d_model: int, layers: int, heads: int, kv_heads: int) -> dict:
  return {"d_model": d_model, "num_layers": layers, "num_heads": heads, "num_kv_heads": kv_heads,
          "head_dim": 16, "mlp_dim": 3 * d_model}


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.setup = "gold_pm"  # or "halves": train PMs / test PM on disjoint halves of the human data
  c.base_preset = "tiny"
  c.sizes = ("xs", "s", "m")
  c.models = ml_collections.ConfigDict({
      "xs": _size(32, 1, 2, 1),
      "s": _size(48, 2, 3, 1),
      "m": _size(64, 2, 4, 2),
      "gold": _size(96, 3, 6, 2),
  })
  c.data = ml_collections.ConfigDict({"subset": "harmless-base", "split": "test"})
  # Sequences of 64 tokens hold the PPO samples (32 prompt + 16 response tokens) with room to spare.
  train = lambda steps: {"steps": steps, "seq_len": 64, "eval_every": steps, "checkpoint_every": 50}
  c.lm = ml_collections.ConfigDict({"train": train(200)})
  # The initial policies: SFT on the Assistant turns ("distill" for context distillation, "" to
  # start PPO from the pretrained LM).
  c.sft = ml_collections.ConfigDict({"objective": "sft", "train": train(100),
                                     "optimizer": {"learning_rate": 1e-3}})
  c.pm = ml_collections.ConfigDict({"train": train(120)})
  c.gold_pm = ml_collections.ConfigDict({"train": train(200)})
  c.labels = ml_collections.ConfigDict({
      "num_pairs": 1024,  # per size, from that size's initial policy on the training prompts
      "policy": "",  # "" = each size's own initial policy; or one size's name for all
      "max_new_tokens": 0,  # 0 = rl.sampling.max_new_tokens
      "temperature": 1.0,
      "batch_size": 256,
      "seed": 0,
  })
  c.rl = ml_collections.ConfigDict({
      "train": {"steps": 40, "eval_every": 5, "checkpoint_every": 10},
      "ppo": {"rollout_batch": 32, "num_minibatches": 2, "epochs": 2},
      "kl": {"coef": 0.001},
      "eval": {"num_prompts": 64},
  })
  # Every RL method on the same frontier (rlhf_jax.analysis.methods). RLOO and GRPO take the rl
  # settings with 4 samples of each of 8 prompts per iteration (the same 32 sequences as PPO)
  # and no value model, for 30 iterations instead of 40 (make run's time); DPO trains on the
  # proxy PM's comparisons, one run per beta.
  # Dr. GRPO, GSPO and DAPO with their papers' clipping: GSPO clips the sequence's geometric-mean
  # ratio to [1 - 3e-4, 1 + 4e-4], DAPO raises the upper clip to 0.28 and penalises the last
  # 4 of the 16 response tokens (its overlong buffer).
  c.methods = ("ppo", "rloo", "grpo", "dr_grpo", "gspo", "dapo", "dpo")
  critic_free = {"ppo": {"samples_per_prompt": 4}, "train": {"steps": 30, "checkpoint_every": 10}}
  c.rloo = ml_collections.ConfigDict(critic_free)
  c.grpo = ml_collections.ConfigDict(critic_free)
  c.dr_grpo = ml_collections.ConfigDict(critic_free)
  c.gspo = ml_collections.ConfigDict({**critic_free, "ppo": {"samples_per_prompt": 4, "clip_eps": 3e-4,
                                                             "clip_eps_high": 4e-4}})
  c.dapo = ml_collections.ConfigDict({**critic_free, "ppo": {"samples_per_prompt": 4, "clip_eps_high": 0.28,
                                                             "overlong_buffer": 4}})
  c.dpo = ml_collections.ConfigDict({
      "betas": (0.1, 0.5),
      "loss": "dpo",  # or "ipo"
      "train": {"steps": 40, "batch_size": 16, "seq_len": 64, "eval_every": 10, "checkpoint_every": 40},
      "optimizer": {"learning_rate": 3e-4},
  })
  # Seeds of the stages whose randomness matters (proxy PMs, RL, DPO, best-of-N): one here, for
  # make run's time, so its tables carry no intervals; (0, 1, 2) gives 95% bootstrap intervals.
  c.seeds = (0,)
  c.bon = ml_collections.ConfigDict({"ns": (1, 2, 4, 8, 16, 32), "num_prompts": 64, "seed": 0})
  # Evaluations of each size's initial and final RLHF policy (rlhf_jax.evals; every setting is in
  # configs/evaluate.py): small subsets of the bundled data; "full": True for whole data sets.
  c.evals = ml_collections.ConfigDict({"suites": "bias_cloze,winogender,bbq,ood,mc,elo", "batch_size": 64})
  c.progress_bar = True
  c.workdir = "runs/sweep_tiny"
  return c
