"""The paper-scale sweep (Bai et al. 2022 sizes, Gao et al. 2022 gold-PM setup) for a TPU pod slice
or a GPU cluster; see launch/. Needs the full hh-rlhf download (online once).

  launch/tpu_pod.sh NAME ZONE v5p-64 -- python -m rlhf_jax sweep --config=experiments/paper_sweep.py
  sbatch --nodes=8 launch/slurm_gpu.sbatch -- python -m rlhf_jax sweep --config=experiments/paper_sweep.py

Every stage keeps the presets' defaults of configs/lm.py, pm.py and ppo.py unless overridden here;
override anything on the command line, e.g. --config.rl.train.steps=500.
"""
import ml_collections

C4 = "https://huggingface.co/datasets/allenai/c4/resolve/main"


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.setup = "gold_pm"
  c.base_preset = "13m"  # the non-tiny defaults of the stage configs
  c.sizes = ("13m", "42m", "197m", "810m")
  c.models = ml_collections.ConfigDict({name: {"preset": name} for name in c.sizes})
  # Full activation checkpointing for the two largest: on 32 chips the 810m and 2.7b PM steps then
  # need about 2 and 4 GiB a chip instead of 25 and 61 (benchmarks/scale_plan.py), so the sweep fits
  # TPU v4 / v5e slices too; on v5p or H100/H200 "none" is faster and still fits.
  c.models["810m"] = {"preset": "810m", "remat": "full"}
  c.models.gold = {"preset": "2.7b", "remat": "full"}
  c.data = ml_collections.ConfigDict({"subset": "helpful-base", "split": "train", "eval_split": "test"})
  # The LMs pretrain on a general corpus, as Bai et al.'s did, not on the dialogues: C4 English
  # (allenai/c4 on the HuggingFace hub, ODC-BY), JSON Lines gzip'd with the text in "text", the first
  # 8 of its 1024 training shards (~356k documents, ~150M tokens each; epochs repeat past them).
  # UNVERIFIED: written offline, so these URLs follow the repository's documented file layout but
  # were never downloaded here. One cache for every size: downloaded and tokenised once.
  c.lm = ml_collections.ConfigDict({"data": {
      "corpus": ",".join(f"{C4}/en/c4-train.{i:05d}-of-01024.json.gz" for i in range(8)),
      "corpus_cache_dir": "runs/corpus_cache"}})
  c.sft = ml_collections.ConfigDict({"objective": "distill", "train": {"steps": 2000}})
  c.pm = ml_collections.ConfigDict({})
  c.gold_pm = ml_collections.ConfigDict({"train": {"steps": 10000}})
  c.labels = ml_collections.ConfigDict({"num_pairs": 50000, "policy": "", "max_new_tokens": 0,
                                        "temperature": 1.0, "batch_size": 512, "seed": 0})
  c.rl = ml_collections.ConfigDict({"train": {"eval_every": 25}})
  # kl_reference: 256 more samples per prompt measure best-of-N's KL (its bound is kept beside it).
  c.bon = ml_collections.ConfigDict({"ns": (1, 2, 4, 8, 16, 32, 64, 128, 256), "num_prompts": 256, "seed": 0,
                                     "kl_reference": 256})
  c.seeds = (0, 1, 2)  # proxy PM, RL, DPO and best-of-N per seed: 95% bootstrap intervals in every table
  # Every method on one frontier: RLOO / GRPO with the rl settings and 4 samples of each of 128
  # prompts per iteration (PPO's 512 sequences); DPO, IPO and SLiC on the proxy PMs' 50k
  # gold-labelled pairs, evaluated every 100 steps (the direct-alignment humps).
  c.methods = ("ppo", "rloo", "grpo", "dpo", "ipo", "slic")
  c.rloo = ml_collections.ConfigDict({"ppo": {"samples_per_prompt": 4}})
  c.grpo = ml_collections.ConfigDict({"ppo": {"samples_per_prompt": 4}})
  c.dpo = ml_collections.ConfigDict({"betas": (0.03, 0.1, 0.3), "loss": "dpo",
                                     "train": {"steps": 1500, "eval_every": 100, "checkpoint_every": 500}})
  # Every evaluation on whole data sets (BBQ, Winogender from $RLHF_JAX_DATA_DIR/evals); add
  # MMLU, ARC, ... converted with `python -m rlhf_jax convert_mc` to mc.tasks.
  c.evals = ml_collections.ConfigDict({"suites": "bias_cloze,winogender,bbq,ood,mc,elo", "full": True,
                                       "batch_size": 64, "elo": {"bon_ns": (4, 16, 64)}})
  c.progress_bar = True
  c.workdir = "runs/sweep_paper"
  return c
