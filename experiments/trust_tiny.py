"""The trust study at the tiny sizes, CPU, offline (`make trust`, about 30 min on 2 cores): the
tiny sweep with three seeds, twice PPO's iterations, and DPO, IPO and SLiC evaluated along their
training, so that the tables carry 95% intervals, analysis/differences.md says which size and
method differences the seeds support, and the monitors can show gold reward peaking inside a run.

  python -m rlhf_jax sweep --config=experiments/trust_tiny.py

Evaluation suites are left out (they are seed-free and make run has them); best-of-N is kept.
"""
import ml_collections

from rlhf_jax.experiments.config_files import sibling_config


def get_config() -> ml_collections.ConfigDict:
  c = sibling_config(__file__, "tiny_sweep.py")
  del c["evals"], c["dr_grpo"], c["gspo"], c["dapo"]
  c.seeds = (0, 1, 2)
  c.methods = ("ppo", "rloo", "grpo", "dpo", "ipo", "slic")
  # 80 iterations (make run: 40) at the same small KL coefficient: long enough for gold reward to
  # turn over if the proxy is exploitable at this scale.
  c.rl.train = {"steps": 80, "eval_every": 10, "checkpoint_every": 20}
  critic_free = {"ppo": {"samples_per_prompt": 4}, "train": {"steps": 60, "eval_every": 10, "checkpoint_every": 20}}
  c.rloo = ml_collections.ConfigDict(critic_free)
  c.grpo = ml_collections.ConfigDict(critic_free)
  # One beta per direct-alignment loss, evaluated every 10 of its 80 steps: the gold-vs-KL curve
  # along training (Rafailov et al. 2024).
  c.dpo.betas = (0.1,)
  c.dpo.train = {"steps": 80, "batch_size": 16, "seq_len": 64, "eval_every": 10, "checkpoint_every": 40}
  # Best-of-N's KL measured (64 more samples per prompt for the reward CDF), beside its bound.
  c.bon.kl_reference = 64
  c.workdir = "runs/trust_tiny"
  return c
