"""Iterated online RLHF at the tiny sizes, CPU, offline (`python -m rlhf_jax online
--config=experiments/online_tiny.py`): the tiny sweep's models and gold PM, three rounds of 256
gold-PM-labelled comparisons per arm (online vs static), shorter PM and PPO runs per round.
"""
import ml_collections

from rlhf_jax.experiments.config_files import sibling_config


def get_config() -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "tiny_sweep.py")
  del c["bon"], c["evals"]  # not part of the online experiment
  c.sizes = ("xs", "s")
  train = lambda steps: {"steps": steps, "seq_len": 64, "eval_every": steps, "checkpoint_every": 50}
  c.pm = ml_collections.ConfigDict({"train": train(80)})
  c.rl.train = {"steps": 20, "eval_every": 20, "checkpoint_every": 10}
  c.online = ml_collections.ConfigDict({"rounds": 3, "pairs_per_round": 256, "agreement": 0.7, "seeds": (0,)})
  c.workdir = "runs/online_tiny"
  return c
