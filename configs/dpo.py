"""DPO / IPO: `--config=configs/dpo.py:PRESET` (the preset names the policy's size).

Required: --config.policy_from=RUN (the initial policy, also DPO's frozen reference),
--config.pm_dir=RUN (a PM, for evaluation only: DPO never reads it while training), and the
comparisons in `preferences` (hh-rlhf format: a file in preferences.path, or a subset/split).
The policy is evaluated as PPO's is: samples on held-out prompts of `data` (the `sampling`
section, the same as PPO's), KL against policy_from, every PM's score.
"""
import ml_collections

from configs import pm, ppo


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  tiny = preset == "tiny"
  c = ppo.get_config(preset)
  for key in ("algorithm", "value_from", "kl", "ppo"):
    del c[key]  # c.sampling stays: how the policy is sampled for its evaluation
  c.preferences = pm.get_config(preset).data  # the comparisons (what a proxy PM would see)
  c.dpo = ml_collections.ConfigDict({
      "beta": 0.1,  # strength of the implicit KL constraint (Rafailov et al. 2023)
      "loss": "dpo",  # "dpo" | "ipo" (Azar et al. 2023: squared loss towards 1 / (2 beta)) | "slic" (hinge)
  })
  c.train.steps = 60 if tiny else 2000
  c.train.batch_size = 16 if tiny else 64  # comparisons per update
  c.train.seq_len = 128 if tiny else 1024
  c.optimizer.learning_rate = 3e-4 if tiny else 5e-7
  c.workdir = f"runs/dpo_{preset}"
  return c
