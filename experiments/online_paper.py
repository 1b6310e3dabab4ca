"""Iterated online RLHF on a pod: the paper sweep's models (13M ... 810M, a 2.7B gold PM) and
data, five rounds of 20k gold-PM-labelled comparisons per arm, three seeds.

  launch/tpu_pod.sh NAME ZONE TYPE -- python -m rlhf_jax online --config=experiments/online_paper.py
"""
import ml_collections

from rlhf_jax.experiments.config_files import sibling_config


def get_config() -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "paper_sweep.py")
  del c["bon"], c["evals"]
  c.online = ml_collections.ConfigDict({"rounds": 5, "pairs_per_round": 20000, "agreement": 0.7,
                                        "mix_earlier": 0.2, "seeds": (0, 1, 2), "eval_pairs": 512,
                                        "elo_prompts": 512})
  c.workdir = "runs/online_paper"
  return c
